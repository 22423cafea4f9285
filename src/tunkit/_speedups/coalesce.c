/*
 * coalesce.c: coalesce, a batch of IP packets into kernel writes, the TCP and
 * UDP packets of a flow merged into GSO super-packets. The C twin of
 * Coalescer.coalesce in tunkit/_offload/coalesce.py.
 */

#include "tunkit.h"

/* coalesce.py's _SLOT_LEN: scratch room per super-packet, the virtio header
 * + an IPv4 (no options) or IPv6 header + the longest TCP header. */
#define SLOT_LEN (VNET_HDR_LEN + IP6_HDR_LEN + TCP_MAX_HDR_LEN)
/* _MAX_UDP_SEGMENTS: UDP_MAX_SEGMENTS of <net/udp.h> (64 before Linux 6.9);
 * virtio_net_hdr_to_skb refuses a USO packet of more datagrams. */
#define MAX_UDP_SEGMENTS 64
/* _MAX_TCP_SEGMENTS: IOV_MAX is 1024, two pieces of header, then one per packet. */
#define MAX_TCP_SEGMENTS (1024 - 2)
/* _TCP_NEVER: the flags that never merge; _IP4_FRAGMENT: MF and the offset. */
#define TCP_NEVER (TCP_FLAG_SYN | TCP_FLAG_RST | TCP_FLAG_URG)
#define IP4_FRAGMENT (IP4_FLAG_MF | IP4_FRAG_OFFSET_MASK)

/* Room for a batch of up to cap packets: 0, or -1 (out of memory; free it
 * all the same). PyMem_*: the GIL must be held. */
int
batch_alloc(batch_t *b, Py_ssize_t cap)
{
    size_t table = 16;
    while (table < (size_t)cap * 2) {
        table <<= 1;
    }
    b->cap = cap;
    b->table_len = table;
    b->pk = PyMem_Calloc((size_t)cap + 1, sizeof(pkt_t));
    b->groups = PyMem_Calloc((size_t)cap + 1, sizeof(group_t));
    b->flows = PyMem_Calloc((size_t)cap + 1, sizeof(flow_t));
    b->entries = PyMem_Calloc((size_t)cap + 1, sizeof(int32_t));
    b->table = PyMem_Malloc(table * sizeof(int32_t));
    return b->pk && b->groups && b->flows && b->entries && b->table ? 0 : -1;
}

/* Empty the batch for n <= cap packets (their p and n set next); no GIL
 * needed. The flow table in use is sized for n, so that a batch much smaller
 * than the room costs no more to reset than it needs. */
void
batch_reset(batch_t *b, Py_ssize_t n)
{
    size_t table = 16;
    while (table < (size_t)n * 2 && table < b->table_len) {
        table <<= 1;
    }
    b->n = n;
    b->mask = table - 1;
    b->n_groups = b->n_flows = b->n_entries = 0;
    memset(b->table, 0xFF, table * sizeof(int32_t)); /* all -1 */
}

void
batch_free(batch_t *b)
{
    PyMem_Free(b->pk);
    PyMem_Free(b->groups);
    PyMem_Free(b->flows);
    PyMem_Free(b->entries);
    PyMem_Free(b->table);
    memset(b, 0, sizeof *b);
}

/* coalesce.Coalescer._parse */
static void
parse_pkt(pkt_t *k, int tcp, int udp, flowkey_t *key)
{
    const uint8_t *p = k->p;
    Py_ssize_t n = k->n;
    k->kind = K_NONE;
    if (n < IP4_MIN_HDR_LEN) {
        return;
    }
    int version = p[IP4_VER_IHL] >> 4;
    Py_ssize_t iph_len;
    int mergeable;
    memset(key, 0, sizeof *key);
    if (version == 4) {
        iph_len = (p[IP4_VER_IHL] & 0x0F) * 4;
        if (iph_len < IP4_MIN_HDR_LEN) {
            return;
        }
        uint16_t frag = get16(p + IP4_FLAGS_FRAG);
        k->is_v6 = 0;
        k->df = (frag & IP4_FLAG_DF) != 0;
        k->ip_id = get16(p + IP4_ID);
        k->proto = p[IP4_PROTOCOL];
        mergeable =
            iph_len == IP4_MIN_HDR_LEN && get16(p + IP4_TOTAL_LEN) == n && !(frag & IP4_FRAGMENT);
        memcpy(key->addrs, p + IP4_SRC, IP4_ADDRS_LEN);
    }
    else if (version == 6) {
        if (n < IP6_HDR_LEN) {
            return;
        }
        iph_len = IP6_HDR_LEN;
        k->is_v6 = 1;
        k->df = 1;
        k->ip_id = 0;
        k->proto = p[IP6_NEXT_HEADER];
        mergeable = get16(p + IP6_PAYLOAD_LEN) == n - IP6_HDR_LEN;
        memcpy(key->addrs, p + IP6_SRC, IP6_ADDRS_LEN);
    }
    else {
        return;
    }
    Py_ssize_t l4_min;
    if (k->proto == IPPROTO_TCP) {
        if (!tcp) {
            return;
        }
        l4_min = TCP_MIN_HDR_LEN;
    }
    else if (k->proto == IPPROTO_UDP) {
        if (!udp) {
            return;
        }
        l4_min = UDP_HDR_LEN;
    }
    else {
        return;
    }
    if (n < iph_len + l4_min) {
        if (n < iph_len + L4_PORTS_LEN) {
            return;
        }
        mergeable = 0; /* _key_only: it closes its flow, nothing more */
    }
    key->proto = k->proto;
    key->is_v6 = k->is_v6;
    memcpy(key->ports, p + iph_len + TCP_SRC_PORT, L4_PORTS_LEN);
    k->kind = K_KEY;
    k->iph_len = (uint16_t)iph_len;
    if (!mergeable) {
        return;
    }
    const uint8_t *l4 = p + iph_len;
    if (k->proto == IPPROTO_TCP) {
        Py_ssize_t tcph_len = (l4[TCP_DATA_OFFSET] >> 4) * 4;
        Py_ssize_t hdr_len = iph_len + tcph_len;
        k->flags = l4[TCP_FLAGS];
        if (tcph_len < TCP_MIN_HDR_LEN || n <= hdr_len || (k->flags & TCP_NEVER)) {
            return;
        }
        k->hdr_len = (uint16_t)hdr_len;
        k->seq = get32(l4 + TCP_SEQ);
    }
    else {
        Py_ssize_t hdr_len = iph_len + UDP_HDR_LEN;
        /* A zero checksum means "none" (IPv4) or is invalid (IPv6). */
        if (get16(l4 + UDP_LEN) != n - iph_len || n <= hdr_len || get16(l4 + UDP_CHECKSUM) == 0) {
            return;
        }
        k->hdr_len = (uint16_t)hdr_len;
        k->seq = 0;
        k->flags = 0;
    }
    k->payload_len = n - k->hdr_len;
    k->kind = K_CAND;
}

/* p[at:end] == q[at:end]: the fields of two headers from offset at up to end. */
static inline int
same_fields(const uint8_t *p, const uint8_t *q, size_t at, size_t end)
{
    return memcmp(p + at, q + at, end - at) == 0;
}

/* The sig of coalesce._Candidate: fields equal all along the flow. */
static int
same_sig(const pkt_t *a, const pkt_t *b)
{
    const uint8_t *p = a->p, *q = b->p;
    if (a->is_v6) {
        /* version, traffic class and flow label; hop limit */
        if (!same_fields(p, q, IP6_VER_TC_FLOW, IP6_PAYLOAD_LEN) ||
            p[IP6_HOP_LIMIT] != q[IP6_HOP_LIMIT]) {
            return 0;
        }
    }
    else if (p[IP4_TOS] != q[IP4_TOS] || !same_fields(p, q, IP4_FLAGS_FRAG, IP4_PROTOCOL)) {
        return 0; /* TOS; flags/fragment and TTL */
    }
    if (a->proto != IPPROTO_TCP) {
        return 1;
    }
    const uint8_t *s = p + a->iph_len, *t = q + b->iph_len;
    return same_fields(s, t, TCP_ACK, TCP_FLAGS) /* ack, data offset */
           && (s[TCP_FLAGS] & ~(TCP_LAST_ONLY | TCP_FIRST_ONLY)) ==
                  (t[TCP_FLAGS] & ~(TCP_LAST_ONLY | TCP_FIRST_ONLY))
           && same_fields(s, t, TCP_WINDOW, TCP_CHECKSUM)      /* window */
           && same_fields(s, t, TCP_URGENT, TCP_MIN_HDR_LEN)   /* urgent pointer */
           && memcmp(s + TCP_MIN_HDR_LEN, t + TCP_MIN_HDR_LEN, /* options */
                     (size_t)(a->hdr_len - a->iph_len - TCP_MIN_HDR_LEN)) == 0;
}

/* coalesce._Group.accepts */
static int
accepts(group_t *g, const pkt_t *head, const pkt_t *c)
{
    if (!same_sig(c, head) || c->payload_len > g->gso_size) {
        return 0;
    }
    if (c->flags & TCP_FIRST_ONLY) {
        return 0;
    }
    if (g->total_len + c->payload_len > IP_MAX_PACKET_LEN) {
        return 0;
    }
    if (g->count >= g->max_segments) {
        return 0;
    }
    if (c->proto == IPPROTO_TCP && c->seq != g->next_seq) {
        return 0;
    }
    if (!c->is_v6) {
        uint16_t counted = (uint16_t)(g->first_id + g->count);
        if (g->id_step < 0) {
            if (c->ip_id == counted) {
                g->id_step = 1;
            }
            else if (c->df && c->ip_id == g->first_id) {
                g->id_step = 0;
            }
            else {
                return 0;
            }
        }
        else if (c->ip_id != (g->id_step ? counted : g->first_id)) {
            return 0;
        }
    }
    return 1;
}

/* coalesce._valid: the IPv4 header and transport checksums verify. */
static int
valid(const pkt_t *k)
{
    const uint8_t *p = k->p;
    uint32_t addrs;
    if (k->is_v6) {
        addrs = be_sum(p + IP6_SRC, IP6_ADDRS_LEN);
    }
    else {
        if (ones_sum_raw(p, k->iph_len, 0) != 0xFFFF) {
            return 0;
        }
        addrs = be_sum(p + IP4_SRC, IP4_ADDRS_LEN);
    }
    uint64_t l4_len = (uint64_t)(k->n - k->iph_len);
    return ones_sum_raw(p + k->iph_len, (size_t)l4_len, (uint64_t)addrs + k->proto + l4_len) ==
           0xFFFF;
}

static int32_t
find_flow(batch_t *b, const flowkey_t *key)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    const uint8_t *kb = (const uint8_t *)key;
    for (size_t i = 0; i < sizeof *key; i++) {
        h = (h ^ kb[i]) * 1099511628211ULL;
    }
    size_t slot = (size_t)(h ^ (h >> 29)) & b->mask;
    for (;;) {
        int32_t f = b->table[slot];
        if (f < 0) {
            f = (int32_t)b->n_flows++;
            b->flows[f].key = *key;
            b->flows[f].open = -1;
            b->table[slot] = f;
            return f;
        }
        if (memcmp(&b->flows[f].key, key, sizeof *key) == 0) {
            return f;
        }
        slot = (slot + 1) & b->mask;
    }
}

/* The loop of Coalescer.coalesce, without the Python objects. */
void
plan_batch(batch_t *b)
{
    for (Py_ssize_t i = 0; i < b->n; i++) {
        pkt_t *k = &b->pk[i];
        flowkey_t key;
        k->next = -1;
        parse_pkt(k, b->tcp, b->udp, &key);
        if (k->kind == K_NONE) {
            b->entries[b->n_entries++] = ~(int32_t)i;
            continue;
        }
        flow_t *flow = &b->flows[find_flow(b, &key)];
        if (k->kind == K_KEY) {
            /* Same flow, but it cannot merge: it closes the open super-packet. */
            flow->open = -1;
            b->entries[b->n_entries++] = ~(int32_t)i;
            continue;
        }
        if (flow->open >= 0) {
            group_t *g = &b->groups[flow->open];
            const pkt_t *head = &b->pk[g->head];
            if (accepts(g, head, k)) {
                if (!g->validated) {
                    g->validated = (uint8_t)valid(head);
                }
                if (g->validated) { /* else the head stays alone; k starts anew */
                    if (!valid(k)) {
                        flow->open = -1;
                        b->entries[b->n_entries++] = ~(int32_t)i;
                        continue;
                    }
                    b->pk[g->last].next = (int32_t)i;
                    g->last = (int32_t)i;
                    g->count++;
                    g->total_len += k->payload_len;
                    g->next_seq += (uint32_t)k->payload_len;
                    g->last_flags = k->flags;
                    if (k->payload_len < g->gso_size || (k->flags & TCP_LAST_ONLY)) {
                        g->closed = 1;
                        flow->open = -1;
                    }
                    continue;
                }
            }
        }
        if (k->flags & TCP_LAST_ONLY) {
            /* A first packet with PSH or FIN ends its super-packet at once. */
            flow->open = -1;
            b->entries[b->n_entries++] = ~(int32_t)i;
            continue;
        }
        int32_t gi = (int32_t)b->n_groups++;
        group_t *g = &b->groups[gi];
        g->head = g->last = (int32_t)i;
        g->count = 1;
        g->gso_size = k->payload_len;
        g->total_len = k->n;
        g->next_seq = k->seq + (uint32_t)k->payload_len;
        g->first_id = k->ip_id;
        g->id_step = -1;
        g->last_flags = k->flags;
        g->max_segments = k->proto == IPPROTO_UDP ? MAX_UDP_SEGMENTS : MAX_TCP_SEGMENTS;
        g->closed = 0;
        g->validated = 0;
        flow->open = gi;
        b->entries[b->n_entries++] = gi;
    }
}

/* coalesce._patch: the virtio header and the patched headers of a group. */
void
patch_group(const batch_t *b, const group_t *g, uint8_t *slot)
{
    const pkt_t *head = &b->pk[g->head];
    Py_ssize_t iph_len = head->iph_len, hdr_len = head->hdr_len;
    uint8_t *vnet = slot, *hdrs = slot + VNET_HDR_LEN;
    memcpy(hdrs, head->p, (size_t)hdr_len);
    uint32_t total_len = (uint32_t)g->total_len;
    uint32_t l4_len = total_len - (uint32_t)iph_len;
    uint32_t addrs;
    if (head->is_v6) {
        put16(hdrs + IP6_PAYLOAD_LEN, l4_len);
        addrs = be_sum(head->p + IP6_SRC, IP6_ADDRS_LEN);
    }
    else {
        /* The head's header checksum was verified: update it (RFC 1624). */
        put16(hdrs + IP4_TOTAL_LEN, total_len);
        put16(hdrs + IP4_CHECKSUM,
              update16_raw(get16(head->p + IP4_CHECKSUM), (uint32_t)head->n, total_len));
        addrs = be_sum(head->p + IP4_SRC, IP4_ADDRS_LEN);
    }
    /* CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum. */
    uint32_t partial = fold64((uint64_t)addrs + head->proto + l4_len);
    uint8_t gso_type;
    uint16_t csum_offset;
    if (head->proto == IPPROTO_TCP) {
        uint8_t flags = head->flags | (g->last_flags & TCP_LAST_ONLY);
        hdrs[iph_len + TCP_FLAGS] = flags;
        put16(hdrs + iph_len + TCP_CHECKSUM, partial);
        gso_type = head->is_v6 ? VIRTIO_NET_HDR_GSO_TCPV6 : VIRTIO_NET_HDR_GSO_TCPV4;
        if (flags & TCP_FLAG_CWR) {
            gso_type |= VIRTIO_NET_HDR_GSO_ECN;
        }
        csum_offset = TCP_CHECKSUM;
    }
    else {
        put16(hdrs + iph_len + UDP_LEN, l4_len);
        put16(hdrs + iph_len + UDP_CHECKSUM, partial);
        gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
        csum_offset = UDP_CHECKSUM;
    }
    vnet[VNET_FLAGS] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vnet[VNET_GSO_TYPE] = gso_type;
    put_host16(vnet + VNET_HDR_LEN_FIELD, (uint16_t)hdr_len);
    put_host16(vnet + VNET_GSO_SIZE, (uint16_t)g->gso_size);
    put_host16(vnet + VNET_CSUM_START, (uint16_t)iph_len);
    put_host16(vnet + VNET_CSUM_OFFSET, csum_offset);
}

/* A Write (a NamedTuple: a tuple subclass without slots) built as
 * tuple.__new__ would, without calling the class's Python __new__. */
static PyObject *
new_write(state_t *st, PyObject *iov, PyObject *packets, Py_ssize_t first, int gso,
          PyObject *indices)
{
    PyTypeObject *tp = (PyTypeObject *)st->write_cls;
    PyObject *first_o = PyLong_FromSsize_t(first);
    PyObject *w = first_o ? tp->tp_alloc(tp, WRITE_FIELDS) : NULL;
    if (w == NULL) {
        Py_XDECREF(first_o);
        Py_DECREF(indices);
        Py_DECREF(iov);
        Py_DECREF(packets);
        return NULL;
    }
    PyObject *gso_o = gso ? Py_True : Py_False;
    Py_INCREF(gso_o);
    PyTuple_SET_ITEM(w, 0, iov);
    PyTuple_SET_ITEM(w, 1, packets);
    PyTuple_SET_ITEM(w, 2, first_o);
    PyTuple_SET_ITEM(w, 3, gso_o);
    PyTuple_SET_ITEM(w, 4, indices);
    return w;
}

/* A byte view of buf from offset on, as coalesce() slices it. */
static PyObject *
packet_view(PyObject *buf, PyObject *offset_slice)
{
    PyObject *view;
    if (PyMemoryView_Check(buf)) {
        view = buf;
        Py_INCREF(view);
    }
    else {
        view = PyMemoryView_FromObject(buf);
        if (view == NULL) {
            return NULL;
        }
    }
    Py_buffer *vb = PyMemoryView_GET_BUFFER(view);
    if (vb->ndim != 1 || vb->format == NULL || strcmp(vb->format, "B") != 0) {
        PyObject *cast = PyObject_CallMethod(view, "cast", "s", "B");
        Py_DECREF(view);
        if (cast == NULL) {
            return NULL;
        }
        view = cast;
    }
    PyObject *pkt = PyObject_GetItem(view, offset_slice);
    Py_DECREF(view);
    if (pkt == NULL) {
        return NULL;
    }
    if (!PyBuffer_IsContiguous(PyMemoryView_GET_BUFFER(pkt), 'C')) {
        Py_DECREF(pkt);
        PyErr_SetString(PyExc_BufferError, "coalesce: packets must be contiguous buffers");
        return NULL;
    }
    return pkt;
}

static PyObject *
slice_from(Py_ssize_t start)
{
    PyObject *s = PyLong_FromSsize_t(start);
    if (s == NULL) {
        return NULL;
    }
    PyObject *slice = PySlice_New(s, Py_None, Py_None);
    Py_DECREF(s);
    return slice;
}

/* The writes of the planned batch (Coalescer._writes). */
static PyObject *
build_writes(state_t *st, batch_t *b, PyObject **views)
{
    Py_ssize_t n_gso = 0;
    for (Py_ssize_t e = 0; e < b->n_entries; e++) {
        if (b->entries[e] >= 0 && b->groups[b->entries[e]].count > 1) {
            n_gso++;
        }
    }
    PyObject *writes = PyList_New(b->n_entries);
    PyObject *scratch = NULL, *scratch_view = NULL;
    if (writes == NULL) {
        goto fail;
    }
    if (n_gso > 0) {
        /* A new buffer per call: views handed out earlier stay valid. */
        scratch = PyByteArray_FromStringAndSize(NULL, n_gso * SLOT_LEN);
        if (scratch == NULL) {
            goto fail;
        }
        memset(PyByteArray_AS_STRING(scratch), 0, (size_t)(n_gso * SLOT_LEN));
        scratch_view = PyMemoryView_FromObject(scratch);
        if (scratch_view == NULL) {
            goto fail;
        }
    }
    Py_ssize_t slot = 0;
    for (Py_ssize_t e = 0; e < b->n_entries; e++) {
        int32_t entry = b->entries[e];
        PyObject *iov, *packets, *indices;
        Py_ssize_t first;
        int gso = 0;
        if (entry < 0 || b->groups[entry].count == 1) {
            first = entry < 0 ? ~entry : b->groups[entry].head;
            PyObject *pkt = views[first];
            iov = PyList_New(2);
            packets = PyList_New(1);
            indices = Py_BuildValue("(n)", first);
            if (iov == NULL || packets == NULL || indices == NULL) {
                Py_XDECREF(iov);
                Py_XDECREF(packets);
                Py_XDECREF(indices);
                goto fail;
            }
            Py_INCREF(st->zero_hdr);
            PyList_SET_ITEM(iov, 0, st->zero_hdr);
            Py_INCREF(pkt);
            PyList_SET_ITEM(iov, 1, pkt);
            Py_INCREF(pkt);
            PyList_SET_ITEM(packets, 0, pkt);
        }
        else {
            const group_t *g = &b->groups[entry];
            const pkt_t *head = &b->pk[g->head];
            first = g->head;
            gso = 1;
            uint8_t *slot_mem = (uint8_t *)PyByteArray_AS_STRING(scratch) + slot * SLOT_LEN;
            patch_group(b, g, slot_mem);
            iov = PyList_New(2 + g->count);
            packets = PyList_New(g->count);
            indices = PyTuple_New(g->count);
            PyObject *payload_slice = slice_from(head->hdr_len);
            PyObject *vnet = NULL, *hdrs = NULL;
            if (iov && packets && indices && payload_slice) {
                vnet = PySequence_GetSlice(scratch_view, slot * SLOT_LEN,
                                           slot * SLOT_LEN + VNET_HDR_LEN);
                hdrs = vnet ? PySequence_GetSlice(scratch_view, slot * SLOT_LEN + VNET_HDR_LEN,
                                                  slot * SLOT_LEN + VNET_HDR_LEN + head->hdr_len)
                            : NULL;
            }
            if (hdrs == NULL) {
                Py_XDECREF(vnet);
                Py_XDECREF(payload_slice);
                Py_XDECREF(iov);
                Py_XDECREF(packets);
                Py_XDECREF(indices);
                goto fail;
            }
            slot++;
            PyList_SET_ITEM(iov, 0, vnet);
            PyList_SET_ITEM(iov, 1, hdrs);
            Py_ssize_t j = 0;
            for (int32_t i = g->head; i >= 0; i = b->pk[i].next, j++) {
                PyObject *payload = PyObject_GetItem(views[i], payload_slice);
                PyObject *index = payload ? PyLong_FromLong(i) : NULL;
                if (index == NULL) {
                    Py_XDECREF(payload);
                    Py_DECREF(payload_slice);
                    Py_DECREF(iov); /* the unset items are NULL: safe */
                    Py_DECREF(packets);
                    Py_DECREF(indices);
                    goto fail;
                }
                PyList_SET_ITEM(iov, 2 + j, payload);
                Py_INCREF(views[i]);
                PyList_SET_ITEM(packets, j, views[i]);
                PyTuple_SET_ITEM(indices, j, index);
            }
            Py_DECREF(payload_slice);
        }
        PyObject *w = new_write(st, iov, packets, first, gso, indices);
        if (w == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(writes, e, w);
    }
    Py_XDECREF(scratch_view);
    Py_XDECREF(scratch);
    return writes;
fail:
    Py_XDECREF(scratch_view);
    Py_XDECREF(scratch);
    Py_XDECREF(writes);
    return NULL;
}

const char coalesce_doc[] = PyDoc_STR(
"coalesce(bufs, offset, tcp, udp)\n--\n\n"
"Plan the kernel writes that send bufs[i][offset:] for every i.\n\n"
"The C twin of tunkit._offload.coalesce.Coalescer.coalesce: the same writes\n"
"(Write tuples of memoryviews); the patched headers live in a bytearray\n"
"made for each call.");

PyObject *
py_coalesce(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"bufs", "offset", "tcp", "udp"};
    PyObject *a[4];
    if (parse_args("coalesce", args, nargs, kwnames, names, 4, 4, a) < 0) {
        return NULL;
    }
    state_t *st = get_state(module);
    if (st == NULL) {
        return NULL;
    }
    batch_t b;
    memset(&b, 0, sizeof b);
    b.tcp = PyObject_IsTrue(a[2]);
    b.udp = PyObject_IsTrue(a[3]);
    if (b.tcp < 0 || b.udp < 0) {
        return NULL;
    }
    PyObject *offset_slice = PySlice_New(a[1], Py_None, Py_None);
    if (offset_slice == NULL) {
        return NULL;
    }
    /* A tuple of its own: getting a buffer may run Python code (a __buffer__
     * method, a cast) that could shrink a list under a borrowed item. */
    PyObject *seq = PySequence_Check(a[0]) ? PySequence_Tuple(a[0]) : NULL;
    if (seq == NULL) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_SetString(PyExc_TypeError, "coalesce() needs a sequence of buffers");
        }
        Py_DECREF(offset_slice);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > INT32_MAX / 4) {
        Py_DECREF(seq);
        Py_DECREF(offset_slice);
        PyErr_SetString(PyExc_OverflowError, "coalesce: batch too large");
        return NULL;
    }
    PyObject *result = NULL;
    PyObject **views = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    if (!views || batch_alloc(&b, n) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    batch_reset(&b, n);
    Py_ssize_t total = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        views[i] = packet_view(items[i], offset_slice);
        if (views[i] == NULL) {
            goto done;
        }
        Py_buffer *vb = PyMemoryView_GET_BUFFER(views[i]);
        b.pk[i].p = vb->buf;
        b.pk[i].n = vb->len;
        total += vb->len;
    }
    /* The memoryviews hold exports of the caller's buffers: none can be
     * resized or freed while the GIL is released. */
    if (total >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        plan_batch(&b);
        Py_END_ALLOW_THREADS
    }
    else {
        plan_batch(&b);
    }
    result = build_writes(st, &b, views);
done:
    if (views != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_XDECREF(views[i]);
        }
    }
    PyMem_Free(views);
    batch_free(&b);
    Py_DECREF(seq);
    Py_DECREF(offset_slice);
    return result;
}

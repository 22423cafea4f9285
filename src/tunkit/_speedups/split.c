/*
 * split.c: split, one kernel read (virtio-net header, then a packet or a
 * GSO super-packet) into finished IP packets. The C twin of
 * tunkit/_offload/split.py.
 */

#include "tunkit.h"

/* Python's view[offset:] start for a sequence of length len. */
static inline Py_ssize_t
slice_start(Py_ssize_t len, Py_ssize_t offset)
{
    if (offset < 0) {
        offset += len;
        return offset < 0 ? 0 : offset;
    }
    return offset > len ? len : offset;
}

/* Acquire byte views of out_bufs[0..count): the room of each from offset on. */
static int
get_outs(PyObject *out_bufs, Py_ssize_t count, Py_ssize_t offset, Py_buffer *views,
         Py_ssize_t *starts, Py_ssize_t *got)
{
    *got = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_GetItem(out_bufs, i);
        if (item == NULL) {
            return -1;
        }
        int r = PyObject_GetBuffer(item, &views[i], PyBUF_SIMPLE);
        Py_DECREF(item);
        if (r < 0) {
            return -1;
        }
        *got = i + 1;
        starts[i] = slice_start(views[i].len, offset);
    }
    return 0;
}

static void
release_views(Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyBuffer_Release(&views[i]);
    }
}

static int
check_writable(Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (views[i].readonly) {
            PyErr_SetString(PyExc_TypeError, "cannot modify read-only memory");
            return -1;
        }
    }
    return 0;
}

static int
store_sizes(PyObject *sizes, const Py_ssize_t *lens, Py_ssize_t count)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *v = PyLong_FromSsize_t(lens[i]);
        if (v == NULL) {
            return -1;
        }
        int r = PySequence_SetItem(sizes, i, v);
        Py_DECREF(v);
        if (r < 0) {
            return -1;
        }
    }
    return 0;
}

typedef struct {
    uint8_t flags, gso_type;
    uint16_t hdr_len, gso_size, csum_start, csum_offset;
} vnet_t;

/* split._copy_through: a GSO_NONE packet, its partial checksum completed. */
static PyObject *
copy_through(state_t *st, const vnet_t *h, const uint8_t *ip, Py_ssize_t ip_len,
             PyObject *out_bufs, PyObject *sizes, Py_ssize_t offset)
{
    if (ip_len == 0) {
        PyErr_SetString(st->malformed, "empty packet after the virtio header");
        return NULL;
    }
    int has_bufs = PyObject_IsTrue(out_bufs);
    if (has_bufs < 0) {
        return NULL;
    }
    int has_sizes = has_bufs ? PyObject_IsTrue(sizes) : 0;
    if (has_sizes < 0) {
        return NULL;
    }
    if (!has_bufs || !has_sizes) {
        PyErr_SetString(st->too_many, "a packet needs 1 buffer, 0 given");
        return NULL;
    }
    Py_buffer view;
    Py_ssize_t start, got;
    if (get_outs(out_bufs, 1, offset, &view, &start, &got) < 0) {
        release_views(&view, got);
        return NULL;
    }
    Py_ssize_t room = view.len - start;
    PyObject *result = NULL;
    if (ip_len > room) {
        PyErr_Format(st->too_big, "packet of %zd bytes does not fit a buffer of %zd bytes",
                     ip_len, room);
        goto done;
    }
    Py_ssize_t cs = h->csum_start, at = (Py_ssize_t)h->csum_start + h->csum_offset;
    int needs_csum = h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM;
    if (needs_csum && (cs >= ip_len || at + CSUM_FIELD_LEN > ip_len)) {
        PyErr_Format(st->malformed,
                     "csum_start %zd + csum_offset %d is beyond the packet of %zd bytes", cs,
                     (int)h->csum_offset, ip_len);
        goto done;
    }
    if (check_writable(&view, 1) < 0) {
        goto done;
    }
    uint8_t *out = (uint8_t *)view.buf + start;
    /* memmove: the caller may hand a buffer that overlaps the read. */
    if (ip_len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        memmove(out, ip, (size_t)ip_len);
        if (needs_csum) {
            uint32_t value = ~ones_sum_raw(out + cs, (size_t)(ip_len - cs), 0) & 0xFFFF;
            put16(out + at, value ? value : 0xFFFF);
        }
        Py_END_ALLOW_THREADS
    }
    else {
        memmove(out, ip, (size_t)ip_len);
        if (needs_csum) {
            uint32_t value = ~ones_sum_raw(out + cs, (size_t)(ip_len - cs), 0) & 0xFFFF;
            put16(out + at, value ? value : 0xFFFF);
        }
    }
    if (store_sizes(sizes, &ip_len, 1) < 0) {
        goto done;
    }
    result = PyLong_FromLong(1);
done:
    PyBuffer_Release(&view);
    return result;
}

/* The segments, GIL released or not: no Python object is touched. */
void
split_write(const split_plan_t *pl, uint8_t *const *outs, Py_ssize_t *lens)
{
    Py_ssize_t hdr_len = pl->hdr_len, iph_len = pl->iph_len;
    const uint8_t *data = pl->ip + hdr_len;
    for (Py_ssize_t i = 0; i < pl->count; i++) {
        Py_ssize_t seg_len = i < pl->count - 1 ? hdr_len + pl->gso_size : pl->last_len;
        uint8_t *out = outs[i];
        memmove(out, pl->template, (size_t)hdr_len);
        memmove(out + hdr_len, data, (size_t)(seg_len - hdr_len));
        data += pl->gso_size;
        if (pl->is_v4) {
            uint32_t seg_id = (uint32_t)(pl->first_id + i) & 0xFFFF;
            put16(out + IP4_TOTAL_LEN, (uint32_t)seg_len);
            put16(out + IP4_ID, seg_id);
            put16(out + IP4_CHECKSUM,
                  ~fold64((uint64_t)pl->ip_base_sum + (uint64_t)seg_len + seg_id) & 0xFFFF);
        }
        else {
            put16(out + IP6_PAYLOAD_LEN, (uint32_t)(seg_len - IP6_HDR_LEN));
        }
        uint64_t l4_len = (uint64_t)(seg_len - iph_len);
        uint32_t value;
        if (pl->is_tcp) {
            put32(out + iph_len + TCP_SEQ, pl->first_seq + (uint32_t)((uint64_t)i * pl->gso_size));
            uint8_t seg_flags = pl->middle_flags;
            if (i == 0) {
                seg_flags |= pl->flags & TCP_FIRST_ONLY;
            }
            if (i == pl->count - 1) {
                seg_flags |= pl->flags & TCP_LAST_ONLY;
            }
            out[iph_len + TCP_FLAGS] = seg_flags;
            value = ~ones_sum_raw(out + iph_len, (size_t)l4_len, pl->addr_sum + l4_len) & 0xFFFF;
        }
        else {
            put16(out + iph_len + UDP_LEN, (uint32_t)l4_len);
            value = ~ones_sum_raw(out + iph_len, (size_t)l4_len, pl->addr_sum + l4_len) & 0xFFFF;
            if (value == 0) {
                value = 0xFFFF; /* RFC 768: 0 would mean "no checksum" */
            }
        }
        put16(out + pl->csum_at, value);
        lens[i] = seg_len;
    }
}

/* The template of a plan whose lengths are set: the headers of every
 * segment, with the varying fields zero, and the sums they start from. */
static void
plan_template(split_plan_t *pl, int proto)
{
    const uint8_t *ip = pl->ip;
    memcpy(pl->template, ip, (size_t)pl->hdr_len);
    put16(pl->template + pl->csum_at, 0);
    pl->addr_sum = pl->is_v4 ? be_sum(ip + IP4_SRC, IP4_ADDRS_LEN)
                             : be_sum(ip + IP6_SRC, IP6_ADDRS_LEN);
    pl->addr_sum += (uint32_t)proto;
    pl->first_id = 0;
    pl->ip_base_sum = 0;
    pl->first_seq = 0;
    pl->flags = pl->middle_flags = 0;
    if (pl->is_v4) {
        pl->first_id = get16(pl->template + IP4_ID);
        put16(pl->template + IP4_TOTAL_LEN, 0);
        put16(pl->template + IP4_ID, 0);
        put16(pl->template + IP4_CHECKSUM, 0);
        pl->ip_base_sum = ones_sum_raw(pl->template, (size_t)pl->iph_len, 0);
    }
    if (pl->is_tcp) {
        pl->first_seq = get32(pl->template + pl->iph_len + TCP_SEQ);
        pl->flags = pl->template[pl->iph_len + TCP_FLAGS];
        pl->middle_flags = pl->flags & (uint8_t) ~(TCP_LAST_ONLY | TCP_FIRST_ONLY);
    }
}

/* The plan of a super-packet (virtio header, then the packet) that
 * gso_check passed with hdr_len > 0: its claims are checked, so nothing
 * can fail here. For the units that split without Python objects (mmsg.c). */
void
split_plan_checked(split_plan_t *pl, const uint8_t *data, Py_ssize_t len, Py_ssize_t hdr_len)
{
    const uint8_t *ip = data + VNET_HDR_LEN;
    Py_ssize_t ip_len = len - VNET_HDR_LEN;
    int version = ip[IP4_VER_IHL] >> 4;
    int proto = version == 4 ? ip[IP4_PROTOCOL] : ip[IP6_NEXT_HEADER];
    pl->ip = ip;
    pl->is_v4 = version == 4;
    pl->is_tcp = proto == IPPROTO_TCP;
    pl->iph_len = pl->is_v4 ? (ip[IP4_VER_IHL] & 0x0F) * 4 : IP6_HDR_LEN;
    pl->csum_at = pl->iph_len + (pl->is_tcp ? TCP_CHECKSUM : UDP_CHECKSUM);
    pl->hdr_len = hdr_len;
    pl->gso_size = host16(data + VNET_GSO_SIZE);
    Py_ssize_t payload_len = ip_len - hdr_len;
    pl->count = (payload_len + pl->gso_size - 1) / pl->gso_size;
    if (pl->count < 1) {
        pl->count = 1;
    }
    pl->last_len = hdr_len + payload_len - (pl->count - 1) * pl->gso_size;
    plan_template(pl, proto);
}

/* split._split_gso: a TCP (TSO) or UDP (USO) super-packet into segments. */
static PyObject *
split_gso(state_t *st, const vnet_t *h, int gso_type, int proto, const uint8_t *ip,
          Py_ssize_t ip_len, PyObject *out_bufs, PyObject *sizes, Py_ssize_t offset)
{
    split_plan_t pl;
    pl.ip = ip;
    pl.is_tcp = proto == IPPROTO_TCP;
    if (ip_len < IP4_MIN_HDR_LEN) {
        PyErr_Format(st->malformed, "super-packet of %zd bytes is shorter than an IP header",
                     ip_len);
        return NULL;
    }
    int version = ip[IP4_VER_IHL] >> 4;
    if (version == 4) {
        if (gso_type == VIRTIO_NET_HDR_GSO_TCPV6) {
            PyErr_Format(st->malformed, "gso_type 0x%x (TCPv6) on an IPv4 packet",
                         (unsigned int)h->gso_type);
            return NULL;
        }
        pl.iph_len = (ip[IP4_VER_IHL] & 0x0F) * 4;
        if (pl.iph_len < IP4_MIN_HDR_LEN) {
            PyErr_Format(st->malformed, "IPv4 header length %zd is below %d", pl.iph_len,
                         IP4_MIN_HDR_LEN);
            return NULL;
        }
        if (ip[IP4_PROTOCOL] != proto) {
            PyErr_Format(st->malformed, "IPv4 protocol %d in a GSO packet of protocol %d",
                         (int)ip[IP4_PROTOCOL], proto);
            return NULL;
        }
        pl.is_v4 = 1;
    }
    else if (version == 6) {
        if (gso_type == VIRTIO_NET_HDR_GSO_TCPV4) {
            PyErr_Format(st->malformed, "gso_type 0x%x (TCPv4) on an IPv6 packet",
                         (unsigned int)h->gso_type);
            return NULL;
        }
        if (ip_len < IP6_HDR_LEN) {
            PyErr_Format(st->malformed,
                         "IPv6 super-packet of %zd bytes is shorter than its header", ip_len);
            return NULL;
        }
        if (ip[IP6_NEXT_HEADER] != proto) {
            PyErr_Format(st->malformed, "IPv6 next header %d in a GSO packet of protocol %d",
                         (int)ip[IP6_NEXT_HEADER], proto);
            return NULL;
        }
        pl.iph_len = IP6_HDR_LEN;
        pl.is_v4 = 0;
    }
    else {
        PyErr_Format(st->malformed, "IP version %d in a GSO packet", version);
        return NULL;
    }
    if (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        int csum_field = pl.is_tcp ? TCP_CHECKSUM : UDP_CHECKSUM;
        if (h->csum_start != pl.iph_len || h->csum_offset != csum_field) {
            PyErr_Format(st->malformed,
                         "csum_start %d/csum_offset %d do not match the IP header length %zd "
                         "and checksum field %d",
                         (int)h->csum_start, (int)h->csum_offset, pl.iph_len, csum_field);
            return NULL;
        }
    }
    Py_ssize_t l4_hdr_len;
    if (pl.is_tcp) {
        if (ip_len < pl.iph_len + TCP_MIN_HDR_LEN) {
            PyErr_Format(st->malformed,
                         "super-packet of %zd bytes is shorter than its TCP header", ip_len);
            return NULL;
        }
        l4_hdr_len = (ip[pl.iph_len + TCP_DATA_OFFSET] >> 4) * 4;
        if (l4_hdr_len < TCP_MIN_HDR_LEN) {
            PyErr_Format(st->malformed, "TCP data offset %zd is below %d", l4_hdr_len,
                         TCP_MIN_HDR_LEN);
            return NULL;
        }
        pl.csum_at = pl.iph_len + TCP_CHECKSUM;
    }
    else {
        l4_hdr_len = UDP_HDR_LEN;
        pl.csum_at = pl.iph_len + UDP_CHECKSUM;
    }
    pl.hdr_len = pl.iph_len + l4_hdr_len;
    if (ip_len < pl.hdr_len) {
        PyErr_Format(st->malformed,
                     "super-packet of %zd bytes is shorter than its headers (%zd)", ip_len,
                     pl.hdr_len);
        return NULL;
    }
    pl.gso_size = h->gso_size;
    if (pl.gso_size == 0) {
        PyErr_SetString(st->malformed, "gso_size 0 in a GSO packet");
        return NULL;
    }
    if (pl.hdr_len + pl.gso_size > IP_MAX_PACKET_LEN) {
        PyErr_Format(st->malformed, "segments of %zd + %zd bytes exceed %d", pl.hdr_len,
                     pl.gso_size, IP_MAX_PACKET_LEN);
        return NULL;
    }
    Py_ssize_t payload_len = ip_len - pl.hdr_len;
    pl.count = (payload_len + pl.gso_size - 1) / pl.gso_size;
    if (pl.count < 1) {
        pl.count = 1; /* a GSO packet without payload: one header-only segment */
    }
    Py_ssize_t n_bufs = PyObject_Length(out_bufs);
    if (n_bufs < 0) {
        return NULL;
    }
    Py_ssize_t n_sizes = PyObject_Length(sizes);
    if (n_sizes < 0) {
        return NULL;
    }
    Py_ssize_t have = n_bufs < n_sizes ? n_bufs : n_sizes;
    if (pl.count > have) {
        PyErr_Format(st->too_many, "super-packet of %zd segments does not fit %zd buffers",
                     pl.count, have);
        return NULL;
    }
    pl.last_len = pl.hdr_len + payload_len - (pl.count - 1) * pl.gso_size;

    /* One allocation: views, starts, out pointers, lengths. */
    size_t each = sizeof(Py_buffer) + sizeof(Py_ssize_t) * 2 + sizeof(uint8_t *);
    char *mem = PyMem_Malloc(each * (size_t)pl.count);
    if (mem == NULL) {
        return PyErr_NoMemory();
    }
    Py_buffer *views = (Py_buffer *)mem;
    Py_ssize_t *starts = (Py_ssize_t *)(views + pl.count);
    Py_ssize_t *lens = starts + pl.count;
    uint8_t **outs = (uint8_t **)(lens + pl.count);
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    if (get_outs(out_bufs, pl.count, offset, views, starts, &got) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < pl.count; i++) {
        Py_ssize_t seg_len = i < pl.count - 1 ? pl.hdr_len + pl.gso_size : pl.last_len;
        Py_ssize_t room = views[i].len - starts[i];
        if (seg_len > room) {
            PyErr_Format(st->too_big,
                         "segment %zd of %zd bytes does not fit a buffer of %zd bytes", i,
                         seg_len, room);
            goto done;
        }
        outs[i] = (uint8_t *)views[i].buf + starts[i];
    }
    if (check_writable(views, pl.count) < 0) {
        goto done;
    }

    plan_template(&pl, proto);
    if (ip_len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        split_write(&pl, outs, lens);
        Py_END_ALLOW_THREADS
    }
    else {
        split_write(&pl, outs, lens);
    }
    if (store_sizes(sizes, lens, pl.count) < 0) {
        goto done;
    }
    result = PyLong_FromSsize_t(pl.count);
done:
    release_views(views, got);
    PyMem_Free(mem);
    return result;
}

const char split_doc[] = PyDoc_STR(
"split(pkt, out_bufs, sizes, offset)\n--\n\n"
"Turn one kernel read into finished IP packets; return how many were stored.\n\n"
"The C twin of tunkit._offload.split.split: same results, same exceptions.");

PyObject *
py_split(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"pkt", "out_bufs", "sizes", "offset"};
    PyObject *a[4];
    if (parse_args("split", args, nargs, kwnames, names, 4, 4, a) < 0) {
        return NULL;
    }
    state_t *st = get_state(module);
    if (st == NULL) {
        return NULL;
    }
    Py_ssize_t offset = PyNumber_AsSsize_t(a[3], NULL); /* clamps, as slicing does */
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer pkt;
    if (PyObject_GetBuffer(a[0], &pkt, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    const uint8_t *p = pkt.buf;
    if (pkt.len < VNET_HDR_LEN) {
        PyErr_Format(st->malformed, "short virtio header: %zd bytes", pkt.len);
        goto done;
    }
    vnet_t h = {p[VNET_FLAGS],           p[VNET_GSO_TYPE],
                host16(p + VNET_HDR_LEN_FIELD), host16(p + VNET_GSO_SIZE),
                host16(p + VNET_CSUM_START),    host16(p + VNET_CSUM_OFFSET)};
    const uint8_t *ip = p + VNET_HDR_LEN;
    Py_ssize_t ip_len = pkt.len - VNET_HDR_LEN;
    int gso_type = h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
    if (gso_type == VIRTIO_NET_HDR_GSO_NONE) {
        result = copy_through(st, &h, ip, ip_len, a[1], a[2], offset);
    }
    else if (gso_type == VIRTIO_NET_HDR_GSO_TCPV4 || gso_type == VIRTIO_NET_HDR_GSO_TCPV6) {
        result = split_gso(st, &h, gso_type, IPPROTO_TCP, ip, ip_len, a[1], a[2], offset);
    }
    else if (gso_type == VIRTIO_NET_HDR_GSO_UDP_L4) {
        result = split_gso(st, &h, gso_type, IPPROTO_UDP, ip, ip_len, a[1], a[2], offset);
    }
    else {
        PyErr_Format(st->malformed, "unsupported virtio gso_type 0x%x",
                     (unsigned int)h.gso_type);
    }
done:
    PyBuffer_Release(&pkt);
    return result;
}

/*
 * tunkit._speedups: the hot kernels of the offload engine in plain C, and
 * PacketIo, the per-packet system calls of a device without offload.
 *
 * One behaviour, two implementations: every kernel here does exactly what
 * its pure-Python twin in tunkit/_offload/ does (checksum.py, split.py,
 * coalesce.py), byte for byte, with the same exceptions and messages; the
 * test suite runs on both and hypothesis compares them. Read the Python
 * modules for the why of each rule (RFC sections, kernel functions); this file
 * only says where C differs in how, not in what. PacketIo's twin is the
 * Python read and write of NativeTun (_linux/device.py); the device tests
 * run on both (io_path).
 *
 * Buffers are taken with PyObject_GetBuffer (or as memoryviews that hold an
 * export), so no exporter can resize or free them; then the GIL is released
 * for the work on the bytes when there is enough of it (GIL_RELEASE_BYTES):
 * a reader thread splitting and a writer thread coalescing run at once.
 *
 * The Internet checksum is summed in host byte order, 32 bits at a time into
 * a 64-bit accumulator, then folded and byte-swapped (RFC 1071 section 2(B):
 * the sum is independent of byte order). Every fold keeps "negative zero":
 * a sum is 0 only when all its data is zero, as in checksum.fold.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

/* Below this many bytes of work the GIL is kept: releasing and taking it
 * back costs more than the work, and may wait for another thread's switch
 * interval. */
#define GIL_RELEASE_BYTES 8192

/* <linux/virtio_net.h> */
#define VNET_HDR_LEN 10
#define F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_UDP_L4 5
#define GSO_ECN 0x80

#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IP_MAX_PACKET_LEN 0xFFFF
#define IP4_MIN_HDR_LEN 20
#define IP6_HDR_LEN 40
#define TCP_MIN_HDR_LEN 20
#define UDP_HDR_LEN 8

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_URG 0x20
#define TCP_CWR 0x80
#define TCP_LAST_ONLY (TCP_FIN | TCP_PSH)
#define TCP_FIRST_ONLY TCP_CWR
#define TCP_NEVER (TCP_SYN | TCP_RST | TCP_URG)

#define IP4_FLAG_DF 0x4000
#define IP4_FRAGMENT 0x3FFF /* MF | fragment offset */

/* coalesce.py: _SLOT_LEN, _MAX_UDP_SEGMENTS, _MAX_TCP_SEGMENTS */
#define SLOT_LEN (VNET_HDR_LEN + IP6_HDR_LEN + 60)
#define MAX_UDP_SEGMENTS 64
#define MAX_TCP_SEGMENTS (1024 - 2)

/* ------------------------------------------------------------------------ */
/* Module state: the Python classes the kernels raise and build.             */

typedef struct {
    PyObject *malformed;  /* tunkit._offload.headers._Malformed */
    PyObject *too_big;    /* tunkit._offload.headers._TooBig */
    PyObject *too_many;   /* tunkit._errors.TooManySegmentsError */
    PyObject *write_cls;  /* tunkit._offload.coalesce.Write (a NamedTuple) */
    PyObject *zero_hdr;   /* tunkit._offload.coalesce.ZERO_VNET_HDR */
} state_t;

static state_t *
get_state(PyObject *module)
{
    state_t *st = (state_t *)PyModule_GetState(module);
    if (st->malformed == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "tunkit._speedups: bind() was not called (import tunkit._offload)");
        return NULL;
    }
    return st;
}

/* ------------------------------------------------------------------------ */
/* Byte helpers                                                              */

static inline uint16_t
get16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t
get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void
put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void
put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline uint16_t
host16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline void
put_host16(uint8_t *p, uint16_t v)
{
    memcpy(p, &v, 2);
}

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

/* ------------------------------------------------------------------------ */
/* The Internet checksum                                                     */

/* checksum.fold for a total that fits 64 bits: 0 only for a zero total. */
static inline uint32_t
fold64(uint64_t s)
{
    while (s >> 16) {
        s = (s & 0xFFFF) + (s >> 16);
    }
    return (uint32_t)s;
}

/* Sum of data as big-endian 16-bit words (an odd tail padded with a zero
 * byte), folded: congruent modulo 0xFFFF, and 0 only for all-zero data. */
static uint32_t
be_sum(const uint8_t *p, size_t n)
{
    uint64_t s = 0, t = 0;
    size_t i = 0;
    /* Two accumulators and a plain loop: gcc vectorizes it. 2**32 words of
     * 32 bits cannot overflow a 64-bit sum. */
    for (; i + 8 <= n; i += 8) {
        uint32_t a, b;
        memcpy(&a, p + i, 4);
        memcpy(&b, p + i + 4, 4);
        s += a;
        t += b;
    }
    s += t;
    if (i + 4 <= n) {
        uint32_t a;
        memcpy(&a, p + i, 4);
        s += a;
        i += 4;
    }
    if (i + 2 <= n) {
        s += host16(p + i);
        i += 2;
    }
    if (i < n) {
#if PY_BIG_ENDIAN
        s += (uint32_t)p[i] << 8;
#else
        s += p[i];
#endif
    }
    uint32_t folded = fold64(s);
#if PY_BIG_ENDIAN
    return folded;
#else
    return ((folded & 0xFF) << 8) | (folded >> 8);
#endif
}

/* checksum.ones_sum with an initial sum below 2**63. */
static inline uint32_t
ones_sum_raw(const uint8_t *p, size_t n, uint64_t initial)
{
    return fold64((uint64_t)be_sum(p, n) + initial);
}

/* checksum.update16, RFC 1624 equation 3. */
static inline uint32_t
update16_raw(uint32_t csum, uint32_t old, uint64_t new_)
{
    return ~fold64((uint64_t)(~csum & 0xFFFF) + (~old & 0xFFFF) + new_) & 0xFFFF;
}

/* Read a non-negative Python int as a sum to add: any value, reduced modulo
 * 0xFFFF where it does not fit (keeping a non-zero value non-zero). */
static int
parse_initial(PyObject *obj, uint64_t *out)
{
    if (obj == NULL) {
        *out = 0;
        return 0;
    }
    if (!PyLong_Check(obj)) {
        PyObject *idx = PyNumber_Index(obj);
        if (idx == NULL) {
            return -1;
        }
        int r = parse_initial(idx, out);
        Py_DECREF(idx);
        return r;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow < 0 || (overflow == 0 && v < 0)) {
        PyErr_SetString(PyExc_ValueError, "initial sum must be non-negative");
        return -1;
    }
    if (overflow == 0) {
        *out = (uint64_t)v;
        return 0;
    }
    PyObject *mod = PyLong_FromLong(0xFFFF);
    if (mod == NULL) {
        return -1;
    }
    PyObject *rem = PyNumber_Remainder(obj, mod);
    Py_DECREF(mod);
    if (rem == NULL) {
        return -1;
    }
    long r = PyLong_AsLong(rem);
    Py_DECREF(rem);
    *out = r == 0 ? 0xFFFF : (uint64_t)r;
    return 0;
}

/* Parse fast-call arguments by name: args[0..nargs) then keywords. */
static int
parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
           const char *const *names, int n_names, int n_required, PyObject **out)
{
    if (nargs > n_names) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname,
                     n_names, nargs);
        return -1;
    }
    for (int i = 0; i < n_names; i++) {
        out[i] = i < nargs ? args[i] : NULL;
    }
    if (kwnames != NULL) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nk; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            int found = 0;
            for (int i = 0; i < n_names; i++) {
                if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                    if (out[i] != NULL) {
                        PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                                     fname, names[i]);
                        return -1;
                    }
                    out[i] = args[nargs + k];
                    found = 1;
                    break;
                }
            }
            if (!found) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                             fname, key);
                return -1;
            }
        }
    }
    for (int i = 0; i < n_required; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[i]);
            return -1;
        }
    }
    return 0;
}

static PyObject *
sum_common(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
           int complement)
{
    static const char *const names[] = {"data", "initial"};
    PyObject *a[2];
    if (parse_args(fname, args, nargs, kwnames, names, 2, 1, a) < 0) {
        return NULL;
    }
    uint64_t initial;
    if (parse_initial(a[1], &initial) < 0) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    uint32_t sum;
    if (view.len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        sum = ones_sum_raw(view.buf, (size_t)view.len, initial);
        Py_END_ALLOW_THREADS
    }
    else {
        sum = ones_sum_raw(view.buf, (size_t)view.len, initial);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(complement ? (~sum & 0xFFFF) : sum);
}

PyDoc_STRVAR(ones_sum_doc,
"ones_sum(data, initial=0)\n--\n\n"
"Return the 16-bit one's-complement sum of data (RFC 1071) plus initial.");

static PyObject *
py_ones_sum(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)module;
    return sum_common("ones_sum", args, nargs, kwnames, 0);
}

PyDoc_STRVAR(checksum_doc,
"checksum(data, initial=0)\n--\n\n"
"Return the Internet checksum of data: the complement of its sum with initial.");

static PyObject *
py_checksum(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)module;
    return sum_common("checksum", args, nargs, kwnames, 1);
}

PyDoc_STRVAR(pseudo_sum_doc,
"pseudo_sum(addrs, proto, l4_len)\n--\n\n"
"Return the unfolded pseudo-header sum for the adjacent source and destination addrs.");

static PyObject *
py_pseudo_sum(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)module;
    static const char *const names[] = {"addrs", "proto", "l4_len"};
    PyObject *a[3];
    if (parse_args("pseudo_sum", args, nargs, kwnames, names, 3, 3, a) < 0) {
        return NULL;
    }
    uint64_t proto, l4_len;
    if (parse_initial(a[1], &proto) < 0 || parse_initial(a[2], &l4_len) < 0) {
        return NULL;
    }
    if (proto > 0xFFFF || l4_len > 0xFFFFFFFFu) {
        PyErr_SetString(PyExc_ValueError, "proto or l4_len out of range");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    /* int.from_bytes(addrs) % 0xFFFF: a multiple of 0xFFFF is 0 here. */
    uint32_t addrs = be_sum(view.buf, (size_t)view.len) % 0xFFFF;
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong((uint64_t)addrs + proto + l4_len);
}

PyDoc_STRVAR(update16_doc,
"update16(csum, old, new)\n--\n\n"
"Return checksum field csum after one 16-bit word changed from old to new (RFC 1624).");

static PyObject *
py_update16(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)module;
    static const char *const names[] = {"csum", "old", "new"};
    PyObject *a[3];
    if (parse_args("update16", args, nargs, kwnames, names, 3, 3, a) < 0) {
        return NULL;
    }
    uint64_t v[3];
    for (int i = 0; i < 3; i++) {
        if (parse_initial(a[i], &v[i]) < 0) {
            return NULL;
        }
    }
    if (v[0] > 0xFFFF || v[1] > 0xFFFF || v[2] > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "update16 takes 16-bit words");
        return NULL;
    }
    return PyLong_FromUnsignedLong(update16_raw((uint32_t)v[0], (uint32_t)v[1], v[2]));
}

/* ------------------------------------------------------------------------ */
/* split: one kernel read into finished packets (split.py)                   */

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
    int needs_csum = h->flags & F_NEEDS_CSUM;
    if (needs_csum && (cs >= ip_len || at + 2 > ip_len)) {
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

typedef struct {
    const uint8_t *ip;
    int is_v4, is_tcp;
    Py_ssize_t iph_len, hdr_len, csum_at, gso_size, count, last_len;
    uint32_t addr_sum, ip_base_sum, first_seq;
    uint16_t first_id;
    uint8_t flags, middle_flags;
    uint8_t template[IP6_HDR_LEN + 60];
} plan_t;

/* The segments, GIL released or not: no Python object is touched. */
static void
write_segments(const plan_t *pl, uint8_t *const *outs, Py_ssize_t *lens)
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
            put16(out + 2, (uint32_t)seg_len);
            put16(out + 4, seg_id);
            put16(out + 10,
                  ~fold64((uint64_t)pl->ip_base_sum + (uint64_t)seg_len + seg_id) & 0xFFFF);
        }
        else {
            put16(out + 4, (uint32_t)(seg_len - IP6_HDR_LEN));
        }
        uint64_t l4_len = (uint64_t)(seg_len - iph_len);
        uint32_t value;
        if (pl->is_tcp) {
            put32(out + iph_len + 4, pl->first_seq + (uint32_t)((uint64_t)i * pl->gso_size));
            uint8_t seg_flags = pl->middle_flags;
            if (i == 0) {
                seg_flags |= pl->flags & TCP_FIRST_ONLY;
            }
            if (i == pl->count - 1) {
                seg_flags |= pl->flags & TCP_LAST_ONLY;
            }
            out[iph_len + 13] = seg_flags;
            value = ~ones_sum_raw(out + iph_len, (size_t)l4_len, pl->addr_sum + l4_len) & 0xFFFF;
        }
        else {
            put16(out + iph_len + 4, (uint32_t)l4_len);
            value = ~ones_sum_raw(out + iph_len, (size_t)l4_len, pl->addr_sum + l4_len) & 0xFFFF;
            if (value == 0) {
                value = 0xFFFF; /* RFC 768: 0 would mean "no checksum" */
            }
        }
        put16(out + pl->csum_at, value);
        lens[i] = seg_len;
    }
}

/* split._split_gso: a TCP (TSO) or UDP (USO) super-packet into segments. */
static PyObject *
split_gso(state_t *st, const vnet_t *h, int gso_type, int proto, const uint8_t *ip,
          Py_ssize_t ip_len, PyObject *out_bufs, PyObject *sizes, Py_ssize_t offset)
{
    plan_t pl;
    pl.ip = ip;
    pl.is_tcp = proto == IPPROTO_TCP_;
    if (ip_len < IP4_MIN_HDR_LEN) {
        PyErr_Format(st->malformed, "super-packet of %zd bytes is shorter than an IP header",
                     ip_len);
        return NULL;
    }
    int version = ip[0] >> 4;
    Py_ssize_t addrs_at, addrs_len;
    if (version == 4) {
        if (gso_type == GSO_TCPV6) {
            PyErr_Format(st->malformed, "gso_type 0x%x (TCPv6) on an IPv4 packet",
                         (unsigned int)h->gso_type);
            return NULL;
        }
        pl.iph_len = (ip[0] & 0x0F) * 4;
        if (pl.iph_len < IP4_MIN_HDR_LEN) {
            PyErr_Format(st->malformed, "IPv4 header length %zd is below %d", pl.iph_len,
                         IP4_MIN_HDR_LEN);
            return NULL;
        }
        if (ip[9] != proto) {
            PyErr_Format(st->malformed, "IPv4 protocol %d in a GSO packet of protocol %d",
                         (int)ip[9], proto);
            return NULL;
        }
        addrs_at = 12;
        addrs_len = 8;
        pl.is_v4 = 1;
    }
    else if (version == 6) {
        if (gso_type == GSO_TCPV4) {
            PyErr_Format(st->malformed, "gso_type 0x%x (TCPv4) on an IPv6 packet",
                         (unsigned int)h->gso_type);
            return NULL;
        }
        if (ip_len < IP6_HDR_LEN) {
            PyErr_Format(st->malformed,
                         "IPv6 super-packet of %zd bytes is shorter than its header", ip_len);
            return NULL;
        }
        if (ip[6] != proto) {
            PyErr_Format(st->malformed, "IPv6 next header %d in a GSO packet of protocol %d",
                         (int)ip[6], proto);
            return NULL;
        }
        pl.iph_len = IP6_HDR_LEN;
        addrs_at = 8;
        addrs_len = 32;
        pl.is_v4 = 0;
    }
    else {
        PyErr_Format(st->malformed, "IP version %d in a GSO packet", version);
        return NULL;
    }
    if (h->flags & F_NEEDS_CSUM) {
        int csum_field = pl.is_tcp ? 16 : 6;
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
        l4_hdr_len = (ip[pl.iph_len + 12] >> 4) * 4;
        if (l4_hdr_len < TCP_MIN_HDR_LEN) {
            PyErr_Format(st->malformed, "TCP data offset %zd is below %d", l4_hdr_len,
                         TCP_MIN_HDR_LEN);
            return NULL;
        }
        pl.csum_at = pl.iph_len + 16;
    }
    else {
        l4_hdr_len = UDP_HDR_LEN;
        pl.csum_at = pl.iph_len + 6;
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

    /* The template: headers of every segment, with the varying fields zero. */
    memcpy(pl.template, ip, (size_t)pl.hdr_len);
    put16(pl.template + pl.csum_at, 0);
    pl.addr_sum = be_sum(ip + addrs_at, (size_t)addrs_len) + (uint32_t)proto;
    pl.first_id = 0;
    pl.ip_base_sum = 0;
    pl.first_seq = 0;
    pl.flags = pl.middle_flags = 0;
    if (pl.is_v4) {
        pl.first_id = get16(pl.template + 4);
        put16(pl.template + 2, 0);
        put16(pl.template + 4, 0);
        put16(pl.template + 10, 0);
        pl.ip_base_sum = ones_sum_raw(pl.template, (size_t)pl.iph_len, 0);
    }
    if (pl.is_tcp) {
        pl.first_seq = get32(pl.template + pl.iph_len + 4);
        pl.flags = pl.template[pl.iph_len + 13];
        pl.middle_flags = pl.flags & (uint8_t) ~(TCP_LAST_ONLY | TCP_FIRST_ONLY);
    }
    if (ip_len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        write_segments(&pl, outs, lens);
        Py_END_ALLOW_THREADS
    }
    else {
        write_segments(&pl, outs, lens);
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

PyDoc_STRVAR(split_doc,
"split(pkt, out_bufs, sizes, offset)\n--\n\n"
"Turn one kernel read into finished IP packets; return how many were stored.\n\n"
"The C twin of tunkit._offload.split.split: same results, same exceptions.");

static PyObject *
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
    vnet_t h = {p[0], p[1], host16(p + 2), host16(p + 4), host16(p + 6), host16(p + 8)};
    const uint8_t *ip = p + VNET_HDR_LEN;
    Py_ssize_t ip_len = pkt.len - VNET_HDR_LEN;
    int gso_type = h.gso_type & ~GSO_ECN;
    if (gso_type == GSO_NONE) {
        result = copy_through(st, &h, ip, ip_len, a[1], a[2], offset);
    }
    else if (gso_type == GSO_TCPV4 || gso_type == GSO_TCPV6) {
        result = split_gso(st, &h, gso_type, IPPROTO_TCP_, ip, ip_len, a[1], a[2], offset);
    }
    else if (gso_type == GSO_UDP_L4) {
        result = split_gso(st, &h, gso_type, IPPROTO_UDP_, ip, ip_len, a[1], a[2], offset);
    }
    else {
        PyErr_Format(st->malformed, "unsupported virtio gso_type 0x%x",
                     (unsigned int)h.gso_type);
    }
done:
    PyBuffer_Release(&pkt);
    return result;
}

/* ------------------------------------------------------------------------ */
/* coalesce: a batch of packets into kernel writes (coalesce.py)             */

enum { K_NONE = 0, K_KEY = 1, K_CAND = 2 };

typedef struct {
    uint8_t proto, is_v6;
    uint8_t ports[4];
    uint8_t addrs[32];
} flowkey_t; /* only uint8_t members: no padding, memcmp is exact */

typedef struct {
    const uint8_t *p;
    Py_ssize_t n;
    Py_ssize_t payload_len;
    int32_t flow; /* index into flows */
    int32_t next; /* next packet of its group, -1 */
    uint32_t seq;
    uint16_t iph_len, hdr_len, ip_id;
    uint8_t kind, proto, is_v6, df, flags;
} pkt_t;

typedef struct {
    Py_ssize_t total_len, gso_size;
    int32_t head, last, count, max_segments;
    uint32_t next_seq;
    uint16_t first_id;
    int8_t id_step; /* -1 unknown, 1 counting up, 0 fixed (DF) */
    uint8_t last_flags, closed, validated;
} group_t;

typedef struct {
    flowkey_t key;
    int32_t open; /* the group being built for this flow, -1 */
} flow_t;

typedef struct {
    pkt_t *pk;
    group_t *groups;
    flow_t *flows;
    int32_t *table; /* open addressing: flow index or -1 */
    int32_t *entries; /* >= 0: a group; < 0: ~index of a lone packet */
    Py_ssize_t n, n_groups, n_flows, n_entries;
    size_t mask;
    int tcp, udp;
} batch_t;

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
    int version = p[0] >> 4;
    Py_ssize_t iph_len;
    int mergeable;
    memset(key, 0, sizeof *key);
    if (version == 4) {
        iph_len = (p[0] & 0x0F) * 4;
        if (iph_len < IP4_MIN_HDR_LEN) {
            return;
        }
        uint16_t frag = get16(p + 6);
        k->is_v6 = 0;
        k->df = (frag & IP4_FLAG_DF) != 0;
        k->ip_id = get16(p + 4);
        k->proto = p[9];
        mergeable = iph_len == IP4_MIN_HDR_LEN && get16(p + 2) == n && !(frag & IP4_FRAGMENT);
        memcpy(key->addrs, p + 12, 8);
    }
    else if (version == 6) {
        if (n < IP6_HDR_LEN) {
            return;
        }
        iph_len = IP6_HDR_LEN;
        k->is_v6 = 1;
        k->df = 1;
        k->ip_id = 0;
        k->proto = p[6];
        mergeable = get16(p + 4) == n - IP6_HDR_LEN;
        memcpy(key->addrs, p + 8, 32);
    }
    else {
        return;
    }
    Py_ssize_t l4_min;
    if (k->proto == IPPROTO_TCP_) {
        if (!tcp) {
            return;
        }
        l4_min = TCP_MIN_HDR_LEN;
    }
    else if (k->proto == IPPROTO_UDP_) {
        if (!udp) {
            return;
        }
        l4_min = UDP_HDR_LEN;
    }
    else {
        return;
    }
    if (n < iph_len + l4_min) {
        if (n < iph_len + 4) {
            return;
        }
        mergeable = 0; /* _key_only: it closes its flow, nothing more */
    }
    key->proto = k->proto;
    key->is_v6 = k->is_v6;
    memcpy(key->ports, p + iph_len, 4);
    k->kind = K_KEY;
    k->iph_len = (uint16_t)iph_len;
    if (!mergeable) {
        return;
    }
    const uint8_t *l4 = p + iph_len;
    if (k->proto == IPPROTO_TCP_) {
        Py_ssize_t tcph_len = (l4[12] >> 4) * 4;
        Py_ssize_t hdr_len = iph_len + tcph_len;
        k->flags = l4[13];
        if (tcph_len < TCP_MIN_HDR_LEN || n <= hdr_len || (k->flags & TCP_NEVER)) {
            return;
        }
        k->hdr_len = (uint16_t)hdr_len;
        k->seq = get32(l4 + 4);
    }
    else {
        Py_ssize_t hdr_len = iph_len + UDP_HDR_LEN;
        /* A zero checksum means "none" (IPv4) or is invalid (IPv6). */
        if (get16(l4 + 4) != n - iph_len || n <= hdr_len || get16(l4 + 6) == 0) {
            return;
        }
        k->hdr_len = (uint16_t)hdr_len;
        k->seq = 0;
        k->flags = 0;
    }
    k->payload_len = n - k->hdr_len;
    k->kind = K_CAND;
}

/* The sig of coalesce._Candidate: fields equal all along the flow. */
static int
same_sig(const pkt_t *a, const pkt_t *b)
{
    const uint8_t *p = a->p, *q = b->p;
    if (a->is_v6) {
        if (memcmp(p, q, 4) != 0 || p[7] != q[7]) { /* version/class/label, hop limit */
            return 0;
        }
    }
    else if (p[1] != q[1] || memcmp(p + 6, q + 6, 3) != 0) { /* TOS, flags/frag, TTL */
        return 0;
    }
    if (a->proto != IPPROTO_TCP_) {
        return 1;
    }
    const uint8_t *s = p + a->iph_len, *t = q + b->iph_len;
    return memcmp(s + 8, t + 8, 5) == 0 /* ack, data offset */
           && (s[13] & ~(TCP_LAST_ONLY | TCP_FIRST_ONLY)) ==
                  (t[13] & ~(TCP_LAST_ONLY | TCP_FIRST_ONLY))
           && memcmp(s + 14, t + 14, 2) == 0    /* window */
           && memcmp(s + 18, t + 18, 2) == 0    /* urgent pointer */
           && memcmp(s + 20, t + 20, (size_t)(a->hdr_len - a->iph_len - 20)) == 0; /* options */
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
    if (c->proto == IPPROTO_TCP_ && c->seq != g->next_seq) {
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
        addrs = be_sum(p + 8, 32);
    }
    else {
        if (ones_sum_raw(p, k->iph_len, 0) != 0xFFFF) {
            return 0;
        }
        addrs = be_sum(p + 12, 8);
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
static void
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
        g->max_segments = k->proto == IPPROTO_UDP_ ? MAX_UDP_SEGMENTS : MAX_TCP_SEGMENTS;
        g->closed = 0;
        g->validated = 0;
        flow->open = gi;
        b->entries[b->n_entries++] = gi;
    }
}

/* coalesce._patch: the virtio header and the patched headers of a group. */
static void
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
        put16(hdrs + 4, l4_len);
        addrs = be_sum(head->p + 8, 32);
    }
    else {
        /* The head's header checksum was verified: update it (RFC 1624). */
        put16(hdrs + 2, total_len);
        put16(hdrs + 10, update16_raw(get16(head->p + 10), (uint32_t)head->n, total_len));
        addrs = be_sum(head->p + 12, 8);
    }
    /* CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum. */
    uint32_t partial = fold64((uint64_t)addrs + head->proto + l4_len);
    uint8_t gso_type;
    uint16_t csum_offset;
    if (head->proto == IPPROTO_TCP_) {
        uint8_t flags = head->flags | (g->last_flags & TCP_LAST_ONLY);
        hdrs[iph_len + 13] = flags;
        put16(hdrs + iph_len + 16, partial);
        gso_type = head->is_v6 ? GSO_TCPV6 : GSO_TCPV4;
        if (flags & TCP_CWR) {
            gso_type |= GSO_ECN;
        }
        csum_offset = 16;
    }
    else {
        put16(hdrs + iph_len + 4, l4_len);
        put16(hdrs + iph_len + 6, partial);
        gso_type = GSO_UDP_L4;
        csum_offset = 6;
    }
    vnet[0] = F_NEEDS_CSUM;
    vnet[1] = gso_type;
    put_host16(vnet + 2, (uint16_t)hdr_len);
    put_host16(vnet + 4, (uint16_t)g->gso_size);
    put_host16(vnet + 6, (uint16_t)iph_len);
    put_host16(vnet + 8, csum_offset);
}

/* A Write (a NamedTuple: a tuple subclass without slots) built as
 * tuple.__new__ would, without calling the class's Python __new__. */
static PyObject *
new_write(state_t *st, PyObject *iov, PyObject *packets, Py_ssize_t first, int gso,
          Py_ssize_t prefix)
{
    PyTypeObject *tp = (PyTypeObject *)st->write_cls;
    PyObject *first_o = PyLong_FromSsize_t(first);
    PyObject *prefix_o = PyLong_FromSsize_t(prefix);
    PyObject *w = (first_o && prefix_o) ? tp->tp_alloc(tp, 5) : NULL;
    if (w == NULL) {
        Py_XDECREF(first_o);
        Py_XDECREF(prefix_o);
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
    PyTuple_SET_ITEM(w, 4, prefix_o);
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
    uint8_t *sent = PyMem_Calloc((size_t)b->n + 1, 1);
    PyObject *scratch = NULL, *scratch_view = NULL;
    if (writes == NULL || sent == NULL) {
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
    Py_ssize_t prefix = 0, slot = 0;
    for (Py_ssize_t e = 0; e < b->n_entries; e++) {
        int32_t entry = b->entries[e];
        PyObject *iov, *packets;
        Py_ssize_t first;
        int gso = 0;
        if (entry < 0 || b->groups[entry].count == 1) {
            first = entry < 0 ? ~entry : b->groups[entry].head;
            PyObject *pkt = views[first];
            iov = PyList_New(2);
            packets = PyList_New(1);
            if (iov == NULL || packets == NULL) {
                Py_XDECREF(iov);
                Py_XDECREF(packets);
                goto fail;
            }
            Py_INCREF(st->zero_hdr);
            PyList_SET_ITEM(iov, 0, st->zero_hdr);
            Py_INCREF(pkt);
            PyList_SET_ITEM(iov, 1, pkt);
            Py_INCREF(pkt);
            PyList_SET_ITEM(packets, 0, pkt);
            sent[first] = 1;
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
            PyObject *payload_slice = slice_from(head->hdr_len);
            PyObject *vnet = NULL, *hdrs = NULL;
            if (iov && packets && payload_slice) {
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
                goto fail;
            }
            slot++;
            PyList_SET_ITEM(iov, 0, vnet);
            PyList_SET_ITEM(iov, 1, hdrs);
            Py_ssize_t j = 0;
            for (int32_t i = g->head; i >= 0; i = b->pk[i].next, j++) {
                PyObject *payload = PyObject_GetItem(views[i], payload_slice);
                if (payload == NULL) {
                    Py_DECREF(payload_slice);
                    Py_DECREF(iov); /* the unset items are NULL: safe */
                    Py_DECREF(packets);
                    goto fail;
                }
                PyList_SET_ITEM(iov, 2 + j, payload);
                Py_INCREF(views[i]);
                PyList_SET_ITEM(packets, j, views[i]);
                sent[i] = 1;
            }
            Py_DECREF(payload_slice);
        }
        while (prefix < b->n && sent[prefix]) {
            prefix++;
        }
        PyObject *w = new_write(st, iov, packets, first, gso, prefix);
        if (w == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(writes, e, w);
    }
    Py_XDECREF(scratch_view);
    Py_XDECREF(scratch);
    PyMem_Free(sent);
    return writes;
fail:
    Py_XDECREF(scratch_view);
    Py_XDECREF(scratch);
    PyMem_Free(sent);
    Py_XDECREF(writes);
    return NULL;
}

PyDoc_STRVAR(coalesce_doc,
"coalesce(bufs, offset, tcp, udp)\n--\n\n"
"Plan the kernel writes that send bufs[i][offset:] for every i.\n\n"
"The C twin of tunkit._offload.coalesce.Coalescer.coalesce: the same writes\n"
"(Write tuples of memoryviews); the patched headers live in a bytearray\n"
"made for each call.");

static PyObject *
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
    size_t cap = 16;
    while (cap < (size_t)n * 2) {
        cap <<= 1;
    }
    b.n = n;
    b.mask = cap - 1;
    PyObject *result = NULL;
    PyObject **views = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    b.pk = PyMem_Calloc((size_t)n + 1, sizeof(pkt_t));
    b.groups = PyMem_Calloc((size_t)n + 1, sizeof(group_t));
    b.flows = PyMem_Calloc((size_t)n + 1, sizeof(flow_t));
    b.entries = PyMem_Calloc((size_t)n + 1, sizeof(int32_t));
    b.table = PyMem_Malloc(cap * sizeof(int32_t));
    if (!views || !b.pk || !b.groups || !b.flows || !b.entries || !b.table) {
        PyErr_NoMemory();
        goto done;
    }
    memset(b.table, 0xFF, cap * sizeof(int32_t)); /* all -1 */
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
    PyMem_Free(b.pk);
    PyMem_Free(b.groups);
    PyMem_Free(b.flows);
    PyMem_Free(b.entries);
    PyMem_Free(b.table);
    Py_DECREF(seq);
    Py_DECREF(offset_slice);
    return result;
}

/* ------------------------------------------------------------------------ */
/* PacketIo: the system calls of a TUN descriptor, one packet or one batch   */
/*
 * A device without offload costs a system call per packet, so what Python
 * runs around that call decides its speed (device.py, NativeTun.read and
 * write); with offload, read_gso/write_gso move a batch of super-packets with
 * a system call each. A PacketIo does one packet, or one batch, in one call
 * that releases the GIL once: the system call, and on EAGAIN a poll() on the descriptor and
 * on the wake-up eventfd that close() makes readable; it keeps the counters
 * too. The calls return the byte count, or -errno, so that a refusal the
 * caller drops and counts costs no exception; -EBADF once closing has begun.
 *
 * Python's per-direction locks are what keep a descriptor number from being
 * closed under a system call elsewhere in device.py; here a count of calls in
 * progress does it, at the cost of two atomic operations: a call counts
 * itself in, then looks at `closing`; drain() sets `closing`, then waits for
 * the count to reach zero (both sequentially consistent, so one of the two
 * sees the other). After drain() no call touches the numbers again, and the
 * owner may close them. The count is never held while Python code runs (a
 * signal handler may call close()).
 */

typedef struct {
    PyObject_HEAD
    int fd;
    int wake;
    int ready; /* __init__ ran (once: a second one could reset the count) */
    atomic_int users;
    atomic_int closing;
    /* Counters: written with the GIL held, by the calls that own them. */
    unsigned long long packets_read;
    unsigned long long bytes_read;
    unsigned long long too_big;
    unsigned long long malformed;
    unsigned long long gso_read;
    unsigned long long packets_written;
    unsigned long long bytes_written;
    unsigned long long dropped_write;
    unsigned long long gso_written;
} packet_io_t;

/* Count a call in; false (and not counted) once closing has begun. */
static inline int
io_enter(packet_io_t *self)
{
    atomic_fetch_add(&self->users, 1);
    if (atomic_load(&self->closing)) {
        atomic_fetch_sub(&self->users, 1);
        return 0;
    }
    return 1;
}

static inline void
io_leave(packet_io_t *self)
{
    atomic_fetch_sub(&self->users, 1);
}

/* Wait until fd has `events` or wake is readable: 0, or -errno (-EBADF: woken). */
static Py_ssize_t
wait_fd(int fd, int wake, short events)
{
    struct pollfd p[2] = {{fd, events, 0}, {wake, POLLIN, 0}};
    if (poll(p, 2, -1) < 0) {
        return -errno;
    }
    if (p[1].revents) {
        return -EBADF;
    }
    return 0;
}

/* readv of iov (POLLIN) or write of iov[0] (POLLOUT) on fd, waiting in
 * poll() for as long as it says EAGAIN: the byte count, or -errno (-EBADF:
 * wake is readable). write, not writev: an empty packet must reach the
 * driver to be refused, and writev returns 0 for it without asking. Without
 * the GIL. */
static Py_ssize_t
io_wait_call(int fd, int wake, short events, const struct iovec *iov, int iovcnt)
{
    for (;;) {
        Py_ssize_t n = events == POLLIN ? readv(fd, iov, iovcnt)
                                        : write(fd, iov[0].iov_base, iov[0].iov_len);
        if (n >= 0) {
            return n;
        }
        if (errno != EAGAIN) {
            return -errno;
        }
        n = wait_fd(fd, wake, events);
        if (n < 0) {
            return n;
        }
    }
}

/* After a system call, with the GIL: count the call out; on -EINTR run the
 * signal handlers (KeyboardInterrupt ends the call, as in os.read) outside
 * the count, then count in again. 1: try again; 0: done (*n is the result);
 * -1: raised. */
static int
io_settle(packet_io_t *self, Py_ssize_t *n)
{
    io_leave(self);
    if (*n != -EINTR) {
        return 0;
    }
    if (PyErr_CheckSignals() < 0) {
        return -1;
    }
    if (!io_enter(self)) {
        *n = -EBADF;
        return 0;
    }
    return 1;
}

static PyObject *
pio_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    packet_io_t *self = (packet_io_t *)PyType_GenericNew(type, args, kwds);
    if (self != NULL) {
        /* Until __init__ gives it descriptors, every call is refused (-EBADF). */
        self->fd = self->wake = -1;
        atomic_store(&self->closing, 1);
    }
    return (PyObject *)self;
}

static int
pio_init(packet_io_t *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"fd", "wake", NULL};
    int fd, wake;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii:PacketIo", names, &fd, &wake)) {
        return -1;
    }
    if (fd < 0 || wake < 0) {
        PyErr_SetString(PyExc_ValueError, "PacketIo: negative descriptor");
        return -1;
    }
    if (self->ready) {
        PyErr_SetString(PyExc_TypeError, "PacketIo: already initialised");
        return -1;
    }
    self->fd = fd;
    self->wake = wake;
    atomic_store(&self->users, 0);
    atomic_store(&self->closing, 0);
    self->ready = 1;
    return 0;
}

PyDoc_STRVAR(pio_read_doc,
"read(buf, offset, overflow)\n--\n\n"
"Read one packet into buf[offset:]; wait in poll() on the descriptor and the\n"
"eventfd while none is ready. A packet longer than the room is read into\n"
"overflow, counted (too_big) and dropped, and the read goes on. Return the\n"
"packet's length, or -errno; -EBADF once closing has begun.");

static PyObject *
pio_read(packet_io_t *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "read() takes 3 arguments");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer buf, over;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    if (offset < 0 || offset >= buf.len) {
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes has no room after offset %zd",
                     buf.len, offset);
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &over, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    struct iovec iov[2] = {{(char *)buf.buf + offset, (size_t)(buf.len - offset)},
                           {over.buf, (size_t)over.len}};
    Py_ssize_t room = buf.len - offset;
    Py_ssize_t n = -EBADF;
    unsigned long long too_big = 0;
    int fd = self->fd, wake = self->wake;
    int go = io_enter(self);
    while (go > 0) {
        Py_BEGIN_ALLOW_THREADS
        while ((n = io_wait_call(fd, wake, POLLIN, iov, 2)) > room) {
            too_big++; /* it did not fit: gone, read the next */
        }
        Py_END_ALLOW_THREADS
        go = io_settle(self, &n);
    }
    self->too_big += too_big;
    if (n >= 0) {
        self->packets_read++;
        self->bytes_read += (unsigned long long)n;
    }
    PyBuffer_Release(&over);
    PyBuffer_Release(&buf);
    return go < 0 ? NULL : PyLong_FromSsize_t(n);
}

PyDoc_STRVAR(pio_write_doc,
"write(buf, offset)\n--\n\n"
"Write buf[offset:] as one packet (empty when offset is past the end); wait\n"
"in poll() on the descriptor and the eventfd while the kernel is full.\n"
"Return the bytes written, or -errno; -EBADF once closing has begun.");

static PyObject *
pio_write(packet_io_t *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write() takes 2 arguments");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (offset > buf.len) {
        offset = buf.len; /* an empty packet, as buf[offset:] is: the kernel's to refuse */
    }
    struct iovec iov = {(char *)buf.buf + offset, (size_t)(buf.len - offset)};
    Py_ssize_t n = -EBADF;
    int fd = self->fd, wake = self->wake;
    int go = io_enter(self);
    while (go > 0) {
        Py_BEGIN_ALLOW_THREADS
        n = io_wait_call(fd, wake, POLLOUT, &iov, 1);
        Py_END_ALLOW_THREADS
        go = io_settle(self, &n);
    }
    if (n >= 0) {
        self->packets_written++;
        self->bytes_written += (unsigned long long)n;
    }
    PyBuffer_Release(&buf);
    return go < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* vnet.py's gso_segments: (segments, header length) of one kernel packet
 * (virtio-net header + IP packet), segments 0 when it is malformed. The same
 * checks in the same order; read it for the why. */
static Py_ssize_t
gso_check(const uint8_t *data, Py_ssize_t len, Py_ssize_t *hdr_len_out)
{
    *hdr_len_out = 0;
    Py_ssize_t ip_len = len - VNET_HDR_LEN;
    if (ip_len < IP4_MIN_HDR_LEN) {
        return 0;
    }
    const uint8_t *ip = data + VNET_HDR_LEN;
    uint8_t flags = data[0], gso_type = data[1];
    uint16_t gso_size = host16(data + 4), csum_start = host16(data + 6),
             csum_offset = host16(data + 8);
    int version = ip[0] >> 4, proto;
    Py_ssize_t iph_len;
    if (version == 4) {
        iph_len = (ip[0] & 0x0F) * 4;
        if (iph_len < IP4_MIN_HDR_LEN || iph_len > ip_len || get16(ip + 2) != ip_len) {
            return 0;
        }
        proto = ip[9];
    }
    else if (version == 6) {
        iph_len = IP6_HDR_LEN;
        if (ip_len < IP6_HDR_LEN || get16(ip + 4) + IP6_HDR_LEN != ip_len) {
            return 0;
        }
        proto = ip[6];
    }
    else {
        return 0;
    }
    int needs_csum = flags & F_NEEDS_CSUM;
    if (needs_csum && (Py_ssize_t)csum_start + csum_offset + 2 > ip_len) {
        return 0;
    }
    int kind = gso_type & ~GSO_ECN;
    if (kind == GSO_NONE) {
        return 1;
    }
    int need_version, need_proto;
    if (kind == GSO_TCPV4) {
        need_version = 4, need_proto = IPPROTO_TCP_;
    }
    else if (kind == GSO_TCPV6) {
        need_version = 6, need_proto = IPPROTO_TCP_;
    }
    else if (kind == GSO_UDP_L4) {
        need_version = 0, need_proto = IPPROTO_UDP_;
    }
    else {
        return 0;
    }
    if (gso_size == 0 || proto != need_proto || (need_version && need_version != version)) {
        return 0;
    }
    Py_ssize_t l4_hdr_len;
    int csum_field;
    if (proto == IPPROTO_TCP_) {
        if (ip_len < iph_len + TCP_MIN_HDR_LEN) {
            return 0;
        }
        l4_hdr_len = (ip[iph_len + 12] >> 4) * 4;
        if (l4_hdr_len < TCP_MIN_HDR_LEN) {
            return 0;
        }
        csum_field = 16;
    }
    else {
        l4_hdr_len = UDP_HDR_LEN;
        csum_field = 6;
    }
    Py_ssize_t hdr_len = iph_len + l4_hdr_len;
    if (hdr_len > ip_len || hdr_len + gso_size > IP_MAX_PACKET_LEN) {
        return 0;
    }
    if (needs_csum && (csum_start != iph_len || csum_offset != csum_field)) {
        return 0;
    }
    Py_ssize_t payload = ip_len - hdr_len;
    Py_ssize_t segments = (payload + gso_size - 1) / gso_size;
    *hdr_len_out = hdr_len;
    return segments > 1 ? segments : 1;
}

PyDoc_STRVAR(gso_segments_doc,
"gso_segments(data)\n--\n\n"
"(segments, header length) of a virtio-net header and its IP packet; (0, 0)\n"
"when it is malformed (vnet.py's gso_segments).");

static PyObject *
py_gso_segments(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t hdr_len;
    Py_ssize_t segments = gso_check(view.buf, view.len, &hdr_len);
    PyBuffer_Release(&view);
    return Py_BuildValue("(nn)", segments, hdr_len);
}

/* The buffers of a batch, taken with the GIL: released by release_bufs. */
static Py_buffer *
take_bufs(PyObject *seq, Py_ssize_t *count, int flags)
{
    /* A tuple of its own (see coalesce): the items stay while buffers are taken. */
    PyObject *fast = PySequence_Check(seq) ? PySequence_Tuple(seq) : NULL;
    if (fast == NULL) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_SetString(PyExc_TypeError, "bufs must be a sequence of buffers");
        }
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    Py_buffer *views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (views == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &views[i], flags) < 0) {
            while (i-- > 0) {
                PyBuffer_Release(&views[i]);
            }
            PyMem_Free(views);
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    *count = n;
    return views;
}

static void
release_bufs(Py_buffer *views, Py_ssize_t count)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        PyBuffer_Release(&views[i]);
    }
    PyMem_Free(views);
}

PyDoc_STRVAR(pio_read_gso_doc,
"read_gso(bufs, sizes, at, overflow)\n--\n\n"
"Read kernel packets whole into bufs[i][at:] (virtio-net header, then the\n"
"packet): wait for the first, then take those already waiting, one per\n"
"buffer. sizes[i] is the packet's length without the header. A packet\n"
"longer than its room is dropped (too_big), one whose header does not match\n"
"it too (malformed). Return (stored, err): err is 0, or -errno of an error\n"
"that ended the call (with stored 0), or that came after stored packets\n"
"(for the caller to raise next time); -EBADF once closing has begun.");

static PyObject *
pio_read_gso(packet_io_t *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "read_gso() takes 4 arguments");
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[2]);
    if (at == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (at < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    Py_ssize_t count = 0;
    Py_buffer *views = take_bufs(args[0], &count, PyBUF_WRITABLE);
    if (views == NULL) {
        return NULL;
    }
    /* Checked before any read: a packet read is never lost to a bad argument. */
    Py_ssize_t n_sizes = PySequence_Size(args[1]);
    if (n_sizes < count) {
        if (n_sizes >= 0) {
            PyErr_Format(PyExc_ValueError, "read_gso with %zd sizes for %zd buffers", n_sizes,
                         count);
        }
        release_bufs(views, count);
        return NULL;
    }
    Py_buffer over;
    if (PyObject_GetBuffer(args[3], &over, PyBUF_WRITABLE) < 0) {
        release_bufs(views, count);
        return NULL;
    }
    Py_ssize_t *lens = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_ssize_t));
    if (lens == NULL) {
        PyBuffer_Release(&over);
        release_bufs(views, count);
        return PyErr_NoMemory();
    }
    Py_ssize_t stored = 0, err = 0;
    unsigned long long too_big = 0, malformed = 0, packets = 0, bytes = 0, gso = 0;
    int fd = self->fd, wake = self->wake;
    int go = io_enter(self);
    if (!go) {
        err = -EBADF;
    }
    while (go > 0 && stored < count) {
        Py_BEGIN_ALLOW_THREADS
        while (stored < count) {
            Py_buffer *v = &views[stored];
            Py_ssize_t start = at < v->len ? at : v->len;
            Py_ssize_t room = v->len - start;
            struct iovec iov[2] = {{(char *)v->buf + start, (size_t)room},
                                   {over.buf, (size_t)over.len}};
            Py_ssize_t n;
            if (stored == 0) {
                n = io_wait_call(fd, wake, POLLIN, iov, 2); /* wait for the first */
            }
            else if ((n = readv(fd, iov, 2)) < 0) {
                n = -errno; /* after it, only what is waiting: EAGAIN ends the batch */
            }
            if (n < 0) {
                if (n != -EAGAIN) {
                    err = n;
                }
                break;
            }
            if (n > room) {
                too_big++;
                continue;
            }
            Py_ssize_t hdr_len;
            Py_ssize_t segments = gso_check((const uint8_t *)v->buf + start, n, &hdr_len);
            if (segments == 0) {
                malformed++;
                continue;
            }
            Py_ssize_t ip_len = n - VNET_HDR_LEN;
            lens[stored++] = ip_len;
            packets += (unsigned long long)segments;
            bytes += (unsigned long long)(ip_len + (segments - 1) * hdr_len);
            gso += hdr_len != 0;
        }
        Py_END_ALLOW_THREADS
        go = 0;
        if (err == -EINTR && stored == 0) {
            Py_ssize_t r = -EINTR;
            go = io_settle(self, &r); /* signal handlers, then again */
            err = go == 0 ? r : 0;
        }
        else {
            if (err == -EINTR) {
                err = 0; /* the handlers run when the caller's Python goes on */
            }
            io_leave(self);
        }
    }
    if (go > 0) {
        io_leave(self); /* no buffers */
    }
    self->too_big += too_big;
    self->malformed += malformed;
    PyObject *result = NULL;
    if (go >= 0) {
        Py_ssize_t i = 0;
        for (; i < stored; i++) {
            /* sizes was checked above, but another thread may have shrunk it
             * meanwhile: then the packets are lost, and not counted as read. */
            PyObject *size = PyLong_FromSsize_t(lens[i]);
            if (size == NULL || PySequence_SetItem(args[1], i, size) < 0) {
                Py_XDECREF(size);
                break;
            }
            Py_DECREF(size);
        }
        if (i == stored) {
            self->packets_read += packets;
            self->bytes_read += bytes;
            self->gso_read += gso;
            result = Py_BuildValue("(nn)", stored, err);
        }
    }
    PyMem_Free(lens);
    PyBuffer_Release(&over);
    release_bufs(views, count);
    return result;
}

PyDoc_STRVAR(pio_write_gso_doc,
"write_gso(bufs, at, refused)\n--\n\n"
"Write each bufs[i][at:] (virtio-net header, then the packet) whole, one\n"
"system call each. Refused by the kernel (EIO; EINVAL for a GSO_NONE\n"
"packet): dropped and counted (dropped_write). Return (done, err): done\n"
"packets were handled; when done < len(bufs), bufs[done] is the caller's:\n"
"err 1 for a super-packet of a kind in *refused* (bit 1: TCP, bit 2: UDP),\n"
"else -errno of its write (-EINVAL: the kernel refused a super-packet;\n"
"-EBADF once closing has begun).");

static PyObject *
pio_write_gso(packet_io_t *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "write_gso() takes 3 arguments");
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[1]);
    long refused = at == -1 && PyErr_Occurred() ? 0 : PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (at < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    Py_ssize_t count = 0;
    Py_buffer *views = take_bufs(args[0], &count, PyBUF_SIMPLE);
    if (views == NULL) {
        return NULL;
    }
    Py_ssize_t done = 0, err = 0;
    unsigned long long packets = 0, bytes = 0, gso = 0, dropped = 0;
    int fd = self->fd, wake = self->wake;
    int go = io_enter(self);
    if (!go) {
        err = -EBADF;
    }
    while (go > 0 && done < count) {
        Py_BEGIN_ALLOW_THREADS
        while (done < count) {
            Py_buffer *v = &views[done];
            Py_ssize_t start = at < v->len ? at : v->len;
            const uint8_t *data = (const uint8_t *)v->buf + start;
            Py_ssize_t len = v->len - start;
            int kind = len > 1 ? data[1] & ~GSO_ECN : GSO_NONE;
            if (kind != GSO_NONE && (refused & (kind == GSO_UDP_L4 ? 2 : 1))) {
                err = 1;
                break;
            }
            struct iovec iov = {(void *)data, (size_t)len};
            Py_ssize_t n = io_wait_call(fd, wake, POLLOUT, &iov, 1);
            if (n < 0) {
                if (n == -EIO || (n == -EINVAL && kind == GSO_NONE)) {
                    dropped++;
                    done++;
                    continue;
                }
                err = n;
                break;
            }
            Py_ssize_t hdr_len;
            Py_ssize_t segments = gso_check(data, len, &hdr_len);
            gso += hdr_len != 0;
            if (segments == 0) {
                segments = 1; /* not ours to judge: the kernel took it */
            }
            packets += (unsigned long long)segments;
            bytes += (unsigned long long)(len - VNET_HDR_LEN + (segments - 1) * hdr_len);
            done++;
        }
        Py_END_ALLOW_THREADS
        go = 0;
        if (err == -EINTR && done == 0) {
            Py_ssize_t r = -EINTR;
            go = io_settle(self, &r); /* signal handlers, then again */
            err = go == 0 ? r : 0;
        }
        else {
            io_leave(self); /* -EINTR after progress: the caller goes on */
        }
    }
    if (go > 0) {
        io_leave(self); /* no buffers */
    }
    self->packets_written += packets;
    self->bytes_written += bytes;
    self->gso_written += gso;
    self->dropped_write += dropped;
    release_bufs(views, count);
    return go < 0 ? NULL : Py_BuildValue("(nn)", done, err);
}

PyDoc_STRVAR(pio_drain_doc,
"drain()\n--\n\n"
"Refuse new calls (they return -EBADF) and wait for those in progress to\n"
"return; idempotent. Make the eventfd readable first, or a call waiting in\n"
"poll() keeps this waiting.");

static PyObject *
pio_drain(packet_io_t *self, PyObject *Py_UNUSED(ignored))
{
    atomic_store(&self->closing, 1);
    if (atomic_load(&self->users) == 0) {
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    while (atomic_load(&self->users) != 0) {
        /* A call here has been woken and is on its way out: a few
         * microseconds, so a short sleep rather than a condition variable. */
        struct timespec ts = {0, 50 * 1000};
        nanosleep(&ts, NULL);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pio_counts_doc,
"counts()\n--\n\n"
"The counters, as a dict named like TunStats's fields.");

static PyObject *
pio_counts(packet_io_t *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsK}", "packets_read", self->packets_read, "bytes_read",
        self->bytes_read, "dropped_too_big", self->too_big, "dropped_malformed", self->malformed,
        "gso_read", self->gso_read, "packets_written", self->packets_written, "bytes_written",
        self->bytes_written, "dropped_write", self->dropped_write, "gso_written",
        self->gso_written);
}

static PyMethodDef pio_methods[] = {
    {"read", (PyCFunction)(void (*)(void))pio_read, METH_FASTCALL, pio_read_doc},
    {"write", (PyCFunction)(void (*)(void))pio_write, METH_FASTCALL, pio_write_doc},
    {"read_gso", (PyCFunction)(void (*)(void))pio_read_gso, METH_FASTCALL, pio_read_gso_doc},
    {"write_gso", (PyCFunction)(void (*)(void))pio_write_gso, METH_FASTCALL, pio_write_gso_doc},
    {"drain", (PyCFunction)pio_drain, METH_NOARGS, pio_drain_doc},
    {"counts", (PyCFunction)pio_counts, METH_NOARGS, pio_counts_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(pio_doc,
"PacketIo(fd, wake)\n--\n\n"
"One packet per call to or from a non-blocking TUN descriptor *fd*, with\n"
"the counters; *wake* is the eventfd that ends waits. Holds the numbers,\n"
"never closes them: the owner does, after drain().");

static PyTypeObject packet_io_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunkit._speedups.PacketIo",
    .tp_basicsize = sizeof(packet_io_t),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = pio_doc,
    .tp_methods = pio_methods,
    .tp_init = (initproc)pio_init,
    .tp_new = pio_new,
};

/* ------------------------------------------------------------------------ */
/* Module                                                                    */

PyDoc_STRVAR(bind_doc,
"bind(malformed, too_big, too_many, write_cls, zero_hdr)\n--\n\n"
"Give the kernels the Python classes they raise and build (tunkit._offload does).");

static PyObject *
py_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "bind() takes 5 arguments");
        return NULL;
    }
    for (int i = 0; i < 3; i++) {
        if (!PyExceptionClass_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError, "bind(): the first three must be exception classes");
            return NULL;
        }
    }
    /* new_write fills the tuple's items itself: a tuple subclass of 5
     * fields whose instances have no other storage (a NamedTuple). */
    PyObject *fields = PyType_Check(args[3]) ? PyObject_GetAttrString(args[3], "_fields") : NULL;
    Py_ssize_t n_fields = fields ? PyObject_Length(fields) : -1;
    Py_XDECREF(fields);
    if (n_fields != 5 || !PyType_IsSubtype((PyTypeObject *)args[3], &PyTuple_Type) ||
        ((PyTypeObject *)args[3])->tp_basicsize != PyTuple_Type.tp_basicsize) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "bind(): write_cls must be a NamedTuple of 5 fields");
        return NULL;
    }
    state_t *st = (state_t *)PyModule_GetState(module);
    PyObject **slots[] = {&st->malformed, &st->too_big, &st->too_many, &st->write_cls,
                          &st->zero_hdr};
    for (int i = 0; i < 5; i++) {
        Py_INCREF(args[i]);
        Py_XSETREF(*slots[i], args[i]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"ones_sum", (PyCFunction)(void (*)(void))py_ones_sum, METH_FASTCALL | METH_KEYWORDS,
     ones_sum_doc},
    {"checksum", (PyCFunction)(void (*)(void))py_checksum, METH_FASTCALL | METH_KEYWORDS,
     checksum_doc},
    {"pseudo_sum", (PyCFunction)(void (*)(void))py_pseudo_sum, METH_FASTCALL | METH_KEYWORDS,
     pseudo_sum_doc},
    {"update16", (PyCFunction)(void (*)(void))py_update16, METH_FASTCALL | METH_KEYWORDS,
     update16_doc},
    {"split", (PyCFunction)(void (*)(void))py_split, METH_FASTCALL | METH_KEYWORDS, split_doc},
    {"coalesce", (PyCFunction)(void (*)(void))py_coalesce, METH_FASTCALL | METH_KEYWORDS,
     coalesce_doc},
    {"bind", (PyCFunction)(void (*)(void))py_bind, METH_FASTCALL, bind_doc},
    {"gso_segments", (PyCFunction)py_gso_segments, METH_O, gso_segments_doc},
    {NULL, NULL, 0, NULL},
};

static int
mod_traverse(PyObject *m, visitproc visit, void *arg)
{
    state_t *st = (state_t *)PyModule_GetState(m);
    Py_VISIT(st->malformed);
    Py_VISIT(st->too_big);
    Py_VISIT(st->too_many);
    Py_VISIT(st->write_cls);
    Py_VISIT(st->zero_hdr);
    return 0;
}

static int
mod_clear(PyObject *m)
{
    state_t *st = (state_t *)PyModule_GetState(m);
    Py_CLEAR(st->malformed);
    Py_CLEAR(st->too_big);
    Py_CLEAR(st->too_many);
    Py_CLEAR(st->write_cls);
    Py_CLEAR(st->zero_hdr);
    return 0;
}

static void
mod_free(void *m)
{
    mod_clear((PyObject *)m);
}

static int
mod_exec(PyObject *m)
{
    if (PyType_Ready(&packet_io_type) < 0) {
        return -1;
    }
    Py_INCREF(&packet_io_type);
    if (PyModule_AddObject(m, "PacketIo", (PyObject *)&packet_io_type) < 0) {
        Py_DECREF(&packet_io_type);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, mod_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "tunkit._speedups",
    "Native kernels of tunkit: checksum, split, coalesce; PacketIo for devices without offload.",
    sizeof(state_t),
    methods,
    slots,
    mod_traverse,
    mod_clear,
    mod_free,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&moduledef);
}

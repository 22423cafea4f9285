/*
 * tunkit.h: what the units of tunkit._speedups share. The common includes,
 * the kernel and RFC constants, the byte helpers and the inline parts of the
 * Internet checksum, the module state, and the declarations of the functions
 * that one unit defines and another calls (module.c's method table names
 * them all). Everything else in a unit is static.
 *
 * tunkit._speedups is one extension module built from several units, a unit
 * per concern, each the C twin of a pure-Python module (named at its top):
 *   checksum.c   the Internet checksum       tunkit/_offload/checksum.py
 *   split.c      split                       tunkit/_offload/split.py
 *   coalesce.c   coalesce                    tunkit/_offload/coalesce.py
 *   packet_io.c  PacketIo, gso_segments      tunkit/_linux/ (fd.py, device.py,
 *                                            gso_device.py); _offload/vnet.py
 *   mmsg.c       UdpIo                       tunkit/transport/udp.py (UdpTun)
 *   module.c     the module, bind()          tunkit/_offload/_impl.py binds it
 *
 * One behaviour, two implementations: every kernel does exactly what its
 * pure-Python twin does, byte for byte, with the same exceptions and
 * messages; the test suite runs on both and hypothesis compares them. Read
 * the Python modules for the why of each rule (RFC sections, kernel
 * functions); the C only says where it differs in how, not in what.
 *
 * Buffers are taken with PyObject_GetBuffer (or as memoryviews that hold an
 * export), so no exporter can resize or free them; then the GIL is released
 * for the work on the bytes when there is enough of it (GIL_RELEASE_BYTES):
 * a reader thread splitting and a writer thread coalescing run at once.
 */

#ifndef TUNKIT_SPEEDUPS_H
#define TUNKIT_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <netinet/in.h> /* IPPROTO_TCP, IPPROTO_UDP */
#include <stdint.h>
#include <string.h>

/* What the units share stays inside the extension: as when it was one file
 * of static functions, the shared object exports PyInit__speedups alone. */
#pragma GCC visibility push(hidden)

/* Below this many bytes of work the GIL is kept: releasing and taking it
 * back costs more than the work, and may wait for another thread's switch
 * interval. */
#define GIL_RELEASE_BYTES 8192

/* Named as in tunkit/_offload/headers.py and vnet.py, which give the why of
 * each; offsets are relative to the start of their own header. Multi-byte
 * fields are big-endian on the wire (get16/put16), except the virtio-net
 * header's, which are in host order (host16/put_host16). */

/* --- struct virtio_net_hdr, <linux/virtio_net.h> (vnet.py: VNET_HDR) ------ */
/* In host byte order on TUN (the legacy layout; TUNSETVNETLE is not used). */
#define VNET_FLAGS 0         /* u8: VIRTIO_NET_HDR_F_* */
#define VNET_GSO_TYPE 1      /* u8: VIRTIO_NET_HDR_GSO_* */
#define VNET_HDR_LEN_FIELD 2 /* u16 hdr_len (VNET_HDR_LEN is the header's own length) */
#define VNET_GSO_SIZE 4      /* u16 */
#define VNET_CSUM_START 6    /* u16 */
#define VNET_CSUM_OFFSET 8   /* u16 */
#define VNET_HDR_LEN 10
/* Values of virtio_net_hdr.flags, <linux/virtio_net.h>. */
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1 /* use csum_start, csum_offset (CHECKSUM_PARTIAL) */
/* Values of virtio_net_hdr.gso_type, <linux/virtio_net.h>. */
#define VIRTIO_NET_HDR_GSO_NONE 0   /* not a GSO frame */
#define VIRTIO_NET_HDR_GSO_TCPV4 1  /* GSO frame, IPv4 TCP (TSO) */
#define VIRTIO_NET_HDR_GSO_TCPV6 4  /* GSO frame, IPv6 TCP */
#define VIRTIO_NET_HDR_GSO_UDP_L4 5 /* GSO frame, IPv4 or IPv6 UDP segmentation (USO) */
#define VIRTIO_NET_HDR_GSO_ECN 0x80 /* bit or-ed into gso_type: the TCP stream uses ECN */

/* IP protocol numbers, IPPROTO_TCP and IPPROTO_UDP (IANA): <netinet/in.h>. */

/* Longest IP packet that GRO builds or a segment may have: the 16-bit total
 * length of IPv4 (the kernel's GRO_LEGACY_MAX_SIZE bounds IPv6 the same way). */
#define IP_MAX_PACKET_LEN 0xFFFF

/* A 16-bit checksum field, as csum_start + csum_offset points at one. */
#define CSUM_FIELD_LEN 2

/* --- IPv4 header, RFC 791 section 3.1 ------------------------------------- */
#define IP4_VER_IHL 0 /* version (high nibble), header length in 32-bit words */
#define IP4_TOS 1     /* type of service / DSCP + ECN (RFC 2474, RFC 3168) */
#define IP4_TOTAL_LEN 2
#define IP4_ID 4
#define IP4_FLAGS_FRAG 6 /* flags (3 bits) + fragment offset (13 bits) */
#define IP4_TTL 8
#define IP4_PROTOCOL 9
#define IP4_CHECKSUM 10
#define IP4_SRC 12
#define IP4_DST 16
#define IP4_ADDRS_LEN 8 /* IP4_SRC and IP4_DST, adjacent: what the pseudo-header sums */
#define IP4_MIN_HDR_LEN 20
#define IP4_MAX_HDR_LEN 60
#define IP4_FLAG_DF 0x4000 /* in the 16-bit flags/fragment field */
#define IP4_FLAG_MF 0x2000
#define IP4_FRAG_OFFSET_MASK 0x1FFF

/* --- IPv6 header, RFC 8200 section 3 -------------------------------------- */
#define IP6_VER_TC_FLOW 0 /* version (4 bits), traffic class (8), flow label (20) */
#define IP6_PAYLOAD_LEN 4
#define IP6_NEXT_HEADER 6
#define IP6_HOP_LIMIT 7
#define IP6_SRC 8
#define IP6_DST 24
#define IP6_ADDRS_LEN 32 /* IP6_SRC and IP6_DST, adjacent: what the pseudo-header sums */
#define IP6_HDR_LEN 40

/* --- TCP header, RFC 9293 section 3.1 ------------------------------------- */
#define TCP_SRC_PORT 0
#define TCP_DST_PORT 2
#define TCP_SEQ 4
#define TCP_ACK 8
#define TCP_DATA_OFFSET 12 /* data offset in 32-bit words (high nibble) */
#define TCP_FLAGS 13
#define TCP_WINDOW 14
#define TCP_CHECKSUM 16
#define TCP_URGENT 18
#define TCP_MIN_HDR_LEN 20 /* options, if any, follow */
#define TCP_MAX_HDR_LEN 60
/* Flag bits of the TCP_FLAGS byte (RFC 9293 section 3.1; CWR/ECE: RFC 3168). */
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define TCP_FLAG_ACK 0x10
#define TCP_FLAG_URG 0x20
#define TCP_FLAG_ECE 0x40
#define TCP_FLAG_CWR 0x80
/* split.py, coalesce.py (_TCP_LAST_ONLY, _TCP_FIRST_ONLY): the flags that
 * tcp_gso_segment keeps on the last segment only, and on the first only. */
#define TCP_LAST_ONLY (TCP_FLAG_FIN | TCP_FLAG_PSH)
#define TCP_FIRST_ONLY TCP_FLAG_CWR

/* --- UDP header, RFC 768 -------------------------------------------------- */
#define UDP_SRC_PORT 0
#define UDP_DST_PORT 2
#define UDP_LEN 4
#define UDP_CHECKSUM 6
#define UDP_HDR_LEN 8

/* TCP and UDP alike: the source and destination ports lead the header
 * (TCP_SRC_PORT, TCP_DST_PORT; UDP_SRC_PORT, UDP_DST_PORT), a flow's key. */
#define L4_PORTS_LEN 4

/* coalesce.Write, a NamedTuple: iov, packets, first, gso, indices. */
#define WRITE_FIELDS 5

/* ------------------------------------------------------------------------ */
/* Byte helpers: big-endian (network order) and host-order 16/32-bit fields  */

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

/* ------------------------------------------------------------------------ */
/* The Internet checksum (checksum.c has the loop and the Python wrappers)   */

/* checksum.fold for a total that fits 64 bits: 0 only for a zero total. */
static inline uint32_t
fold64(uint64_t s)
{
    while (s >> 16) {
        s = (s & 0xFFFF) + (s >> 16);
    }
    return (uint32_t)s;
}

/* Sum of data as big-endian 16-bit words, folded (checksum.c). */
uint32_t be_sum(const uint8_t *p, size_t n);

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

/* ------------------------------------------------------------------------ */
/* Module state: the Python classes the kernels raise and build (bind())     */

typedef struct {
    PyObject *malformed;  /* tunkit._offload.headers._Malformed */
    PyObject *too_big;    /* tunkit._offload.headers._TooBig */
    PyObject *too_many;   /* tunkit._errors.TooManySegmentsError */
    PyObject *write_cls;  /* tunkit._offload.coalesce.Write (a NamedTuple) */
    PyObject *zero_hdr;   /* tunkit._offload.coalesce.ZERO_VNET_HDR */
} state_t;

/* The module's state, or NULL with RuntimeError before bind() (module.c). */
state_t *get_state(PyObject *module);

/* Parse fast-call arguments by name: args[0..nargs) then keywords; the first
 * n_required are required, a missing optional one is NULL (module.c). */
int parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
               const char *const *names, int n_names, int n_required, PyObject **out);

/* ------------------------------------------------------------------------ */
/* The module's functions and type, for module.c's method table              */

/* checksum.c */
extern const char ones_sum_doc[], checksum_doc[], pseudo_sum_doc[], update16_doc[];
PyObject *py_ones_sum(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames);
PyObject *py_checksum(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames);
PyObject *py_pseudo_sum(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames);
PyObject *py_update16(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames);

/* split.c */
extern const char split_doc[];
/* The plan of one super-packet's split: split_write makes the segments from it. */
typedef struct {
    const uint8_t *ip;
    int is_v4, is_tcp;
    Py_ssize_t iph_len, hdr_len, csum_at, gso_size, count, last_len;
    uint32_t addr_sum, ip_base_sum, first_seq;
    uint16_t first_id;
    uint8_t flags, middle_flags;
    uint8_t template[IP6_HDR_LEN + TCP_MAX_HDR_LEN];
} split_plan_t;
void split_plan_checked(split_plan_t *pl, const uint8_t *data, Py_ssize_t len,
                        Py_ssize_t hdr_len);
void split_write(const split_plan_t *pl, uint8_t *const *outs, Py_ssize_t *lens);
PyObject *py_split(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames);

/* coalesce.c */
extern const char coalesce_doc[];
/* The plan of a batch, for the units that coalesce without Python objects
 * (mmsg.c): batch_alloc once, then per batch batch_reset, set pk[i].p and
 * pk[i].n, plan_batch; entries[0..n_entries) are the writes in order, each
 * a group (>= 0; its packets linked by pk[].next from head, a super-packet
 * when count > 1: patch_group writes its virtio header and headers) or a
 * lone packet (~index). */
enum { K_NONE = 0, K_KEY = 1, K_CAND = 2 };

typedef struct {
    uint8_t proto, is_v6;
    uint8_t ports[L4_PORTS_LEN];
    uint8_t addrs[IP6_ADDRS_LEN]; /* IPv4: the first IP4_ADDRS_LEN */
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
    Py_ssize_t cap;   /* room for this many packets (batch_alloc) */
    size_t table_len; /* entries of table allocated */
    size_t mask;      /* of the part of table in use (batch_reset) */
    int tcp, udp;
} batch_t;
int batch_alloc(batch_t *b, Py_ssize_t cap);
void batch_reset(batch_t *b, Py_ssize_t n);
void batch_free(batch_t *b);
void plan_batch(batch_t *b);
void patch_group(const batch_t *b, const group_t *g, uint8_t *slot);
PyObject *py_coalesce(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames);

/* packet_io.c */
extern PyTypeObject packet_io_type;
extern const char gso_segments_doc[];
PyObject *py_gso_segments(PyObject *module, PyObject *arg);
/* Wait without the GIL until fd has poll() `events` or wake is readable: 0,
 * or -errno (-EBADF: wake is readable, close() has begun). A wake below 0
 * is a descriptor in non-blocking mode (set_blocking(False)): no wait,
 * -EAGAIN at once, for the caller's event loop to wait in its stead. */
Py_ssize_t wait_fd(int fd, int wake, short events);
/* The wake argument of wait_fd for an object in *blocking* mode or not. */
#define WAIT_WAKE(wake, blocking) ((blocking) ? (wake) : -1)
extern const char set_blocking_doc[];
/* vnet.py's gso_segments on bytes: segments (0: malformed) and *hdr_len_out. */
Py_ssize_t gso_check(const uint8_t *data, Py_ssize_t len, Py_ssize_t *hdr_len_out);
/* The buffers of a sequence, taken with the GIL (PyObject_GetBuffer *flags*):
 * NULL with an exception, else *count* views for release_bufs. */
Py_buffer *take_bufs(PyObject *seq, Py_ssize_t *count, int flags);
void release_bufs(Py_buffer *views, Py_ssize_t count);

/* mmsg.c */
extern PyTypeObject udp_io_type;

#pragma GCC visibility pop

#endif /* TUNKIT_SPEEDUPS_H */

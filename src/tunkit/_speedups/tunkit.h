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

#include <stdint.h>
#include <string.h>

/* What the units share stays inside the extension: as when it was one file
 * of static functions, the shared object exports PyInit__speedups alone. */
#pragma GCC visibility push(hidden)

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
PyObject *py_split(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames);

/* coalesce.c */
extern const char coalesce_doc[];
PyObject *py_coalesce(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames);

/* packet_io.c */
extern PyTypeObject packet_io_type;
extern const char gso_segments_doc[];
PyObject *py_gso_segments(PyObject *module, PyObject *arg);

#pragma GCC visibility pop

#endif /* TUNKIT_SPEEDUPS_H */

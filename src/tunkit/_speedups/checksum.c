/*
 * checksum.c: the Internet checksum (RFC 1071) of tunkit._speedups, and its
 * Python wrappers ones_sum, checksum, pseudo_sum and update16. The C twin of
 * tunkit/_offload/checksum.py.
 *
 * The sum is taken in host byte order, 32 bits at a time into a 64-bit
 * accumulator, then folded and byte-swapped (RFC 1071 section 2(B): the sum
 * is independent of byte order). Every fold keeps "negative zero": a sum is
 * 0 only when all its data is zero, as in checksum.fold. fold64,
 * ones_sum_raw and update16_raw, which split.c and coalesce.c call per
 * segment, are inline in tunkit.h.
 */

#include "tunkit.h"

/* Sum of data as big-endian 16-bit words (an odd tail padded with a zero
 * byte), folded: congruent modulo 0xFFFF, and 0 only for all-zero data. */
uint32_t
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

const char ones_sum_doc[] = PyDoc_STR(
"ones_sum(data, initial=0)\n--\n\n"
"Return the 16-bit one's-complement sum of data (RFC 1071) plus initial.");

PyObject *
py_ones_sum(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)module;
    return sum_common("ones_sum", args, nargs, kwnames, 0);
}

const char checksum_doc[] = PyDoc_STR(
"checksum(data, initial=0)\n--\n\n"
"Return the Internet checksum of data: the complement of its sum with initial.");

PyObject *
py_checksum(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)module;
    return sum_common("checksum", args, nargs, kwnames, 1);
}

const char pseudo_sum_doc[] = PyDoc_STR(
"pseudo_sum(addrs, proto, l4_len)\n--\n\n"
"Return the unfolded pseudo-header sum for the adjacent source and destination addrs.");

PyObject *
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

const char update16_doc[] = PyDoc_STR(
"update16(csum, old, new)\n--\n\n"
"Return checksum field csum after one 16-bit word changed from old to new (RFC 1624).");

PyObject *
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

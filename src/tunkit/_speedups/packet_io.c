/*
 * packet_io.c: PacketIo, the system calls of a TUN descriptor in C: read and
 * write of one packet (a device without offload), read_gso and write_gso of
 * a batch of packets with their virtio-net headers, super-packets passed on
 * whole (a device with offload), and the counters; and gso_segments, the
 * check of such a packet before it is handed on.
 *
 * The pure-Python twins: the read and write of NativeTun (_linux/device.py)
 * and the read_gso and write_gso of GsoNativeTun (_linux/gso_device.py), on
 * the _Descriptor of _linux/fd.py; gso_check is vnet.py's gso_segments
 * (_offload/vnet.py). The device tests run on both paths (io_path).
 */

#include "tunkit.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

/* write_gso's *refused*: the kinds of super-packet the kernel refused, as
 * bits (gso_device.py: _REFUSED_TCP, _REFUSED_UDP); and the err it returns
 * for a packet of such a kind, handed back to be split (_SPLIT_FIRST). */
#define REFUSED_TCP 1
#define REFUSED_UDP 2
#define SPLIT_FIRST 1

/*
 * A device makes a system call per packet, without offload (NativeTun.read
 * and write), or per super-packet, with it (GsoNativeTun.read_gso and
 * write_gso), so what Python runs around that call decides its speed. A
 * PacketIo call does one packet (read, write) or one batch of packets with
 * their virtio-net headers (read_gso, write_gso) and releases the GIL once
 * for all of it: the system calls, on EAGAIN a poll() on the descriptor and
 * on the wake-up eventfd that close() makes readable, the check of each
 * packet of a batch (gso_check) and the counters. Errors come back as
 * -errno, in place of the byte count (read, write) or beside the count of
 * packets done (read_gso, write_gso); -EBADF once closing has begun.
 *
 * One rule each, here for all four calls:
 * - A packet the kernel refuses on write (EIO: the link is down; EINVAL for
 *   a packet that is not a super-packet: not IP) is dropped and counted by
 *   PacketIo itself (dropped_write); write returns 0 for it, write_gso goes
 *   on. EINVAL for a super-packet is the caller's: the kernel lacks that
 *   offload, and the caller splits it.
 * - EINTR (poll() interrupted by a signal) before any progress runs the
 *   signal handlers outside the count of calls (io_settle), then the call
 *   goes on; after progress it is no error: the call returns what it did,
 *   and the handlers run as soon as the caller's Python goes on.
 * - Drops are counted the moment they happen (atomic counters, without the
 *   GIL), so that stats() is current while a read is blocked; packets and
 *   bytes when the call hands them over, with the GIL.
 *
 * On the Python path, the per-direction locks of _Descriptor (_linux/fd.py)
 * are what keep a descriptor number from being closed under a system call;
 * here a count of calls in progress does it, at the cost of two atomic
 * operations: a call counts itself in, then looks at `closing`; drain() sets
 * `closing`, then waits for the count to reach zero (both sequentially
 * consistent, so one of the two sees the other). drain() sleeps on the count
 * (a futex) and the last call out wakes it. After drain() no call touches
 * the numbers again, and the owner may close them. The count is never held
 * while Python code runs (a signal handler may call close()).
 */

typedef struct {
    PyObject_HEAD
    int fd;
    int wake;
    int ready; /* __init__ ran (once: a second one could reset the count) */
    int blocking; /* wait in poll() on EAGAIN (set_blocking), else return -EAGAIN */
    atomic_int users;
    atomic_int closing;
    /* Drops: counted as they happen, without the GIL (relaxed: counters only). */
    atomic_ullong too_big;
    atomic_ullong malformed;
    atomic_ullong dropped_write;
    /* Counters: written with the GIL held, by the calls that own them. */
    unsigned long long packets_read;
    unsigned long long bytes_read;
    unsigned long long gso_read;
    unsigned long long packets_written;
    unsigned long long bytes_written;
    unsigned long long gso_written;
    /* The fault seam (_fail_gso, tests only): the next fault_left super-packets
     * of the kinds in fault_kinds (REFUSED_* bits) fail with -fault_errno
     * without a system call. Set with the GIL held; 0 costs one int check. */
    long fault_left;
    long fault_kinds;
    int fault_errno;
} packet_io_t;

static inline void
count_drop(atomic_ullong *counter)
{
    atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
}

/* Whether the kernel's -errno *n* for a written packet means "dropped" (see
 * above); *gso*: the packet is a super-packet. */
static inline int
write_dropped(Py_ssize_t n, int gso)
{
    return n == -EIO || (n == -EINVAL && !gso);
}

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
    if (atomic_fetch_sub(&self->users, 1) == 1 && atomic_load(&self->closing)) {
        /* The last call out, while drain() waits: wake it. */
        syscall(SYS_futex, (int *)&self->users, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    }
}

/* Wait until fd has `events` or wake is readable: 0, or -errno (-EBADF: woken). */
Py_ssize_t
wait_fd(int fd, int wake, short events)
{
    if (wake < 0) {
        return -EAGAIN; /* non-blocking: the caller's event loop waits */
    }
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

/* io_settle for a batch (read_gso, write_gso) that made *progress* packets:
 * -EINTR after progress is no error (see above). 1: go again (*err is 0);
 * 0: done; -1: raised. */
static int
io_settle_batch(packet_io_t *self, Py_ssize_t progress, Py_ssize_t *err)
{
    if (*err == -EINTR && progress) {
        *err = 0;
    }
    int go = io_settle(self, err);
    if (go > 0) {
        *err = 0;
    }
    return go;
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
    self->blocking = 1;
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
    int fd = self->fd, wake = WAIT_WAKE(self->wake, self->blocking);
    int go = io_enter(self);
    while (go > 0) {
        Py_BEGIN_ALLOW_THREADS
        while ((n = io_wait_call(fd, wake, POLLIN, iov, 2)) > room) {
            count_drop(&self->too_big); /* it did not fit: gone, read the next */
        }
        Py_END_ALLOW_THREADS
        go = io_settle(self, &n);
    }
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
"Return the bytes written; 0 when the kernel refused the packet (EIO,\n"
"EINVAL), which is dropped and counted (dropped_write); or -errno, -EBADF\n"
"once closing has begun.");

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
    int fd = self->fd, wake = WAIT_WAKE(self->wake, self->blocking);
    int go = io_enter(self);
    while (go > 0) {
        Py_BEGIN_ALLOW_THREADS
        n = io_wait_call(fd, wake, POLLOUT, &iov, 1);
        if (write_dropped(n, 0)) {
            count_drop(&self->dropped_write);
            n = 0;
        }
        Py_END_ALLOW_THREADS
        go = io_settle(self, &n);
    }
    if (n > 0) {
        self->packets_written++;
        self->bytes_written += (unsigned long long)n;
    }
    PyBuffer_Release(&buf);
    return go < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* vnet.py's gso_segments: (segments, header length) of one kernel packet
 * (virtio-net header + IP packet), segments 0 when it is malformed. The same
 * checks in the same order; read it for the why. */
Py_ssize_t
gso_check(const uint8_t *data, Py_ssize_t len, Py_ssize_t *hdr_len_out)
{
    *hdr_len_out = 0;
    Py_ssize_t ip_len = len - VNET_HDR_LEN;
    if (ip_len < IP4_MIN_HDR_LEN) {
        return 0;
    }
    const uint8_t *ip = data + VNET_HDR_LEN;
    uint8_t flags = data[VNET_FLAGS], gso_type = data[VNET_GSO_TYPE];
    uint16_t gso_size = host16(data + VNET_GSO_SIZE), csum_start = host16(data + VNET_CSUM_START),
             csum_offset = host16(data + VNET_CSUM_OFFSET);
    int version = ip[IP4_VER_IHL] >> 4, proto;
    Py_ssize_t iph_len;
    if (version == 4) {
        iph_len = (ip[IP4_VER_IHL] & 0x0F) * 4;
        if (iph_len < IP4_MIN_HDR_LEN || iph_len > ip_len || get16(ip + IP4_TOTAL_LEN) != ip_len) {
            return 0;
        }
        proto = ip[IP4_PROTOCOL];
    }
    else if (version == 6) {
        iph_len = IP6_HDR_LEN;
        if (ip_len < IP6_HDR_LEN || get16(ip + IP6_PAYLOAD_LEN) + IP6_HDR_LEN != ip_len) {
            return 0;
        }
        proto = ip[IP6_NEXT_HEADER];
    }
    else {
        return 0;
    }
    int needs_csum = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM;
    if (needs_csum && (Py_ssize_t)csum_start + csum_offset + CSUM_FIELD_LEN > ip_len) {
        return 0;
    }
    int kind = gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
    if (kind == VIRTIO_NET_HDR_GSO_NONE) {
        return 1;
    }
    int need_version, need_proto;
    if (kind == VIRTIO_NET_HDR_GSO_TCPV4) {
        need_version = 4, need_proto = IPPROTO_TCP;
    }
    else if (kind == VIRTIO_NET_HDR_GSO_TCPV6) {
        need_version = 6, need_proto = IPPROTO_TCP;
    }
    else if (kind == VIRTIO_NET_HDR_GSO_UDP_L4) {
        need_version = 0, need_proto = IPPROTO_UDP;
    }
    else {
        return 0;
    }
    if (gso_size == 0 || proto != need_proto || (need_version && need_version != version)) {
        return 0;
    }
    Py_ssize_t l4_hdr_len;
    int csum_field;
    if (proto == IPPROTO_TCP) {
        if (ip_len < iph_len + TCP_MIN_HDR_LEN) {
            return 0;
        }
        l4_hdr_len = (ip[iph_len + TCP_DATA_OFFSET] >> 4) * 4;
        if (l4_hdr_len < TCP_MIN_HDR_LEN) {
            return 0;
        }
        csum_field = TCP_CHECKSUM;
    }
    else {
        l4_hdr_len = UDP_HDR_LEN;
        csum_field = UDP_CHECKSUM;
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

const char gso_segments_doc[] = PyDoc_STR(
"gso_segments(data)\n--\n\n"
"(segments, header length) of a virtio-net header and its IP packet; (0, 0)\n"
"when it is malformed (vnet.py's gso_segments).");

PyObject *
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
Py_buffer *
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

void
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
"(for the caller to raise next time); -EBADF once closing has begun;\n"
"-EAGAIN with nothing stored in non-blocking mode (set_blocking).");

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
    unsigned long long packets = 0, bytes = 0, gso = 0;
    int fd = self->fd, wake = WAIT_WAKE(self->wake, self->blocking);
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
                if (n != -EAGAIN || stored == 0) {
                    err = n; /* -EAGAIN for the first: non-blocking, nothing there */
                }
                break;
            }
            if (n > room) {
                count_drop(&self->too_big);
                continue;
            }
            Py_ssize_t hdr_len;
            Py_ssize_t segments = gso_check((const uint8_t *)v->buf + start, n, &hdr_len);
            if (segments == 0) {
                count_drop(&self->malformed);
                continue;
            }
            Py_ssize_t ip_len = n - VNET_HDR_LEN;
            lens[stored++] = ip_len;
            packets += (unsigned long long)segments;
            bytes += (unsigned long long)(ip_len + (segments - 1) * hdr_len);
            gso += hdr_len != 0;
        }
        Py_END_ALLOW_THREADS
        go = io_settle_batch(self, stored, &err);
    }
    if (go > 0) {
        io_leave(self); /* no buffers */
    }
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
"packet): dropped and counted (dropped_write), and the call goes on.\n"
"Return (done, err): done\n"
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
    unsigned long long packets = 0, bytes = 0, gso = 0;
    int fd = self->fd, wake = WAIT_WAKE(self->wake, self->blocking);
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
            int kind = len > VNET_GSO_TYPE ? data[VNET_GSO_TYPE] & ~VIRTIO_NET_HDR_GSO_ECN
                                            : VIRTIO_NET_HDR_GSO_NONE;
            if (kind != VIRTIO_NET_HDR_GSO_NONE &&
                (refused & (kind == VIRTIO_NET_HDR_GSO_UDP_L4 ? REFUSED_UDP : REFUSED_TCP))) {
                err = SPLIT_FIRST;
                break;
            }
            struct iovec iov = {(void *)data, (size_t)len};
            Py_ssize_t n;
            if (self->fault_left && kind != VIRTIO_NET_HDR_GSO_NONE &&
                (self->fault_kinds &
                 (kind == VIRTIO_NET_HDR_GSO_UDP_L4 ? REFUSED_UDP : REFUSED_TCP))) {
                self->fault_left--;
                n = -self->fault_errno;
            } else {
                n = io_wait_call(fd, wake, POLLOUT, &iov, 1);
            }
            if (n < 0) {
                if (write_dropped(n, kind != VIRTIO_NET_HDR_GSO_NONE)) {
                    count_drop(&self->dropped_write);
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
        go = io_settle_batch(self, done, &err);
    }
    if (go > 0) {
        io_leave(self); /* no buffers */
    }
    self->packets_written += packets;
    self->bytes_written += bytes;
    self->gso_written += gso;
    release_bufs(views, count);
    return go < 0 ? NULL : Py_BuildValue("(nn)", done, err);
}

PyDoc_STRVAR(pio_fail_gso_doc,
"_fail_gso(kinds, count, errno)\n--\n\n"
"The fault seam, for tests only: the next *count* super-packets of the\n"
"kinds in *kinds* (bit 1: TCP, bit 2: UDP) that write_gso meets fail with\n"
"-errno, as if the kernel had refused them, without a system call.\n"
"count 0 ends it.");

static PyObject *
pio_fail_gso(packet_io_t *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_fail_gso() takes 3 arguments");
        return NULL;
    }
    long kinds = PyLong_AsLong(args[0]);
    long count = kinds == -1 && PyErr_Occurred() ? 0 : PyLong_AsLong(args[1]);
    long err = count == -1 && PyErr_Occurred() ? 0 : PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (count < 0 || err <= 0 || err > 4095) {
        PyErr_SetString(PyExc_ValueError, "_fail_gso: negative count or errno");
        return NULL;
    }
    self->fault_kinds = kinds;
    self->fault_errno = (int)err;
    self->fault_left = count;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pio_drain_doc,
"drain()\n--\n\n"
"Refuse new calls (they return -EBADF) and wait for those in progress to\n"
"return (asleep: the last one out wakes it); idempotent. Make the eventfd\n"
"readable first, or a call waiting in poll() keeps this waiting.");

static PyObject *
pio_drain(packet_io_t *self, PyObject *Py_UNUSED(ignored))
{
    atomic_store(&self->closing, 1);
    int users = atomic_load(&self->users);
    if (users == 0) {
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    while (users != 0) {
        /* Sleeps unless the count is no longer `users` (then look again). */
        syscall(SYS_futex, (int *)&self->users, FUTEX_WAIT_PRIVATE, users, NULL, NULL, 0);
        users = atomic_load(&self->users);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

const char set_blocking_doc[] = PyDoc_STR(
"set_blocking(flag)\n--\n\n"
"In blocking mode (the default) a call waits in poll() while the descriptor\n"
"would block; otherwise it returns -EAGAIN (read_gso: (0, 0) when nothing\n"
"was stored), for an event loop to wait on the descriptor instead.");

static PyObject *
pio_set_blocking(packet_io_t *self, PyObject *arg)
{
    int flag = PyObject_IsTrue(arg);
    if (flag < 0) {
        return NULL;
    }
    self->blocking = flag;
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
        self->bytes_read, "dropped_too_big", atomic_load_explicit(&self->too_big,
        memory_order_relaxed), "dropped_malformed", atomic_load_explicit(&self->malformed,
        memory_order_relaxed), "gso_read", self->gso_read, "packets_written",
        self->packets_written, "bytes_written", self->bytes_written, "dropped_write",
        atomic_load_explicit(&self->dropped_write, memory_order_relaxed), "gso_written",
        self->gso_written);
}

static PyMethodDef pio_methods[] = {
    {"read", (PyCFunction)(void (*)(void))pio_read, METH_FASTCALL, pio_read_doc},
    {"write", (PyCFunction)(void (*)(void))pio_write, METH_FASTCALL, pio_write_doc},
    {"read_gso", (PyCFunction)(void (*)(void))pio_read_gso, METH_FASTCALL, pio_read_gso_doc},
    {"write_gso", (PyCFunction)(void (*)(void))pio_write_gso, METH_FASTCALL, pio_write_gso_doc},
    {"drain", (PyCFunction)pio_drain, METH_NOARGS, pio_drain_doc},
    {"_fail_gso", (PyCFunction)(void (*)(void))pio_fail_gso, METH_FASTCALL, pio_fail_gso_doc},
    {"set_blocking", (PyCFunction)pio_set_blocking, METH_O, set_blocking_doc},
    {"counts", (PyCFunction)pio_counts, METH_NOARGS, pio_counts_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(pio_doc,
"PacketIo(fd, wake)\n--\n\n"
"The system calls of a non-blocking TUN descriptor *fd*: one packet per\n"
"call (read, write) or a batch of packets with their virtio-net headers\n"
"(read_gso, write_gso), and the counters; *wake* is the eventfd that ends\n"
"waits. Holds the numbers, never closes them: the owner does, after drain().");

PyTypeObject packet_io_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunkit._speedups.PacketIo",
    .tp_basicsize = sizeof(packet_io_t),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = pio_doc,
    .tp_methods = pio_methods,
    .tp_init = (initproc)pio_init,
    .tp_new = pio_new,
};

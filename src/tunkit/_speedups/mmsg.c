/*
 * mmsg.c: UdpIo, the system calls of a UdpTun's socket in C: a batch of
 * datagrams per recvmmsg and per sendmmsg, UDP_GRO reads cut into their
 * datagrams and coalesced back into super-packets (read_gso), super-packets
 * split into the segments of UDP_SEGMENT sends (write_gso). The pure-Python
 * twin: UdpTun in tunkit/transport/udp.py (_receive, read, read_gso, write,
 * write_gso, _send); the UdpTun tests run on both paths.
 *
 * A UdpIo call does its whole batch with the GIL released once: the system
 * calls, poll() on the socket and the wake-up eventfd while it would block,
 * the checks of each datagram, the GRO plan (coalesce.c) and the split
 * (split.c). The caller holds the UdpTun's lock of the direction for the
 * whole call (read side: the receive scratch and the datagrams pending;
 * write side: the split scratch and the messages), so close() waits for the
 * call to leave before it closes the descriptor. Errors come back as
 * -errno beside the count done; -EBADF once the eventfd is readable.
 *
 * What is policy stays in Python: when to turn UDP_SEGMENT off (udp.py's
 * _note_gso). A UDP_SEGMENT send that the kernel refuses (EIO, EINVAL,
 * EMSGSIZE) is sent again here datagram by datagram, so nothing is lost,
 * and the call says how many sends were refused.
 */

#include "tunkit.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/udp.h> /* SOL_UDP, UDP_SEGMENT, UDP_GRO */
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* Messages per recvmmsg and sendmmsg: udp.py's BATCH. */
#define MAX_MSGS 128
/* udp.py's _MAX_SPLIT: segments of one super-packet written whole. */
#define MAX_SPLIT 1024
/* The split scratch: room for the segments of several super-packets (each at
 * most 64 KB of payload plus a header per segment) between two sendmmsg. */
#define WBUF_LEN (8 << 16)
/* Errnos of a send that the network lost (udp.py's _LOST_ON_SEND, given to
 * the constructor): at most this many. */
#define MAX_LOST 16

typedef struct {
    const uint8_t *p;
    Py_ssize_t n;
} dgram_t;

typedef struct {
    PyObject_HEAD
    int fd, wake;
    int blocking; /* wait in poll() on EAGAIN (set_blocking), else return -EAGAIN */
    struct sockaddr_storage peer;
    socklen_t peer_len;
    Py_ssize_t slot, nslots, mtu, max_segments, max_payload;
    int lost[MAX_LOST];
    int n_lost;
    /* Read side (the UdpTun's read lock). */
    uint8_t *rbuf;                 /* nslots * slot bytes */
    struct mmsghdr *rmsgs;         /* nslots */
    struct iovec *riov;            /* nslots */
    struct sockaddr_storage *rnames; /* nslots */
    uint8_t *rctl;                 /* nslots * RCTL_LEN */
    dgram_t *pending;              /* received, not yet handed out: views of rbuf */
    Py_ssize_t pending_cap, head, n_pending;
    uint8_t *done;                 /* pending_cap: handed out by this read_gso */
    batch_t batch;                 /* pending_cap packets */
    /* Write side (the UdpTun's write lock). */
    uint8_t *wbuf;
    struct mmsghdr *wmsgs;         /* MAX_MSGS */
    struct iovec *wiov;            /* MAX_MSGS * max_segments */
    uint8_t *wctl;                 /* MAX_MSGS * WCTL_LEN */
    Py_ssize_t *wbuf_of;           /* MAX_MSGS: the buffer each message belongs to */
    uint8_t **wouts;               /* MAX_SPLIT: where each segment of a split goes */
    Py_ssize_t *wlens;             /* MAX_SPLIT: and its length */
    struct mmsghdr *amsgs;         /* max_segments: one message's datagrams sent apart */
    /* Counters, named as UdpStats's fields; each side writes its own. */
    unsigned long long packets_read, bytes_read, malformed, too_big, stranger, gro_reads,
        gso_read, gro_coalesced;
    unsigned long long packets_written, bytes_written, dropped_write, gso_written, gso_sends,
        gso_refused, malformed_written;
} udp_io_t;

#define RCTL_LEN CMSG_SPACE(sizeof(int))     /* UDP_GRO: the datagram size, an int */
#define WCTL_LEN CMSG_SPACE(sizeof(uint16_t)) /* UDP_SEGMENT: a u16 */

/* What one write call adds up, for udp.py's _note_gso. */
typedef struct {
    Py_ssize_t ok;      /* UDP_SEGMENT sends that went */
    Py_ssize_t run;     /* refused in a row since the last that went (or the call's start) */
    Py_ssize_t refused; /* EINVAL/EMSGSIZE refusals */
    int eio;            /* one was refused with EIO: GSO is off from there on */
    int gso;            /* UDP_SEGMENT still in use in this call */
} wstat_t;

/* -------------------------------------------------------------------------- */
/* Receiving                                                                  */

/* udp.py's _ip_ok: an IPv4 or IPv6 packet whose length field matches. */
static int
ip_ok(const uint8_t *p, Py_ssize_t n)
{
    if (n < IP4_MIN_HDR_LEN) {
        return 0;
    }
    int version = p[IP4_VER_IHL] >> 4;
    if (version == 4) {
        Py_ssize_t iph_len = (p[IP4_VER_IHL] & 0x0F) * 4;
        return iph_len >= IP4_MIN_HDR_LEN && iph_len <= n && get16(p + IP4_TOTAL_LEN) == n;
    }
    if (version == 6) {
        return n >= IP6_HDR_LEN && get16(p + IP6_PAYLOAD_LEN) + IP6_HDR_LEN == n;
    }
    return 0;
}

/* Whether a source address is the peer's (address and port; not flow or scope). */
static int
from_peer(const udp_io_t *s, const struct sockaddr_storage *a)
{
    if (a->ss_family != s->peer.ss_family) {
        return 0;
    }
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)&s->peer;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)&s->peer;
    return x->sin6_port == y->sin6_port &&
           memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
}

/* The datagrams of one received message, kept in pending or counted away. */
static void
take_message(udp_io_t *s, const struct mmsghdr *m, const uint8_t *data)
{
    Py_ssize_t n = m->msg_len;
    Py_ssize_t size = n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m->msg_hdr); c != NULL;
         c = CMSG_NXTHDR((struct msghdr *)&m->msg_hdr, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO &&
            c->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int gso;
            memcpy(&gso, CMSG_DATA(c), sizeof gso);
            if (gso > 0) {
                size = gso;
            }
        }
    }
    if (size <= 0) {
        size = n ? n : 1;
    }
    Py_ssize_t count = (n + size - 1) / size;
    if (count < 1) {
        count = 1; /* an empty datagram is one too */
    }
    if (!from_peer(s, (const struct sockaddr_storage *)m->msg_hdr.msg_name)) {
        s->stranger += (unsigned long long)count;
        return;
    }
    if (m->msg_hdr.msg_flags & MSG_TRUNC) {
        s->too_big++;
        return;
    }
    if (size > s->mtu) {
        s->too_big += (unsigned long long)count;
        return;
    }
    if (n == 0) {
        s->malformed++;
        return;
    }
    if (size < n) {
        s->gro_reads++;
    }
    for (Py_ssize_t at = 0; at < n; at += size) {
        Py_ssize_t len = n - at < size ? n - at : size;
        if (ip_ok(data + at, len) && s->n_pending < s->pending_cap) {
            s->pending[s->n_pending++] = (dgram_t){data + at, len};
        }
        else {
            s->malformed++;
        }
    }
}

/* Receive what is ready (block: wait until one datagram is kept) into rbuf,
 * pending being empty. 0, or -errno (-EBADF: woken). Without the GIL. */
static Py_ssize_t
receive(udp_io_t *s, int block)
{
    s->head = s->n_pending = 0;
    for (;;) {
        for (Py_ssize_t i = 0; i < s->nslots; i++) {
            s->riov[i].iov_base = s->rbuf + i * s->slot;
            s->riov[i].iov_len = (size_t)s->slot;
            struct msghdr *h = &s->rmsgs[i].msg_hdr;
            h->msg_name = &s->rnames[i];
            h->msg_namelen = sizeof s->rnames[i];
            h->msg_iov = &s->riov[i];
            h->msg_iovlen = 1;
            h->msg_control = s->rctl + i * RCTL_LEN;
            h->msg_controllen = RCTL_LEN;
            h->msg_flags = 0;
        }
        int r = recvmmsg(s->fd, s->rmsgs, (unsigned int)s->nslots, 0, NULL);
        if (r < 0) {
            if (errno != EAGAIN) {
                return -errno;
            }
            if (!block) {
                return 0;
            }
            Py_ssize_t w = wait_fd(s->fd, WAIT_WAKE(s->wake, s->blocking), POLLIN);
            if (w < 0) {
                return w;
            }
            continue;
        }
        for (int i = 0; i < r; i++) {
            take_message(s, &s->rmsgs[i], s->rbuf + i * s->slot);
        }
        if (s->n_pending || !block) {
            return 0;
        }
    }
}

/* The arguments of read/read_gso: bufs, sizes, offset. */
static Py_buffer *
read_args(PyObject *const *args, Py_ssize_t nargs, const char *name, Py_ssize_t *count,
          Py_ssize_t *offset)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s() takes 3 arguments", name);
        return NULL;
    }
    *offset = PyLong_AsSsize_t(args[2]);
    if (*offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (*offset < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    Py_buffer *views = take_bufs(args[0], count, PyBUF_WRITABLE);
    if (views == NULL) {
        return NULL;
    }
    Py_ssize_t n_sizes = PySequence_Size(args[1]);
    if (n_sizes < *count) {
        if (n_sizes >= 0) {
            PyErr_Format(PyExc_ValueError, "%s with %zd sizes for %zd buffers", name, n_sizes,
                         *count);
        }
        release_bufs(views, *count);
        return NULL;
    }
    return views;
}

/* Store lens in sizes and build (stored, err); NULL if sizes refused. */
static PyObject *
read_result(PyObject *sizes, const Py_ssize_t *lens, Py_ssize_t stored, Py_ssize_t err)
{
    for (Py_ssize_t i = 0; i < stored; i++) {
        PyObject *v = PyLong_FromSsize_t(lens[i]);
        if (v == NULL || PySequence_SetItem(sizes, i, v) < 0) {
            Py_XDECREF(v);
            return NULL;
        }
        Py_DECREF(v);
    }
    return Py_BuildValue("(nn)", stored, err);
}

/* Store a lone packet behind an all-zero virtio header: 1, or 0 when it does not fit. */
static int
put_lone(uint8_t *out, Py_ssize_t room, const pkt_t *k, Py_ssize_t *len)
{
    if (VNET_HDR_LEN + k->n > room) {
        return 0;
    }
    memset(out, 0, VNET_HDR_LEN);
    memcpy(out + VNET_HDR_LEN, k->p, (size_t)k->n);
    *len = k->n;
    return 1;
}

/* Hand out the pending datagrams coalesced (read_gso's loop body): returns
 * how many buffers it filled from views[stored..count). Without the GIL. */
static Py_ssize_t
deliver_gso(udp_io_t *s, Py_buffer *views, Py_ssize_t stored, Py_ssize_t count, Py_ssize_t at,
            Py_ssize_t *lens, unsigned long long *bytes)
{
    batch_t *b = &s->batch;
    Py_ssize_t m = s->n_pending - s->head;
    batch_reset(b, m);
    for (Py_ssize_t i = 0; i < m; i++) {
        b->pk[i].p = s->pending[s->head + i].p;
        b->pk[i].n = s->pending[s->head + i].n;
    }
    b->tcp = b->udp = 1;
    plan_batch(b);
    memset(s->done, 0, (size_t)m);
    Py_ssize_t first = stored;
    for (Py_ssize_t e = 0; e < b->n_entries && stored < count; e++) {
        int32_t entry = b->entries[e];
        const group_t *g = entry >= 0 ? &b->groups[entry] : NULL;
        Py_buffer *v = &views[stored];
        Py_ssize_t start = at < v->len ? at : v->len;
        uint8_t *out = (uint8_t *)v->buf + start;
        Py_ssize_t room = v->len - start;
        if (g != NULL && g->count > 1 && VNET_HDR_LEN + g->total_len <= room) {
            const pkt_t *head = &b->pk[g->head];
            patch_group(b, g, out);
            uint8_t *pos = out + VNET_HDR_LEN + head->hdr_len;
            for (int32_t i = g->head; i >= 0; i = b->pk[i].next) {
                const pkt_t *k = &b->pk[i];
                Py_ssize_t payload = k->n - head->hdr_len;
                memcpy(pos, k->p + head->hdr_len, (size_t)payload);
                pos += payload;
                *bytes += (unsigned long long)k->n;
                s->done[i] = 1;
            }
            lens[stored++] = g->total_len;
            s->packets_read += (unsigned long long)g->count;
            s->gso_read++;
            s->gro_coalesced += (unsigned long long)g->count;
            continue;
        }
        /* A lone packet, or a group too long for its buffer: packet by packet. */
        int32_t i = entry >= 0 ? g->head : ~entry;
        for (; i >= 0 && stored < count; i = g != NULL ? b->pk[i].next : -1) {
            v = &views[stored];
            start = at < v->len ? at : v->len;
            if (put_lone((uint8_t *)v->buf + start, v->len - start, &b->pk[i], &lens[stored])) {
                *bytes += (unsigned long long)b->pk[i].n;
                s->packets_read++;
                stored++;
            }
            else {
                s->too_big++;
            }
            s->done[i] = 1;
        }
    }
    /* What is left waits, in order, for the next call. */
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        if (!s->done[i]) {
            s->pending[kept++] = s->pending[s->head + i];
        }
    }
    s->head = 0;
    s->n_pending = kept;
    return stored - first;
}

/* Hand out the pending datagrams one per buffer (read's loop body): how many
 * buffers it filled from views[stored..count). Without the GIL. */
static Py_ssize_t
deliver_plain(udp_io_t *s, Py_buffer *views, Py_ssize_t stored, Py_ssize_t count,
              Py_ssize_t offset, Py_ssize_t *lens, unsigned long long *bytes)
{
    Py_ssize_t first = stored;
    while (stored < count && s->head < s->n_pending) {
        dgram_t d = s->pending[s->head++];
        Py_buffer *v = &views[stored];
        Py_ssize_t start = offset < v->len ? offset : v->len;
        if (d.n > v->len - start) {
            s->too_big++;
            continue;
        }
        memcpy((uint8_t *)v->buf + start, d.p, (size_t)d.n);
        lens[stored++] = d.n;
        *bytes += (unsigned long long)d.n;
    }
    s->packets_read += (unsigned long long)(stored - first);
    return stored - first;
}

typedef Py_ssize_t (*deliver_fn)(udp_io_t *, Py_buffer *, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                 Py_ssize_t *, unsigned long long *);

/* read and read_gso: hand out what is pending, receive while buffers remain
 * (waiting for the first while none is stored), with `deliver`. */
static PyObject *
read_batch(udp_io_t *self, PyObject *const *args, Py_ssize_t nargs, const char *name,
           deliver_fn deliver)
{
    Py_ssize_t count, offset;
    Py_buffer *views = read_args(args, nargs, name, &count, &offset);
    if (views == NULL) {
        return NULL;
    }
    Py_ssize_t *lens = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_ssize_t));
    if (lens == NULL) {
        release_bufs(views, count);
        return PyErr_NoMemory();
    }
    Py_ssize_t stored = 0, err = 0;
    unsigned long long bytes = 0;
    Py_BEGIN_ALLOW_THREADS
    while (stored < count) {
        if (self->head == self->n_pending) {
            err = receive(self, stored == 0);
            if (err < 0 || self->head == self->n_pending) {
                break;
            }
        }
        stored += deliver(self, views, stored, count, offset, lens, &bytes);
    }
    Py_END_ALLOW_THREADS
    self->bytes_read += bytes;
    PyObject *result = read_result(args[1], lens, stored, err);
    PyMem_Free(lens);
    release_bufs(views, count);
    return result;
}

PyDoc_STRVAR(uio_read_doc,
"read(bufs, sizes, offset)\n--\n\n"
"Store one datagram per buffer at bufs[i][offset:]: those pending first, then\n"
"receive (waiting for the first while none is stored). A datagram longer\n"
"than the room is dropped (too_big). Return (stored, err): err 0, or -errno\n"
"of an error that ended the call (stored 0) or came after stored packets.");

static PyObject *
uio_read(udp_io_t *self, PyObject *const *args, Py_ssize_t nargs)
{
    return read_batch(self, args, nargs, "read", deliver_plain);
}

PyDoc_STRVAR(uio_read_gso_doc,
"read_gso(bufs, sizes, at)\n--\n\n"
"Store the pending and received datagrams coalesced (coalesce.c's GRO plan):\n"
"bufs[i][at:] gets a virtio-net header, then a super-packet or a lone\n"
"packet; sizes[i] its length without the header. Waits for the first. What\n"
"does not fit the buffers stays pending. Return (stored, err) as read().");

static PyObject *
uio_read_gso(udp_io_t *self, PyObject *const *args, Py_ssize_t nargs)
{
    return read_batch(self, args, nargs, "read_gso", deliver_gso);
}

/* -------------------------------------------------------------------------- */
/* Sending                                                                    */

static int
is_lost(const udp_io_t *s, int e)
{
    for (int i = 0; i < s->n_lost; i++) {
        if (s->lost[i] == e) {
            return 1;
        }
    }
    return 0;
}

/* Point msgs[0..n) at the peer (their iov set); with seg > 0, a UDP_SEGMENT
 * control message of that size in ctl. */
static void
address(udp_io_t *s, struct mmsghdr *m, uint8_t *ctl, Py_ssize_t seg)
{
    struct msghdr *h = &m->msg_hdr;
    h->msg_name = &s->peer;
    h->msg_namelen = s->peer_len;
    h->msg_flags = 0;
    if (seg > 0) {
        h->msg_control = ctl;
        h->msg_controllen = WCTL_LEN;
        struct cmsghdr *c = CMSG_FIRSTHDR(h);
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t v = (uint16_t)seg;
        memcpy(CMSG_DATA(c), &v, sizeof v);
    }
    else {
        h->msg_control = NULL;
        h->msg_controllen = 0;
    }
}

static Py_ssize_t send_msgs(udp_io_t *s, struct mmsghdr *msgs, Py_ssize_t n, wstat_t *w,
                            Py_ssize_t *failed);

/* The datagrams of message m (one per iovec), each a send of its own. */
static Py_ssize_t
send_apart(udp_io_t *s, const struct mmsghdr *m, wstat_t *w)
{
    const struct msghdr *h = &m->msg_hdr;
    Py_ssize_t n = (Py_ssize_t)h->msg_iovlen;
    for (Py_ssize_t i = 0; i < n; i++) {
        s->amsgs[i].msg_hdr.msg_iov = &h->msg_iov[i];
        s->amsgs[i].msg_hdr.msg_iovlen = 1;
        address(s, &s->amsgs[i], NULL, 0);
    }
    Py_ssize_t failed;
    return send_msgs(s, s->amsgs, n, w, &failed);
}

/* sendmmsg of msgs[0..n), waiting while the socket is full. A UDP_SEGMENT
 * message the kernel refuses is sent apart (and counted in w); one the
 * network loses is dropped and counted. 0, or -errno with *failed the index
 * of the message that met it. Without the GIL. */
static Py_ssize_t
send_msgs(udp_io_t *s, struct mmsghdr *msgs, Py_ssize_t n, wstat_t *w, Py_ssize_t *failed)
{
    Py_ssize_t k = 0;
    while (k < n) {
        struct msghdr *h = &msgs[k].msg_hdr;
        int segmented = h->msg_controllen != 0;
        if (segmented && !w->gso) {
            /* GSO went off earlier in this call (EIO): the rest goes apart. */
            Py_ssize_t r = send_apart(s, &msgs[k], w);
            if (r < 0) {
                *failed = k;
                return r;
            }
            k++;
            continue;
        }
        int r = sendmmsg(s->fd, msgs + k, (unsigned int)(n - k), 0);
        if (r > 0) {
            for (int i = 0; i < r; i++) {
                const struct msghdr *sent = &msgs[k + i].msg_hdr;
                s->packets_written += sent->msg_iovlen;
                s->bytes_written += msgs[k + i].msg_len;
                if (sent->msg_controllen) {
                    s->gso_sends++;
                    w->ok++;
                    w->run = 0;
                }
            }
            k += r;
            continue;
        }
        int e = errno;
        if (e == EAGAIN) {
            Py_ssize_t wr = wait_fd(s->fd, WAIT_WAKE(s->wake, s->blocking), POLLOUT);
            if (wr < 0) {
                *failed = k;
                return wr;
            }
            continue;
        }
        if (segmented && (e == EIO || e == EINVAL || e == EMSGSIZE)) {
            if (e == EIO) {
                w->eio = 1;
                w->gso = 0;
            }
            else {
                w->refused++;
                w->run++;
                s->gso_refused++;
            }
            Py_ssize_t ra = send_apart(s, &msgs[k], w);
            if (ra < 0) {
                *failed = k;
                return ra;
            }
            k++;
            continue;
        }
        if (is_lost(s, e)) {
            s->dropped_write += h->msg_iovlen;
            k++;
            continue;
        }
        *failed = k;
        return -e;
    }
    return 0;
}

/* Messages being built for one sendmmsg, and the iovecs they use (one per
 * datagram). The last message is open while datagrams may still join it. */
typedef struct {
    Py_ssize_t n_msgs, n_iov, iov_cap;
    int open;              /* the last message may take more datagrams */
    Py_ssize_t seg, limit; /* its datagrams' size, and how many it may hold */
    Py_ssize_t bytes;      /* its payload so far */
} outbox_t;

/* Send what the outbox holds; the message that fails names the buffer
 * (*done) before which everything went. 0 or -errno. */
static Py_ssize_t
flush(udp_io_t *s, outbox_t *o, wstat_t *w, Py_ssize_t *done)
{
    Py_ssize_t failed = 0;
    Py_ssize_t r = o->n_msgs ? send_msgs(s, s->wmsgs, o->n_msgs, w, &failed) : 0;
    if (r < 0) {
        *done = s->wbuf_of[failed];
    }
    o->n_msgs = o->n_iov = 0;
    o->open = 0;
    return r;
}

/* Add datagram (p, len) of buffer `buf` to the outbox, flushing it first
 * when full (*flushed then says so). With UDP_SEGMENT, datagrams join the
 * open message as udp.py's _run groups them: of its first one's size (a
 * shorter one joins and closes it), up to the limits of one send; across
 * the buffers too (the segments of consecutive super-packets share sends).
 * 0 or -errno of the flush. */
static Py_ssize_t
append(udp_io_t *s, outbox_t *o, wstat_t *w, Py_ssize_t buf, uint8_t *p, Py_ssize_t len,
       Py_ssize_t *done, int *flushed)
{
    if (o->open && w->gso && len <= o->seg && o->bytes + len <= s->max_payload &&
        o->n_iov < o->iov_cap) {
        struct mmsghdr *m = &s->wmsgs[o->n_msgs - 1];
        s->wiov[o->n_iov].iov_base = p;
        s->wiov[o->n_iov].iov_len = (size_t)len;
        o->n_iov++;
        if (m->msg_hdr.msg_iovlen++ == 1) {
            address(s, m, s->wctl + (o->n_msgs - 1) * WCTL_LEN, o->seg); /* now segmented */
        }
        o->bytes += len;
        if (len < o->seg || (Py_ssize_t)m->msg_hdr.msg_iovlen >= o->limit) {
            o->open = 0;
        }
        return 0;
    }
    if (o->n_msgs >= MAX_MSGS || o->n_iov >= o->iov_cap) {
        Py_ssize_t r = flush(s, o, w, done);
        *flushed = 1;
        if (r < 0) {
            return r;
        }
    }
    struct mmsghdr *m = &s->wmsgs[o->n_msgs];
    s->wiov[o->n_iov].iov_base = p;
    s->wiov[o->n_iov].iov_len = (size_t)len;
    m->msg_hdr.msg_iov = &s->wiov[o->n_iov];
    m->msg_hdr.msg_iovlen = 1;
    address(s, m, NULL, 0);
    s->wbuf_of[o->n_msgs] = buf;
    o->n_msgs++;
    o->n_iov++;
    o->seg = len;
    o->bytes = len;
    Py_ssize_t by_bytes = s->max_payload / (len > 0 ? len : 1);
    o->limit = by_bytes < s->max_segments ? by_bytes : s->max_segments;
    o->open = w->gso && o->limit > 1 && len > 0; /* UDP_SEGMENT 0 would not segment */
    return 0;
}

/* The arguments of write/write_gso: bufs, offset, gso. */
static Py_buffer *
write_args(PyObject *const *args, Py_ssize_t nargs, const char *name, Py_ssize_t *count,
           Py_ssize_t *offset, int *gso)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s() takes 3 arguments", name);
        return NULL;
    }
    *offset = PyLong_AsSsize_t(args[1]);
    if (*offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (*offset < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    *gso = PyObject_IsTrue(args[2]);
    if (*gso < 0) {
        return NULL;
    }
    return take_bufs(args[0], count, PyBUF_SIMPLE);
}

/* What a write's buffers share: the outbox, wbuf's bytes in use (the
 * segments the outbox points at), the call's UDP_SEGMENT outcomes. */
typedef struct {
    outbox_t o;
    wstat_t w;
    Py_ssize_t wpos, done;
} wcall_t;

/* One buffer of write: its packet as one datagram. 0 or -errno. */
static Py_ssize_t
put_plain(udp_io_t *s, wcall_t *c, Py_ssize_t i, uint8_t *data, Py_ssize_t len)
{
    int flushed = 0;
    return append(s, &c->o, &c->w, i, data, len, &c->done, &flushed);
}

/* One buffer of write_gso (virtio-net header, then a packet or a super-packet):
 * its segments, or its packet, as datagrams. 0 or -errno. */
static Py_ssize_t
put_gso(udp_io_t *s, wcall_t *c, Py_ssize_t i, uint8_t *data, Py_ssize_t len)
{
    Py_ssize_t hdr_len;
    Py_ssize_t segments = gso_check(data, len, &hdr_len);
    if (segments == 0 || segments > MAX_SPLIT) {
        s->malformed_written++;
        return 0;
    }
    Py_ssize_t ip_len = len - VNET_HDR_LEN;
    uint8_t *ip = data + VNET_HDR_LEN;
    int flushed = 0;
    Py_ssize_t err;
    if (hdr_len == 0 && !(data[VNET_FLAGS] & VIRTIO_NET_HDR_F_NEEDS_CSUM)) {
        err = append(s, &c->o, &c->w, i, ip, ip_len, &c->done, &flushed); /* as it is */
        if (flushed) {
            c->wpos = 0;
        }
        return err;
    }
    split_plan_t pl;
    Py_ssize_t need, seg_len;
    if (hdr_len) {
        split_plan_checked(&pl, data, len, hdr_len);
        seg_len = pl.hdr_len + pl.gso_size;
        need = (pl.count - 1) * seg_len + pl.last_len;
    }
    else {
        seg_len = need = ip_len;
    }
    if (c->wpos + need > WBUF_LEN) {
        if ((err = flush(s, &c->o, &c->w, &c->done)) < 0) {
            return err;
        }
        c->wpos = 0;
    }
    uint8_t *base = s->wbuf + c->wpos;
    uint8_t **outs = s->wouts;
    Py_ssize_t *lens = s->wlens;
    if (hdr_len) {
        for (Py_ssize_t k = 0; k < pl.count; k++) {
            outs[k] = base + k * seg_len;
        }
        split_write(&pl, outs, lens);
        s->gso_written++;
    }
    else {
        /* split's copy_through: the partial checksum completed (skb_checksum_help). */
        Py_ssize_t cs = host16(data + VNET_CSUM_START);
        Py_ssize_t field = cs + host16(data + VNET_CSUM_OFFSET);
        memcpy(base, ip, (size_t)ip_len);
        uint32_t value = ~ones_sum_raw(base + cs, (size_t)(ip_len - cs), 0) & 0xFFFF;
        put16(base + field, value ? value : 0xFFFF);
        outs[0] = base;
        lens[0] = ip_len;
    }
    c->wpos += need;
    /* A flush in here keeps wbuf: this super-packet's segments are there. */
    for (Py_ssize_t k = 0; k < segments; k++) {
        if ((err = append(s, &c->o, &c->w, i, outs[k], lens[k], &c->done, &flushed)) < 0) {
            return err;
        }
    }
    return 0;
}

typedef Py_ssize_t (*put_fn)(udp_io_t *, wcall_t *, Py_ssize_t, uint8_t *, Py_ssize_t);

/* write and write_gso: each buffer from offset on through `put`, then the
 * last sendmmsg. Returns (done, err, ok, run, refused, eio). */
static PyObject *
write_batch(udp_io_t *self, PyObject *const *args, Py_ssize_t nargs, const char *name, put_fn put)
{
    Py_ssize_t count, offset;
    int gso;
    Py_buffer *views = write_args(args, nargs, name, &count, &offset, &gso);
    if (views == NULL) {
        return NULL;
    }
    wcall_t c = {{0, 0, MAX_MSGS * self->max_segments, 0, 0, 0, 0}, {0, 0, 0, 0, gso}, 0, count};
    Py_ssize_t err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count && err == 0; i++) {
        Py_buffer *v = &views[i];
        Py_ssize_t start = offset < v->len ? offset : v->len;
        err = put(self, &c, i, (uint8_t *)v->buf + start, v->len - start);
    }
    if (err == 0) {
        err = flush(self, &c.o, &c.w, &c.done);
    }
    Py_END_ALLOW_THREADS
    release_bufs(views, count);
    return Py_BuildValue("(nnnnni)", err < 0 ? c.done : count, err, c.w.ok, c.w.run,
                         c.w.refused, c.w.eio);
}

PyDoc_STRVAR(uio_write_doc,
"write(bufs, offset, gso)\n--\n\n"
"Send each bufs[i][offset:] as a datagram to the peer, by sendmmsg; with gso,\n"
"runs of equal length (the last maybe shorter) as one UDP_SEGMENT send.\n"
"Return (done, err, ok, run, refused, eio): done buffers were handled; err\n"
"0 or -errno of bufs[done]; ok UDP_SEGMENT sends went, refused were refused\n"
"(EINVAL/EMSGSIZE; sent apart), run of them since the last that went; eio 1\n"
"when one was refused with EIO (the rest of the call went apart).");

static PyObject *
uio_write(udp_io_t *self, PyObject *const *args, Py_ssize_t nargs)
{
    return write_batch(self, args, nargs, "write", put_plain);
}

PyDoc_STRVAR(uio_write_gso_doc,
"write_gso(bufs, at, gso)\n--\n\n"
"Send each bufs[i][at:] (virtio-net header, then a packet or a super-packet)\n"
"to the peer: a super-packet split (split.c) into the segments of UDP_SEGMENT\n"
"sends (without gso: a datagram each), a single packet as one datagram, its\n"
"partial checksum completed; a malformed one dropped (malformed_written).\n"
"sendmmsg of several buffers at once. Return as write().");

static PyObject *
uio_write_gso(udp_io_t *self, PyObject *const *args, Py_ssize_t nargs)
{
    return write_batch(self, args, nargs, "write_gso", put_gso);
}

/* -------------------------------------------------------------------------- */
/* The object                                                                 */

PyDoc_STRVAR(uio_counts_doc,
"counts()\n--\n\n"
"The counters, as a dict named like UdpStats's fields (malformed_written\n"
"apart: UdpStats adds it to dropped_malformed).");

static PyObject *
uio_counts(udp_io_t *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsK}", "packets_read", self->packets_read, "bytes_read",
        self->bytes_read, "dropped_malformed", self->malformed, "dropped_too_big", self->too_big,
        "dropped_stranger", self->stranger, "gro_reads", self->gro_reads, "gso_read",
        self->gso_read, "gro_coalesced", self->gro_coalesced, "packets_written",
        self->packets_written, "bytes_written", self->bytes_written, "dropped_write",
        self->dropped_write, "gso_written", self->gso_written, "gso_sends", self->gso_sends,
        "gso_refused", self->gso_refused, "malformed_written", self->malformed_written);
}

PyDoc_STRVAR(uio_pending_doc,
"pending()\n--\n\n"
"How many received datagrams wait to be handed out.");

static PyObject *
uio_pending(udp_io_t *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(self->n_pending - self->head);
}

static void
uio_free_mem(udp_io_t *self)
{
    PyMem_Free(self->rbuf);
    PyMem_Free(self->rmsgs);
    PyMem_Free(self->riov);
    PyMem_Free(self->rnames);
    PyMem_Free(self->rctl);
    PyMem_Free(self->pending);
    PyMem_Free(self->done);
    batch_free(&self->batch);
    PyMem_Free(self->wbuf);
    PyMem_Free(self->wmsgs);
    PyMem_Free(self->wiov);
    PyMem_Free(self->wctl);
    PyMem_Free(self->wbuf_of);
    PyMem_Free(self->wouts);
    PyMem_Free(self->wlens);
    PyMem_Free(self->amsgs);
    self->rbuf = NULL;
    self->rmsgs = NULL;
    self->riov = NULL;
    self->rnames = NULL;
    self->rctl = NULL;
    self->pending = NULL;
    self->done = NULL;
    self->wbuf = NULL;
    self->wmsgs = NULL;
    self->wiov = NULL;
    self->wctl = NULL;
    self->wbuf_of = NULL;
    self->wouts = NULL;
    self->wlens = NULL;
    self->amsgs = NULL;
}

static void
uio_dealloc(udp_io_t *self)
{
    uio_free_mem(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
uio_init(udp_io_t *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"fd",           "wake",        "family", "addr", "port",
                            "scope_id",     "slot",        "nslots", "mtu",  "max_segments",
                            "max_payload",  "lost",        NULL};
    int fd, wake, family, port;
    unsigned int scope_id;
    Py_buffer addr;
    Py_ssize_t slot, nslots, mtu, max_segments, max_payload;
    PyObject *lost;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiy*iInnnnnO:UdpIo", names, &fd, &wake,
                                     &family, &addr, &port, &scope_id, &slot, &nslots, &mtu,
                                     &max_segments, &max_payload, &lost)) {
        return -1;
    }
    int ok = 0;
    if (self->rbuf != NULL) {
        PyErr_SetString(PyExc_TypeError, "UdpIo: already initialised");
        goto out;
    }
    if (fd < 0 || wake < 0 || slot < IP4_MIN_HDR_LEN || nslots < 1 || nslots > MAX_MSGS ||
        mtu < 1 || max_segments < 1 || max_segments > MAX_MSGS || max_payload < 1 ||
        port < 0 || port > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "UdpIo: argument out of range");
        goto out;
    }
    memset(&self->peer, 0, sizeof self->peer);
    if (family == AF_INET && addr.len == 4) {
        struct sockaddr_in *a = (void *)&self->peer;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        memcpy(&a->sin_addr, addr.buf, 4);
        self->peer_len = sizeof *a;
    }
    else if (family == AF_INET6 && addr.len == 16) {
        struct sockaddr_in6 *a = (void *)&self->peer;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        memcpy(&a->sin6_addr, addr.buf, 16);
        a->sin6_scope_id = scope_id; /* a link-local peer's interface */
        self->peer_len = sizeof *a;
    }
    else {
        PyErr_SetString(PyExc_ValueError, "UdpIo: addr must be 4 (AF_INET) or 16 (AF_INET6) bytes");
        goto out;
    }
    PyObject *errs = PySequence_Tuple(lost);
    if (errs == NULL) {
        goto out;
    }
    Py_ssize_t n_lost = PyTuple_GET_SIZE(errs);
    if (n_lost > MAX_LOST) {
        Py_DECREF(errs);
        PyErr_SetString(PyExc_ValueError, "UdpIo: too many lost errnos");
        goto out;
    }
    for (Py_ssize_t i = 0; i < n_lost; i++) {
        self->lost[i] = (int)PyLong_AsLong(PyTuple_GET_ITEM(errs, i));
    }
    Py_DECREF(errs);
    if (PyErr_Occurred()) {
        goto out;
    }
    self->n_lost = (int)n_lost;
    self->fd = fd;
    self->wake = wake;
    self->blocking = 1;
    self->slot = slot;
    self->nslots = nslots;
    self->mtu = mtu;
    self->max_segments = max_segments;
    self->max_payload = max_payload;
    /* Every datagram kept is an IP packet of 20 bytes or more. */
    self->pending_cap = nslots * (slot / IP4_MIN_HDR_LEN + 1);
    self->rbuf = PyMem_Malloc((size_t)(nslots * slot));
    self->rmsgs = PyMem_Calloc((size_t)nslots, sizeof(struct mmsghdr));
    self->riov = PyMem_Calloc((size_t)nslots, sizeof(struct iovec));
    self->rnames = PyMem_Calloc((size_t)nslots, sizeof(struct sockaddr_storage));
    self->rctl = PyMem_Calloc((size_t)nslots, RCTL_LEN);
    self->pending = PyMem_Calloc((size_t)self->pending_cap, sizeof(dgram_t));
    self->done = PyMem_Calloc((size_t)self->pending_cap, 1);
    self->wbuf = PyMem_Malloc(WBUF_LEN);
    self->wmsgs = PyMem_Calloc(MAX_MSGS, sizeof(struct mmsghdr));
    self->wiov = PyMem_Calloc((size_t)(MAX_MSGS * max_segments), sizeof(struct iovec));
    self->wctl = PyMem_Calloc(MAX_MSGS, WCTL_LEN);
    self->wbuf_of = PyMem_Calloc(MAX_MSGS, sizeof(Py_ssize_t));
    self->wouts = PyMem_Calloc(MAX_SPLIT, sizeof(uint8_t *));
    self->wlens = PyMem_Calloc(MAX_SPLIT, sizeof(Py_ssize_t));
    self->amsgs = PyMem_Calloc((size_t)max_segments, sizeof(struct mmsghdr));
    if (batch_alloc(&self->batch, self->pending_cap) < 0 || !self->rbuf || !self->rmsgs ||
        !self->riov || !self->rnames || !self->rctl || !self->pending || !self->done ||
        !self->wbuf || !self->wmsgs || !self->wiov || !self->wctl || !self->wbuf_of ||
        !self->wouts || !self->wlens || !self->amsgs) {
        uio_free_mem(self);
        PyErr_NoMemory();
        goto out;
    }
    ok = 1;
out:
    PyBuffer_Release(&addr);
    return ok ? 0 : -1;
}

static PyObject *
uio_set_blocking(udp_io_t *self, PyObject *arg)
{
    int flag = PyObject_IsTrue(arg);
    if (flag < 0) {
        return NULL;
    }
    self->blocking = flag;
    Py_RETURN_NONE;
}

static PyMethodDef uio_methods[] = {
    {"read", (PyCFunction)(void (*)(void))uio_read, METH_FASTCALL, uio_read_doc},
    {"read_gso", (PyCFunction)(void (*)(void))uio_read_gso, METH_FASTCALL, uio_read_gso_doc},
    {"write", (PyCFunction)(void (*)(void))uio_write, METH_FASTCALL, uio_write_doc},
    {"write_gso", (PyCFunction)(void (*)(void))uio_write_gso, METH_FASTCALL, uio_write_gso_doc},
    {"counts", (PyCFunction)uio_counts, METH_NOARGS, uio_counts_doc},
    {"pending", (PyCFunction)uio_pending, METH_NOARGS, uio_pending_doc},
    {"set_blocking", (PyCFunction)uio_set_blocking, METH_O, set_blocking_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(uio_doc,
"UdpIo(fd, wake, family, addr, port, scope_id, slot, nslots, mtu, max_segments,\n"
"      max_payload, lost)\n--\n\n"
"The system calls of a UdpTun's non-blocking UDP socket *fd* to one peer\n"
"(*family*, packed *addr*, *port*, IPv6 *scope_id*): receives of *nslots* slots of *slot*\n"
"bytes (a UDP_GRO read, or one datagram), datagrams above *mtu* dropped;\n"
"sends of at most *max_segments* datagrams and *max_payload* bytes per\n"
"UDP_SEGMENT message; *lost*, the errnos of a send the network lost. *wake*\n"
"is the eventfd that ends waits. Holds the numbers, never closes them; the\n"
"caller holds the UdpTun's lock of each call's direction.");

PyTypeObject udp_io_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunkit._speedups.UdpIo",
    .tp_basicsize = sizeof(udp_io_t),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = uio_doc,
    .tp_methods = uio_methods,
    .tp_init = (initproc)uio_init,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)uio_dealloc,
};

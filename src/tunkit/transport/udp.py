"""UdpTun: IP-in-UDP to one peer, with UDP GSO and GRO matched to the TUN offloads.

One IP packet per UDP datagram, nothing added (as the kernel's FOU carries
them). What makes it fast is keeping 64 KB per system call end to end: a TUN
device's super-packet (``NativeTun.read_gso``) is split into its finished IP
packets and sent as one ``UDP_SEGMENT`` send, the kernel cuts it into
datagrams (in software or on the NIC), the receiving kernel coalesces them
again (``UDP_GRO``: one read returns up to 64 datagrams of equal size), and
:meth:`UdpTun.read_gso` turns that read back into super-packets for the
other device's ``write_gso`` with the offload engine's :class:`Coalescer`.

Where the kernel lacks ``UDP_SEGMENT``/``UDP_GRO`` (probed at start) or a
send with ``UDP_SEGMENT`` fails with EIO (the route's device cannot checksum
UDP, which segmentation needs: ``udp_send_skb``), the datagrams go one per
send instead, and ``stats()`` says so. Nothing is lost on the way.

The socket's system calls are made on a non-blocking descriptor; a call that
would block waits in ``poll()`` on the socket and a wake-up eventfd
(:class:`tunkit._linux.fd._Descriptor`), so :meth:`UdpTun.close` ends it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, MutableSequence, Sequence
from typing import TYPE_CHECKING, Any, Final, final

from .._errors import ClosedError, OffsetError, TooManySegmentsError
from .._events import Event, Events
from .._linux import netns
from .._linux.constants import (
    IP_MTU,
    IPV6_MTU,
    SIOCGSKNS,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    UDP_GRO,
    UDP_SEGMENT,
)
from .._linux.device import TunStats
from .._linux.fd import _Descriptor
from .._offload import ZERO_VNET_HDR, Coalescer, Write, _Malformed, _TooBig, split
from .._offload._impl import NATIVE_MODULE
from .._offload.headers import (
    IP4_MIN_HDR_LEN,
    IP4_TOTAL_LEN,
    IP6_HDR_LEN,
    IP6_PAYLOAD_LEN,
    IP_MAX_PACKET_LEN,
    U16,
    UDP_HDR_LEN,
    byte_view,
)
from .._offload.vnet import VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR, VNET_HDR_LEN, gso_segments

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from .._speedups import UdpIo

__all__ = ["UdpStats", "UdpTun"]

BATCH: Final = 128
MIN_MTU: Final = 68  # RFC 791: every IPv4 host takes packets of 68 bytes
# Socket buffers asked for (the kernel doubles the value for its bookkeeping):
# a read_gso batch alone is up to 16 x 64 KB, and a TCP stream through the
# tunnel keeps a window of several MB in flight.
SOCKET_BUFFER: Final = 8 << 20
# UDP_MAX_SEGMENTS of <linux/udp.h> before Linux 6.9 (128 since): datagrams
# per UDP_SEGMENT send, and per UDP_GRO read.
MAX_SEGMENTS: Final = 64
# The longest UDP payload of one send: the IPv4 total length (16 bits) less
# the IPv4 and UDP headers (IPv6 allows 20 bytes more; not worth telling apart).
MAX_PAYLOAD: Final = IP_MAX_PACKET_LEN - IP4_MIN_HDR_LEN - UDP_HDR_LEN
_FAMILIES: Final = (socket.AF_INET, socket.AF_INET6)
# A GRO read is at most 64 KB (the kernel stops coalescing there); one byte
# more than the largest, so that MSG_TRUNC can only mean "not ours".
_GRO_SLOT: Final = 1 << 16
# Receive scratch: several GRO reads, or up to BATCH datagrams, per call.
_RECV_SCRATCH: Final = 4 * _GRO_SLOT
_CMSG_INT: Final = struct.Struct("=i")  # UDP_GRO's cmsg: the datagram size, an int
_CMSG_U16: Final = struct.Struct("=H")  # UDP_SEGMENT's cmsg: a u16
_ANC_SPACE: Final = socket.CMSG_SPACE(_CMSG_INT.size)
# Segments of one super-packet written whole: the devices cap theirs at 128
# (gso_max_segs); more is not a super-packet any kernel makes.
_MAX_SPLIT: Final = 1024
# What a lossy network says when it loses one send: the packet is dropped and
# counted (stats().dropped_write), as a real link loses it; copy() goes on.
_LOST_ON_SEND: Final = frozenset(
    {
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
        errno.ENOBUFS,
        errno.EPERM,  # a firewall rule
        errno.EACCES,
        errno.EMSGSIZE,  # one datagram above the path MTU with DF set
        errno.ECONNREFUSED,  # only with IP_RECVERR; not asked for, but harmless
        errno.EADDRNOTAVAIL,  # the local address went away
    }
)
# What a UDP_SEGMENT send may answer that the same datagrams one by one would
# not (udp_send_skb): EIO, the route cannot take GSO (xfrm; older kernels: a
# device that cannot checksum UDP): GSO is turned off for good, as wireguard-go
# does. EINVAL/EMSGSIZE: these segments are longer than the path MTU (which
# may shrink, and grow back), or the socket sends without checksums
# (SO_NO_CHECK): that message goes apart, and only so many refusals in a row
# turn GSO off.
_GSO_OFF: Final = errno.EIO
_GSO_REFUSED: Final = frozenset({errno.EINVAL, errno.EMSGSIZE})
_REFUSALS_BEFORE_OFF: Final = 8

# The C extension's UdpIo (None without it, or from an older build): the
# batches of datagrams in one call each, recvmmsg and sendmmsg, the checks,
# the GRO plan and the split, with the GIL released once. On loopback, a 64
# KB super-packet written and read back costs the pure path ~45 + ~110 us of
# CPU (slicing and checking ~45 datagrams in Python), UdpIo ~21 + ~20 us,
# most of it the kernel's copies. UdpTuns made while this is None (tests
# rebind it), and those on a socket of a subclass (whose methods may do
# something else), use the pure path.
_UDP_IO: Final[type[UdpIo] | None] = getattr(NATIVE_MODULE, "UdpIo", None)
_udp_io = _UDP_IO
_EINTR: Final = -errno.EINTR


@dataclasses.dataclass(frozen=True, slots=True)
class UdpStats(TunStats):
    """A :class:`TunStats` of a :class:`UdpTun`, with the counters of the transport.

    ``packets_*``/``bytes_*`` count inner IP packets (one per datagram);
    ``gso_read``/``gso_written`` count super-packets returned by ``read_gso``
    and taken by ``write_gso``; ``gro_coalesced`` the datagrams merged into
    the super-packets ``read_gso`` returned; ``dropped_write`` the packets a
    send lost (network unreachable, a firewall, no buffer space).
    """

    dropped_stranger: int = 0  # datagrams from someone other than the peer
    dropped_no_peer: int = 0  # packets written before any peer was known
    gso_sends: int = 0  # UDP_SEGMENT sends (each of several datagrams)
    gso_fallback: int = 0  # 1 once UDP_SEGMENT was turned off (EIO, or refused 8 times in a row)
    gso_refused: int = 0  # UDP_SEGMENT sends refused (EINVAL/EMSGSIZE), sent apart
    gro_reads: int = 0  # UDP_GRO reads that returned several datagrams
    udp_gso: int = 0  # 1 while UDP_SEGMENT is used
    udp_gro: int = 0  # 1 while UDP_GRO is on


def _resolve(host: str, port: int, family: int, passive: bool = False) -> tuple[int, Any]:
    """Return (family, sockaddr) of *host*, *port*; *family* 0 for either."""
    flags = socket.AI_PASSIVE if passive else 0
    if family == socket.AF_INET6:
        flags |= socket.AI_V4MAPPED  # an IPv4 peer of an IPv6 socket
    infos = socket.getaddrinfo(
        host or None, port, family, socket.SOCK_DGRAM, socket.IPPROTO_UDP, flags
    )
    return infos[0][0], infos[0][4]


def _address(value: object, what: str) -> tuple[str, int]:
    if (
        not isinstance(value, tuple)
        or len(value) < 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
    ):
        raise TypeError(f"{what} must be a (host, port) tuple, not {value!r}")
    return value[0], value[1]


def _open_socket(
    local: socket.socket | tuple[str, int], peer: tuple[str, int] | None
) -> tuple[socket.socket, bool]:
    """Return the UDP socket for *local* and whether it was made here (else the caller's)."""
    if isinstance(local, socket.socket):
        if local.type != socket.SOCK_DGRAM or local.family not in _FAMILIES:
            raise ValueError(f"local socket must be a UDP socket of IPv4 or IPv6, not {local!r}")
        if local.getsockname()[1] == 0:
            raise ValueError(f"local socket {local!r} is not bound")
        return local, False
    host, port = _address(local, "local")
    family = 0
    if host:
        family = _resolve(host, port, 0, passive=True)[0]
    elif peer is not None:
        family = _resolve(peer[0], peer[1], 0)[0]  # a wildcard of the peer's family
    family, addr = _resolve(host, port, family or socket.AF_INET, passive=True)
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock, True


def _size_buffers(sock: socket.socket) -> None:
    """Raise the socket's buffers to SOCKET_BUFFER: past net.core.*mem_max where permitted."""
    for plain, force in ((socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
        if sock.getsockopt(socket.SOL_SOCKET, plain) >= 2 * SOCKET_BUFFER:
            continue  # the kernel reports twice what was set
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except PermissionError:  # no CAP_NET_ADMIN: up to the sysctl's cap
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _probe_offloads(sock: socket.socket, gso: bool) -> tuple[bool, bool]:
    """Return (UDP_SEGMENT usable, UDP_GRO on); turn UDP_GRO on or, without *gso*, off."""
    if not gso:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_UDP, UDP_GRO, 0)  # a caller's socket may have it on
        return False, False
    try:
        sock.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
        tx = True
    except OSError:  # ENOPROTOOPT before Linux 4.18
        tx = False
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        rx = sock.getsockopt(socket.SOL_UDP, UDP_GRO) == 1
    except OSError:  # before Linux 5.0
        rx = False
    return tx, rx


def _is_ipv4(sockaddr: Any, family: int) -> bool:
    """Whether packets to *sockaddr* travel in IPv4 (an IPv4-mapped IPv6 address included)."""
    if family == socket.AF_INET:
        return True
    addr = ipaddress.IPv6Address(sockaddr[0].split("%")[0])
    return addr.ipv4_mapped is not None


def _route_mtu(sock: socket.socket, peer: Any) -> int | None:
    """The MTU of the route from *sock*'s namespace to *peer*, or None if it cannot be asked.

    ``IP_MTU`` needs a connected socket, and connecting the tunnel's own
    socket would filter (and, disconnected, lose the port of) it: a probe
    socket is connected instead, made in *sock*'s network namespace when that
    is not this thread's and it may be entered.
    """
    ns_fd: int | None = None
    try:
        ns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
        if os.fstat(ns_fd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
            os.close(ns_fd)
            ns_fd = None
    except OSError:  # no CAP_NET_ADMIN (or an old kernel): the socket is ours to probe here
        ns_fd = None
    try:
        with netns.inside(ns_fd):
            probe = socket.socket(sock.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with probe:
            probe.connect(peer)
            if sock.family == socket.AF_INET:
                mtu: int = probe.getsockopt(socket.IPPROTO_IP, IP_MTU)
            else:
                mtu = probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
            return mtu
    except OSError:
        return None
    finally:
        if ns_fd is not None:
            os.close(ns_fd)


def _ip_ok(pkt: memoryview) -> bool:
    """Whether *pkt* is an IPv4 or IPv6 packet whose length field matches its length."""
    n = len(pkt)
    if n < IP4_MIN_HDR_LEN:
        return False
    version = pkt[0] >> 4
    if version == 4:
        iph_len = (pkt[0] & 0x0F) * 4
        return IP4_MIN_HDR_LEN <= iph_len <= n and U16.unpack_from(pkt, IP4_TOTAL_LEN)[0] == n
    if version == 6:
        return n >= IP6_HDR_LEN and U16.unpack_from(pkt, IP6_PAYLOAD_LEN)[0] + IP6_HDR_LEN == n
    return False


@final
class UdpTun:
    """A Tun whose packets travel to one peer as UDP datagrams, one IP packet each.

    ``UdpTun(local, peer=None, *, mtu=None, gso=True)``: *local* is a
    ``(host, port)`` to bind (``("", 0)``: any address, a free port) or a
    bound UDP socket, whose ownership passes to the UdpTun (on an error the
    caller keeps it); *peer* is the ``(host, port)`` to send to. Datagrams
    from any other source are dropped and counted
    (``stats().dropped_stranger``); with ``peer=None`` the first source heard
    becomes the peer and stays, and packets written before that are dropped
    (``dropped_no_peer``).

    **It neither encrypts nor authenticates.** Anyone on the path can read
    and change the packets, and anyone who can send from the peer's address
    can inject packets into the tunnel. Carry it only over a network you
    trust, or use :class:`tunkit.StreamTun` over TLS for a tunnel that is
    private and authenticated.

    ``batch_size()`` is 128. It is a :class:`tunkit.GsoTun`: ``write_gso``
    sends each TCP or UDP super-packet of a TUN device as one ``UDP_SEGMENT``
    send of its segments, ``read_gso`` turns ``UDP_GRO`` reads back into
    super-packets with their virtio-net headers, so that
    ``tunkit.copy(device, udp)`` moves 64 KB per system call each way.
    ``read``/``write`` carry plain packets (equal-sized ones of a batch
    still go as one ``UDP_SEGMENT`` send). With ``gso=False`` neither
    option is used: one datagram per send and per read.

    ``mtu()`` is the largest inner packet: *mtu*, or by default the MTU of
    the route to the peer less the IP and UDP headers (1500 less them without
    a peer). Received datagrams longer than that, truncated, or not an IPv4
    or IPv6 packet of their own length are dropped and counted; nothing a
    peer sends can raise here or make memory grow. ``mwo()`` and ``mro()``
    are 0 (``read_gso``/``write_gso`` need 10 bytes for the virtio-net
    header). One reader thread and one writer thread may use it at once;
    :meth:`close` from any thread ends their blocked calls at once.

    Raises:
        TypeError: *local* or *peer* is not a ``(host, port)`` (or a socket).
        ValueError: *local* is not a bound UDP socket; *mtu* outside 68..65507 (the
            largest UDP payload).
        OSError: the address cannot be resolved or bound (EADDRINUSE, ...).
    """

    def __init__(
        self,
        local: socket.socket | tuple[str, int],
        peer: tuple[str, int] | None = None,
        *,
        mtu: int | None = None,
        gso: bool = True,
    ) -> None:
        if mtu is not None and (
            not isinstance(mtu, int) or isinstance(mtu, bool) or not MIN_MTU <= mtu <= MAX_PAYLOAD
        ):
            raise ValueError(f"mtu {mtu!r} is outside {MIN_MTU}..{MAX_PAYLOAD}")
        if peer is not None:
            peer = _address(peer, "peer")
        sock, made = _open_socket(local, peer)
        try:
            family = sock.family
            peer_addr = None if peer is None else _resolve(peer[0], peer[1], family)[1]
            sock.setblocking(False)
            _size_buffers(sock)
            tx, rx = _probe_offloads(sock, gso)
            if mtu is None:
                route = None if peer_addr is None else _route_mtu(sock, peer_addr)
                ipv4 = (
                    family == socket.AF_INET if peer_addr is None else _is_ipv4(peer_addr, family)
                )
                overhead = (IP4_MIN_HDR_LEN if ipv4 else IP6_HDR_LEN) + UDP_HDR_LEN
                mtu = min((route or 1500) - overhead, MAX_PAYLOAD)
                if mtu < MIN_MTU:
                    raise ValueError(f"the route to {peer} leaves an MTU of {mtu} bytes")
            local_addr = sock.getsockname()
            self._fd = _Descriptor(sock.fileno(), "UdpTun")
        except BaseException:
            if made:
                sock.close()
            raise
        self._sock = sock
        self._family = family
        self._mtu = mtu
        host = local_addr[0] if family == socket.AF_INET else f"[{local_addr[0]}]"
        self._name = f"udp:{host}:{local_addr[1]}"
        self._local = local_addr
        self._events = Events(Event.UP)
        self._read_lock = self._fd.read_lock
        self._write_lock = self._fd.write_lock
        # The peer: sockaddr to send to, and (host, port) that sources must
        # match. Set once, by __init__ or by the first datagram heard (on the
        # reader's thread); the writer reads it without a lock (one assignment).
        self._peer_addr: Any = peer_addr
        self._peer_key: tuple[str, int] | None = (
            None if peer_addr is None else (peer_addr[0], peer_addr[1])
        )
        self._gro = rx
        # The C calls (UdpIo), once the peer is known; None: the pure path.
        self._use_c = _udp_io is not None and type(sock) is socket.socket
        self._io: UdpIo | None = None
        self._blocking = True  # set_blocking()
        # Read side, guarded by the read lock. Datagrams land in _rbuf, in
        # slots of _slot bytes (a GRO read, or one datagram: mtu() bytes, so
        # that a longer one comes back with MSG_TRUNC); _pending holds those
        # received but not yet handed out, as views of _rbuf, which is reused
        # only once _pending is empty.
        self._slot = _GRO_SLOT if rx else mtu
        self._rbuf = bytearray(max(_RECV_SCRATCH, self._slot))
        self._rview = memoryview(self._rbuf)
        self._pending: deque[memoryview] = deque()
        self._read_error: BaseException | None = None  # kept for the next call
        self._coalescer = Coalescer(tcp=True, udp=True)
        self._packets_read = 0
        self._bytes_read = 0
        self._dropped_malformed = 0
        self._dropped_too_big = 0
        self._dropped_stranger = 0
        self._gro_reads = 0
        self._gso_read = 0
        self._gro_coalesced = 0
        # Write side, guarded by the write lock. A super-packet is split into
        # _sbuf, in _seg_views: views of _seg_len bytes each, back to back.
        self._gso = tx
        self._sbuf = bytearray(2 * _GRO_SLOT)
        self._seg_len = 0
        self._seg_views: list[memoryview] = []
        self._seg_sizes = [0] * _MAX_SPLIT
        self._packets_written = 0
        self._bytes_written = 0
        self._dropped_write = 0
        self._dropped_no_peer = 0
        self._gso_written = 0
        self._gso_sends = 0
        self._gso_fallback = 0
        self._gso_refused = 0
        self._dropped_malformed_w = 0  # write_gso's malformed super-packets
        self._refusals = 0  # UDP_SEGMENT sends refused in a row (both paths)
        if peer_addr is not None:
            self._start_c()

    def _start_c(self) -> None:
        """Make the C calls for the peer, if they are to be used (else the pure path serves)."""
        if not self._use_c or _udp_io is None:
            return
        peer = self._peer_addr
        try:
            self._io = _udp_io(
                self._fd.fd,
                self._fd.wake_fd,
                self._family,
                socket.inet_pton(self._family, peer[0].split("%")[0]),
                peer[1],
                peer[3] if len(peer) > 3 else 0,  # an IPv6 peer's scope id
                self._slot,
                max(1, min(BATCH, len(self._rbuf) // self._slot)),
                self._mtu,
                MAX_SEGMENTS,
                MAX_PAYLOAD,
                tuple(_LOST_ON_SEND),
            )
        except (MemoryError, ValueError):
            self._use_c = False
            return
        self._io.set_blocking(self._blocking)

    # -- read side ----------------------------------------------------------------

    def _receive(self, block: bool) -> None:
        """Receive the datagrams that are ready into ``_pending``; hold the read lock.

        With *block*, wait until at least one is kept (the dropped ones do
        not count). ``_pending`` must be empty: ``_rbuf`` is refilled from
        its start. An error after some datagrams were kept is stored for the
        next call.

        Raises:
            ClosedError: closed before or while waiting.
            OSError: the first receive failed.
        """
        fd = self._fd
        recv = self._sock.recvmsg_into
        view = self._rview
        slot = self._slot
        end = len(view) - slot
        pending = self._pending
        at = 0
        reads = 0
        # Up to BATCH receives; more only while waiting for a first one to keep.
        while at <= end and (reads < BATCH or (block and not pending)):
            if fd.closed:
                raise fd.closed_error("read")
            try:
                n, anc, flags, addr = recv([view[at : at + slot]], _ANC_SPACE)
            except BlockingIOError:
                if pending or not block:
                    return
                fd.wait_readable()
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                if pending:
                    self._read_error = fd.failure(exc, "read")
                    return
                raise fd.failure(exc, "read") from None
            reads += 1
            size = n
            for level, kind, data in anc:
                if level == socket.SOL_UDP and kind == UDP_GRO and len(data) >= _CMSG_INT.size:
                    size = _CMSG_INT.unpack_from(data)[0]
            if size <= 0:
                size = n or 1
            count = max(1, -(-n // size))  # an empty datagram is one too
            key = self._peer_key
            if key is None:
                self._learn(addr)
            elif addr[0] != key[0] or addr[1] != key[1]:
                self._dropped_stranger += count
                continue
            if flags & socket.MSG_TRUNC:
                self._dropped_too_big += 1
                continue
            if size > self._mtu:
                self._dropped_too_big += count
                continue
            if size < n:
                self._gro_reads += 1
                for start in range(at, at + n, size):
                    pkt = view[start : min(start + size, at + n)]
                    if _ip_ok(pkt):
                        pending.append(pkt)
                    else:
                        self._dropped_malformed += 1
            else:
                pkt = view[at : at + n]
                if _ip_ok(pkt):
                    pending.append(pkt)
                else:
                    self._dropped_malformed += 1
            at += n

    def _learn(self, addr: Any) -> None:
        """Make *addr*, the first source heard, the peer for good; hold the read lock."""
        self._peer_key = (addr[0], addr[1])
        self._peer_addr = addr
        self._start_c()  # from the next call on, once what is pending is handed out

    def _start_read(self) -> None:
        """Raise what a previous read kept, or ClosedError; hold the read lock."""
        if self._fd.closed:
            raise self._fd.closed_error("read")
        if self._read_error is not None:
            error, self._read_error = self._read_error, None
            raise error

    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """Read packets into ``bufs[i][offset:]``, one per datagram; return how many.

        Blocks until one comes, then takes those already waiting while
        buffers remain (one ``UDP_GRO`` read may bring up to 64). A packet
        longer than the room in its buffer is dropped and counted
        (``dropped_too_big``). An error after some packets were stored is
        raised by the next call.

        Raises:
            OffsetError: *offset* is negative.
            ValueError: no buffers, or fewer sizes than buffers.
            ClosedError: the UdpTun is closed, or closes while the call waits.
            OSError: the socket failed.
        """
        _check_read_args("read", bufs, sizes, offset, 0)
        want = len(bufs)
        pending = self._pending
        with self._read_lock:
            self._start_read()
            io = self._io
            if io is not None and not pending:
                return self._read_c(io.read, bufs, sizes, offset)
            stored = 0
            nbytes = 0
            while stored < want:
                if not pending:
                    self._receive(block=not stored)
                    if not pending:
                        break
                pkt = pending.popleft()
                out = byte_view(bufs[stored], offset)
                n = len(pkt)
                if n > len(out):
                    self._dropped_too_big += 1
                    continue
                out[:n] = pkt
                sizes[stored] = n
                stored += 1
                nbytes += n
            self._packets_read += stored
            self._bytes_read += nbytes
            return stored

    def read_gso(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 16
    ) -> int:
        """Read datagrams and return them as super-packets for a TUN device's ``write_gso``.

        Packet ``i`` is stored at ``bufs[i][offset:offset + sizes[i]]`` with
        its 10-byte virtio-net header at ``bufs[i][offset - 10:offset]``: the
        TCP segments and UDP datagrams of one inner flow that arrived
        together (one ``UDP_GRO`` read, or several) are coalesced into one
        super-packet (``VIRTIO_NET_HDR_F_NEEDS_CSUM``, a GSO type, as the
        offload engine's GRO plans them for a device); any other packet comes
        alone behind an all-zero header. Give each buffer room for
        ``offset + 65535`` bytes; a super-packet that does not fit its
        buffer comes as its packets, one per buffer. Blocks until one packet
        comes; an error after some were stored is raised by the next call.

        Raises:
            OffsetError: *offset* is below 10 (the virtio-net header's room).
            ValueError: no buffers, or fewer sizes than buffers.
            ClosedError: the UdpTun is closed, or closes while the call waits.
            OSError: the socket failed.
        """
        _check_read_args("read_gso", bufs, sizes, offset, VNET_HDR_LEN)
        want = len(bufs)
        pending = self._pending
        at = offset - VNET_HDR_LEN
        with self._read_lock:
            self._start_read()
            io = self._io
            if io is not None and not pending:
                return self._read_c(io.read_gso, bufs, sizes, at)
            stored = 0
            packets = nbytes = 0
            while stored < want:
                if not pending:
                    self._receive(block=not stored)
                    if not pending:
                        break
                writes = deque(self._coalescer.coalesce(list(pending), 0))
                pending.clear()
                while writes:
                    if stored == want:
                        # No buffer left: the rest waits, its packets in order.
                        pending.extend(p for w in writes for p in w.packets)
                        break
                    w = writes.popleft()
                    n = _assemble(w, byte_view(bufs[stored], at))
                    if n < 0:
                        if w.gso:  # too long for the buffer: its packets one by one
                            writes.extendleft(reversed(_lone(w)))
                        else:
                            self._dropped_too_big += 1
                        continue
                    sizes[stored] = n
                    stored += 1
                    packets += len(w.packets)
                    nbytes += sum(map(len, w.packets)) if w.gso else n
                    if w.gso:
                        self._gso_read += 1
                        self._gro_coalesced += len(w.packets)
            self._packets_read += packets
            self._bytes_read += nbytes
            return stored

    def _read_c(
        self,
        call: Callable[[Sequence[WriteableBuffer], MutableSequence[int], int], tuple[int, int]],
        bufs: Sequence[WriteableBuffer],
        sizes: MutableSequence[int],
        offset: int,
    ) -> int:
        """A read by the C calls (UdpIo.read or read_gso); hold the read lock."""
        while True:
            stored, err = call(bufs, sizes, offset)
            if err != _EINTR or stored:
                break  # EINTR with nothing stored: the signal handlers ran, try again
        if err and err != _EINTR:
            exc = self._fd.errno_failure(err, "read")
            if not stored:
                raise exc
            self._read_error = exc
        return stored

    # -- write side ---------------------------------------------------------------

    def _write_c(
        self,
        call: Callable[[Sequence[ReadableBuffer], int, bool], tuple[int, int, int, int, int, int]],
        bufs: Sequence[ReadableBuffer],
        offset: int,
    ) -> int:
        """A write by the C calls (UdpIo.write or write_gso); hold the write lock."""
        total = len(bufs)
        done = 0
        while done < total:
            rest = bufs if not done else bufs[done:]
            n, err, ok, run, _refused, eio = call(rest, offset, self._gso)
            self._note_gso(ok, run, bool(eio))
            done += n
            if err == _EINTR:
                continue
            if err:
                exc = self._fd.errno_failure(err, "write")
                if done:
                    return done  # the caller's retry meets the error
                raise exc
        return total

    def _note_gso(self, ok: int, run: int, eio: bool) -> None:
        """Count UDP_SEGMENT sends that went (*ok*) and refusals in a row after them (*run*);
        turn UDP_SEGMENT off for good after EIO or too many refusals. Hold the write lock."""
        self._refusals = run if ok else self._refusals + run
        if self._gso and (eio or self._refusals >= _REFUSALS_BEFORE_OFF):
            self._gso = False
            self._gso_fallback += 1

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Send ``bufs[i][offset:]`` to the peer, one datagram each; return how many were handled.

        Consecutive packets of equal length (the last of a run may be
        shorter) go as one ``UDP_SEGMENT`` send. A packet the network loses
        on sending (unreachable, a firewall, no buffer space) is dropped and
        counted (``dropped_write``), as are packets written before any peer
        is known (``dropped_no_peer``). When another error hits after some
        packets went out, returns how many did; the caller's retry raises it.
        The bytes in front of *offset* are not touched.

        Raises:
            OffsetError: *offset* is negative.
            ClosedError: the UdpTun is closed, or closes during the call.
            OSError: the socket refused the first packet.
        """
        if offset < 0:
            raise OffsetError(f"write offset {offset} is below mwo() 0")
        total = len(bufs)
        with self._write_lock:
            if self._fd.closed:
                raise self._fd.closed_error("write")
            peer = self._peer_addr
            if peer is None:
                self._dropped_no_peer += total
                return total
            io = self._io
            if io is not None:
                return self._write_c(io.write, bufs, offset)
            views = [byte_view(buf, offset) for buf in bufs]
            done = 0
            while done < total:
                count = self._run(views, done) if self._gso else 1
                try:
                    self._send(views[done : done + count], peer)
                except OSError:
                    if done:
                        return done
                    raise
                done += count
            return total

    def _run(self, views: list[memoryview], start: int) -> int:
        """How many packets from *start* on may go as one UDP_SEGMENT send: equal length, the
        last maybe shorter, at most MAX_SEGMENTS and one send's payload."""
        size = len(views[start])
        if not size:
            return 1  # UDP_SEGMENT 0 would not segment
        limit = min(len(views), start + MAX_SEGMENTS, start + MAX_PAYLOAD // size)
        end = start + 1
        while end < limit:
            n = len(views[end])
            if n != size:
                if n < size:
                    end += 1  # a shorter one ends the run
                break
            end += 1
        return end - start

    def write_gso(self, bufs: Sequence[ReadableBuffer], offset: int = 16) -> int:
        """Send super-packets as a TUN device's ``read_gso`` gives them; return how many went.

        Packet ``i`` is ``bufs[i][offset:]`` with its 10-byte virtio-net header
        at ``bufs[i][offset - 10:offset]``. A TCP or UDP super-packet is split
        into its finished IP packets (the offload engine's split: headers,
        checksums), which go as one ``UDP_SEGMENT`` send (two when they
        exceed one send's 64 KB); a single packet goes as one datagram, its
        partial checksum completed. Without ``UDP_SEGMENT`` (or once it
        failed with EIO) each segment is a send of its own. A packet whose
        header does not match it is dropped and counted
        (``dropped_malformed``); losses and errors as in :meth:`write`.

        Raises:
            OffsetError: *offset* is below 10.
            ClosedError: the UdpTun is closed, or closes during the call.
            OSError: the socket refused the first packet.
        """
        if offset < VNET_HDR_LEN:
            raise OffsetError(
                f"write_gso offset {offset} is below {VNET_HDR_LEN} (the virtio-net header)"
            )
        total = len(bufs)
        at = offset - VNET_HDR_LEN
        with self._write_lock:
            if self._fd.closed:
                raise self._fd.closed_error("write")
            peer = self._peer_addr
            if peer is None:
                self._dropped_no_peer += sum(gso_segments(byte_view(b, at))[0] for b in bufs)
                return total
            io = self._io
            if io is not None:
                return self._write_c(io.write_gso, bufs, at)
            for done, buf in enumerate(bufs):
                try:
                    self._send_super(byte_view(buf, at), peer)
                except OSError:
                    if done:
                        return done
                    raise
            return total

    def _send_super(self, data: memoryview, peer: Any) -> None:
        """Send one kernel (super-)packet *data* (virtio header first); hold the write lock."""
        segments, hdr_len = gso_segments(data)
        if not segments or segments > _MAX_SPLIT:
            self._dropped_malformed_w += 1
            return
        flags, _, _, gso_size, _, _ = VNET_HDR.unpack_from(data)
        if not hdr_len and not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            self._send([data[VNET_HDR_LEN:]], peer)  # a finished packet: as it is
            return
        seg_len = hdr_len + gso_size if hdr_len else len(data) - VNET_HDR_LEN
        outs = self._segment_views(seg_len, segments)
        sizes = self._seg_sizes
        try:
            count = split(data, outs, sizes, 0)
        except (_Malformed, _TooBig, TooManySegmentsError):
            self._dropped_malformed_w += 1
            return
        dgrams = outs[:count]
        dgrams[-1] = dgrams[-1][: sizes[count - 1]]
        if hdr_len:
            self._gso_written += 1
        step = min(MAX_SEGMENTS, max(1, MAX_PAYLOAD // seg_len)) if self._gso else 1
        for start in range(0, count, step):
            self._send(dgrams[start : start + step], peer)

    def _segment_views(self, seg_len: int, segments: int) -> list[memoryview]:
        """Views of ``_sbuf`` of *seg_len* bytes each, back to back, at least *segments* of them."""
        if seg_len != self._seg_len or len(self._seg_views) < segments:
            need = seg_len * max(segments, len(self._sbuf) // seg_len)
            if len(self._sbuf) < need:
                self._sbuf = bytearray(need)
            view = memoryview(self._sbuf)
            self._seg_views = [
                view[i : i + seg_len] for i in range(0, len(view) - seg_len + 1, seg_len)
            ]
            self._seg_len = seg_len
        return self._seg_views

    def _send(self, dgrams: list[memoryview], peer: Any) -> None:
        """Send *dgrams* to *peer*: one datagram, or several as one UDP_SEGMENT send of the
        first one's size (all equal but the last). Hold the write lock.

        Raises:
            ClosedError: closed before or while waiting.
            OSError: the socket refused it (other than a loss on the network).
        """
        fd = self._fd
        count = len(dgrams)
        sock = self._sock
        while True:
            if fd.closed:
                raise fd.closed_error("write")
            try:
                if count == 1:
                    sent = sock.sendto(dgrams[0], peer)
                else:
                    cmsg = [(socket.SOL_UDP, UDP_SEGMENT, _CMSG_U16.pack(len(dgrams[0])))]
                    sent = sock.sendmsg(dgrams, cmsg, 0, peer)
                    self._gso_sends += 1
                    self._refusals = 0
                break
            except BlockingIOError:
                fd.wait_writable()
            except InterruptedError:
                continue
            except OSError as exc:
                code = exc.errno
                if count > 1 and (code == _GSO_OFF or code in _GSO_REFUSED):
                    if code != _GSO_OFF:
                        self._gso_refused += 1
                    self._note_gso(0, int(code != _GSO_OFF), code == _GSO_OFF)
                    for dgram in dgrams:
                        self._send([dgram], peer)
                    return
                if code in _LOST_ON_SEND:
                    self._dropped_write += count
                    return
                raise fd.failure(exc, "write") from None
        self._packets_written += count
        self._bytes_written += sent

    # -- the rest of the Tun ------------------------------------------------------

    def mwo(self) -> int:
        """Minimal write offset: 0 (``write_gso`` needs 10, for the virtio-net header)."""
        return 0

    def mro(self) -> int:
        """Minimal read offset: 0 (``read_gso`` needs 10, for the virtio-net header)."""
        return 0

    def mtu(self) -> int:
        """The largest inner packet: the route's MTU less the IP and UDP headers, or as given."""
        return self._mtu

    def name(self) -> str:
        """``"udp:<local host>:<local port>"`` (an IPv6 host in brackets)."""
        return self._name

    def events(self) -> Events:
        """The event stream: UP at once, nothing after; it ends at :meth:`close`."""
        return self._events

    def batch_size(self) -> int:
        """128: one read or write may carry that many packets."""
        return BATCH

    def set_blocking(self, flag: bool) -> None:
        """Blocking mode (the default), or not: then a call that would wait raises
        ``BlockingIOError`` instead, having stored or sent nothing (``tunkit.aio``
        waits for the socket in its event loop). A call that made progress
        returns it, as in blocking mode.
        """
        self._blocking = flag
        self._fd.set_blocking(flag)
        if self._io is not None:
            self._io.set_blocking(flag)

    def fileno(self) -> int:
        """The socket's descriptor, still owned by this object.

        Raises:
            ClosedError: the UdpTun is closed.
        """
        fd = self._fd.fileno()
        if fd < 0:
            raise ClosedError("tun: fileno of closed UdpTun: file already closed")
        return fd

    @property
    def local_address(self) -> tuple[Any, ...]:
        """The address the socket is bound to (``getsockname()``)."""
        return tuple(self._local)

    @property
    def peer(self) -> tuple[str, int] | None:
        """The peer's (host, port): as given, or the first source heard; None before that."""
        return self._peer_key

    def stats(self) -> UdpStats:
        """A snapshot of the counters (each exact; read without stopping traffic)."""
        # What the C calls (UdpIo) moved, they counted themselves.
        c: dict[str, int] = {} if self._io is None else self._io.counts()
        return UdpStats(
            packets_read=self._packets_read + c.get("packets_read", 0),
            bytes_read=self._bytes_read + c.get("bytes_read", 0),
            packets_written=self._packets_written + c.get("packets_written", 0),
            bytes_written=self._bytes_written + c.get("bytes_written", 0),
            gro_coalesced=self._gro_coalesced + c.get("gro_coalesced", 0),
            dropped_malformed=self._dropped_malformed
            + self._dropped_malformed_w
            + c.get("dropped_malformed", 0)
            + c.get("malformed_written", 0),
            dropped_too_big=self._dropped_too_big + c.get("dropped_too_big", 0),
            dropped_write=self._dropped_write + c.get("dropped_write", 0),
            gso_read=self._gso_read + c.get("gso_read", 0),
            gso_written=self._gso_written + c.get("gso_written", 0),
            dropped_stranger=self._dropped_stranger + c.get("dropped_stranger", 0),
            dropped_no_peer=self._dropped_no_peer,
            gso_sends=self._gso_sends + c.get("gso_sends", 0),
            gso_fallback=self._gso_fallback,
            gso_refused=self._gso_refused + c.get("gso_refused", 0),
            gro_reads=self._gro_reads + c.get("gro_reads", 0),
            udp_gso=int(self._gso),
            udp_gro=int(self._gro),
        )

    def close(self) -> None:
        """Close the socket; idempotent, from any thread.

        Blocked reads and writes raise :class:`ClosedError` at once; returns
        once the socket is closed and the events stream has ended.
        """
        if self._fd.closed:
            return
        self._fd.close()  # wakes the waiters, then closes the descriptor under both locks
        # The descriptor is closed: the socket object must not close its number again.
        self._sock.detach()
        self._events.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd.closed

    def __enter__(self) -> UdpTun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " [closed]" if self._fd.closed else ""
        return f"<UdpTun {self._name} peer={self._peer_key} mtu={self._mtu}{state}>"


def _check_read_args(
    what: str, bufs: Sequence[object], sizes: MutableSequence[int], offset: int, minimum: int
) -> None:
    if offset < minimum:
        room = "mro() 0" if not minimum else f"{minimum} (the virtio-net header)"
        raise OffsetError(f"{what} offset {offset} is below {room}")
    if not bufs:
        raise ValueError(f"{what} with 0 buffers")
    if len(sizes) < len(bufs):
        raise ValueError(f"{what} with {len(sizes)} sizes for {len(bufs)} buffers")


def _assemble(w: Write, out: memoryview) -> int:
    """Store write *w* (virtio header, then the packet) at the start of *out*; return the packet's
    length, or -1 when it does not fit."""
    total = sum(map(len, w.iov))
    if total > len(out):
        return -1
    pos = 0
    for piece in w.iov:
        end = pos + len(piece)
        out[pos:end] = piece
        pos = end
    return total - VNET_HDR_LEN


def _lone(w: Write) -> list[Write]:
    """The packets of write *w*, each as a write of its own (GSO_NONE)."""
    pairs = zip(w.packets, w.indices, strict=True)
    return [Write([ZERO_VNET_HDR, p], [p], i, False, (i,)) for p, i in pairs]

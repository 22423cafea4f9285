"""NativeTun: a Linux TUN device (``/dev/net/tun``) as a Tun, optionally in a namespace."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import itertools
import os
import socket
import struct
import threading
from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, Final, final

# The offload engine, imported from the package so that its dispatch (a C
# extension where one is built) applies here too.
from .._buffers import check_offset
from .._errors import ClosedError, TooManySegmentsError
from .._events import Event, Events
from .._offload import Coalescer, Write, _Malformed, _TooBig, split
from .._offload._impl import PACKET_IO
from .._offload.headers import byte_view
from . import netlink
from .constants import (
    IFF_NO_PI,
    IFF_TUN,
    IFF_VNET_HDR,
    IFNAMSIZ,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
    TUNGETIFF,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN,
)
from .fd import _Descriptor
from .netns import inside as netns_inside
from .netns import open_netns
from .vnet import VNET_HDR, gso_segments

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["GsoNativeTun", "NativeTun", "TunStats", "create_tun", "open_tun"]

TUN_PATH: Final = "/dev/net/tun"

# Headroom in front of every packet: room for the virtio-net header, as the Go
# tuntap device keeps (SPEC.md: mwo() and mro() are 16 with or without offload).
HEADROOM: Final = 16
BATCH_OFFLOAD: Final = 128
MIN_MTU: Final = 68  # tun.c: dev->min_mtu
MAX_MTU: Final = 65535  # tun.c: dev->max_mtu
# The largest packet the kernel hands to a TUN reader, virtio header included.
_MAX_KERNEL_PACKET: Final = VIRTIO_NET_HDR_LEN + 65535

# struct ifreq, <linux/if.h>: ifr_name[IFNAMSIZ], then a union of which the
# TUN ioctls use ifr_flags (short); 40 bytes in all on every Linux ABI.
_IFREQ: Final = struct.Struct(f"={IFNAMSIZ}sH22x")
# What an offload device asks the kernel for (TUNSETOFFLOAD): partial
# checksums and TCP segmentation always, UDP segmentation where accepted.
_OFFLOAD_BASE: Final = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
_OFFLOAD_USO: Final = TUN_F_USO4 | TUN_F_USO6
# A read that found nothing (EAGAIN) costs an exception, about a microsecond
# in CPython, three times a poll() that finds the device readable: after one,
# the next reads wait in poll() first, until this many have gone by.
_WAIT_FIRST_READS: Final = 8
_readv: Final = os.readv  # bound once: the plain read and write run per packet
_write: Final = os.write
# The C extension's PacketIo (None without it) does the hot system calls: the
# read and write of a device without offload, and read_gso/write_gso of one
# with it. Each call does the system calls, poll() when the device is not
# ready, the header checks and the counters with the GIL released once and no
# lock. Per packet, what Python runs around the system call decides the speed:
# on pair-load, read/write in Python (a lock, counters, a memoryview and a
# slice per packet) reached 0.5-0.65x a bare os.readv/os.write loop, PacketIo
# ~1x; super-packets passed whole went from ~0.55x veth to ~0.85x. Devices made
# while this is None (tests rebind it) use the Python path.
_packet_io = PACKET_IO
# What the kernel says when it refuses one written packet: EIO while the link
# is down, EINVAL for bytes that are not an IPv4 or IPv6 packet.
_DROPPED_ON_WRITE: Final = frozenset({errno.EIO, errno.EINVAL})
_SPLIT_FIRST: Final = 1  # PacketIo.write_gso: a super-packet of a refused kind
# The kinds of super-packet a kernel refused, as bits (PacketIo.write_gso's *refused*).
_REFUSED_TCP: Final = 1
_REFUSED_UDP: Final = 2


def _refused_bit(gso_type: int) -> int:
    """The refusal bit of a virtio ``gso_type``: UDP (USO) or TCP (TSO, v4 or v6)."""
    if gso_type & ~VIRTIO_NET_HDR_GSO_ECN == VIRTIO_NET_HDR_GSO_UDP_L4:
        return _REFUSED_UDP
    return _REFUSED_TCP


@dataclasses.dataclass(frozen=True, slots=True)
class TunStats:
    """A snapshot of a NativeTun's counters since it was made.

    Each field is exact; the fields are read without stopping traffic, so two
    of them may be from slightly different moments.
    """

    packets_read: int = 0
    bytes_read: int = 0
    packets_written: int = 0
    bytes_written: int = 0
    gso_split: int = 0  # super-packets split on read (offload)
    gro_coalesced: int = 0  # packets merged on write (offload)
    dropped_malformed: int = 0
    dropped_too_big: int = 0
    dropped_write: int = 0  # written packets the kernel refused (link down, not IP)
    gro_refused: int = 0  # super-packets the kernel refused (EINVAL), sent split instead
    gso_read: int = 0  # super-packets read whole (read_gso)
    gso_written: int = 0  # super-packets written whole (write_gso)


def check_name(name: str) -> None:
    """Check a device name as the kernel's ``dev_valid_name`` will; ``""`` is allowed.

    Raises:
        ValueError: longer than 15 bytes, ``.``/``..``, or with ``/``, ``:``,
            white space or NUL.
    """
    if not isinstance(name, str):
        raise TypeError(f"device name must be a str, not {type(name).__name__}")
    if name == "":
        return
    if len(name.encode()) > IFNAMSIZ - 1:
        raise ValueError(
            f"device name {name!r} is {len(name.encode())} bytes long; at most {IFNAMSIZ - 1}"
        )
    if name in (".", ".."):
        raise ValueError(f"device name {name!r} is not allowed")
    bad = [c for c in name if c in "/:\0" or c.isspace()]
    if bad:
        raise ValueError(f"device name {name!r} contains {bad[0]!r}")


def _check_mtu(mtu: int) -> None:
    if not isinstance(mtu, int) or isinstance(mtu, bool):
        raise TypeError(f"mtu must be an int, not {type(mtu).__name__}")
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"mtu {mtu} is outside {MIN_MTU}..{MAX_MTU}")


def _open_dev_tun() -> int:
    try:
        return os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(
            errno.ENOENT,
            f"{TUN_PATH} does not exist: load the TUN driver (modprobe tun)",
            TUN_PATH,
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            # The device node is there but no driver answers it.
            raise FileNotFoundError(
                errno.ENOENT,
                f"{TUN_PATH} has no driver behind it: load the TUN driver (modprobe tun)",
                TUN_PATH,
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionError(
                exc.errno,
                f"cannot open {TUN_PATH}: {os.strerror(exc.errno)} "
                "(creating a TUN device needs CAP_NET_ADMIN and access to the file)",
                TUN_PATH,
            ) from exc
        raise


def _name_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _set_iff(fd: int, name: str, flags: int) -> str:
    """TUNSETIFF on *fd*; return the device's name (the kernel picks one for ``""``)."""
    try:
        result = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
    except OSError as exc:
        shown = repr(name) if name else "(kernel-chosen name)"
        if exc.errno == errno.EPERM:
            raise PermissionError(
                exc.errno, f"creating TUN device {shown} needs CAP_NET_ADMIN"
            ) from exc
        if exc.errno == errno.EBUSY:
            raise FileExistsError(
                exc.errno,
                f"device name {name!r} is in use: that TUN device is open elsewhere",
            ) from None
        if exc.errno == errno.EINVAL and name and _name_exists(name):
            raise FileExistsError(
                exc.errno, f"device name {name!r} is in use by a device that is not TUN"
            ) from None
        raise OSError(exc.errno, f"TUNSETIFF {shown}: {os.strerror(exc.errno or 0)}") from exc
    raw_name, _flags = _IFREQ.unpack(result)
    return str(raw_name.split(b"\0", 1)[0].decode())


def _get_iff(fd: int) -> tuple[str, int]:
    result = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    raw_name, flags = _IFREQ.unpack(result)
    return str(raw_name.split(b"\0", 1)[0].decode()), int(flags)


def _set_offload(fd: int, flags: int) -> None:
    # TUNSETOFFLOAD takes the flags by value, not through a pointer.
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def _enable_vnet(fd: int) -> int:
    """Set the virtio header size and ask for the offloads; return the TUN_F_* accepted.

    TSO and checksum offload first with USO (Linux 6.2 and later), then
    without it; a kernel that refuses even those gets none (whole packets
    with full checksums only), quietly: offload is a speed-up, not a feature
    a caller can lose.
    """
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("=i", VIRTIO_NET_HDR_LEN))
    for flags in (_OFFLOAD_BASE | _OFFLOAD_USO, _OFFLOAD_BASE):
        try:
            _set_offload(fd, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            continue
        return flags
    _set_offload(fd, 0)
    return 0


class NativeTun:
    """A Linux TUN device (``IFF_TUN | IFF_NO_PI``) as a Tun; make one with
    :func:`create_tun` or :func:`open_tun`.

    It owns the device descriptor, a descriptor of its network namespace
    (when one was named), an rtnetlink event socket and the thread
    ``tunkit-events:<name>`` that reads it. One reader thread and one writer
    thread may use it at once; configuration methods may be called from any
    thread. :meth:`close` releases all of it.

    This class moves one packet per system call (no offload), in C when the
    extension ``tunkit._speedups`` is built (see ``_packet_io``). A device with
    the virtio header is a :class:`GsoNativeTun`, a subclass that adds the
    offloads and ``read_gso``/``write_gso`` (a :class:`tunkit.GsoTun`).
    """

    def __init__(
        self,
        fd: int,
        name: str,
        *,
        vnet_hdr: bool,
        offload_flags: int,
        ns_fd: int | None,
        monitor: netlink.LinkMonitor,
    ) -> None:
        """Private: use :func:`create_tun` or :func:`open_tun`. Takes ownership of
        *fd*, *ns_fd* and *monitor*, and starts the monitor's thread."""
        self._fd = _Descriptor(fd, "device", _packet_io)
        self._io = self._fd.io  # None: the pure read and write below
        self._read_lock = self._fd.read_lock
        self._write_lock = self._fd.write_lock
        self._ns_fd = ns_fd  # None: the device lives in this process's namespace
        self._vnet_hdr = vnet_hdr
        self._offload_flags = offload_flags
        self._batch = BATCH_OFFLOAD if vnet_hdr else 1
        self._monitor = monitor
        state = monitor.state
        self._index = state.ifindex
        self._name = state.name or name
        self._mtu = state.mtu
        # What the event thread last saw, apart from _mtu, which set_mtu also
        # updates: each change the kernel reports is an event, whoever made it.
        self._seen_mtu = state.mtu  # event thread only
        self._seen_up = state.up  # event thread only
        self._events = Events(Event.UP if state.up else None)
        self._state_lock = threading.Lock()
        self._closed = False  # guarded by _state_lock
        # Read side, guarded by the read lock.
        self._overflow = bytearray(_MAX_KERNEL_PACKET)  # catches too-big packets
        self._wait_first = 0  # reads left that poll() before trying (see read())
        self._packets_read = 0
        self._bytes_read = 0
        self._dropped_malformed = 0
        self._dropped_too_big = 0
        self._gso_split = 0
        self._gso_read = 0
        # Write side, guarded by the write lock.
        self._packets_written = 0
        self._bytes_written = 0
        self._gro_coalesced = 0
        self._gro_refused = 0
        self._gso_written = 0
        self._dropped_write = 0
        monitor.start(self._on_state, self._name)

    # -- events ---------------------------------------------------------------

    def _on_state(self, state: netlink.LinkState) -> None:
        # On the event thread. No event once close() has begun: the stream ends there.
        if self._closed:
            return
        if state.deleted:
            if self._seen_up:
                self._seen_up = False
                self._events.put(Event.DOWN)
            return
        if state.name:
            self._name = state.name  # renamed with `ip link set name`
        if state.mtu != self._seen_mtu:
            self._seen_mtu = state.mtu
            self._mtu = state.mtu  # before the event: mtu() is new when it is seen
            self._events.put(Event.MTU_UPDATE)
        if state.up != self._seen_up:
            self._seen_up = state.up
            self._events.put(Event.UP if state.up else Event.DOWN)

    def events(self) -> Events:
        """The stream of UP, DOWN and MTU_UPDATE events, from creation on; ends at close()."""
        return self._events

    # -- Tun ------------------------------------------------------------------

    def _check_read_args(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int
    ) -> None:
        if offset < HEADROOM:
            check_offset("read", offset, HEADROOM)
        if len(bufs) < self._batch:
            raise ValueError(f"read with {len(bufs)} buffers; batch_size() is {self._batch}")
        if len(sizes) < len(bufs):
            raise ValueError(f"read with {len(sizes)} sizes for {len(bufs)} buffers")

    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = HEADROOM
    ) -> int:
        """Read one packet into ``bufs[0][offset:]``, blocking until one comes; return 1.

        A packet longer than the room in the buffer is dropped and counted
        (``stats().dropped_too_big``), and the read goes on. Needs
        ``len(bufs) >= batch_size()`` and ``offset >= mro()``.

        Raises:
            OffsetError: *offset* is below ``mro()``.
            ValueError: fewer buffers than ``batch_size()``, or fewer sizes than buffers.
            ClosedError: the device is closed, or closes while the call waits.
        """
        # The hot path of a device without offload: one system call per
        # packet, so every line here is paid per packet. The checks of
        # _check_read_args are inlined for a batch of 1.
        if offset < HEADROOM or not bufs or len(sizes) < len(bufs):
            self._check_read_args(bufs, sizes, offset)
        io = self._io
        if io is None:
            return self._read_pure(bufs, sizes, offset)
        n = io.read(bufs[0], offset, self._overflow)
        if n < 0:
            raise self._fd.errno_failure(n, "read")
        sizes[0] = n
        return 1

    def _read_pure(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int
    ) -> int:
        view = byte_view(bufs[0])
        room = len(view) - offset
        if room <= 0:
            raise ValueError(f"buffer of {len(view)} bytes has no room after offset {offset}")
        iov: list[WriteableBuffer] = [view[offset:], self._overflow]
        d = self._fd
        with self._read_lock:
            if self._wait_first:
                self._wait_first -= 1
                d.wait_readable()
            while True:
                try:
                    n = _readv(d.fd, iov)
                except BlockingIOError:
                    self._wait_first = _WAIT_FIRST_READS
                    d.wait_readable()
                    continue
                except OSError as exc:
                    raise d.failure(exc, "read") from None
                if n <= room:
                    break
                self._dropped_too_big += 1
            self._packets_read += 1
            self._bytes_read += n
        sizes[0] = n
        return 1

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = HEADROOM) -> int:
        """Write ``bufs[i][offset:]`` as one packet each, one system call per packet.

        Returns how many were handled. A packet the kernel refuses (EIO while
        the link is down, EINVAL for bytes that are not IPv4 or IPv6) is
        dropped and counted in ``stats().dropped_write``, as a real link loses
        it. When another error hits packet ``i > 0``, returns ``i`` and the
        caller's retry of that packet raises it. The bytes in front of
        *offset* are left unchanged.

        Raises:
            OffsetError: *offset* is below ``mwo()``.
            ClosedError: the device is closed, or closes during the call.
            OSError: any other refusal of the first packet.
        """
        if offset < HEADROOM:
            check_offset("write", offset, HEADROOM)
        io = self._io
        if io is None:
            return self._write_pure(bufs, offset)
        done = 0
        for buf in bufs:
            n = io.write(buf, offset)
            if n < 0:
                if -n not in _DROPPED_ON_WRITE:
                    if done:
                        return done
                    raise self._fd.errno_failure(n, "write")
                with self._write_lock:
                    self._dropped_write += 1  # lost as on a real link (see _write_pure)
            done += 1
        return done

    def _write_pure(self, bufs: Sequence[ReadableBuffer], offset: int) -> int:
        d = self._fd
        done = 0
        with self._write_lock:
            for buf in bufs:
                pkt = byte_view(buf, offset)
                while True:
                    try:
                        n = _write(d.fd, pkt)
                        break
                    except BlockingIOError:
                        try:
                            d.wait_writable()  # raises ClosedError once close() began
                        except ClosedError:
                            if done:
                                return done  # the caller's retry meets it
                            raise
                    except OSError as exc:
                        n = -exc.errno if exc.errno in _DROPPED_ON_WRITE else 0
                        if n:
                            break
                        if done:
                            return done
                        raise d.failure(exc, "write") from None
                done += 1
                if n < 0:
                    # Lost as on a real link: one bad packet, or a link that is
                    # down for a while, must not stop a forwarder.
                    self._dropped_write += 1
                else:
                    self._packets_written += 1
                    self._bytes_written += n
        return done

    def mwo(self) -> int:
        """Minimal write offset: 16 bytes of headroom in front of each written packet."""
        return HEADROOM

    def mro(self) -> int:
        """Minimal read offset: 16."""
        return HEADROOM

    def mtu(self) -> int:
        """The device's MTU, as the kernel last reported it (or as :meth:`set_mtu` set it)."""
        return self._mtu

    def name(self) -> str:
        """The device's name (follows renames)."""
        return self._name

    def batch_size(self) -> int:
        """1 without offload (one packet per system call), 128 with the virtio header."""
        return self._batch

    def fileno(self) -> int:
        """The device descriptor, still owned by this object.

        Raises:
            ClosedError: the device is closed.
        """
        fd = self._fd.fileno()
        if fd < 0:
            raise ClosedError("tun: fileno of closed device: file already closed")
        return fd

    def stats(self) -> TunStats:
        """A snapshot of the counters."""
        # What the C calls (PacketIo) moved, they counted themselves.
        c = {} if self._io is None else self._io.counts()
        return TunStats(
            packets_read=self._packets_read + c.get("packets_read", 0),
            bytes_read=self._bytes_read + c.get("bytes_read", 0),
            packets_written=self._packets_written + c.get("packets_written", 0),
            bytes_written=self._bytes_written + c.get("bytes_written", 0),
            gso_split=self._gso_split,
            gro_coalesced=self._gro_coalesced,
            dropped_malformed=self._dropped_malformed + c.get("dropped_malformed", 0),
            dropped_too_big=self._dropped_too_big + c.get("dropped_too_big", 0),
            dropped_write=self._dropped_write + c.get("dropped_write", 0),
            gro_refused=self._gro_refused,
            gso_read=self._gso_read + c.get("gso_read", 0),
            gso_written=self._gso_written + c.get("gso_written", 0),
        )

    @property
    def offload(self) -> bool:
        """Whether the device carries the virtio-net header (``IFF_VNET_HDR``)."""
        return self._vnet_hdr

    @property
    def offload_flags(self) -> int:
        """The ``TUN_F_*`` offloads the kernel accepted (``TUNSETOFFLOAD``); 0 without offload."""
        return self._offload_flags

    # -- configuration over netlink -------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClosedError(f"tun: {what} on closed device: file already closed")

    def index(self) -> int:
        """The device's interface index in its namespace."""
        return self._index

    def set_mtu(self, mtu: int) -> None:
        """Set the device's MTU; ``mtu()`` returns it at once, and MTU_UPDATE follows.

        Raises:
            ValueError: *mtu* outside 68..65535.
            PermissionError: no CAP_NET_ADMIN.
        """
        _check_mtu(mtu)
        self._check_open("set_mtu")
        netlink.set_mtu(self._ns_fd, self._index, mtu)
        self._mtu = mtu

    def up(self) -> None:
        """Set the device administratively up (UP follows in ``events()``)."""
        self._check_open("up")
        netlink.set_up(self._ns_fd, self._index, True)

    def down(self) -> None:
        """Set the device administratively down (DOWN follows in ``events()``)."""
        self._check_open("down")
        netlink.set_up(self._ns_fd, self._index, False)

    def add_address(self, cidr: str) -> None:
        """Add an address such as ``"10.0.0.1/24"`` or ``"fd00::1/64"`` (IPv6 usable at once).

        Raises:
            ValueError: *cidr* is not an address with a prefix length.
            FileExistsError: the device has that address already.
        """
        iface = ipaddress.ip_interface(cidr)
        self._check_open("add_address")
        netlink.add_address(self._ns_fd, self._index, iface)

    def remove_address(self, cidr: str) -> None:
        """Remove an address added with :meth:`add_address`.

        Raises:
            OSError: EADDRNOTAVAIL when the device does not have it.
        """
        iface = ipaddress.ip_interface(cidr)
        self._check_open("remove_address")
        netlink.remove_address(self._ns_fd, self._index, iface)

    def addresses(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        """The device's addresses, IPv4 first, link-local ones included."""
        self._check_open("addresses")
        return netlink.addresses(self._ns_fd, self._index)

    # -- life -----------------------------------------------------------------

    def close(self) -> None:
        """Close the device; idempotent, from any thread.

        Blocked reads and writes raise :class:`ClosedError` at once; returns
        after the event thread has ended and every descriptor is closed. The
        kernel removes a device that is not persistent with its last descriptor.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._fd.close()
        finally:
            try:
                self._monitor.close()
            finally:
                self._events.close()
                if self._ns_fd is not None:
                    os.close(self._ns_fd)
                    self._ns_fd = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> NativeTun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " [closed]" if self._closed else ""
        offload = " offload" if self._vnet_hdr else ""
        return f"<NativeTun {self._name} index={self._index} mtu={self._mtu}{offload}{state}>"


@final
class GsoNativeTun(NativeTun):
    """A :class:`NativeTun` with the virtio-net header: the kernel's offloads, and super-packets.

    What :func:`create_tun` returns with ``offload=True`` (and :func:`open_tun`
    for a descriptor with ``IFF_VNET_HDR``). ``read`` splits super-packets
    into packets, ``write`` coalesces a batch into super-packets (GRO), and
    ``read_gso``/``write_gso`` move super-packets whole: this class is a
    :class:`tunkit.GsoTun`, while a plain :class:`NativeTun` is not.
    """

    def __init__(
        self,
        fd: int,
        name: str,
        *,
        vnet_hdr: bool,
        offload_flags: int,
        ns_fd: int | None,
        monitor: netlink.LinkMonitor,
    ) -> None:
        """Private: use :func:`create_tun` or :func:`open_tun` (see :class:`NativeTun`)."""
        # Read side, guarded by the read lock. One kernel packet (header
        # included) lands in _rbuf; _pending is the length of one read there
        # but not yet handed out (it did not fit the rest of a batch), 0 if none.
        self._rbuf = bytearray(_MAX_KERNEL_PACKET)
        self._rview = memoryview(self._rbuf)
        self._pending = 0
        self._read_error: BaseException | None = None  # kept for the next call
        self._split_sizes = [0] * BATCH_OFFLOAD
        # Write side, guarded by the write lock. A kind of super-packet that the
        # kernel refused (EINVAL) is split before writing from then on.
        uso = offload_flags & _OFFLOAD_USO == _OFFLOAD_USO
        self._coalescer = Coalescer(tcp=True, udp=bool(uso))
        self._refused = 0  # kinds refused (_REFUSED_TCP, _REFUSED_UDP), as PacketIo.write_gso takes
        self._seg_bufs: list[bytearray] = []  # segments of a refused super-packet
        self._seg_sizes: list[int] = []
        super().__init__(
            fd, name, vnet_hdr=vnet_hdr, offload_flags=offload_flags, ns_fd=ns_fd, monitor=monitor
        )

    # -- packets: read splits, write coalesces ----------------------------------

    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = HEADROOM
    ) -> int:
        """Read packets into ``bufs[i][offset:]``, splitting super-packets; return the count.

        Blocks until one kernel packet comes, then takes the ones already
        waiting while buffers remain. A super-packet (TCP or UDP GSO) becomes
        its segments, one per buffer, with their own headers and checksums; a
        partial checksum is completed. A malformed kernel packet, or one whose
        packets do not fit their buffers, is dropped and counted
        (``dropped_malformed``, ``dropped_too_big``) and the read goes on. An
        error after some packets were stored is raised by the next call.

        Raises:
            OffsetError: *offset* is below ``mro()``.
            ValueError: fewer buffers than ``batch_size()``, or fewer sizes than buffers.
            TooManySegmentsError: a super-packet has more segments than
                *bufs*; it is dropped (and counted), and the next read goes on.
            ClosedError: the device is closed, or closes while the call waits.
        """
        self._check_read_args(bufs, sizes, offset)
        want = len(bufs)
        fd = self._fd
        iov = [self._rbuf]
        rview = self._rview
        with self._read_lock:
            if self._read_error is not None:
                error, self._read_error = self._read_error, None
                raise error
            stored = 0
            while True:
                if self._pending:
                    n, self._pending = self._pending, 0
                elif not stored:
                    n = fd.readv_locked(iov)
                else:
                    try:
                        n = fd.try_readv_locked(iov)
                    except OSError as exc:
                        self._read_error = exc
                        return stored
                    if n < 0:
                        return stored
                try:
                    if stored:
                        got = self._handle_kernel_packet(
                            rview[:n], bufs[stored:], self._split_sizes, offset
                        )
                        sizes[stored : stored + got] = self._split_sizes[:got]
                    else:
                        got = self._handle_kernel_packet(rview[:n], bufs, sizes, offset)
                except TooManySegmentsError:
                    if stored:
                        self._pending = n  # first in the next call, with all buffers
                        return stored
                    self._dropped_too_big += 1
                    raise
                stored += got
                if stored >= want:
                    return stored

    def _handle_kernel_packet(
        self,
        data: memoryview,
        bufs: Sequence[WriteableBuffer],
        sizes: MutableSequence[int],
        offset: int,
    ) -> int:
        """Turn one kernel read (virtio header + packet) into packets in *bufs*; return the count.

        A malformed one, or one that does not fit, is dropped and counted: 0.
        Called with the read lock held.

        Raises:
            TooManySegmentsError: more segments than buffers; nothing stored
                or counted (the caller decides).
        """
        try:
            count = split(data, bufs, sizes, offset)
        except _Malformed:
            self._dropped_malformed += 1
            return 0
        except _TooBig:
            self._dropped_too_big += 1
            return 0
        if data[1] & ~VIRTIO_NET_HDR_GSO_ECN != VIRTIO_NET_HDR_GSO_NONE:
            self._gso_split += 1
        self._packets_read += count
        self._bytes_read += sum(sizes[:count]) if count > 1 else sizes[0]
        return count

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = HEADROOM) -> int:
        """Write ``bufs[i][offset:]`` as packets, coalescing each flow's into super-packets.

        The TCP segments and UDP datagrams of one flow in the batch go to the
        kernel as one super-packet (GRO); every other packet is written alone.
        Returns how many packets were handled, not how many system calls. If
        the kernel refuses a super-packet (EINVAL: some kernels lack USO), its
        packets are written one by one, that kind of coalescing is turned off
        for the device, and ``stats().gro_refused`` counts it. A packet the
        kernel refuses is dropped and counted as in :meth:`NativeTun.write`.
        When another error hits after some packets went out, returns how many
        leading packets were sent and the caller's retry raises it.

        Raises:
            OffsetError: *offset* is below ``mwo()``.
            ClosedError: the device is closed, or closes during the call.
            OSError: any other refusal of the first write.
        """
        if offset < HEADROOM:
            check_offset("write", offset, HEADROOM)
        fd = self._fd
        with self._write_lock:
            writes = self._coalescer.coalesce(bufs, offset)
            done = 0  # leading packets of the batch handled so far
            for w in writes:
                try:
                    if w.gso and self._was_refused(w.iov[0][1]):
                        # Refused earlier in this batch: the coalescer heard of
                        # it too late to leave this one whole.
                        self._write_apart(w)
                        done = w.prefix
                        continue
                    try:
                        n = fd.writev_locked(w.iov)
                    except OSError as exc:
                        if isinstance(exc, ClosedError) or exc.errno not in _DROPPED_ON_WRITE:
                            raise
                        if exc.errno == errno.EINVAL and w.gso:
                            self._refuse(w.iov[0][1])
                            self._write_apart(w)
                        else:
                            self._dropped_write += len(w.packets)
                        done = w.prefix
                        continue
                except OSError:
                    if done:
                        return done  # the caller's retry meets the error
                    raise
                done = w.prefix
                if w.gso:
                    self._gro_coalesced += len(w.packets)
                    self._packets_written += len(w.packets)
                    self._bytes_written += sum(map(len, w.packets))
                else:
                    self._packets_written += 1
                    self._bytes_written += n - VIRTIO_NET_HDR_LEN
            return len(bufs)

    def _write_apart(self, w: Write) -> None:
        """Write the packets of *w* one by one (GSO_NONE), dropping and counting refusals."""
        for iov in w.one_by_one():
            self._write_one(iov)

    def _was_refused(self, gso_type: int) -> bool:
        """Whether the kernel refused a super-packet of *gso_type*'s kind before."""
        return bool(self._refused & _refused_bit(gso_type))

    def _refuse(self, gso_type: int) -> None:
        """The kernel refused a super-packet of *gso_type*: split that kind from now on."""
        self._gro_refused += 1
        bit = _refused_bit(gso_type)
        self._refused |= bit
        if bit == _REFUSED_UDP:
            self._coalescer.udp = False
        else:
            self._coalescer.tcp = False

    def _write_one(self, iov: list[memoryview]) -> None:
        """Write one packet (header and packet in *iov*), dropping and counting a refusal."""
        try:
            n = self._fd.writev_locked(iov)
        except OSError as exc:
            if isinstance(exc, ClosedError) or exc.errno not in _DROPPED_ON_WRITE:
                raise
            self._dropped_write += 1
            return
        self._packets_written += 1
        self._bytes_written += n - VIRTIO_NET_HDR_LEN

    # -- super-packets whole ----------------------------------------------------

    def read_gso(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = HEADROOM
    ) -> int:
        """Read kernel packets whole, super-packets included; return how many were stored.

        Packet ``i`` is stored at ``bufs[i][offset:offset + sizes[i]]`` with
        its 10-byte virtio-net header at ``bufs[i][offset - 10:offset]``: a
        GSO super-packet of up to 64 KB of one TCP or UDP flow, or a single
        packet (``GSO_NONE``, possibly with a partial checksum to complete).
        Blocks until the first comes, then takes those already waiting, one
        per buffer. Any number of buffers will do; give each room for
        ``offset + 65535`` bytes, because a packet longer than its buffer's
        room is dropped and counted (``dropped_too_big``), as is one whose
        header does not match it (``dropped_malformed``). An error after some
        packets were stored is raised by the next call.

        Raises:
            OffsetError: *offset* is below ``mro()``.
            ValueError: no buffers, or fewer sizes than buffers.
            ClosedError: the device is closed, or closes while the call waits.
        """
        if offset < HEADROOM:
            check_offset("read", offset, HEADROOM)
        if not bufs:
            raise ValueError("read_gso with 0 buffers")
        if len(sizes) < len(bufs):
            raise ValueError(f"read_gso with {len(sizes)} sizes for {len(bufs)} buffers")
        io = self._io
        if io is not None and not self._pending and self._read_error is None:
            # The whole batch in one C call (PacketIo.read_gso): the reads,
            # the header checks and the counters, with the GIL released once.
            stored, err = io.read_gso(bufs, sizes, offset - VIRTIO_NET_HDR_LEN, self._overflow)
            if err:
                exc = self._fd.errno_failure(err, "read")
                if not stored:
                    raise exc
                self._read_error = exc
            return stored
        want = len(bufs)
        fd = self._fd
        overflow = self._overflow
        at = offset - VIRTIO_NET_HDR_LEN
        with self._read_lock:
            if self._read_error is not None:
                error, self._read_error = self._read_error, None
                raise error
            stored = 0
            while stored < want:
                room = byte_view(bufs[stored], at)
                if self._pending:
                    # Left by read(): hand it on whole if it fits.
                    n, self._pending = self._pending, 0
                    if n <= len(room):
                        room[:n] = self._rview[:n]
                elif not stored:
                    n = fd.readv_locked([room, overflow])
                else:
                    try:
                        n = fd.try_readv_locked([room, overflow])
                    except OSError as exc:
                        self._read_error = exc
                        return stored
                    if n < 0:
                        return stored
                if n > len(room):
                    self._dropped_too_big += 1
                    continue
                segments, hdr_len = gso_segments(room[:n])
                if not segments:
                    self._dropped_malformed += 1
                    continue
                ip_len = n - VIRTIO_NET_HDR_LEN
                sizes[stored] = ip_len
                stored += 1
                self._packets_read += segments
                # As many bytes as the segments carry: headers once per segment.
                self._bytes_read += ip_len + (segments - 1) * hdr_len
                if hdr_len:
                    self._gso_read += 1
            return stored

    def write_gso(self, bufs: Sequence[ReadableBuffer], offset: int = HEADROOM) -> int:
        """Write packets whole with their virtio-net headers; return how many were handled.

        Packet ``i`` is ``bufs[i][offset:]`` and its header is
        ``bufs[i][offset - 10:offset]`` (as :meth:`read_gso` stores them): one
        system call each, super-packets included. A super-packet the kernel
        refuses (EINVAL, a kernel without USO say) is split and written
        segment by segment, and that kind is split first from then on
        (``stats().gro_refused``): nothing is lost. Other refusals are
        dropped and counted as in :meth:`write`. When another error hits
        after some packets went out, returns how many were handled.

        Raises:
            OffsetError: *offset* is below ``mwo()``.
            ClosedError: the device is closed, or closes during the call.
            OSError: any other refusal of the first packet.
        """
        if offset < HEADROOM:
            check_offset("write", offset, HEADROOM)
        io = self._io
        if io is None:
            return self._write_gso_pure(bufs, offset)
        # The batch in C (PacketIo.write_gso); a packet it hands back (a kind
        # the kernel refused, or an error) goes through the Python path alone.
        at = offset - VIRTIO_NET_HDR_LEN
        total = len(bufs)
        done = 0
        while done < total:
            rest = bufs if not done else list(itertools.islice(bufs, done, None))
            n, err = io.write_gso(rest, at, self._refused)
            done += n
            if err == 0 or err == -errno.EINTR:
                continue
            if err != _SPLIT_FIRST and err != -errno.EINVAL:
                exc = self._fd.errno_failure(err, "write")
                if done:
                    return done  # the caller's retry meets the error
                raise exc
            # A super-packet of a kind the kernel refused before, or refuses
            # now (EINVAL): split and written segment by segment, as in
            # _write_gso_pure; the first refusal of a kind turns it off.
            data = byte_view(bufs[done], at)
            with self._write_lock:
                try:
                    if self._write_split(data) and err != _SPLIT_FIRST:
                        self._refuse(data[1])
                except OSError:
                    if done:
                        return done
                    raise
            done += 1
        return done

    def _write_gso_pure(self, bufs: Sequence[ReadableBuffer], offset: int) -> int:
        write = self._fd.write_locked
        at = offset - VIRTIO_NET_HDR_LEN
        done = 0
        with self._write_lock:
            for buf in bufs:
                data = byte_view(buf, at)
                kind = data[1] & ~VIRTIO_NET_HDR_GSO_ECN if len(data) > 1 else 0
                try:
                    if kind != VIRTIO_NET_HDR_GSO_NONE and self._was_refused(kind):
                        self._write_split(data)
                        done += 1
                        continue
                    try:
                        write(data)
                    except OSError as exc:
                        if isinstance(exc, ClosedError) or exc.errno not in _DROPPED_ON_WRITE:
                            raise
                        if exc.errno == errno.EINVAL and kind != VIRTIO_NET_HDR_GSO_NONE:
                            if self._write_split(data):
                                self._refuse(kind)
                        else:
                            self._dropped_write += 1
                        done += 1
                        continue
                except OSError:
                    if done:
                        return done  # the caller's retry meets the error
                    raise
                done += 1
                segments, hdr_len = gso_segments(data)
                if hdr_len:
                    self._gso_written += 1
                segments = segments or 1  # not ours to judge: the kernel took it
                ip_len = len(data) - VIRTIO_NET_HDR_LEN
                self._packets_written += segments
                self._bytes_written += ip_len + (segments - 1) * hdr_len
        return done

    def _write_split(self, data: memoryview) -> bool:
        """Split super-packet *data* (header + packet) and write the segments one by one.

        Returns whether it could be split; one that cannot is dropped and
        counted in ``dropped_write``. Called with the write lock held.
        """
        segments, hdr_len = gso_segments(data)
        if not segments:
            self._dropped_write += 1
            return False
        seg_room = VIRTIO_NET_HDR_LEN + hdr_len + VNET_HDR.unpack_from(data)[3]
        if len(self._seg_bufs) < segments or len(self._seg_bufs[0]) < seg_room:
            count = max(segments, len(self._seg_bufs))
            size = max(seg_room, len(self._seg_bufs[0]) if self._seg_bufs else 0)
            # Zero-filled: the first 10 bytes of each stay an empty virtio header.
            self._seg_bufs = [bytearray(size) for _ in range(count)]
            self._seg_sizes = [0] * count
        try:
            count = split(data, self._seg_bufs, self._seg_sizes, VIRTIO_NET_HDR_LEN)
        except (_Malformed, _TooBig, TooManySegmentsError):
            self._dropped_write += 1
            return False
        for i in range(count):
            seg = memoryview(self._seg_bufs[i])[: VIRTIO_NET_HDR_LEN + self._seg_sizes[i]]
            self._write_one([seg])
        return True


def _make(
    fd: int,
    name: str,
    vnet_hdr: bool,
    offload_flags: int,
    ns_fd: int | None,
    mtu: int | None,
) -> NativeTun:
    """Bind the event socket, apply *mtu*, and wrap *fd*; on error close nothing of *fd*."""
    monitor = netlink.LinkMonitor.open(ns_fd, name)
    try:
        if mtu is not None and mtu != monitor.state.mtu:
            netlink.set_mtu(ns_fd, monitor.state.ifindex, mtu)
            # The kernel's answer to our own change is not an event: start from it.
            monitor.note_mtu(mtu)
        if vnet_hdr:
            # A super-packet of more segments than a read's batch_size()
            # buffers cannot be split into them: at an MTU below ~560 a 64 KB
            # one has more than 128. Capped here, the kernel builds none
            # larger (it segments the rest itself). An older kernel that
            # cannot change it keeps its default: such packets are then
            # dropped and counted by read (TooManySegmentsError).
            with contextlib.suppress(OSError):
                netlink.set_gso_max_segs(ns_fd, monitor.state.ifindex, BATCH_OFFLOAD)
        cls = GsoNativeTun if vnet_hdr else NativeTun
        return cls(
            fd, name, vnet_hdr=vnet_hdr, offload_flags=offload_flags, ns_fd=ns_fd, monitor=monitor
        )
    except BaseException:
        monitor.close()
        raise


def create_tun(
    name: str = "", mtu: int = 1500, *, offload: bool = True, netns: str | None = None
) -> NativeTun:
    """Create a TUN device, in network namespace *netns* if given, and return it, down.

    The descriptor stays with this process whatever the namespace, so one
    process can own devices in several namespaces. ``name=""`` lets the
    kernel choose (``tun0``, ...); the name of a free persistent TUN device
    attaches to it. With *offload* (the default) the device carries the
    virtio-net header, asks the kernel for checksum, TCP and (where
    accepted) UDP segmentation offload, has a batch size of 128, and is a
    :class:`GsoNativeTun` (a :class:`tunkit.GsoTun`). Without it the
    kernel's offloads are switched off (no super-packets), the batch size is
    1, and it is a plain :class:`NativeTun`.

    Raises:
        ValueError: a bad *name* or *mtu*, before any system call.
        FileNotFoundError: *netns* does not exist, or there is no ``/dev/net/tun``.
        PermissionError: no CAP_NET_ADMIN (the message names it).
        FileExistsError: *name* is in use.
    """
    check_name(name)
    _check_mtu(mtu)
    ns_fd = _netns_fd(netns)
    fd = -1
    try:
        with netns_inside(ns_fd):
            # The device is made in the namespace of the opener of /dev/net/tun.
            fd = _open_dev_tun()
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            real_name = _set_iff(fd, name, flags)
            # A persistent device may keep offloads that an earlier owner
            # asked for: without the virtio header they would hand over
            # super-packets with nothing to say so. Reset them.
            if offload:
                offload_flags = _enable_vnet(fd)
            else:
                _set_offload(fd, 0)
                offload_flags = 0
            return _make(fd, real_name, offload, offload_flags, ns_fd, mtu)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if ns_fd is not None:
            os.close(ns_fd)
        raise


def open_tun(fd: int, *, offload: bool | None = None, netns: str | None = None) -> NativeTun:
    """Wrap a TUN descriptor made elsewhere (a persistent device, one passed by a parent).

    Takes ownership of *fd* on success; on error the caller keeps it. The
    descriptor must be attached to an ``IFF_TUN | IFF_NO_PI`` device; its
    flags (``TUNGETIFF``) tell whether the virtio header is on when *offload*
    is ``None``. With the header, the offloads are asked for as by
    :func:`create_tun` and the result is a :class:`GsoNativeTun`; without
    it, the device's offloads are switched off so that the kernel hands
    over no super-packets. *netns* names the namespace the device lives in,
    for configuration and events (default: this process's).

    Raises:
        ValueError: *fd* is not such a device, or *offload* contradicts its flags.
        FileNotFoundError: *netns* does not exist.
    """
    try:
        name, flags = _get_iff(fd)
    except OSError as exc:
        raise ValueError(f"descriptor {fd} is not an attached TUN device: {exc}") from exc
    if not flags & IFF_TUN:
        raise ValueError(f"descriptor {fd} is a TAP device {name!r}, not TUN")
    # Some kernels (seen on 6.18) report IFF_NO_PI in TUNGETIFF even for a
    # device made without it, so this catches only the honest ones.
    if not flags & IFF_NO_PI:
        raise ValueError(f"device {name!r} was made without IFF_NO_PI; tunkit needs it")
    vnet_hdr = bool(flags & IFF_VNET_HDR)
    if offload is not None and offload != vnet_hdr:
        state = "on" if vnet_hdr else "off"
        raise ValueError(f"offload={offload} but the virtio header of {name!r} is {state}")
    if vnet_hdr:
        offload_flags = _enable_vnet(fd)
    else:
        _set_offload(fd, 0)
        offload_flags = 0
    ns_fd = _netns_fd(netns)
    try:
        return _make(fd, name, vnet_hdr, offload_flags, ns_fd, None)
    except BaseException:
        if ns_fd is not None:
            os.close(ns_fd)
        raise


def _netns_fd(name: str | None) -> int | None:
    return None if name is None else open_netns(name)

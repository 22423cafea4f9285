"""NativeTun: a Linux TUN device (``/dev/net/tun``) as a Tun, optionally in a namespace."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, Final, final

from .._errors import ClosedError, OffsetError
from .._events import Event, Events
from . import netlink
from .constants import (
    IFF_NO_PI,
    IFF_TUN,
    IFF_VNET_HDR,
    IFNAMSIZ,
    TUNGETIFF,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_LEN,
)
from .fd import _Descriptor
from .netns import inside as netns_inside
from .netns import open_netns

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["NativeTun", "TunStats", "create_tun", "open_tun"]

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
# struct virtio_net_hdr, <linux/virtio_net.h>, host byte order on a TUN device.
_VNET_HDR: Final = struct.Struct("=BBHHHH")
_ZERO_VNET_HDR: Final = bytes(VIRTIO_NET_HDR_LEN)
# What the kernel says when it refuses one written packet: EIO while the link
# is down, EINVAL for bytes that are not an IPv4 or IPv6 packet.
_DROPPED_ON_WRITE: Final = frozenset({errno.EIO, errno.EINVAL})


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


def _enable_vnet(fd: int) -> None:
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("=i", VIRTIO_NET_HDR_LEN))
    # No offloads yet: the kernel then hands over only whole packets with full
    # checksums (GSO_NONE). The offload engine asks for TUN_F_CSUM | TSO | USO.
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)


@final
class NativeTun:
    """A Linux TUN device (``IFF_TUN | IFF_NO_PI``) as a Tun; make one with
    :func:`create_tun` or :func:`open_tun`.

    It owns the device descriptor, a descriptor of its network namespace
    (when one was named), an rtnetlink event socket and the thread
    ``tunkit-events:<name>`` that reads it. One reader thread and one writer
    thread may use it at once; configuration methods may be called from any
    thread. :meth:`close` releases all of it.
    """

    def __init__(
        self,
        fd: int,
        name: str,
        *,
        vnet_hdr: bool,
        ns_fd: int | None,
        monitor: netlink.LinkMonitor,
    ) -> None:
        """Private: use :func:`create_tun` or :func:`open_tun`. Takes ownership of
        *fd*, *ns_fd* and *monitor*, and starts the monitor's thread."""
        self._fd = _Descriptor(fd, "device")
        self._ns_fd = ns_fd  # None: the device lives in this process's namespace
        self._vnet_hdr = vnet_hdr
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
        # Read side, guarded by the descriptor's read lock.
        self._overflow = bytearray(_MAX_KERNEL_PACKET)  # catches too-big packets
        self._rbuf = bytearray(_MAX_KERNEL_PACKET) if vnet_hdr else bytearray()
        self._packets_read = 0
        self._bytes_read = 0
        self._dropped_malformed = 0
        self._dropped_too_big = 0
        self._gso_split = 0
        # Write side, guarded by the descriptor's write lock.
        self._packets_written = 0
        self._bytes_written = 0
        self._gro_coalesced = 0
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
        if offset < HEADROOM:
            raise OffsetError(f"read offset {offset} is below mro() {HEADROOM}")
        if len(bufs) < self._batch:
            raise ValueError(f"read with {len(bufs)} buffers; batch_size() is {self._batch}")
        if len(sizes) < len(bufs):
            raise ValueError(f"read with {len(sizes)} sizes for {len(bufs)} buffers")
        views = [memoryview(b).cast("B") for b in bufs]
        if len(views[0]) <= offset:
            raise ValueError(f"buffer of {len(views[0])} bytes has no room after offset {offset}")
        with self._fd.read_lock:
            while True:
                n = (
                    self._read_vnet(views, sizes, offset)
                    if self._vnet_hdr
                    else self._read_plain(views[0], sizes, offset)
                )
                if n:
                    return n

    def _read_plain(self, view: memoryview, sizes: MutableSequence[int], offset: int) -> int:
        room = len(view) - offset
        n = self._fd.readv_locked([view[offset:], self._overflow])
        if n > room:
            self._dropped_too_big += 1
            return 0
        sizes[0] = n
        self._packets_read += 1
        self._bytes_read += n
        return 1

    def _read_vnet(self, views: list[memoryview], sizes: MutableSequence[int], offset: int) -> int:
        n = self._fd.readv_locked([self._rbuf])
        data = memoryview(self._rbuf)[:n]
        if n < VIRTIO_NET_HDR_LEN:
            self._dropped_malformed += 1
            return 0
        return self._handle_kernel_packet(
            data[:VIRTIO_NET_HDR_LEN], data[VIRTIO_NET_HDR_LEN:], views, sizes, offset
        )

    def _handle_kernel_packet(
        self,
        hdr: memoryview,
        pkt: memoryview,
        views: list[memoryview],
        sizes: MutableSequence[int],
        offset: int,
    ) -> int:
        """Turn one kernel packet and its virtio header into packets in *views*; return the count.

        The seam for the offload engine: with offloads on, a GSO super-packet
        is split here into segments and partial checksums are completed. Until
        then the kernel is asked for no offloads, so every packet is GSO_NONE
        with a full checksum, and anything else is dropped as malformed.
        Called with the read lock held.
        """
        flags, gso_type, _hdr_len, _gso_size, _csum_start, _csum_offset = _VNET_HDR.unpack_from(
            hdr, 0
        )
        if gso_type != VIRTIO_NET_HDR_GSO_NONE or flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            self._dropped_malformed += 1
            return 0
        pkt_len = len(pkt)
        if pkt_len > len(views[0]) - offset:
            self._dropped_too_big += 1
            return 0
        views[0][offset : offset + pkt_len] = pkt
        sizes[0] = pkt_len
        self._packets_read += 1
        self._bytes_read += pkt_len
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
            raise OffsetError(f"write offset {offset} is below mwo() {HEADROOM}")
        if self._vnet_hdr:
            iovecs: list[list[ReadableBuffer]] = [
                [_ZERO_VNET_HDR, memoryview(b).cast("B")[offset:]] for b in bufs
            ]
        else:
            iovecs = [[memoryview(b).cast("B")[offset:]] for b in bufs]
        with self._fd.write_lock:
            return self._write_iovecs(iovecs)

    def _write_iovecs(self, iovecs: list[list[ReadableBuffer]]) -> int:
        """Write each iovec list as one packet; the seam for the coalescing engine.

        Called with the write lock held. With a virtio header, the header is
        the first 10 bytes of each list.
        """
        hdr_len = VIRTIO_NET_HDR_LEN if self._vnet_hdr else 0
        for i, iov in enumerate(iovecs):
            try:
                n = self._fd.writev_locked(iov)
            except OSError as exc:
                if exc.errno in _DROPPED_ON_WRITE and not isinstance(exc, ClosedError):
                    # Lost as on a real link: one bad packet, or a link that is
                    # down for a while, must not stop a forwarder.
                    self._dropped_write += 1
                    continue
                if i == 0:
                    raise
                return i
            self._packets_written += 1
            self._bytes_written += n - hdr_len
        return len(iovecs)

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
        return TunStats(
            packets_read=self._packets_read,
            bytes_read=self._bytes_read,
            packets_written=self._packets_written,
            bytes_written=self._bytes_written,
            gso_split=self._gso_split,
            gro_coalesced=self._gro_coalesced,
            dropped_malformed=self._dropped_malformed,
            dropped_too_big=self._dropped_too_big,
            dropped_write=self._dropped_write,
        )

    @property
    def offload(self) -> bool:
        """Whether the device carries the virtio-net header (``IFF_VNET_HDR``)."""
        return self._vnet_hdr

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


def _make(fd: int, name: str, vnet_hdr: bool, ns_fd: int | None, mtu: int | None) -> NativeTun:
    """Bind the event socket, apply *mtu*, and wrap *fd*; on error close nothing of *fd*."""
    monitor = netlink.LinkMonitor.open(ns_fd, name)
    try:
        if mtu is not None and mtu != monitor.state.mtu:
            netlink.set_mtu(ns_fd, monitor.state.ifindex, mtu)
            # The kernel's answer to our own change is not an event: start from it.
            monitor.note_mtu(mtu)
        return NativeTun(fd, name, vnet_hdr=vnet_hdr, ns_fd=ns_fd, monitor=monitor)
    except BaseException:
        monitor.close()
        raise


def create_tun(
    name: str = "", mtu: int = 1500, *, offload: bool = False, netns: str | None = None
) -> NativeTun:
    """Create a TUN device, in network namespace *netns* if given, and return it, down.

    The descriptor stays with this process whatever the namespace, so one
    process can own devices in several namespaces. ``name=""`` lets the
    kernel choose (``tun0``, ...); the name of a free persistent TUN device
    attaches to it. *offload* turns on the virtio-net header (batch size 128);
    the kernel offloads themselves (GSO split, GRO) come with the offload engine.

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
            if offload:
                _enable_vnet(fd)
            return _make(fd, real_name, offload, ns_fd, mtu)
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
    is ``None``. *netns* names the namespace the device lives in, for
    configuration and events (default: this process's).

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
        _enable_vnet(fd)
    ns_fd = _netns_fd(netns)
    try:
        return _make(fd, name, vnet_hdr, ns_fd, None)
    except BaseException:
        if ns_fd is not None:
            os.close(ns_fd)
        raise


def _netns_fd(name: str | None) -> int | None:
    return None if name is None else open_netns(name)

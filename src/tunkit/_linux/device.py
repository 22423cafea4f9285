"""NativeTun: a Linux TUN device (``/dev/net/tun``) as a Tun, optionally in a namespace."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import os
import time
from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, Final

from .._errors import ClosedError
from .._events import Event, Events
from .._offload.headers import byte_view
from .._offload.vnet import VNET_HDR_LEN
from .._offload_state import OffloadKind, OffloadOff, OffloadState
from .._tun import check_offset
from . import netlink
from .constants import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_PERSIST,
    IFF_TUN,
    IFF_VNET_HDR,
    IFNAMSIZ,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
)
from .fd import PACKET_IO, CloseOnce, _Descriptor
from .ioctl import (
    OFFLOAD_BASE,
    OFFLOAD_USO,
    enable_vnet,
    get_iff,
    open_dev_tun,
    set_group,
    set_iff,
    set_offload,
    set_owner,
    set_persist,
)
from .netns import inside as netns_inside
from .netns import open_netns

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["NativeTun", "TunStats", "create_tun", "open_tun"]

# Headroom in front of every packet: room for the virtio-net header, as the Go
# tuntap device keeps (SPEC.md: mwo() and mro() are 16 with or without offload).
HEADROOM: Final = 16
BATCH_OFFLOAD: Final = 128
MIN_MTU: Final = 68  # tun.c: dev->min_mtu
MAX_MTU: Final = 65535  # tun.c: dev->max_mtu
# The largest packet the kernel hands to a TUN reader, virtio header included.
_MAX_KERNEL_PACKET: Final = VNET_HDR_LEN + 65535

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
# lock per packet (read_gso takes the read lock once per batch). Per packet,
# what Python runs around the system call decides the speed: on pair-load,
# read/write in Python (a lock, counters, a memoryview and a slice per
# packet) reached 0.5-0.65x a bare os.readv/os.write loop, PacketIo
# ~1x; super-packets passed whole went from ~0.55x veth to ~0.85x. Devices made
# while this is None (tests rebind it) use the Python path.
_packet_io = PACKET_IO
# What the kernel says when it refuses one written packet: EIO while the link
# is down, EINVAL for bytes that are not an IPv4 or IPv6 packet (for a
# super-packet, EINVAL means the kernel lacks that offload: the caller splits
# it). The Python paths' copy of PacketIo's rule (packet_io.c, write_dropped).
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
    gro_refused: int = 0  # super-packets the kernel refused (EINVAL), sent split instead
    gso_read: int = 0  # super-packets read whole (read_gso)
    gso_written: int = 0  # super-packets written whole (write_gso)


def offload_kinds(flags: int) -> frozenset[OffloadKind]:
    """The :class:`OffloadKind` kinds in ``TUN_F_*`` *flags* (TCP, UDP: both v4 and v6)."""
    kinds: set[OffloadKind] = set()
    if flags & TUN_F_CSUM:
        kinds.add(OffloadKind.CHECKSUM)
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) == TUN_F_TSO4 | TUN_F_TSO6:
        kinds.add(OffloadKind.TCP)
    if flags & (TUN_F_USO4 | TUN_F_USO6) == TUN_F_USO4 | TUN_F_USO6:
        kinds.add(OffloadKind.UDP)
    return frozenset(kinds)


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
        # offload_state(): what enable_vnet asked for (nothing without the
        # header: set_offloads switches them off) and what the kernel took.
        self._requested = offload_kinds(OFFLOAD_BASE | OFFLOAD_USO) if vnet_hdr else frozenset()
        self._accepted = offload_kinds(offload_flags)
        self._offload_off: list[OffloadOff] = []  # once per kind; appended under the write lock
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
        self._once = CloseOnce()
        self._closed = False  # set once by close()
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
        it. The packets go out in order: when another error hits packet
        ``i > 0``, returns ``i``, and the caller's retry starts with that
        packet (it meets the error again, or the packet goes). The bytes in
        front of *offset* are left unchanged.

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
            # 0 is a packet the kernel refused: PacketIo dropped and counted it.
            n = io.write(buf, offset)
            if n < 0:
                if done:
                    return done  # the caller's retry starts with the packet that failed
                raise self._fd.errno_failure(n, "write")
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

    def set_blocking(self, flag: bool) -> None:
        """Blocking mode (the default), or not: then a call that would wait raises
        ``BlockingIOError`` instead, having stored or written nothing, as a
        non-blocking socket does (``tunkit.aio`` waits for the descriptor in
        its event loop, then calls again). A call that made progress returns
        it, as in blocking mode; drops are counted either way.
        """
        self._fd.set_blocking(flag)

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

    def offload_state(self) -> OffloadState:
        """What this device asked of the kernel's offloads, what it accepted, and what is off since.

        A kind is turned off on its own when the kernel refuses it (a
        coalesced TCP or UDP write answered with EINVAL, say) or the attach
        check finds the device's virtio header not as this object uses it;
        each such kind is listed once, with when and why, and its packets go
        on split. Any thread may call it.
        """
        return OffloadState(self._requested, self._accepted, tuple(self._offload_off))

    def _turn_off(self, kind: OffloadKind, reason: str, err: int | None) -> None:
        """Note that *kind* is off from now on, for *reason* (once per kind)."""
        if any(o.kind is kind for o in self._offload_off):
            return
        self._offload_off.append(OffloadOff(kind, time.time(), reason, err))

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
        """Close the device; idempotent, from any thread, and from a signal handler.

        Blocked reads and writes raise :class:`ClosedError` at once; returns
        after the event thread has ended and every descriptor is closed. The
        kernel removes a device that is not persistent with its last descriptor.
        A signal handler may close the device that its own thread is reading
        or writing (every path: C and Python, ``read``, ``write``,
        ``read_gso``, ``write_gso``): the call raises :class:`ClosedError`
        once the handler returns. A close() that meets one under way on
        another thread returns when that one is done. The device is gone
        when close() returns;
        if the call was waiting in ``poll()``, its two descriptor numbers
        are released by that call as it raises (see ``_Descriptor``).
        """
        if not self._once.begin():
            return  # closed, or closed by another thread meanwhile
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
                self._once.end()

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


def _make(
    fd: int,
    name: str,
    vnet_hdr: bool,
    offload_flags: int,
    ns_fd: int | None,
    mtu: int | None,
    *,
    monitor: netlink.LinkMonitor | None = None,
    cap_segs: bool | None = None,
) -> NativeTun:
    """Bind the event socket (or take *monitor*), apply *mtu*, and wrap *fd*.

    *cap_segs* caps the kernel's super-packets at ``BATCH_OFFLOAD`` segments
    (default: when *vnet_hdr*). Takes ownership of *monitor*, also on error;
    on error closes nothing of *fd* and *ns_fd*.
    """
    if monitor is None:
        monitor = netlink.LinkMonitor.open(ns_fd, name)
    try:
        if mtu is not None and mtu != monitor.state.mtu:
            netlink.set_mtu(ns_fd, monitor.state.ifindex, mtu)
            # The kernel's answer to our own change is not an event: start from it.
            monitor.note_mtu(mtu)
        if vnet_hdr if cap_segs is None else cap_segs:
            # A super-packet of more segments than a read's batch_size()
            # buffers cannot be split into them: at an MTU below ~560 a 64 KB
            # one has more than 128. Capped here, the kernel builds none
            # larger (it segments the rest itself). An older kernel that
            # cannot change it, or a caller without CAP_NET_ADMIN, keeps the
            # default: such packets are then dropped and counted by read
            # (TooManySegmentsError).
            with contextlib.suppress(OSError):
                netlink.set_gso_max_segs(ns_fd, monitor.state.ifindex, BATCH_OFFLOAD)
        from .gso_device import GsoNativeTun  # a subclass of NativeTun: imported here

        cls = GsoNativeTun if vnet_hdr else NativeTun
        return cls(
            fd, name, vnet_hdr=vnet_hdr, offload_flags=offload_flags, ns_fd=ns_fd, monitor=monitor
        )
    except BaseException:
        monitor.close()
        raise


def set_offloads(fd: int, vnet_hdr: bool) -> int:
    """Set the offloads that the virtio header of *fd* demands; return the TUN_F_* accepted.

    With the header, the offloads are asked for (:func:`enable_vnet`).
    Without it they are switched off: a persistent device keeps the offloads
    an earlier owner asked for, and without the header the kernel would then
    hand over super-packets with nothing to say so.
    """
    if vnet_hdr:
        return enable_vnet(fd)
    set_offload(fd, 0)
    return 0


def create_tun(
    name: str = "",
    mtu: int = 1500,
    *,
    offload: bool = True,
    netns: str | None = None,
    persist: bool = False,
    owner: int | str | None = None,
    group: int | str | None = None,
    multi_queue: bool = False,
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

    With *persist* the device stays after its last descriptor closes
    (TUNSETPERSIST), until :func:`tunkit.delete_tun`. *owner* and *group* (an
    id or a name) let that user, or members of that group, attach to it
    later without CAP_NET_ADMIN (TUNSETOWNER, TUNSETGROUP; with both, the
    kernel asks for both). A persistent device given neither is owned by
    this process's user: the kernel would otherwise let anyone who can open
    ``/dev/net/tun`` attach to it. With *multi_queue* (IFF_MULTI_QUEUE) each
    :func:`tunkit.attach_tun` of the name adds a queue; this object is the
    first.

    Raises:
        ValueError: a bad *name*, *mtu*, *owner* or *group*, before any system call.
        FileNotFoundError: *netns* does not exist, or there is no ``/dev/net/tun``.
        PermissionError: no CAP_NET_ADMIN (the message names it).
        FileExistsError: *name* is in use.
    """
    from .owners import resolve_group, resolve_user

    check_name(name)
    _check_mtu(mtu)
    uid = None if owner is None else resolve_user(owner)
    gid = None if group is None else resolve_group(group)
    if persist and uid is None and gid is None:
        uid = os.geteuid()
    ns_fd = _netns_fd(netns)
    fd = -1
    made_persistent = False
    try:
        with netns_inside(ns_fd):
            # The device is made in the namespace of the opener of /dev/net/tun.
            fd = open_dev_tun()
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            if multi_queue:
                flags |= IFF_MULTI_QUEUE
            real_name = set_iff(fd, name, flags)
            if persist and not get_iff(fd)[1] & IFF_PERSIST:
                set_persist(fd, True)
                made_persistent = True
            if uid is not None:
                set_owner(fd, uid)
            if gid is not None:
                set_group(fd, gid)
            offload_flags = set_offloads(fd, offload)
            return _make(
                fd, real_name, offload, offload_flags, ns_fd, mtu,
                # Whoever attaches to a device that outlives us may ask for
                # the offloads: cap its super-packets now, while we may.
                cap_segs=offload or persist or multi_queue,
            )
    except BaseException:
        if fd >= 0:
            if made_persistent:
                # Ours and half made: it goes with its descriptor.
                with contextlib.suppress(OSError):
                    set_persist(fd, False)
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
        name, flags = get_iff(fd)
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
    offload_flags = set_offloads(fd, vnet_hdr)
    ns_fd = _netns_fd(netns)
    try:
        return _make(fd, name, vnet_hdr, offload_flags, ns_fd, None)
    except BaseException:
        if ns_fd is not None:
            os.close(ns_fd)
        raise


def _netns_fd(name: str | None) -> int | None:
    return None if name is None else open_netns(name)

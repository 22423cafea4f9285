"""Pass a NativeTun to another process over a Unix socket (SCM_RIGHTS): send_tun, recv_tun.

One message carries the device's descriptor and what the receiver needs to
rebuild it without any privilege::

    b"tunkitfd" | u16 length (big-endian) | JSON header
    + SCM_RIGHTS: the descriptors the header's "fds" lists, in that order

The JSON header is an object ``{"tunkit": 1, "name", "index", "mtu", "up",
"offload", "offload_flags", "fds"}``; ``"tunkit"`` is the format's version.
``"fds"`` names the descriptors: ``"tun"`` (always first), ``"netns"`` (the
device's network namespace) and ``"netlink"`` (an rtnetlink socket bound to
link events in that namespace, so that the receiver reports events even from
another namespace, where it could open none).

The receiver needs no privilege to read, write and see events. Configuration
methods of the rebuilt device (``set_mtu``, ``up``, ``add_address`` ...)
then need what they always need, CAP_NET_ADMIN over the device's namespace,
and, when the receiver runs in another namespace, CAP_SYS_ADMIN to enter it:
without them they raise ``PermissionError``. That is the point of a
privilege-separated worker: it moves packets and configures nothing.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import socket
import struct
from typing import Any, Final, NamedTuple

from . import netlink
from .constants import CLONE_NEWNET, IFF_VNET_HDR, NETLINK_ROUTE, NS_GET_NSTYPE
from .device import NativeTun, _make
from .ioctl import get_iff

__all__ = ["MAGIC", "Header", "parse_header", "recv_tun", "send_tun"]

MAGIC: Final = b"tunkitfd"
VERSION: Final = 1
_FRAME: Final = struct.Struct(f"!{len(MAGIC)}sH")  # magic, JSON length
_MAX_JSON: Final = 4096
_KINDS: Final = ("tun", "netns", "netlink")
_MAX_FDS: Final = len(_KINDS)
_FD_SIZE: Final = array.array("i").itemsize
_ANCILLARY: Final = socket.CMSG_SPACE(_MAX_FDS * _FD_SIZE)
_OWN_NETNS: Final = "/proc/thread-self/ns/net"


class Header(NamedTuple):
    """The JSON header of a descriptor message, checked."""

    name: str
    ifindex: int
    mtu: int
    up: bool
    offload: bool
    offload_flags: int
    fds: tuple[str, ...]


def _field(obj: dict[str, Any], key: str, kind: type) -> Any:
    value = obj.get(key)
    # bool is an int: an int field must not take True, nor a bool field 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"not a tunkit descriptor message: {key!r} is {value!r}")
    return value


def parse_header(frame: bytes) -> Header:
    """Check a whole frame (magic, length, JSON header) and return its header.

    Raises:
        ValueError: anything else than a frame :func:`send_tun` makes.
    """
    if len(frame) < _FRAME.size:
        raise ValueError(f"not a tunkit descriptor message: {len(frame)} bytes")
    magic, length = _FRAME.unpack_from(frame)
    if magic != MAGIC:
        raise ValueError(f"not a tunkit descriptor message: it starts with {magic!r}")
    if length > _MAX_JSON or len(frame) != _FRAME.size + length:
        raise ValueError(
            f"not a tunkit descriptor message: header of {length} bytes in a frame of "
            f"{len(frame)}"
        )
    try:
        obj = json.loads(frame[_FRAME.size :])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not a tunkit descriptor message: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a tunkit descriptor message: the header is not a JSON object")
    version = obj.get("tunkit")
    if version != VERSION or isinstance(version, bool):
        raise ValueError(
            f"not a tunkit descriptor message of version {VERSION}: 'tunkit' is {version!r}"
        )
    fds = _field(obj, "fds", list)
    if not fds or fds[0] != "tun" or len(set(map(str, fds))) != len(fds) or any(
        k not in _KINDS for k in fds
    ):
        raise ValueError(f"not a tunkit descriptor message: 'fds' is {fds!r}")
    return Header(
        name=_field(obj, "name", str),
        ifindex=_field(obj, "index", int),
        mtu=_field(obj, "mtu", int),
        up=_field(obj, "up", bool),
        offload=_field(obj, "offload", bool),
        offload_flags=_field(obj, "offload_flags", int),
        fds=tuple(fds),
    )


def _frame(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(MAGIC, len(body)) + body


def send_tun(sock: socket.socket, tun: NativeTun) -> None:
    """Send *tun*'s descriptor over the Unix socket *sock*, with what rebuilds it.

    *tun* stays open and usable here: the receiver gets descriptors of the
    same device (of the same queue, for a multi-queue device), so both
    processes now hold it; close it here when the receiver is to be its only
    user. Do not close *tun* from another thread during the call. Any kind
    of Unix socket works (stream, datagram, seqpacket). Blocks as
    ``sock.sendmsg`` does.

    Raises:
        ClosedError: *tun* is closed.
        TypeError: *tun* is not a :class:`NativeTun`.
        OSError: the socket refused the message.
    """
    if not isinstance(tun, NativeTun):
        raise TypeError(f"send_tun sends a NativeTun, not {type(tun).__name__}")
    tun_fd = tun.fileno()  # ClosedError when closed
    ns_fd = tun._ns_fd
    own_ns = -1
    events: socket.socket | None = None
    try:
        if ns_fd is None:
            # The device lives where this thread does (it was made or attached here).
            ns_fd = own_ns = os.open(_OWN_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            events = netlink.event_socket(tun._ns_fd)
        except OSError:
            events = None  # no right to enter the namespace: the receiver gets no events
        kinds = ["tun", "netns"] + ([] if events is None else ["netlink"])
        fds = [tun_fd, ns_fd] + ([] if events is None else [events.fileno()])
        frame = _frame({
            "tunkit": VERSION,
            "name": tun.name(),
            "index": tun.index(),
            "mtu": tun.mtu(),
            "up": bool(tun._monitor.state.up),
            "offload": tun.offload,
            "offload_flags": tun.offload_flags,
            "fds": kinds,
        })
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([frame], rights)
        if sent < len(frame):  # a stream socket took part of it: the rest, without rights
            sock.sendall(frame[sent:])
    finally:
        if events is not None:
            events.close()
        if own_ns >= 0:
            os.close(own_ns)


def _recv_frame(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """Receive one message: its bytes (a whole frame, or what is not one), fds, msg flags."""
    fds: list[int] = []
    if sock.type == socket.SOCK_STREAM:
        # Take exactly the frame: the bytes after it belong to whoever reads next.
        data, ancdata, flags, _addr = sock.recvmsg(_FRAME.size, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
    else:
        data, ancdata, flags, _addr = sock.recvmsg(
            _FRAME.size + _MAX_JSON + 1, _ANCILLARY, socket.MSG_CMSG_CLOEXEC
        )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if sock.type != socket.SOCK_STREAM or not data:
        return data, fds, flags
    try:
        while len(data) < _FRAME.size:
            more = sock.recv(_FRAME.size - len(data))
            if not more:
                return data, fds, flags
            data += more
        magic, length = _FRAME.unpack_from(data)
        if magic != MAGIC or length > _MAX_JSON:
            return data, fds, flags  # not ours: read no further
        while len(data) < _FRAME.size + length:
            more = sock.recv(_FRAME.size + length - len(data))
            if not more:
                break
            data += more
    except BaseException:
        _close_all(fds)
        raise
    return data, fds, flags


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _is_netns(fd: int) -> bool:
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def _rebuild(header: Header, fds: list[int]) -> NativeTun:
    """Wrap the received descriptors; takes ownership of all of them on success."""
    by_kind = dict(zip(header.fds, fds, strict=True))
    tun_fd = by_kind["tun"]
    try:
        name, flags = get_iff(tun_fd)
    except OSError as exc:
        raise ValueError(f"the descriptor received is not an attached TUN device: {exc}") from None
    if bool(flags & IFF_VNET_HDR) != header.offload:
        raise ValueError(
            f"the header says offload={header.offload}, the device {name!r} says otherwise"
        )
    ns_fd = by_kind.get("netns")
    if ns_fd is not None:
        if not _is_netns(ns_fd):
            raise ValueError("the 'netns' descriptor received is not a network namespace")
        own, theirs = os.stat(_OWN_NETNS), os.fstat(ns_fd)
        if (own.st_dev, own.st_ino) == (theirs.st_dev, theirs.st_ino):
            os.close(ns_fd)  # the device lives here: configure it here, without setns
            fds.remove(ns_fd)
            ns_fd = None
    monitor: netlink.LinkMonitor | None = None
    events_fd = by_kind.get("netlink")
    if events_fd is not None:
        events = socket.socket(fileno=events_fd)
        fds.remove(events_fd)  # owned by the socket object from here on
        try:
            if events.family != socket.AF_NETLINK or events.proto != NETLINK_ROUTE:
                raise ValueError("the 'netlink' descriptor received is not an rtnetlink socket")
            monitor = netlink.LinkMonitor.from_socket(events, name)
        except FileNotFoundError:
            events.close()  # renamed or gone meanwhile: no events, the device still works
        except BaseException:
            events.close()
            raise
    if monitor is None:
        monitor = netlink.LinkMonitor.detached(
            netlink.LinkState(header.ifindex, name, header.mtu, header.up)
        )
    # On error _make closes the monitor; the caller closes the rest (still in fds).
    return _make(tun_fd, name, header.offload, header.offload_flags, ns_fd, None,
                 monitor=monitor, cap_segs=False)


def recv_tun(sock: socket.socket) -> NativeTun:
    """Receive a device sent by :func:`send_tun` on the Unix socket *sock*; return it.

    The result is a working :class:`NativeTun` (a ``GsoNativeTun`` when the
    virtio header is on) that needs no privilege to read, write and report
    events. Its configuration methods raise ``PermissionError`` without
    CAP_NET_ADMIN over the device's namespace (and CAP_SYS_ADMIN to enter
    it, when it is not this process's). Blocks as ``sock.recvmsg`` does
    (the socket's timeout applies). On a stream socket it reads exactly the
    message, nothing after it.

    Raises:
        ValueError: the message is not a tunkit descriptor message (every
            descriptor that came with it is closed).
        EOFError: the peer closed the socket before sending anything.
    """
    data, fds, flags = _recv_frame(sock)
    try:
        if not data and not fds:
            raise EOFError("recv_tun: the peer closed the socket")
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise ValueError("not a tunkit descriptor message: it was longer than one")
        header = parse_header(data)
        if len(fds) != len(header.fds):
            raise ValueError(
                f"not a tunkit descriptor message: {len(fds)} descriptors for {header.fds}"
            )
        return _rebuild(header, fds)
    except BaseException:
        _close_all(fds)
        raise


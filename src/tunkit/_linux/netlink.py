"""rtnetlink for one device: link state and events, configuration over pyroute2.

Two kinds of sockets, as STYLE.md asks:

- :class:`LinkMonitor` owns one raw ``NETLINK_ROUTE`` socket bound to
  ``RTMGRP_LINK`` in the device's namespace, read only by its thread
  ``tunkit-events:<dev>``, which waits in ``poll()`` on the socket and a
  wake-up eventfd (no polling loop). Its messages are parsed here with
  ``struct`` (a handful of fixed layouts), so the hot event path has no
  dependency beyond the standard library.
- Configuration requests (:func:`set_mtu`, :func:`set_up`, addresses) use a
  short-lived pyroute2 ``IPRoute`` each, created inside the device's namespace.

pyroute2 is imported here and nowhere else in tunkit.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Final, NamedTuple, TypeVar

from . import netns
from .constants import (
    IFA_F_NODAD,
    IFF_UP,
    IFLA_IFNAME,
    IFLA_MTU,
    NETLINK_ROUTE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    RTM_DELLINK,
    RTM_GETLINK,
    RTM_NEWLINK,
    RTMGRP_LINK,
)

__all__ = [
    "Interface",
    "LinkMonitor",
    "LinkState",
    "add_address",
    "addresses",
    "remove_address",
    "set_mtu",
    "set_up",
]

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
_T = TypeVar("_T")

# struct nlmsghdr, <linux/netlink.h>: len, type, flags, seq, pid (host order).
_NLMSGHDR: Final = struct.Struct("=IHHII")
# struct ifinfomsg, <linux/rtnetlink.h>: family, pad, type, index, flags, change.
_IFINFOMSG: Final = struct.Struct("=BBHiII")
# struct rtattr, <linux/rtnetlink.h>: len, type; payload aligned to 4 bytes.
_RTATTR: Final = struct.Struct("=HH")
# struct nlmsgerr starts with the (negative) errno.
_NLMSGERR_ERROR: Final = struct.Struct("=i")
_U32: Final = struct.Struct("=I")
_RECV_SIZE: Final = 65536
_SOCKET_RCVBUF: Final = 1 << 20


def _align4(n: int) -> int:
    return (n + 3) & ~3


class LinkState(NamedTuple):
    """What one RTM_NEWLINK/RTM_DELLINK message says about a link."""

    ifindex: int
    name: str
    mtu: int
    up: bool  # administrative state, IFF_UP
    deleted: bool = False


def _parse_link(body: memoryview, deleted: bool) -> LinkState | None:
    if len(body) < _IFINFOMSG.size:
        return None
    _family, _pad, _type, index, flags, _change = _IFINFOMSG.unpack_from(body, 0)
    name = ""
    mtu = 0
    pos = _IFINFOMSG.size
    while pos + _RTATTR.size <= len(body):
        rta_len, rta_type = _RTATTR.unpack_from(body, pos)
        if rta_len < _RTATTR.size or pos + rta_len > len(body):
            break  # a claim that does not fit: stop, keep what was read
        payload = body[pos + _RTATTR.size : pos + rta_len]
        if rta_type == IFLA_IFNAME:
            name = bytes(payload).split(b"\0", 1)[0].decode(errors="replace")
        elif rta_type == IFLA_MTU and len(payload) >= _U32.size:
            (mtu,) = _U32.unpack_from(payload, 0)
        pos += _align4(rta_len)
    return LinkState(index, name, mtu, bool(flags & IFF_UP), deleted)


def _parse_messages(data: memoryview) -> list[tuple[int, int, LinkState | int | None]]:
    """Split one datagram into (type, seq, payload): a LinkState, an errno, or None."""
    out: list[tuple[int, int, LinkState | int | None]] = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        msg_len, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if msg_len < _NLMSGHDR.size or pos + msg_len > len(data):
            break
        body = data[pos + _NLMSGHDR.size : pos + msg_len]
        payload: LinkState | int | None = None
        if msg_type in (RTM_NEWLINK, RTM_DELLINK):
            payload = _parse_link(body, msg_type == RTM_DELLINK)
        elif msg_type == NLMSG_ERROR and len(body) >= _NLMSGERR_ERROR.size:
            payload = -_NLMSGERR_ERROR.unpack_from(body, 0)[0]
        out.append((msg_type, seq, payload))
        pos += _align4(msg_len)
    return out


def _getlink_request(seq: int, index: int = 0, name: str = "") -> bytes:
    attrs = b""
    if name:
        raw = name.encode() + b"\0"
        attrs = _RTATTR.pack(_RTATTR.size + len(raw), IFLA_IFNAME) + raw
        attrs += b"\0" * (_align4(len(attrs)) - len(attrs))
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, index, 0, 0) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body


class LinkMonitor:
    """Watch one link's state over rtnetlink and report each change to a callback.

    :meth:`open` binds the event socket (so nothing after it is missed) and
    reads the link's current state; :meth:`start` starts the thread
    ``tunkit-events:<dev>`` that calls *on_state* with every later state of
    the link; :meth:`close` ends the thread, joins it and closes both
    descriptors. The monitor owns its socket, eventfd and thread.
    """

    def __init__(self, sock: socket.socket, state: LinkState) -> None:
        self._sock = sock
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._state = state
        self._seq = itertools.count(2)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False  # guarded by _lock

    @classmethod
    def open(cls, ns: int | str | None, name: str) -> LinkMonitor:
        """Bind an event socket in namespace *ns* and read link *name*'s state.

        Raises:
            FileNotFoundError: no link *name* in that namespace.
            OSError: netlink failed.
        """
        with netns.inside(ns):
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
            )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_RCVBUF)
            sock.bind((0, RTMGRP_LINK))
            # Events queue in the socket from here on; the state read next is
            # at least as new as any of them.
            state = cls._query(sock, name)
            return cls(sock, state)
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _query(sock: socket.socket, name: str) -> LinkState:
        # Blocking is fine: the kernel answers a GETLINK at once.
        seq = 1
        sock.send(_getlink_request(seq, name=name))
        while True:
            data = sock.recv(_RECV_SIZE)
            for msg_type, msg_seq, payload in _parse_messages(memoryview(data)):
                if msg_seq != seq:
                    continue  # an event before the answer: the answer covers it
                if msg_type == NLMSG_ERROR and isinstance(payload, int) and payload:
                    if payload == errno.ENODEV:
                        raise FileNotFoundError(payload, f"no network device {name!r}")
                    raise OSError(payload, f"reading link {name!r}: {os.strerror(payload)}")
                if isinstance(payload, LinkState):
                    return payload

    @property
    def state(self) -> LinkState:
        """The link's state as last reported by the kernel."""
        return self._state

    def note_mtu(self, mtu: int) -> None:
        """Record an MTU that we set before :meth:`start`, so it is no change later."""
        self._state = self._state._replace(mtu=mtu)

    def start(self, on_state: Callable[[LinkState], None], device: str) -> None:
        """Start the event thread, which calls *on_state* for every state of this link."""
        self._thread = threading.Thread(
            target=self._run,
            args=(on_state,),
            name=f"tunkit-events:{device}",
            # close() joins it; daemon only so that a device never closed
            # cannot keep the interpreter from exiting.
            daemon=True,
        )
        self._thread.start()

    def _run(self, on_state: Callable[[LinkState], None]) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        index = self._state.ifindex
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake in ready:
                return
            while True:
                try:
                    data = self._sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # The kernel dropped events (our socket was full): ask for
                    # the state again; the answer arrives as an RTM_NEWLINK.
                    self._sock.send(_getlink_request(next(self._seq), index=index))
                    continue
                for _type, _seq, payload in _parse_messages(memoryview(data)):
                    if isinstance(payload, LinkState) and payload.ifindex == index:
                        self._state = payload
                        on_state(payload)

    def close(self) -> None:
        """Stop and join the event thread, close the socket and eventfd; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._sock.close()
        os.close(self._wake)


# Configuration: a short-lived IPRoute per request, in the device's namespace.


def _netlink_error(exc: Exception, what: str) -> OSError:
    code = getattr(exc, "code", 0) or errno.EIO
    message = f"{what}: {os.strerror(code)}"
    if code == errno.EPERM:
        message += " (needs CAP_NET_ADMIN)"
    return OSError(code, message)


def _request(ns: int | str | None, what: str, fn: Callable[[Any], _T]) -> _T:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    def run() -> _T:
        with netns.inside(ns), IPRoute() as ipr:
            try:
                return fn(ipr)
            except NetlinkError as exc:
                raise _netlink_error(exc, what) from exc

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    # Sync IPRoute runs an event loop of its own, which cannot start inside a
    # running one: do the request on a helper thread (entering the namespace there).
    result: list[_T] = []
    error: list[BaseException] = []

    def on_thread() -> None:
        try:
            result.append(run())
        except BaseException as exc:
            error.append(exc)

    helper = threading.Thread(target=on_thread, name="tunkit-netlink:request")
    helper.start()
    helper.join()
    if error:
        raise error[0]
    return result[0]


def set_mtu(ns: int | str | None, index: int, mtu: int) -> None:
    """Set the MTU of link *index* in namespace *ns*."""
    _request(ns, f"setting MTU {mtu}", lambda ipr: ipr.link("set", index=index, mtu=mtu))


def set_gso_max_segs(ns: int | str | None, index: int, segs: int) -> None:
    """Cap the segments of the super-packets the kernel hands link *index* (IFLA_GSO_MAX_SEGS)."""
    _request(
        ns,
        f"setting gso_max_segs {segs}",
        lambda ipr: ipr.link("set", index=index, gso_max_segs=segs),
    )


def set_up(ns: int | str | None, index: int, up: bool) -> None:
    """Set link *index* administratively up or down."""
    state = "up" if up else "down"
    _request(ns, f"setting the link {state}", lambda ipr: ipr.link("set", index=index, state=state))


def _addr_args(index: int, iface: Interface) -> dict[str, Any]:
    args: dict[str, Any] = {
        "index": index,
        "address": str(iface.ip),
        "prefixlen": iface.network.prefixlen,
    }
    if iface.version == 6:
        # Usable at once: no duplicate address detection (IPv6 over a TUN
        # link has no neighbours to collide with).
        args["flags"] = IFA_F_NODAD
    return args


def add_address(ns: int | str | None, index: int, iface: Interface) -> None:
    """Add address *iface* to link *index*."""
    _request(ns, f"adding address {iface}", lambda ipr: ipr.addr("add", **_addr_args(index, iface)))


def remove_address(ns: int | str | None, index: int, iface: Interface) -> None:
    """Remove address *iface* from link *index*."""
    args = _addr_args(index, iface)
    args.pop("flags", None)
    _request(ns, f"removing address {iface}", lambda ipr: ipr.addr("del", **args))


def addresses(ns: int | str | None, index: int) -> list[Interface]:
    """Return the addresses of link *index*, IPv4 first, link-local ones included."""

    def dump(ipr: Any) -> list[Interface]:
        out: list[Interface] = []
        for msg in ipr.addr("dump", index=index):
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if address is None:
                continue
            out.append(ipaddress.ip_interface(f"{address}/{msg['prefixlen']}"))
        out.sort(key=lambda i: i.version)
        return out

    return _request(ns, "reading addresses", dump)

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
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple, TypeVar

from . import netns
from .constants import (
    IFA_F_NODAD,
    IFF_TUN,
    IFF_UP,
    IFLA_GSO_MAX_SEGS,
    IFLA_IFNAME,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_MTU,
    IFLA_TUN_GROUP,
    IFLA_TUN_MULTI_QUEUE,
    IFLA_TUN_NUM_DISABLED_QUEUES,
    IFLA_TUN_NUM_QUEUES,
    IFLA_TUN_OWNER,
    IFLA_TUN_PERSIST,
    IFLA_TUN_PI,
    IFLA_TUN_TYPE,
    IFLA_TUN_VNET_HDR,
    NETLINK_ROUTE,
    NLA_TYPE_MASK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    RTM_DELLINK,
    RTM_GETLINK,
    RTM_NEWLINK,
    RTMGRP_LINK,
)
from .fd import CloseOnce

__all__ = [
    "Interface",
    "LinkMonitor",
    "LinkState",
    "TunInfo",
    "add_address",
    "addresses",
    "delete_link",
    "event_socket",
    "remove_address",
    "set_mtu",
    "set_up",
    "tun_info",
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


def _attrs(body: memoryview, pos: int = 0) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(type, payload)`` of each rtattr from *pos* on; stop at one that does not fit."""
    while pos + _RTATTR.size <= len(body):
        rta_len, rta_type = _RTATTR.unpack_from(body, pos)
        if rta_len < _RTATTR.size or pos + rta_len > len(body):
            return  # a claim that does not fit: stop, keep what was read
        yield rta_type & NLA_TYPE_MASK, body[pos + _RTATTR.size : pos + rta_len]
        pos += _align4(rta_len)


def _u32(payload: memoryview) -> int | None:
    return _U32.unpack_from(payload, 0)[0] if len(payload) >= _U32.size else None


def _flag(payload: memoryview) -> bool:
    return len(payload) >= 1 and payload[0] != 0


def _parse_link(body: memoryview, deleted: bool) -> LinkState | None:
    if len(body) < _IFINFOMSG.size:
        return None
    _family, _pad, _type, index, flags, _change = _IFINFOMSG.unpack_from(body, 0)
    name = ""
    mtu = 0
    for rta_type, payload in _attrs(body, _IFINFOMSG.size):
        if rta_type == IFLA_IFNAME:
            name = bytes(payload).split(b"\0", 1)[0].decode(errors="replace")
        elif rta_type == IFLA_MTU:
            mtu = _u32(payload) or mtu
    return LinkState(index, name, mtu, bool(flags & IFF_UP), deleted)


def _split(data: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """Yield ``(type, seq, body)`` of each netlink message in one datagram that fits."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        msg_len, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if msg_len < _NLMSGHDR.size or pos + msg_len > len(data):
            return
        yield msg_type, seq, data[pos + _NLMSGHDR.size : pos + msg_len]
        pos += _align4(msg_len)


def _error_code(body: memoryview) -> int:
    """The errno of an NLMSG_ERROR body (0: an acknowledgement)."""
    return -_NLMSGERR_ERROR.unpack_from(body, 0)[0] if len(body) >= _NLMSGERR_ERROR.size else 0


def _parse_messages(data: memoryview) -> list[tuple[int, int, LinkState | int | None]]:
    """Split one datagram into (type, seq, payload): a LinkState, an errno, or None."""
    out: list[tuple[int, int, LinkState | int | None]] = []
    for msg_type, seq, body in _split(data):
        payload: LinkState | int | None = None
        if msg_type in (RTM_NEWLINK, RTM_DELLINK):
            payload = _parse_link(body, msg_type == RTM_DELLINK)
        elif msg_type == NLMSG_ERROR:
            payload = _error_code(body)
        out.append((msg_type, seq, payload))
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

    def __init__(self, sock: socket.socket | None, state: LinkState) -> None:
        self._sock = sock
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._state = state
        self._seq = itertools.count(2)
        self._thread: threading.Thread | None = None
        self._closed = False  # set once by close()
        self._once = CloseOnce()

    @classmethod
    def open(cls, ns: int | str | None, name: str) -> LinkMonitor:
        """Bind an event socket in namespace *ns* and read link *name*'s state.

        Raises:
            FileNotFoundError: no link *name* in that namespace.
            OSError: netlink failed.
        """
        sock = event_socket(ns)
        try:
            # Events queue in the socket from here on; the state read next is
            # at least as new as any of them.
            state = cls._query(sock, name)
            return cls(sock, state)
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _query(sock: socket.socket, name: str) -> LinkState:
        state = _parse_link(_getlink(sock, name), deleted=False)
        if state is None:
            raise OSError(errno.EPROTO, f"reading link {name!r}: a short answer")
        return state

    @classmethod
    def from_socket(cls, sock: socket.socket, name: str) -> LinkMonitor:
        """Watch link *name* through *sock*, an rtnetlink socket bound to RTMGRP_LINK.

        The socket may have been made in another network namespace, by another
        process (passed over a Unix socket): it reports the links of the
        namespace it was made in, and reading them needs no privilege. Takes
        ownership of *sock* on success.

        Raises:
            FileNotFoundError: no link *name* where the socket looks.
        """
        sock.setblocking(True)
        return cls(sock, cls._query(sock, name))

    @classmethod
    def detached(cls, state: LinkState) -> LinkMonitor:
        """A monitor with no socket and no thread: *state* stays as given, no event follows."""
        return cls(None, state)

    @property
    def state(self) -> LinkState:
        """The link's state as last reported by the kernel."""
        return self._state

    def note_mtu(self, mtu: int) -> None:
        """Record an MTU that we set before :meth:`start`, so it is no change later."""
        self._state = self._state._replace(mtu=mtu)

    def start(self, on_state: Callable[[LinkState], None], device: str) -> None:
        """Start the event thread, which calls *on_state* for every state of this link.

        A :meth:`detached` monitor starts nothing.
        """
        if self._sock is None:
            return
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
        sock = self._sock
        assert sock is not None  # start() runs no thread without one
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        index = self._state.ifindex
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake in ready:
                return
            while True:
                try:
                    data = sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # The kernel dropped events (our socket was full): ask for
                    # the state again; the answer arrives as an RTM_NEWLINK.
                    sock.send(_getlink_request(next(self._seq), index=index))
                    continue
                for _type, _seq, payload in _parse_messages(memoryview(data)):
                    if isinstance(payload, LinkState) and payload.ifindex == index:
                        self._state = payload
                        on_state(payload)

    def close(self) -> None:
        """Stop and join the event thread, close the socket and eventfd; idempotent.

        A close() that meets one under way on another thread returns when that one is done.
        """
        if not self._once.begin():
            return
        self._closed = True
        try:
            os.eventfd_write(self._wake, 1)
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join()
            if self._sock is not None:
                self._sock.close()
            os.close(self._wake)
        finally:
            self._once.end()

def _getlink(sock: socket.socket, name: str, seq: int = 1) -> memoryview:
    """Ask *sock*'s namespace for link *name*; return the ifinfomsg body of the answer.

    Blocking is fine: the kernel answers a GETLINK at once.

    Raises:
        FileNotFoundError: no link of that name.
    """
    sock.send(_getlink_request(seq, name=name))
    while True:
        data = memoryview(sock.recv(_RECV_SIZE))
        for msg_type, msg_seq, body in _split(data):
            if msg_seq != seq:
                continue  # an event before the answer: the answer covers it
            if msg_type == NLMSG_ERROR:
                code = _error_code(body)
                if code == errno.ENODEV:
                    raise FileNotFoundError(code, f"no network device {name!r}")
                if code:
                    raise OSError(code, f"reading link {name!r}: {os.strerror(code)}")
            elif msg_type == RTM_NEWLINK:
                return body


class TunInfo(NamedTuple):
    """What rtnetlink says of a link, with the TUN driver's own attributes (``ip -d link``)."""

    ifindex: int
    name: str
    kind: str  # IFLA_INFO_KIND: "tun" for TUN and TAP devices, "" for a link without one
    tun_type: int  # IFF_TUN or IFF_TAP; 0 when not reported
    owner: int | None  # None: no owner
    group: int | None  # None: no group
    pi: bool
    vnet_hdr: bool
    persist: bool
    multi_queue: bool
    queues: int  # attached queues (descriptors taking part in its traffic)
    disabled_queues: int  # queues detached with TUNSETQUEUE
    gso_max_segs: int  # 0 when not reported
    mtu: int
    up: bool

    @property
    def is_tun(self) -> bool:
        """Whether the link is a TUN device (not TAP, not another kind)."""
        return self.kind == "tun" and self.tun_type == IFF_TUN


def _parse_tun_info(body: memoryview) -> TunInfo | None:
    link = _parse_link(body, deleted=False)
    if link is None:
        return None
    fields: dict[str, Any] = {"kind": "", "gso_max_segs": 0}
    data: memoryview | None = None
    for rta_type, payload in _attrs(body, _IFINFOMSG.size):
        if rta_type == IFLA_GSO_MAX_SEGS:
            fields["gso_max_segs"] = _u32(payload) or 0
        elif rta_type == IFLA_LINKINFO:
            for info_type, info in _attrs(payload):
                if info_type == IFLA_INFO_KIND:
                    fields["kind"] = bytes(info).split(b"\0", 1)[0].decode(errors="replace")
                elif info_type == IFLA_INFO_DATA:
                    data = info
    tun: dict[int, memoryview] = dict(_attrs(data)) if data is not None else {}
    absent = memoryview(b"")
    return TunInfo(
        ifindex=link.ifindex,
        name=link.name,
        tun_type=tun[IFLA_TUN_TYPE][0] if len(tun.get(IFLA_TUN_TYPE, absent)) else 0,
        owner=_u32(tun.get(IFLA_TUN_OWNER, absent)),
        group=_u32(tun.get(IFLA_TUN_GROUP, absent)),
        pi=_flag(tun.get(IFLA_TUN_PI, absent)),
        vnet_hdr=_flag(tun.get(IFLA_TUN_VNET_HDR, absent)),
        persist=_flag(tun.get(IFLA_TUN_PERSIST, absent)),
        multi_queue=_flag(tun.get(IFLA_TUN_MULTI_QUEUE, absent)),
        queues=_u32(tun.get(IFLA_TUN_NUM_QUEUES, absent)) or 0,
        disabled_queues=_u32(tun.get(IFLA_TUN_NUM_DISABLED_QUEUES, absent)) or 0,
        mtu=link.mtu,
        up=link.up,
        **fields,
    )


def tun_info(ns: int | str | None, name: str) -> TunInfo | None:
    """What the kernel says of link *name* in namespace *ns*; ``None`` when there is none.

    Reading links needs no privilege (entering *ns* does, unless it is ``None``).
    """
    with netns.inside(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_ROUTE)
    with sock:
        sock.bind((0, 0))
        try:
            body = _getlink(sock, name)
        except FileNotFoundError:
            return None
    return _parse_tun_info(body)


def event_socket(ns: int | str | None) -> socket.socket:
    """A new rtnetlink socket in namespace *ns*, bound to link events (RTMGRP_LINK).

    Events queue in it from the moment it is bound; whoever reads it (a
    :class:`LinkMonitor`, here or in a process it is passed to) sees each
    change made after that. The caller owns it.
    """
    with netns.inside(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_RCVBUF)
        sock.bind((0, RTMGRP_LINK))
    except BaseException:
        sock.close()
        raise
    return sock


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


def delete_link(ns: int | str | None, index: int, what: str) -> None:
    """Delete link *index* in namespace *ns* (RTM_DELLINK, as ``ip link delete``)."""
    _request(ns, what, lambda ipr: ipr.link("del", index=index))


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

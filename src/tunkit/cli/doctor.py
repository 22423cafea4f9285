"""``tunkit doctor [--json]``: can tunkit run here, and at what speed? One table to act on.

Every row is a probe, not a guess: ``/dev/net/tun`` is opened, the kernel's
offloads are asked for on a scratch device in a scratch network namespace
(``tk-<pid>-doctor``, deleted afterwards whatever happens) and one coalesced
write of each kind is sent through it and caught by a socket there; UDP
segmentation is tried on loopback. A probe that needs privileges this process
lacks says "needs root". Exit status 0 when every row says "yes", else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import json
import os
import platform
import pwd
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Final, NamedTuple

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .._linux.constants import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
    UDP_GRO,
    UDP_SEGMENT,
)
from .._linux.device import NativeTun, create_tun
from .._linux.netns import (
    create_netns,
    delete_netns,
    inside,
    unique_netns_name,
)
from .._offload import _impl
from .._offload.checksum import checksum, fold, pseudo_sum
from .._offload.headers import (
    IP4_CHECKSUM,
    IP4_FLAG_DF,
    IP4_HDR,
    IP4_MIN_HDR_LEN,
    IP6_HDR,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_CHECKSUM,
    TCP_FLAG_ACK,
    TCP_FLAG_PSH,
    TCP_HDR,
    TCP_MIN_HDR_LEN,
    U16,
    UDP_CHECKSUM,
    UDP_HDR,
    UDP_HDR_LEN,
)
from .._offload.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR_LEN,
    VnetHdr,
)
from .._offload_state import describe_errno
from .._tun import GsoTun
from . import children
from .preflight import HelpFormatter, missing_capabilities

__all__ = [
    "DOCTOR_HELP",
    "NEEDS_ROOT",
    "NO",
    "YES",
    "Row",
    "add_parser",
    "diagnose",
    "run",
    "scratch_netns",
    "summary",
]

DOCTOR_HELP = """\
Tell whether tunkit can run here, and at what speed: the kernel, /dev/net/tun,
this process's capabilities, the C extension, the offloads the kernel accepts
(asked for on a scratch device in a scratch network namespace, with one
coalesced write of each kind sent through it), UDP segmentation on loopback,
and the programs ip and iperf3. One table; each "no" says what to do.

Exit status 0 when everything works, 1 otherwise. Without root the probes
that need it say "needs root". The scratch namespace (tk-<pid>-doctor) is
removed afterwards.

examples:
  sudo tunkit doctor
  tunkit doctor --json | jq '.rows[] | select(.state != "yes")'
"""

YES: Final = "yes"
NO: Final = "no"
NEEDS_ROOT: Final = "needs root"
_WIDTH: Final = 80  # the table fits a terminal of 80 columns, and a pipe

# The scratch device's addresses exist only in the scratch namespace (RFC 1918
# and RFC 4193 ranges); packets come "from" the peer behind the device.
_LOCAL4: Final = "10.214.0.1"
_PEER4: Final = "10.214.0.2"
_LOCAL6: Final = "fd00:214::1"
_PEER6: Final = "fd00:214::2"
_PORT: Final = 9  # discard: the destination of every probe packet
_SRC_PORT: Final = 40214
_SEGMENTS: Final = 3  # segments of each probe super-packet
_GSO_SIZE: Final = 1200  # bytes of payload per segment, below any MSS at MTU 1500
_WAIT: Final = 1.0  # seconds to wait for each packet the kernel should deliver


@dataclass(frozen=True)
class Row:
    """One line of the diagnosis: what was checked, whether it is fine, what to do."""

    key: str  # the row's name in --json
    check: str  # what the table calls it
    state: str  # YES, NO or NEEDS_ROOT
    found: str  # what the probe found
    advice: str = ""  # what to do about a "no" (for a "yes", a hint)
    errno: str | None = None  # the kernel's refusal, by name ("EINVAL"), where a write failed

    @property
    def ok(self) -> bool:
        return self.state == YES


# -- the machine: kernel, /dev/net/tun, capabilities, the C extension, programs --------


_MODPROBE: Final = (
    "load the driver: modprobe tun (the node is /dev/net/tun, character device 10:200)"
)
_OPEN_TO_ALL: Final = (
    "to let users attach to their own persistent devices: chmod 0666 /dev/net/tun, or the "
    'udev rule KERNEL=="tun", MODE="0666" as distributions ship it'
)


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def dev_net_tun_row(path: str = "/dev/net/tun") -> Row:
    """Check that *path* is the TUN character device (10:200) and that this process opens it."""
    check = "/dev/net/tun"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Row("dev_net_tun", check, NO, f"{path} is missing", _MODPROBE)
    except OSError as exc:
        return Row("dev_net_tun", check, NO, f"{path}: {exc.strerror}", _MODPROBE)
    numbers = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if not stat.S_ISCHR(st.st_mode) or numbers != (10, 200):
        what = f"character device {numbers[0]}:{numbers[1]}" if stat.S_ISCHR(st.st_mode) else (
            "not a character device")
        return Row("dev_net_tun", check, NO, f"{path} is {what}, not the TUN device 10:200",
                   f"replace it: rm {path}; mknod {path} c 10 200; chmod 0666 {path}")
    mode = stat.S_IMODE(st.st_mode)
    found = f"10:200 {stat.filemode(st.st_mode)} {_owner(st)}"
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return Row("dev_net_tun", check, NO,
                       f"{found}: this user may not open it (mode {mode:04o})",
                       f"run as root; or, {_OPEN_TO_ALL}")
        return Row("dev_net_tun", check, NO, f"{found}, but opening it fails: {exc.strerror}",
                   _MODPROBE)
    if mode & 0o006 != 0o006:
        return Row("dev_net_tun", check, YES, f"{found}, opens",
                   f"mode {mode:04o} shuts other users out; {_OPEN_TO_ALL}")
    return Row("dev_net_tun", check, YES, f"{found}, opens")


def capabilities_row(missing: list[str]) -> Row:
    """Report the capabilities devices (CAP_NET_ADMIN) and namespaces (CAP_SYS_ADMIN) need."""
    check = "capabilities"
    if not missing:
        return Row("capabilities", check, YES, "CAP_NET_ADMIN and CAP_SYS_ADMIN effective")
    need = {"CAP_NET_ADMIN": "for devices", "CAP_SYS_ADMIN": "for namespaces"}
    found = " and ".join(f"{cap} ({need[cap]})" for cap in missing) + " missing"
    return Row("capabilities", check, NO, found,
               "run as root (sudo tunkit doctor), or give the program those capabilities "
               "(systemd: AmbientCapabilities=)")


def speedups_row() -> Row:
    """Report whether the C extension runs the offload engine, and why not."""
    check = "C extension"
    if _impl.speedups_enabled():
        return Row("speedups", check, YES, "tunkit._speedups loaded")
    if _impl._forced_pure():
        advice = "unset TUNKIT_PURE_PYTHON"
    else:
        advice = ("reinstall with a C compiler and the Python headers (Debian: apt-get "
                  "install gcc python3-dev; then pip install --force-reinstall tunkit)")
    return Row("speedups", check, NO,
               f"pure Python ({_impl.REASON}): the per-packet path runs ~10x slower", advice)


_TOOLS: Final = (
    ("ip", "iproute2", "tunkit demo and bench set up namespaces with it"),
    ("iperf3", "iperf3", "tunkit bench measures with it"),
)


def tool_rows() -> list[Row]:
    """Report whether the programs the commands run are on PATH."""
    rows = []
    for tool, package, why in _TOOLS:
        path = shutil.which(tool)
        if path is None:
            rows.append(Row(tool, tool, NO, f"not on PATH: {why}",
                            f"apt-get install {package} (Debian package {package})"))
        else:
            rows.append(Row(tool, tool, YES, path))
    return rows


# -- UDP segmentation on loopback ---------------------------------------------------


def _payload(n: int) -> bytes:
    """*n* bytes that show where each was when they arrive (no two neighbours alike)."""
    return (bytes(range(251)) * (n // 251 + 1))[:n]


def _udp_segment_row(tx: socket.socket, rx: socket.socket, data: bytes) -> Row:
    check = "UDP_SEGMENT"
    try:
        tx.setsockopt(socket.SOL_UDP, UDP_SEGMENT, _GSO_SIZE)
        tx.sendto(data, rx.getsockname())
        got = [rx.recv(65535) for _ in range(_SEGMENTS)]
    except OSError as exc:
        return Row("udp_segment", check, NO, f"a send with UDP_SEGMENT fails: {exc}",
                   "a kernel before 4.18: UDP tunnels send one datagram per system call")
    if b"".join(got) != data or any(len(g) != _GSO_SIZE for g in got):
        return Row("udp_segment", check, NO,
                   f"one send arrived as datagrams of {[len(g) for g in got]} bytes",
                   "this kernel segments UDP wrongly: update it")
    return Row("udp_segment", check, YES, f"1 send → {_SEGMENTS} datagrams of {_GSO_SIZE} B")


def _udp_gro_row(tx: socket.socket, rx: socket.socket, data: bytes, can_send: bool) -> Row:
    check = "UDP_GRO"
    try:
        rx.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    except OSError as exc:
        return Row("udp_gro", check, NO, f"the kernel refuses UDP_GRO: {exc}",
                   "a kernel before 5.0: UDP tunnels read one datagram per system call")
    if not can_send:
        return Row("udp_gro", check, YES, "accepted (not tried: UDP_SEGMENT fails)")
    try:
        tx.sendto(data, rx.getsockname())
        msg, ancillary, _, _ = rx.recvmsg(65535, socket.CMSG_SPACE(4))
    except OSError as exc:
        return Row("udp_gro", check, NO, f"a read with UDP_GRO fails: {exc}", "update the kernel")
    sizes = [int.from_bytes(d[:4], sys.byteorder) for level, kind, d in ancillary
             if level == socket.SOL_UDP and kind == UDP_GRO]
    if msg != data or sizes != [_GSO_SIZE]:
        return Row("udp_gro", check, NO,
                   f"read {len(msg)} bytes as one, segment sizes {sizes}",
                   "this kernel does not coalesce on read: UDP tunnels read one per call")
    return Row("udp_gro", check, YES, f"{_SEGMENTS} datagrams → 1 read, segment size {_GSO_SIZE}")


def udp_socket_rows() -> list[Row]:
    """Try UDP_SEGMENT (send) and UDP_GRO (receive) between sockets on loopback."""
    data = _payload(_SEGMENTS * _GSO_SIZE)
    with contextlib.ExitStack() as stack:
        tx, plain, gro = (
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            for _ in range(3)
        )
        for sock in (plain, gro):
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(_WAIT)
        segment = _udp_segment_row(tx, plain, data)
        return [segment, _udp_gro_row(tx, gro, data, segment.ok)]


# -- the kernel's offloads, on a scratch device in a scratch namespace ----------------


@contextlib.contextmanager
def scratch_netns() -> Iterator[str]:
    """Make the network namespace ``tk-<pid>-doctor``; delete it on the way out, whatever happens.

    What killed tunkit runs left (their processes, then their namespaces) is removed first.
    """
    children.remove_leftovers("tk")
    name = unique_netns_name("doctor")
    try:
        create_netns(name)
        yield name
    finally:
        with contextlib.suppress(FileNotFoundError):
            delete_netns(name)


class _Kind(NamedTuple):
    """One kind of coalesced write: a TCP or UDP super-packet over IPv4 or IPv6."""

    key: str
    check: str
    v6: bool
    proto: int
    gso_type: int


_KINDS: Final = (
    _Kind("write_tcp4", "coalesced TCPv4", False, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV4),
    _Kind("write_tcp6", "coalesced TCPv6", True, IPPROTO_TCP, VIRTIO_NET_HDR_GSO_TCPV6),
    _Kind("write_udp4", "coalesced UDPv4", False, IPPROTO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4),
    _Kind("write_udp6", "coalesced UDPv6", True, IPPROTO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4),
)

_NO_TUN_OFFLOAD: Final = (
    "this kernel has no TUN offload: tunkit moves one packet per system call (several "
    "times slower)"
)
_NO_USO: Final = "Linux 6.2 and later accept it; until then tunkit moves UDP one datagram a call"
# (key, check, TUN_F_* bit, what the kernel then hands over, advice when refused)
_FLAGS: Final = (
    ("tun_f_csum", "TUN_F_CSUM", TUN_F_CSUM, "partial checksums", _NO_TUN_OFFLOAD),
    ("tun_f_tso4", "TUN_F_TSO4", TUN_F_TSO4, "TCPv4 super-packets", _NO_TUN_OFFLOAD),
    ("tun_f_tso6", "TUN_F_TSO6", TUN_F_TSO6, "TCPv6 super-packets", _NO_TUN_OFFLOAD),
    ("tun_f_uso4", "TUN_F_USO4", TUN_F_USO4, "UDPv4 super-packets", _NO_USO),
    ("tun_f_uso6", "TUN_F_USO6", TUN_F_USO6, "UDPv6 super-packets", _NO_USO),
)
# Every row the device probe gives, in order, for the table when it cannot run.
_DEVICE_ROWS: Final = (
    ("vnet_hdr", "IFF_VNET_HDR"),
    *((key, check) for key, check, *_ in _FLAGS),
    *((kind.key, kind.check) for kind in _KINDS),
)


_UNPROBED: Final = "not probed"  # how the found text of a probe that could not run begins


def _unprobed(state: str, found: str, advice: str) -> list[Row]:
    return [Row(key, check, state, found, advice) for key, check in _DEVICE_ROWS]


def _super_packet(kind: _Kind, payload: bytes, headroom: int) -> bytearray:
    """A buffer for ``write_gso``: *headroom* bytes, the virtio header at their end, then one
    TCP or UDP super-packet from the peer to the scratch device of ``_SEGMENTS`` segments.

    As the kernel's own: a partial transport checksum (the folded pseudo-header sum,
    ``VIRTIO_NET_HDR_F_NEEDS_CSUM``), the IP and transport lengths of the whole.
    """
    family = socket.AF_INET6 if kind.v6 else socket.AF_INET
    src = socket.inet_pton(family, _PEER6 if kind.v6 else _PEER4)
    dst = socket.inet_pton(family, _LOCAL6 if kind.v6 else _LOCAL4)
    tcp = kind.proto == IPPROTO_TCP
    l4_len = (TCP_MIN_HDR_LEN if tcp else UDP_HDR_LEN) + len(payload)
    if kind.v6:
        ip = bytearray(IP6_HDR.pack(6 << 28, l4_len, kind.proto, 64, src, dst))
    else:
        ip = bytearray(IP4_HDR.pack(0x45, 0, IP4_MIN_HDR_LEN + l4_len, 1, IP4_FLAG_DF, 64,
                                    kind.proto, 0, src, dst))
        U16.pack_into(ip, IP4_CHECKSUM, checksum(ip))
    partial = fold(pseudo_sum(src + dst, kind.proto, l4_len))
    if tcp:
        l4 = TCP_HDR.pack(_SRC_PORT, _PORT, 1, 1, (TCP_MIN_HDR_LEN // 4) << 4,
                          TCP_FLAG_ACK | TCP_FLAG_PSH, 65535, partial, 0)
    else:
        l4 = UDP_HDR.pack(_SRC_PORT, _PORT, l4_len, partial)
    vnet = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind.gso_type, len(ip) + len(l4), _GSO_SIZE,
                   len(ip), TCP_CHECKSUM if tcp else UDP_CHECKSUM)
    buf = bytearray(headroom) + ip + l4 + payload
    vnet.pack_into(buf, headroom - VNET_HDR_LEN)
    return buf


def _receiver(ns: str, kind: _Kind) -> socket.socket:
    """A socket in *ns* that gets what the device delivers of *kind*: raw for TCP (no
    connection to ACK), bound to the port for UDP (it gets the segments, as datagrams)."""
    family = socket.AF_INET6 if kind.v6 else socket.AF_INET
    with inside(ns):
        if kind.proto == IPPROTO_TCP:
            sock = socket.socket(family, socket.SOCK_RAW, IPPROTO_TCP)
        else:
            sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if kind.proto == IPPROTO_UDP:
            sock.bind((_LOCAL6 if kind.v6 else _LOCAL4, _PORT))
    except BaseException:
        sock.close()
        raise
    return sock


def _received(sock: socket.socket, enough: Callable[[list[bytes]], bool]) -> list[bytes]:
    """What *sock* receives until *enough* of it came, or for at most ``_WAIT`` seconds."""
    got: list[bytes] = []
    deadline = time.monotonic() + _WAIT
    while not enough(got) and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(65535))
        except TimeoutError:
            break
    return got


def _delivered(sock: socket.socket, kind: _Kind, payload: bytes) -> str:
    """How the super-packet reached *sock* intact, or ``""`` when it did not."""
    if kind.proto == IPPROTO_TCP:
        # An IPv4 raw socket gets the IP header too, an IPv6 one only the segment.
        want = (0 if kind.v6 else IP4_MIN_HDR_LEN) + TCP_MIN_HDR_LEN + len(payload)

        def whole(got: list[bytes]) -> bool:
            return bool(got) and len(got[-1]) == want and got[-1].endswith(payload)

        return "raw socket got it whole" if whole(_received(sock, whole)) else ""
    got = _received(sock, lambda got: sum(map(len, got)) >= len(payload))
    return f"socket got {len(got)} datagrams" if got and b"".join(got) == payload else ""


_QUIRK: Final = (
    "a kernel bug: update the kernel (its vendor's fixed release); tunkit splits these "
    "writes meanwhile, slower"
)


def _write_row(tun: NativeTun, ns: str, kind: _Kind) -> Row:
    """Write one super-packet of *kind* whole (``write_gso``); check the kernel took it."""
    assert isinstance(tun, GsoTun)
    payload = _payload(_SEGMENTS * _GSO_SIZE)
    headroom = tun.mwo()
    what = f"1 write of {_SEGMENTS} segments"
    try:
        sock = _receiver(ns, kind)
    except OSError as exc:
        return Row(kind.key, kind.check, NO, f"{_UNPROBED}: no socket to receive it: {exc}",
                   "see the error")
    with sock:
        before = tun.stats()
        off_before = len(tun.offload_state().off)
        try:
            tun.write_gso([_super_packet(kind, payload, headroom)], headroom)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0)
            return Row(kind.key, kind.check, NO, f"writing {what} fails: {exc}", _QUIRK, name)
        after = tun.stats()
        if after.gro_refused > before.gro_refused:
            # What the device turned off, and why (offload_state): the errno by name.
            off = tun.offload_state().off[off_before:]
            err = off[0].errno if off and off[0].errno is not None else errno.EINVAL
            name = errno.errorcode.get(err, str(err))
            return Row(kind.key, kind.check, NO,
                       f"refused: {describe_errno(err)}; {what}, split and sent", _QUIRK, name)
        if after.dropped_write > before.dropped_write:
            return Row(kind.key, kind.check, NO, f"the kernel dropped {what}", _QUIRK)
        if after.gso_written == before.gso_written:
            return Row(kind.key, kind.check, NO,
                       "not written whole: the kernel refused this protocol above", _QUIRK)
        how = _delivered(sock, kind, payload)
    if not how:
        return Row(kind.key, kind.check, NO,
                   f"the kernel took {what}, but it never arrived intact", _QUIRK)
    return Row(kind.key, kind.check, YES, f"{_SEGMENTS} segments in 1 write; {how}")


def _ipv6_local(ns: str, address: str) -> bool:
    """Wait, at most ``_WAIT`` seconds, until *address* in *ns* has its local route.

    The kernel adds an IPv6 address's local route on a work queue after the
    link comes up, even with ``IFA_F_NODAD``: a packet to the address before
    then is not delivered (it counts as Ip6InAddrErrors; seen 1 run in 20).
    """
    entry = f"{socket.inet_pton(socket.AF_INET6, address).hex()} 80 "  # the /128 route
    deadline = time.monotonic() + _WAIT
    while True:
        with inside(ns), open("/proc/thread-self/net/ipv6_route") as routes:
            if any(line.startswith(entry) for line in routes):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def device_rows() -> list[Row]:
    """Probe the kernel's offloads on a scratch device in a scratch namespace (needs root)."""
    with scratch_netns() as ns:
        try:
            tun = create_tun(f"tkdoc{os.getpid()}", netns=ns)
        except OSError as exc:
            return _unprobed(NO, f"{_UNPROBED}: no scratch device: {exc}", "see the rows above")
        with tun:
            rows = [Row("vnet_hdr", "IFF_VNET_HDR", YES, "accepted: virtio-net headers")]
            for key, check, bit, what, advice in _FLAGS:
                if tun.offload_flags & bit:
                    rows.append(Row(key, check, YES, f"accepted: {what}"))
                else:
                    rows.append(Row(key, check, NO, "refused by TUNSETOFFLOAD", advice))
            try:
                tun.add_address(f"{_LOCAL4}/24")
                no_ipv6 = ""
                try:
                    tun.add_address(f"{_LOCAL6}/64")
                except OSError as exc:
                    no_ipv6 = f"{_UNPROBED}: no IPv6 here ({exc.strerror})"
                tun.up()
                if not no_ipv6 and not _ipv6_local(ns, _LOCAL6):
                    no_ipv6 = f"{_UNPROBED}: {_LOCAL6} never got its local route"
            except OSError as exc:
                return [*rows, *(Row(kind.key, kind.check, NO,
                                     f"{_UNPROBED}: the scratch device refuses its setup: {exc}",
                                     "see the error") for kind in _KINDS)]
            for kind in _KINDS:
                if kind.v6 and no_ipv6:
                    rows.append(Row(kind.key, kind.check, NO, no_ipv6,
                                    "enable IPv6: sysctl -w net.ipv6.conf.all.disable_ipv6=0"))
                else:
                    rows.append(_write_row(tun, ns, kind))
            return rows


def kernel_row(device: list[Row] | None, state: str = NO, why: str = "") -> Row:
    """The kernel's release, and whether the probes saw it refuse or lose coalesced writes.

    *device* is what :func:`device_rows` found, or None when it could not run
    (*state* and *why* then say so).
    """
    release = f"Linux {platform.release()}"
    if device is None:
        return Row("kernel", "kernel", state, f"{release}; offload quirks not probed", why)
    writes = [r for r in device if r.key.startswith("write_")]
    if all(r.found.startswith(_UNPROBED) for r in writes):
        return Row("kernel", "kernel", NO, f"{release}; offload quirks not probed",
                   "see the rows below")
    bad = [r.check.removeprefix("coalesced ") for r in writes if not r.ok]
    if not bad:
        return Row("kernel", "kernel", YES, f"{release}: no offload quirk seen")
    return Row("kernel", "kernel", NO, f"{release}: coalesced {', '.join(bad)} writes fail",
               "see the rows below")


# -- the diagnosis -------------------------------------------------------------------


def diagnose() -> list[Row]:
    """Run every probe; return the rows, in the table's order."""
    tun_row = dev_net_tun_row()
    missing = missing_capabilities()
    if missing:
        advice = "run as root: sudo tunkit doctor"
        kernel = kernel_row(None, NEEDS_ROOT, advice)
        probed = _unprobed(NEEDS_ROOT, f"{_UNPROBED}: needs a scratch namespace and device",
                           advice)
    elif not tun_row.ok:
        advice = "make /dev/net/tun work (row above), then run tunkit doctor again"
        kernel = kernel_row(None, NO, advice)
        probed = _unprobed(NO, f"{_UNPROBED}: no usable /dev/net/tun", advice)
    else:
        probed = device_rows()
        kernel = kernel_row(probed)
    return [kernel, tun_row, capabilities_row(missing), speedups_row(), *probed,
            *udp_socket_rows(), *tool_rows()]


# The rows on which the speed of each protocol through a device depends.
_SPEED_KEYS: Final = (
    ("TCP", ("vnet_hdr", "tun_f_csum", "tun_f_tso4", "tun_f_tso6", "write_tcp4", "write_tcp6")),
    ("UDP", ("vnet_hdr", "tun_f_csum", "tun_f_uso4", "tun_f_uso6", "write_udp4", "write_udp6",
             "udp_segment", "udp_gro")),
)


def summary(rows: list[Row]) -> str:
    """One line: can tunkit run here, and at what speed."""
    ok = {r.key: r.ok for r in rows}
    if not (ok["dev_net_tun"] and ok["capabilities"]):
        return "tunkit cannot make devices here (in-memory Tuns work): fix the rows marked no"
    slow = [] if ok["speedups"] else ["pure Python"]
    slow += [f"{proto} without full offload" for proto, keys in _SPEED_KEYS
             if not all(ok[k] for k in keys)]
    if slow:
        return f"tunkit runs here, slower: {'; '.join(slow)}"
    return "tunkit runs here at full speed: C extension, TCP and UDP super-packets whole"


# The last row of each group: the machine, the offloads asked for, the writes, UDP sockets.
_GROUP_ENDS: Final = frozenset({"speedups", "tun_f_uso6", "write_udp6", "device", "udp_gro"})


_DEVICE_KEYS: Final = tuple(key for key, _ in _DEVICE_ROWS)


def _merge_unprobed(rows: list[Row]) -> list[Row]:
    """Show the device probe's rows as one when it did not run: they all say the same."""
    keys = tuple(r.key for r in rows)
    for start in range(len(rows) - len(_DEVICE_KEYS) + 1):
        run = rows[start : start + len(_DEVICE_KEYS)]
        if keys[start : start + len(_DEVICE_KEYS)] == _DEVICE_KEYS and len(
            {(r.state, r.found, r.advice) for r in run}
        ) == 1:
            first = run[0]
            merged = Row("device", "IFF_VNET_HDR,\nTUN_F_*,\ncoalesced *", first.state,
                         first.found, first.advice)
            return [*rows[:start], merged, *rows[start + len(_DEVICE_KEYS) :]]
    return rows


def _table(rows: list[Row]) -> Table:
    table = Table(title="tunkit doctor", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("ok", no_wrap=True)
    table.add_column("found, and what to do", ratio=1, overflow="fold")
    rows = _merge_unprobed(rows)
    for i, row in enumerate(rows):
        cell = Text(row.found)
        if row.advice:
            cell.append(f"\n→ {row.advice}", style="dim" if row.ok else "bold")
        # A rule under each group, and around a row of several lines.
        next_advice = i + 1 < len(rows) and bool(rows[i + 1].advice)
        table.add_row(row.check, Text(row.state, style="green" if row.ok else "bold red"), cell,
                      end_section=row.key in _GROUP_ENDS or bool(row.advice) or next_advice)
    return table


def add_parser(sub: Any) -> None:
    """Add ``doctor`` to the subcommands *sub* (``argparse``'s subparsers action)."""
    doctor = sub.add_parser(
        "doctor",
        help="tell whether tunkit can run here, and at what speed",
        description=DOCTOR_HELP,
        formatter_class=HelpFormatter,
    )
    doctor.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``tunkit doctor``: print the table (or JSON); 0 when every row says yes, else 1."""
    rows = diagnose()
    ok = all(r.ok for r in rows)
    if args.json:
        out = {"ok": ok, "summary": summary(rows),
               "rows": [{**asdict(r), "ok": r.ok} for r in rows]}
        print(json.dumps(out, indent=2))
    else:
        width = min(console.width, _WIDTH)
        console.print(_table(rows), width=width)
        console.print(summary(rows), width=width)
    return 0 if ok else 1

"""Root test helpers: uniquely named namespaces, native devices in them, and a harness.

Everything these helpers make lives inside network namespaces named
``tk-<pid>-<tag>`` that they create, and is deleted by name in ``finally``.
Without root (or without ``/dev/net/tun``, ``ip``) the tests that use the
``root`` fixture are skipped with the reason; under ``CI=true`` they fail
instead, so CI can never pass by skipping them.

Import the fixtures into a test module: ``from netns_util import netns_factory, root``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from blocking import wait_in_poll

import tunkit
from tunkit._linux import device as tk_device
from tunkit._linux import netns as tk_netns
from tunkit._linux.device import NativeTun, create_tun
from tunkit._offload import _impl as tk_impl

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
_counter = itertools.count()


def root_unavailable() -> str | None:
    """Why root tests cannot run here, or ``None`` when they can."""
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for namespaces)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (modprobe tun)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return None


@pytest.fixture
def root() -> None:
    """Skip (or, under CI=true, fail) a test that needs root and /dev/net/tun."""
    reason = root_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"root test cannot run under CI=true: {reason}")
    pytest.skip(reason)


def need_tool(name: str) -> str:
    """Return the path of program *name*; skip (fail under CI) when it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"needs the program {name!r} (Debian: apt-get install iputils-ping for ping)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# On a test of the C path: skipped (with the reason) where the extension is missing.
_NEEDS_PACKET_IO = (
    [] if tk_device.PACKET_IO else [pytest.mark.skip(reason=f"no C extension: {tk_impl.REASON}")]
)


@pytest.fixture(params=[pytest.param("c", marks=_NEEDS_PACKET_IO), "pure"])
def io_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test twice: devices without offload made in it use the C extension's
    PacketIo for read and write ("c"), then os.readv/os.write ("pure")."""
    if request.param == "pure":
        monkeypatch.setattr(tk_device, "_packet_io", None)
    path: str = request.param
    return path


# Devices for tests that run on each: with offload, and without it on each
# read/write path (see io_path).
DEVICE_KINDS = [pytest.param("plain", marks=_NEEDS_PACKET_IO), "plain-pure", "vnet"]


def device_kind(kind: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Set up for a device of *kind* (one of DEVICE_KINDS); return its ``offload``."""
    if kind == "plain-pure":
        monkeypatch.setattr(tk_device, "_packet_io", None)
    return kind == "vnet"


@pytest.fixture
def netns_factory(root: None) -> Iterator[Callable[[str], str]]:
    """Return ``make(tag) -> name``: creates ``tk-<pid>-<tag>-<n>``, deleted after the test."""
    made: list[str] = []

    def make(tag: str) -> str:
        name = tk_netns.unique_netns_name(f"{tag}-{next(_counter)}")
        tk_netns.create_netns(name)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            with contextlib.suppress(FileNotFoundError):
                tk_netns.delete_netns(name)


def ns_run(
    ns: str, *args: str, timeout: float = 30, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace *ns* (``ip netns exec``) and return its result."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def ns_socket(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """Open a socket inside namespace *ns*; it stays bound to that namespace."""
    with tk_netns.inside(ns):
        return socket.socket(family, kind, proto)


def disable_ipv6(ns: str) -> None:
    """Turn IPv6 off for devices made later in *ns*: no router solicitations, no MLD."""
    for scope in ("all", "default"):
        ns_run(ns, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")


# -- the conformance harness -------------------------------------------------------


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _checksum(data: bytes) -> int:
    return ~_ones_sum(data) & 0xFFFF


def udp4_packet(src: str, dst: str, ident: int, payload: bytes, sport: int, dport: int) -> bytes:
    """Return a fully valid UDP/IPv4 packet (both checksums right, no options)."""
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    udp_len = 8 + len(payload)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF  # RFC 768: 0 means "no checksum"
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, ident, 0, 64, socket.IPPROTO_UDP, 0, saddr, daddr
    )
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + udp


class NativeHarness:
    """A NativeTun up in its own namespace, with a raw socket and a packet tap beside it.

    ``inject`` sends packets from the namespace's IP stack (a raw IPv4
    socket, header included) to a peer routed out the device, so ``tun.read``
    returns them byte for byte; ``collect`` reads what ``tun.write`` put into
    the namespace with an AF_PACKET socket bound to the device.
    """

    LOCAL = "10.78.0.1"
    PEER = "10.78.0.2"

    def __init__(self, ns: str, *, offload: bool = False) -> None:
        self.ns = ns
        disable_ipv6(ns)
        self.tun: NativeTun = create_tun(netns=ns, offload=offload)
        try:
            self.tun.add_address(f"{self.LOCAL}/24")
            self.tun.up()
            self._raw = ns_socket(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._tap = ns_socket(ns, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            self._tap.bind((self.tun.name(), ETH_P_ALL))
        except BaseException:
            self.close()
            raise

    def packet(self, i: int, size: int) -> bytes:
        """A valid UDP/IPv4 packet of *size* bytes (28 or more) to the peer, distinct per *i*."""
        if size < 28:
            raise ValueError(f"size {size} is below 28 (IPv4 + UDP headers)")
        payload = (i.to_bytes(4, "big") * (size // 4 + 1))[: size - 28]
        ident = i % 0xFFFF + 1  # nonzero: the kernel then keeps it
        return udp4_packet(self.LOCAL, self.PEER, ident, payload, 40000 + i % 1000, 9)

    def inject(self, packets: Sequence[bytes]) -> None:
        for pkt in packets:
            self._raw.sendto(pkt, (self.PEER, 0))

    def collect(self, count: int, timeout: float) -> list[bytes]:
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._tap.settimeout(remaining)
            try:
                data, addr = self._tap.recvfrom(70000)
            except TimeoutError:
                break
            except OSError as exc:
                if exc.errno == errno.ENETDOWN:  # reported once after the link went down
                    continue
                raise
            if addr[2] != PACKET_OUTGOING:
                out.append(data)
        return out

    def wait_blocked(self, thread: threading.Thread) -> None:
        wait_in_poll(thread)

    def close(self) -> None:
        for sock in ("_raw", "_tap"):
            s = getattr(self, sock, None)
            if s is not None:
                s.close()
        self.tun.close()


# -- two devices in two namespaces, joined by copy ---------------------------------


class Pair:
    """Devices ``a`` (in ``ns_a``, 10.77.0.1, fd00:77::1) and ``b`` (``ns_b``, .2, ::2).

    :meth:`start_copy` joins them with ``tunkit.copy`` (or another loop) on a
    thread; :meth:`close` closes both devices and joins it. *offload* is
    passed to ``create_tun``.
    """

    A4, B4 = "10.77.0.1", "10.77.0.2"
    A6, B6 = "fd00:77::1", "fd00:77::2"

    def __init__(self, ns_a: str, ns_b: str, mtu: int = 1500, *, offload: bool = True) -> None:
        self.ns_a, self.ns_b = ns_a, ns_b
        self.a = create_tun(netns=ns_a, mtu=mtu, offload=offload)
        try:
            self.b = create_tun(netns=ns_b, mtu=mtu, offload=offload)
        except BaseException:
            self.a.close()
            raise
        self._copy: threading.Thread | None = None
        self.copy_error: list[BaseException] = []
        try:
            for tun, v4, v6 in ((self.a, self.A4, self.A6), (self.b, self.B4, self.B6)):
                tun.add_address(f"{v4}/24")
                tun.add_address(f"{v6}/64")
                tun.up()
        except BaseException:
            self.a.close()
            self.b.close()
            raise

    def start_copy(
        self,
        *,
        passthrough: bool = True,
        loop: Callable[[NativeTun, NativeTun], None] | None = None,
    ) -> None:
        """Join the devices on a thread: ``tunkit.copy(a, b, passthrough=...)``, or *loop*."""

        def run() -> None:
            try:
                if loop is None:
                    tunkit.copy(self.a, self.b, passthrough=passthrough)
                else:
                    loop(self.a, self.b)
            except BaseException as exc:
                self.copy_error.append(exc)

        self._copy = threading.Thread(target=run, name="test-copy")
        self._copy.start()

    def settled_stats(self, timeout: float = 5.0) -> tuple[tunkit.TunStats, tunkit.TunStats]:
        """``a.stats(), b.stats()`` once neither has changed for 50 ms.

        A receiver can hold the last packet while the copy thread, still in
        the write that carried it, has not counted it yet: read the counters
        when the copy is done with what the test sent.
        """
        deadline = time.monotonic() + timeout
        last = self.a.stats(), self.b.stats()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.a.stats(), self.b.stats()
            if now == last:
                break
            last = now
        return last

    def close(self) -> None:
        self.a.close()
        self.b.close()
        if self._copy is not None:
            self._copy.join(10)
            assert not self._copy.is_alive(), "copy did not end after close()"
        assert not self.copy_error, f"copy failed: {self.copy_error[0]!r}"


# -- a TCP transfer across a Pair, checked end to end ---------------------------------

_RECEIVER = """
    import hashlib, socket, sys
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((sys.argv[1], 5201))
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    print(total, digest.hexdigest(), flush=True)
"""

_SENDER = """
    import hashlib, random, socket, sys
    data = random.Random(4).randbytes(int(sys.argv[2]))
    print(hashlib.sha256(data).hexdigest(), flush=True)
    conn = socket.create_connection((sys.argv[1], 5201), timeout=60)
    conn.sendall(data)
    conn.close()
"""


def ns_python(ns: str, code: str, *args: str) -> subprocess.Popen[str]:
    """Start ``python -c code args`` inside namespace *ns*, its output piped."""
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def tcp_transfer(pair: Pair, size: int, timeout: float = 100) -> None:
    """Send *size* random bytes over TCP from ``ns_a`` to ``b``'s IPv4 address; check SHA-256.

    Raises:
        AssertionError: a side failed, or the bytes that arrived differ.
    """
    receiver = ns_python(pair.ns_b, _RECEIVER, pair.B4)
    sender: subprocess.Popen[str] | None = None
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready", receiver.stderr
        sender = ns_python(pair.ns_a, _SENDER, pair.B4, str(size))
        sent_out, sent_err = sender.communicate(timeout=timeout)
        assert sender.returncode == 0, sent_err
        got_out, got_err = receiver.communicate(timeout=20)
        assert receiver.returncode == 0, got_err
    finally:
        for proc in (receiver, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    total, digest = got_out.split()
    assert int(total) == size
    assert digest == sent_out.strip(), "the bytes that arrived differ from those sent"

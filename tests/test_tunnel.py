"""``tunkit tunnel`` as real processes: one in each of two namespaces joined by a veth underlay.

Each end is ``python -m tunkit tunnel ...`` with ``--netns``: it makes its
device and its transport socket inside its namespace. The tests ping across
the overlay (IPv4 and IPv6), send 200 MB of TCP and compare SHA-256, send UDP
datagrams of many sizes up to the MTU, kill one end with SIGKILL and restart
it while the other keeps running, and check the one-line errors.
"""

# ruff: noqa: F811  (fixtures imported from netns_util are parameters here)

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns_util import need_tool, netns_factory, ns_run, ns_socket, root, tcp_transfer  # noqa: F401
from tls_util import Pki, make_pki

TUNKIT = [sys.executable, "-m", "tunkit"]
UNDER_A, UNDER_B = "192.168.79.1", "192.168.79.2"
A4, B4 = "10.79.0.1", "10.79.0.2"
A6, B6 = "fd00:79::1", "fd00:79::2"
PORT = 5555
MTU = 9000  # tunkit tunnel's default over streams
TRANSPORTS = ["udp", "tcp", "tls"]


class TunnelProc:
    """One ``tunkit tunnel`` process; a thread collects its output lines."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "COLUMNS": "200"}
        self.proc = subprocess.Popen(
            [*TUNKIT, "tunnel", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._collect, name="test-tunnel-output")
        self._reader.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout: float = 20) -> None:
        """Wait until *count* output lines contain *text*."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(text in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                ended = self.proc.poll() is not None and not self._reader.is_alive()
                if left <= 0 or ended:
                    pytest.fail(f"no {text!r} (x{count}) from {self.proc.args}: "
                                f"{self.lines}, status {self.proc.poll()}")
                self._cond.wait(min(left, 0.1))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> tuple[int, str]:
        """End it with *sig* (by its PID); return its exit status and standard error."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)  # the output thread reads stdout to its end
        assert self.proc.stderr is not None
        return self.proc.returncode, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@dataclass
class Hosts:
    """Two namespaces joined by a veth underlay, and a way to start tunnel ends in them."""

    ns_a: str
    ns_b: str
    pki: Pki
    procs: list[TunnelProc]

    # Names that tcp_transfer (netns_util) expects of a pair.
    @property
    def B4(self) -> str:
        return B4

    def _tls(self, transport: str, who: str) -> list[str]:
        if transport != "tls":
            return []
        cert, key = {"server": (self.pki.server_cert, self.pki.server_key),
                     "client": (self.pki.client_cert, self.pki.client_key),
                     "stranger": (self.pki.stranger_cert, self.pki.stranger_key)}[who]
        return ["--cert", str(cert), "--key", str(key), "--ca", str(self.pki.ca)]

    def listen(self, transport: str, *extra: str) -> TunnelProc:
        proc = TunnelProc(
            "--listen", f"{UNDER_A}:{PORT}", "--transport", transport, "--netns", self.ns_a,
            "--address", f"{A4}/24", "--address", f"{A6}/64", "--interval", "1",
            *self._tls(transport, "server"), *extra,
        )
        self.procs.append(proc)
        return proc

    def connect(self, transport: str, who: str = "client") -> TunnelProc:
        proc = TunnelProc(
            "--connect", f"{UNDER_A}:{PORT}", "--transport", transport, "--netns", self.ns_b,
            "--address", f"{B4}/24", "--address", f"{B6}/64", "--interval", "1",
            *self._tls(transport, who),
        )
        self.procs.append(proc)
        return proc

    def ends(self, transport: str) -> tuple[TunnelProc, TunnelProc]:
        """A listening end in A and a connecting end in B, both connected (udp: ready)."""
        a = self.listen(transport)
        a.wait_for("listening on")
        b = self.connect(transport)
        b.wait_for(ready(transport))
        a.wait_for(ready(transport))
        return a, b


def ready(transport: str) -> str:
    """What an end prints once it can carry packets."""
    return "ready:" if transport == "udp" else "connected:"


def device_mtu(proc: TunnelProc) -> int:
    """The device MTU an end reported at start."""
    return int(proc.lines[0].split(", mtu ")[1].split(")")[0])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), hosts=(UNDER_A,))


@pytest.fixture
def hosts(netns_factory: Callable[[str], str], pki: Pki) -> Iterator[Hosts]:
    ns_a, ns_b = netns_factory("tun-a"), netns_factory("tun-b")
    for ns in (ns_a, ns_b):
        ns_run(ns, "ip", "link", "set", "lo", "up")
    ns_run(ns_a, "ip", "link", "add", "ua", "type", "veth", "peer", "name", "ub", "netns", ns_b)
    ns_run(ns_a, "ip", "addr", "add", f"{UNDER_A}/24", "dev", "ua")
    ns_run(ns_b, "ip", "addr", "add", f"{UNDER_B}/24", "dev", "ub")
    ns_run(ns_a, "ip", "link", "set", "ua", "up")
    ns_run(ns_b, "ip", "link", "set", "ub", "up")
    h = Hosts(ns_a, ns_b, pki, [])
    try:
        yield h
    finally:
        for proc in h.procs:  # only our own, by PID
            proc.kill()


def ping(ns: str, target: str, count: int = 3, timeout: float = 20) -> None:
    """Ping *target* from *ns* until *count* replies in a row came (the link may be settling)."""
    deadline = time.monotonic() + timeout
    while True:
        result = ns_run(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "1", target,
                        check=False)
        if result.returncode == 0:
            return
        assert time.monotonic() < deadline, f"no ping {target} from {ns}: {result.stdout}"


def udp_sizes(hosts: Hosts, family: int, src: str, dst: str, sizes: list[int]) -> None:
    """Send one datagram of each of *sizes* from A to B over the overlay; each arrives intact."""
    rx = ns_socket(hosts.ns_b, family, socket.SOCK_DGRAM)
    tx = ns_socket(hosts.ns_a, family, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((dst, 9999))
        tx.bind((src, 0))
        rx.settimeout(2)
        for size in sizes:
            payload = os.urandom(size)
            for _ in range(3):  # a datagram may be lost; three in a row would not be
                tx.sendto(payload, (dst, 9999))
                try:
                    got, _ = rx.recvfrom(65536)
                except TimeoutError:
                    continue
                assert got == payload, f"a {size}-byte datagram changed on the way"
                break
            else:
                pytest.fail(f"a {size}-byte datagram never arrived")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ping_tcp_and_udp_cross_the_tunnel(hosts: Hosts, transport: str) -> None:
    need_tool("ping")
    a, b = hosts.ends(transport)
    mtu = device_mtu(a)
    # Streams: tunkit tunnel's default. UDP: the underlay's 1500 less IPv4 and UDP headers.
    assert mtu == (MTU if transport != "udp" else 1500 - 28), a.lines[0]
    assert device_mtu(b) == mtu
    ping(hosts.ns_b, A4)
    ping(hosts.ns_b, A6)
    ping(hosts.ns_a, B6)
    # UDP of many sizes up to the MTU: IPv4 + UDP headers are 28 bytes, IPv6 + UDP 48.
    sizes = [1, 2, 100, 512, 1000, 1400, 1472, 1473, 4000, 8000]
    udp_sizes(hosts, socket.AF_INET, A4, B4,
              sorted({s for s in sizes if s <= mtu - 28} | {mtu - 29, mtu - 28}))
    sizes = [1, 333, 1280, 1452, 5000]
    udp_sizes(hosts, socket.AF_INET6, A6, B6,
              sorted({s for s in sizes if s <= mtu - 48} | {mtu - 49, mtu - 48}))
    tcp_transfer(hosts, 200 * 1024 * 1024, timeout=100)  # type: ignore[arg-type]
    # The counters move: wait for a counter line that shows packets from the peer.
    b.wait_for("from peer:")
    assert a.proc.poll() is None and b.proc.poll() is None
    status_a, err_a = a.stop(signal.SIGTERM)
    status_b, err_b = b.stop(signal.SIGINT)
    assert (status_a, status_b) == (0, 0), (err_a, err_b)
    assert "Traceback" not in err_a + err_b
    totals = a.lines[a.lines.index(next(x for x in a.lines if x.startswith("stopped"))) + 1]
    sent_bytes = int(totals.split("to peer: ")[1].split(" packets, ")[1].split(" bytes")[0]
                     .replace(",", ""))
    assert sent_bytes > 200 * 1024 * 1024, totals  # the 200 MB went out through this end
    if transport == "tls":
        assert any("tls: encrypted" in line for line in a.lines)
    if transport == "udp":  # it says so plainly at start, both ends
        for proc in (a, b):
            assert any(line.startswith("udp: NOT encrypted and NOT authenticated")
                       for line in proc.lines)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_either_end_killed_and_restarted_traffic_resumes(hosts: Hosts, transport: str) -> None:
    need_tool("ping")
    a, b = hosts.ends(transport)
    ping(hosts.ns_b, A4)
    # The connecting end dies without a word; the listener takes its successor
    # (over UDP: the same source address, as the connecting end binds the port).
    b.proc.send_signal(signal.SIGKILL)
    b.kill()
    b2 = hosts.connect(transport)
    b2.wait_for(ready(transport))
    if transport != "udp":
        a.wait_for("connected:", count=2)
    ping(hosts.ns_b, A4)
    ping(hosts.ns_a, B6)
    # The listening end dies; the connecting end goes on (over a stream it
    # tries again until the successor is up).
    a.proc.send_signal(signal.SIGKILL)
    a.kill()
    if transport != "udp":
        b2.wait_for("cannot reach")
    a2 = hosts.listen(transport)
    a2.wait_for(ready(transport))
    if transport != "udp":
        b2.wait_for("connected:", count=2)
    ping(hosts.ns_b, A4)
    ping(hosts.ns_a, B4)
    assert b2.proc.poll() is None and a2.proc.poll() is None
    assert b2.stop()[0] == 0
    assert a2.stop()[0] == 0


def _one_line_error(proc: TunnelProc, *needles: str) -> str:
    status, err = proc.stop(timeout=30) if proc.proc.poll() is None else proc.stop()
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, err, proc.lines)
    assert len(lines) == 1 and lines[0].startswith("tunkit: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _exit_status(proc: TunnelProc, timeout: float = 30) -> int:
    try:
        return proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.proc.args} did not exit: {proc.lines}")


@pytest.mark.timeout(90)
def test_one_line_errors_port_in_use_unreachable_and_bad_certificate(hosts: Hosts) -> None:
    a = hosts.listen("tls")
    a.wait_for("listening on")
    # The same port again in the same namespace.
    second = hosts.listen("tls")
    assert _exit_status(second) == 2
    _one_line_error(second, f"--listen {UNDER_A}:{PORT}", "address already in use")
    # A certificate that the listener's authority did not sign.
    stranger = hosts.connect("tls", who="stranger")
    assert _exit_status(stranger) == 2, stranger.stop()[1]
    _one_line_error(stranger, "refused this end", "is --cert signed")
    a.wait_for("refused")  # the listener says so, and goes on
    assert a.proc.poll() is None
    good = hosts.connect("tls")
    good.wait_for("connected:")
    assert good.stop()[0] == 0
    assert a.stop()[0] == 0
    # A second UDP listener on the port of a running one.
    udp = hosts.listen("udp")
    udp.wait_for("ready:")
    udp_again = hosts.listen("udp")
    assert _exit_status(udp_again) == 2
    _one_line_error(udp_again, f"--listen {UNDER_A}:{PORT}", "address already in use")
    assert udp.stop()[0] == 0
    # Nothing listens any more: the peer cannot be reached.
    lonely = hosts.connect("tcp")
    assert _exit_status(lonely) == 2
    _one_line_error(lonely, f"--connect {UNDER_A}:{PORT}", "connection refused")


@pytest.mark.timeout(60)
def test_an_existing_persistent_device_is_attached_to_and_stays(hosts: Hosts) -> None:
    need_tool("ping")
    ns_run(hosts.ns_a, "ip", "tuntap", "add", "mode", "tun", "tkpersist")
    a = hosts.listen("tcp", "--dev", "tkpersist")
    a.wait_for("listening on")
    assert a.lines[0].startswith(f"tunnel: tkpersist in namespace {hosts.ns_a} ")
    b = hosts.connect("tcp")
    b.wait_for("connected:")
    ping(hosts.ns_b, A4)
    assert a.stop()[0] == 0
    link = ns_run(hosts.ns_a, "ip", "-d", "link", "show", "tkpersist")
    assert "tun" in link.stdout  # still there, the persistent device it was


@pytest.mark.timeout(60)
def test_a_frame_longer_than_the_listeners_mtu_ends_that_connection_only(hosts: Hosts) -> None:
    a = hosts.listen("tcp", "--mtu", "1500")
    a.wait_for("listening on")
    b = TunnelProc("--connect", f"{UNDER_A}:{PORT}", "--transport", "tcp",
                   "--netns", hosts.ns_b, "--address", f"{B4}/24", "--mtu", "9000")
    hosts.procs.append(b)
    b.wait_for("connected:")
    ns_run(hosts.ns_b, "ping", "-c", "1", "-W", "1", "-s", "3000", A4, check=False)
    a.wait_for("give both ends the same --mtu")
    a.wait_for("disconnected:")
    assert any("frame of 3028 bytes is longer than mtu() 1500" in line for line in a.lines)
    b.wait_for("connected:", count=2)  # it comes back; the listener takes it again
    assert a.proc.poll() is None and b.proc.poll() is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--listen", "nohost"], "expected HOST:PORT"),
        (["--listen", "1.2.3.4:99999"], "port must be"),
        (["--connect", "::1:5"], "brackets"),
        (["--listen", "127.0.0.1:5555", "--transport", "tls", "--cert", "/nonexistent.pem",
          "--key", "/x", "--ca", "/y"], "--cert /nonexistent.pem: no such file"),
        (["--listen", "127.0.0.1:5555", "--transport", "tls"], "needs --cert, --key and --ca"),
        (["--listen", "127.0.0.1:5555", "--address", "10.1.2.300/24"], "prefix length"),
        (["--listen", "127.0.0.1:5555", "--mtu", "70000"], "at most 65535"),
        (["--listen", "127.0.0.1:5555", "--netns", "tk-0-no-such-namespace"],
         "tk-0-no-such-namespace"),
    ],
    ids=["no-port", "bad-port", "v6-no-brackets", "missing-cert", "tls-no-files",
         "address-no-prefix", "mtu-too-big", "no-namespace"],
)
def test_a_persons_mistakes_are_one_line_and_status_2(
    root: None, args: list[str], needle: str, tmp_path: Path
) -> None:
    proc = TunnelProc(*args)
    try:
        assert _exit_status(proc) == 2
        _one_line_error(proc, needle)
    finally:
        proc.kill()


def test_help_explains_with_examples() -> None:
    result = subprocess.run([*TUNKIT, "tunnel", "--help"], capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--connect" in result.stdout
    assert "--transport" in result.stdout


README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.timeout(60)
def test_the_readme_tunnel_end_talks_to_tunkit_tunnel(hosts: Hosts) -> None:
    need_tool("ping")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if "StreamTun(conn)" in b]
    example = subprocess.Popen(
        ["ip", "netns", "exec", hosts.ns_a, sys.executable, "-c", block],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not ns_run(hosts.ns_a, "ss", "-Hltn", "sport = :5555").stdout.strip():
            assert example.poll() is None and time.monotonic() < deadline, example.stderr
            time.sleep(0.05)
        peer = TunnelProc("--connect", f"{UNDER_A}:5555", "--transport", "tcp",
                          "--netns", hosts.ns_b, "--address", "10.7.0.2/24", "--mtu", "1500")
        hosts.procs.append(peer)
        peer.wait_for("connected:")
        ping(hosts.ns_b, "10.7.0.1")
        assert peer.stop()[0] == 0  # its end closes: the example's copy ends normally
        out, err = example.communicate(timeout=20)
        assert example.returncode == 0, err
        assert out.splitlines() == ["True True"]
    finally:
        if example.poll() is None:
            example.kill()
        example.communicate()


def _udp_exchange(hosts: Hosts, payloads: list[bytes]) -> None:
    """B sends each payload to A:9999 over the overlay; A answers each with its reverse."""
    rx = ns_socket(hosts.ns_a, socket.AF_INET, socket.SOCK_DGRAM)
    tx = ns_socket(hosts.ns_b, socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((A4, 9999))
        tx.bind((B4, 9998))
        rx.settimeout(5)
        tx.settimeout(5)
        for payload in payloads:
            tx.sendto(payload, (A4, 9999))
            got, peer = rx.recvfrom(65536)
            assert got == payload
            rx.sendto(payload[::-1], peer)
            assert tx.recvfrom(65536)[0] == payload[::-1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_pcap_records_the_devices_packets_with_their_directions(
    hosts: Hosts, transport: str, tmp_path: Path
) -> None:
    from pcap_readers import scapy, tshark

    pcap = tmp_path / "tunnel.pcapng"
    a = hosts.listen(transport, "--pcap", str(pcap))
    a.wait_for("listening on")
    b = hosts.connect(transport)
    b.wait_for(ready(transport))
    a.wait_for(ready(transport))
    assert any(f"recording the device's packets into {pcap}" in line for line in a.lines)
    payloads = [bytes([i]) * (100 + 211 * i) for i in range(6)]
    _udp_exchange(hosts, payloads)
    size = 4 * 1024 * 1024
    tcp_transfer(hosts, size, timeout=60)  # type: ignore[arg-type]
    status, err = a.stop()
    assert status == 0, err
    device = a.lines[0].split()[1]  # "tunnel: tun0 in namespace ..."
    for reader in (tshark, scapy):
        seen = reader(pcap)
        # A datagram from B came from the peer and was written to the device: "out";
        # the answer was read from it on its way to the peer: "in".
        v4 = [s for s in seen if s.data[0] >> 4 == 4]
        udp = [s for s in v4 if len(s.data) > 28 and s.data[9] == socket.IPPROTO_UDP
               and s.data[22:24] in (b"\x27\x0f", b"\x27\x0e")]
        expected = [(p, "out", B4, A4) for p in payloads]
        expected += [(p[::-1], "in", A4, B4) for p in payloads]
        assert sorted((s.data[28:], s.direction, s.src, s.dst) for s in udp) == sorted(
            expected), reader
        assert {s.interface for s in seen} == {device}, reader
        # The TCP bytes A sent left its device as super-packets; the file holds
        # their segments, each no longer than the device's MTU, all the bytes.
        sent = [s for s in v4 if s.data[9] == socket.IPPROTO_TCP and s.src == A4
                and s.direction == "in"]
        assert max(len(s.data) for s in sent) <= device_mtu(a), reader
        ihl = [(s.data[0] & 15) * 4 for s in sent]
        payload = sum(int.from_bytes(s.data[2:4], "big") - h - (s.data[h + 12] >> 4) * 4
                      for s, h in zip(sent, ihl, strict=True))
        assert size <= payload < size + 64 * 1024, reader  # retransmits are recorded too
    total = len(tshark(pcap))
    assert f"  --pcap: {total:,} packets recorded into {pcap}" in a.lines, a.lines[-3:]


def test_pcap_file_that_cannot_be_written_is_one_line_before_anything(root: None) -> None:
    proc = TunnelProc("--listen", "127.0.0.1:5555", "--pcap", "/nonexistent-tunkit/t.pcapng")
    try:
        assert _exit_status(proc) == 2
        _one_line_error(proc, "--pcap /nonexistent-tunkit/t.pcapng: No such file or directory")
        assert proc.lines == []
    finally:
        proc.kill()

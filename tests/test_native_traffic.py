"""Real traffic: two devices in two namespaces joined by tunkit.copy (ping, TCP, UDP)."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest
from netns_util import Pair, need_tool, netns_factory, ns_run, ns_socket, root  # noqa: F401

MakeNs = Callable[[str], str]


@pytest.fixture
def pair(netns_factory: MakeNs) -> Iterator[Pair]:
    p = Pair(netns_factory("a"), netns_factory("b"))
    try:
        p.start_copy()
        yield p
    finally:
        p.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [4, 6])
def test_ping_both_ways(pair: Pair, version: int) -> None:
    need_tool("ping")
    a, b = (pair.A4, pair.B4) if version == 4 else (pair.A6, pair.B6)
    for ns, dst in ((pair.ns_a, b), (pair.ns_b, a)):
        result = ns_run(
            ns, "ping", f"-{version}", "-c", "3", "-i", "0.2", "-W", "2", dst, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "3 received" in result.stdout
    stats_a, stats_b = pair.a.stats(), pair.b.stats()
    assert stats_a.packets_read >= 6 and stats_b.packets_written >= 6
    assert stats_a.dropped_too_big == stats_b.dropped_too_big == 0


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


def _ns_python(ns: str, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(120)
def test_tcp_64_mb_arrives_intact(pair: Pair) -> None:
    size = 64 << 20
    receiver = _ns_python(pair.ns_b, _RECEIVER, pair.B4)
    sender: subprocess.Popen[str] | None = None
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready", receiver.stderr
        sender = _ns_python(pair.ns_a, _SENDER, pair.B4, str(size))
        sent_out, sent_err = sender.communicate(timeout=100)
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
    assert digest == sent_out.strip()
    # Without offload every segment is a packet of at most the MTU.
    assert pair.a.stats().bytes_read > size
    assert pair.b.stats().dropped_too_big == 0


UDP_SIZES = [0, 1, 2, 100, 1000, 1472, 1473, 1480, 1500, 2000, 2952, 2953, 8192, 9000, 16384]
UDP_SIZES += [32768, 50001, 65000]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [4, 6])
def test_udp_datagrams_of_many_sizes_arrive_intact(pair: Pair, version: int) -> None:
    # Datagrams above the MTU are fragmented by the sender's kernel, carried
    # fragment by fragment and reassembled by the receiver's.
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    src, dst = (pair.A4, pair.B4) if version == 4 else (pair.A6, pair.B6)
    largest = 65507 if version == 4 else 65527  # 65535 minus the IPv4 / UDP headers
    receiver = ns_socket(pair.ns_b, family, socket.SOCK_DGRAM)
    sender = ns_socket(pair.ns_a, family, socket.SOCK_DGRAM)
    try:
        receiver.bind((dst, 9000))
        receiver.settimeout(5)
        sender.bind((src, 0))
        for i, size in enumerate([*UDP_SIZES, largest]):
            payload = os.urandom(size)
            sender.sendto(payload, (dst, 9000))
            data, peer = receiver.recvfrom(70000)
            assert len(data) == size, f"datagram {i}"
            assert data == payload, f"datagram {i} of {size} bytes changed"
            assert peer[0] == src
        with pytest.raises(OSError):  # one byte more does not fit an IP packet
            sender.sendto(bytes(largest + 1), (dst, 9000))
    finally:
        receiver.close()
        sender.close()

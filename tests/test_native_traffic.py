"""Real traffic: two devices in two namespaces joined by tunkit.copy (ping, TCP, UDP),
with offload on (super-packets passed whole) and off."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest
from netns_util import (  # noqa: F401
    DEVICE_KINDS,
    Pair,
    device_kind,
    need_tool,
    netns_factory,
    ns_run,
    ns_socket,
    root,
    tcp_transfer,
)

MakeNs = Callable[[str], str]


@pytest.fixture(params=DEVICE_KINDS)
def pair(
    netns_factory: MakeNs, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Pair]:
    offload = device_kind(request.param, monkeypatch)
    p = Pair(netns_factory("a"), netns_factory("b"), offload=offload)
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
    stats_a, stats_b = pair.settled_stats()
    assert stats_a.packets_read >= 6 and stats_b.packets_written >= 6
    assert stats_a.dropped_too_big == stats_b.dropped_too_big == 0


@pytest.mark.timeout(120)
def test_tcp_64_mb_arrives_intact(pair: Pair) -> None:
    size = 64 << 20
    tcp_transfer(pair, size)
    # Every byte was read once, plus the headers of each packet or segment.
    assert pair.a.stats().bytes_read > size
    assert pair.b.stats().dropped_too_big == pair.a.stats().dropped_too_big == 0
    assert pair.a.stats().dropped_malformed == 0


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

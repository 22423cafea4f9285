"""A raised MTU on a running pair: big packets flow at once through copy, Forwarder, Point2Point.

A forwarding loop sizes its read buffers from the source's MTU. After
``set_mtu(9000)`` on both devices of a running pair, 8000-byte pings must all
come back: from the first one on, with offload on and off, super-packets
passed through whole or not. (A read already blocked with the old buffers
when the MTU changed is the hard case: it is the very next packet.)
"""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from netns_util import (  # noqa: F401
    Pair,
    need_tool,
    netns_factory,
    ns_run,
    root,
    tcp_transfer,
)

import tunkit

MakeNs = Callable[[str], str]
PINGS = 20


@contextlib.contextmanager
def _joined(pair: Pair, via: str, passthrough: bool) -> Iterator[None]:
    """Join the pair's devices with *via* (copy, two Forwarders, a Point2Point) while inside."""
    if via == "copy":
        pair.start_copy(passthrough=passthrough)
        yield
        return
    if via == "forwarder":
        a2b = tunkit.Forwarder(tunkit.Pool(), passthrough=passthrough)
        b2a = tunkit.Forwarder(tunkit.Pool(), passthrough=passthrough)
        try:
            a2b.set_read_tun(pair.a)
            a2b.set_write_tun(pair.b)
            b2a.set_read_tun(pair.b)
            b2a.set_write_tun(pair.a)
            yield
        finally:
            a2b.stop()
            b2a.stop()
        return
    p2p = tunkit.Point2Point(tunkit.Pool(), passthrough=passthrough)
    try:
        p2p.set_a(pair.a)
        p2p.set_b(pair.b)
        yield
    finally:
        p2p.stop()


def _ping(pair: Pair, count: int, size: int) -> str:
    result = ns_run(
        pair.ns_a, "ping", "-4", "-c", str(count), "-i", "0.02", "-W", "2", "-s", str(size),
        pair.B4, check=False,
    )
    return result.stdout + result.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "no-passthrough"])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
@pytest.mark.parametrize("via", ["copy", "forwarder", "p2p"])
def test_big_pings_flow_at_once_after_the_mtu_is_raised(
    netns_factory: MakeNs, via: str, offload: bool, passthrough: bool
) -> None:
    need_tool("ping")
    pair = Pair(netns_factory("mtu-a"), netns_factory("mtu-b"), offload=offload)
    try:
        with _joined(pair, via, passthrough):
            out = _ping(pair, 2, 56)  # the loop runs, and is blocked in a read again
            assert "2 received" in out, out
            pair.a.set_mtu(9000)
            pair.b.set_mtu(9000)
            out = _ping(pair, PINGS, 8000)
            assert f"{PINGS} received" in out, out
            stats_a, stats_b = pair.settled_stats()
            assert stats_a.dropped_too_big == stats_b.dropped_too_big == 0
    finally:
        pair.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("via", ["copy", "p2p"])
def test_passthrough_is_decided_again_when_an_mtu_changes(netns_factory: MakeNs, via: str) -> None:
    """Super-packets pass whole only while the destination's MTU fits the source's.

    Counted on A's side: ``gso_read`` counts super-packets read whole,
    ``gso_split`` those split by ``read``.
    """
    pair = Pair(netns_factory("pass-a"), netns_factory("pass-b"), offload=True)
    try:
        pair.b.set_mtu(1400)  # below A's: A's super-packets must be split
        with _joined(pair, via, passthrough=True):
            seen = pair.a.stats()
            for b_mtu, whole in ((1400, False), (1500, True), (1400, False)):
                pair.b.set_mtu(b_mtu)
                tcp_transfer(pair, 4 << 20)
                now, _ = pair.settled_stats()
                moved = (now.gso_read - seen.gso_read, now.gso_split - seen.gso_split)
                if whole:
                    assert moved[0] > 0 and moved[1] == 0, (b_mtu, moved)
                else:
                    assert moved[0] == 0 and moved[1] > 0, (b_mtu, moved)
                seen = now
    finally:
        pair.close()

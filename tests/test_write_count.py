"""What a device's write count means: these first packets were handled, and no later one was sent.

A coalesced write sends a batch flow by flow, so a kernel write that fails
may come after a later packet of the batch already went out. The count must
then cover that packet, or the caller's retry of ``bufs[count:]`` (what
``write_all`` and a Forwarder do) sends it twice. The failure is injected
where the device makes its system calls (the one loop of ``_Descriptor``);
every datagram is counted where the kernel delivers it, on a UDP socket.
"""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import errno
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from netns_util import NativeHarness, netns_factory, ns_socket, root  # noqa: F401
from packets import GSO_UDP_L4, UDP, Flow, vnet

from tunkit._linux.constants import TUN_F_USO4
from tunkit._linux.gso_device import _REFUSED_UDP, GsoNativeTun
from tunkit._offload import _impl as tk_impl
from tunkit._write import write_all

MakeNs = Callable[[str], str]
PORT = 7000


class _FailingWrites:
    """Stands in for a device's descriptor: the writes numbered in *fail* (1 = the first
    write system call from now on) fail with ENOBUFS; everything else is the real one."""

    def __init__(self, inner: object, fail: set[int]) -> None:
        self._inner = inner
        self.fail = fail
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def call_locked(self, call: Any, arg: Any, direction: str, block: bool = True) -> int:
        if direction == "write":
            self.writes += 1
            if self.writes in self.fail:
                raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        return int(self._inner.call_locked(call, arg, direction, block))  # type: ignore[attr-defined]


ENGINES = [
    pytest.param(tk_impl.PURE, id="pure"),
    pytest.param(
        tk_impl.NATIVE,
        id="native",
        marks=[] if tk_impl.NATIVE else [pytest.mark.skip(reason=f"no C: {tk_impl.REASON}")],
    ),
]


@pytest.fixture
def device(netns_factory: MakeNs) -> Iterator[tuple[NativeHarness, socket.socket]]:
    """An offload device (USO on) and a UDP socket at its address that counts what arrives."""
    h = NativeHarness(netns_factory("count"), offload=True)
    sock = ns_socket(h.ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert h.tun.offload_flags & TUN_F_USO4, "the kernel refused USO: no UDP coalescing"
        sock.bind((h.LOCAL, PORT))
        sock.settimeout(0.5)
        yield h, sock
    finally:
        sock.close()
        h.close()


def _arrived(sock: socket.socket) -> Counter[bytes]:
    got: Counter[bytes] = Counter()
    while True:
        try:
            got[sock.recv(70000)] += 1
        except TimeoutError:
            return got


def _flow(h: NativeHarness, sport: int) -> Flow:
    return Flow(proto=UDP, src=h.PEER, dst=h.LOCAL, sport=sport, dport=PORT)


def _framed(packets: Sequence[bytes]) -> list[bytes]:
    return [bytes(16) + p for p in packets]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("apart", [False, True], ids=["coalesced", "one-by-one"])
def test_a_failed_write_is_never_followed_by_a_duplicate(
    device: tuple[NativeHarness, socket.socket], engine: tk_impl.Engine, apart: bool
) -> None:
    """Batch [A1, B1, A2, A3]: flow A goes out first (A1..A3, one super-packet, or one
    by one if UDP super-packets were refused meanwhile), then B1 fails. The count is 4,
    B1 is dropped and counted, the next write raises ENOBUFS; write_all retries nothing."""
    h, sock = device
    tun = h.tun
    assert isinstance(tun, GsoNativeTun)
    tun._coalescer = engine.Coalescer(tcp=True, udp=True)
    if apart:
        # Refused earlier in the batch, as the coalescer planned it: written one by one.
        tun._refused |= _REFUSED_UDP
    a, b = _flow(h, 5000), _flow(h, 5001)
    a_packets = [a.packet(bytes([i]) * 400, ip_id=100 + i) for i in range(3)]
    b1 = b.packet(b"B" * 400, ip_id=7)
    batch = _framed([a_packets[0], b1, a_packets[1], a_packets[2]])
    # Flow A is one kernel write (coalesced) or three: B1's is the next one.
    failing = _FailingWrites(tun._fd, {2 if not apart else 4})
    tun._fd = failing  # type: ignore[assignment]
    before = tun.stats()
    write_all(tun, batch, 16)  # returns: every packet was handled
    assert _arrived(sock) == Counter({p[28:]: 1 for p in a_packets})  # each once, B1 not
    assert tun.stats().dropped_write - before.dropped_write == 1  # B1
    with pytest.raises(OSError) as kept:
        tun.write(_framed([b1]))
    assert kept.value.errno == errno.ENOBUFS
    assert tun.write(_framed([b1])) == 1  # and then it goes
    assert _arrived(sock) == Counter({b1[28:]: 1})


@pytest.mark.timeout(30)
def test_a_super_packet_cut_short_in_its_split_is_handled_once(
    device: tuple[NativeHarness, socket.socket],
) -> None:
    """write_gso of a super-packet of a refused kind: split, and its second segment's
    write fails. It counts as handled (its first segment went out), the rest is dropped
    and counted, the error is the next call's; no segment arrives twice."""
    h, sock = device
    tun = h.tun
    assert isinstance(tun, GsoNativeTun)
    tun._refuse(GSO_UDP_L4, True, errno.EINVAL)  # as after the kernel refused one: split first
    flow = _flow(h, 5002)
    datagrams = [bytes([i]) * 300 for i in range(4)]
    whole = flow.packet(b"".join(datagrams), ip_id=40)
    header = vnet(0, GSO_UDP_L4, 28, 300)
    second = flow.packet(b"S" * 100, ip_id=50)
    batch = [bytes(6) + header + whole, bytes(16) + second]
    failing = _FailingWrites(tun._fd, {2})
    tun._fd = failing  # type: ignore[assignment]
    before = tun.stats()
    assert tun.write_gso(batch) == 1  # [0] handled (in part); [1] not sent
    assert tun.stats().dropped_write - before.dropped_write == 3
    with pytest.raises(OSError) as kept:
        tun.write_gso(batch[1:])
    assert kept.value.errno == errno.ENOBUFS
    assert tun.write_gso(batch[1:]) == 1
    assert _arrived(sock) == Counter({datagrams[0]: 1, b"S" * 100: 1})

"""NativeTun.offload_state(), as root in namespaces: what was asked, accepted, and turned off.

The kernel's refusals come from the device's fault seam (``_fail_gso``: the
next coalesced writes of a kind fail with EINVAL, in Python and in PacketIo
alike), on real devices carrying real traffic: TCP checked end to end with
SHA-256, UDP datagram by datagram. The kind refused must be turned off once,
with its errno and reason, its traffic split and nothing lost; the other
kind must stay on.
"""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from netns_util import (  # noqa: F401
    Pair,
    io_path,
    netns_factory,
    ns_socket,
    root,
    tcp_transfer,
)
from packets import payload_bytes

import tunkit
from tunkit import OffloadKind, OffloadOff, OffloadState
from tunkit._linux import gso_device
from tunkit._linux.device import NativeTun, create_tun
from tunkit._linux.gso_device import _REFUSED_TCP, _REFUSED_UDP, GsoNativeTun
from tunkit._linux.ioctl import get_vnet_hdr_sz, set_vnet_hdr_sz

MakeNs = Callable[[str], str]
UDP_SEGMENT = 103  # <linux/udp.h>: the socket option of UDP GSO
SOL_UDP = 17
ALL = frozenset(OffloadKind)


def _gso(tun: NativeTun) -> GsoNativeTun:
    assert isinstance(tun, GsoNativeTun), tun
    return tun


@pytest.fixture
def make_pair(netns_factory: MakeNs) -> Iterator[Callable[..., Pair]]:
    pairs: list[Pair] = []

    def make(**kw: Any) -> Pair:
        p = Pair(netns_factory("sa"), netns_factory("sb"), **kw)
        pairs.append(p)
        return p

    try:
        yield make
    finally:
        for p in pairs:
            p.close()


def _send_udp_gso(pair: Pair, datagrams: Sequence[bytes], gso_size: int) -> None:
    """Send *datagrams* from ``ns_a`` as one UDP_SEGMENT send to ``b``; check each arrives."""
    receiver = ns_socket(pair.ns_b, socket.AF_INET, socket.SOCK_DGRAM)
    sender = ns_socket(pair.ns_a, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind((pair.B4, 9100))
        sender.bind((pair.A4, 0))
        receiver.settimeout(5)
        sender.setsockopt(SOL_UDP, UDP_SEGMENT, gso_size)
        sender.sendto(b"".join(datagrams), (pair.B4, 9100))
        got = [receiver.recvfrom(70000)[0] for _ in datagrams]
        assert got == list(datagrams)
    finally:
        receiver.close()
        sender.close()


def _settle(tun: NativeTun, kinds: int) -> OffloadState:
    """offload_state() once *kinds* kinds are off (the copy thread may still be in that write)."""
    deadline = time.monotonic() + 5
    state = tun.offload_state()
    while len(state.off) < kinds and time.monotonic() < deadline:
        time.sleep(0.01)
        state = tun.offload_state()
    return state


# -- a fresh device ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_fresh_device_has_what_it_asked_for_and_nothing_off(netns_factory: MakeNs) -> None:
    with create_tun(netns=netns_factory("fresh")) as tun:
        state = tun.offload_state()
    # Linux 6.2 and later accept USO; everything tunkit asks for is then taken.
    assert state.requested == ALL
    assert state.accepted == state.requested
    assert state.active == ALL
    assert state.off == ()
    assert str(state).splitlines() == [
        "requested: checksum, tcp, udp",
        "accepted:  checksum, tcp, udp",
        "active:    checksum, tcp, udp",
    ]


@pytest.mark.timeout(30)
def test_a_device_without_offload_asks_for_none(netns_factory: MakeNs) -> None:
    with create_tun(netns=netns_factory("plain"), offload=False) as tun:
        state = tun.offload_state()
    assert state == OffloadState(frozenset(), frozenset(), ())
    assert "requested: none" in str(state)


# -- the kernel refuses a kind: it is turned off, the traffic goes on ----------------------


def _check_off(state: OffloadState, kind: OffloadKind, whole: bool, before: float) -> OffloadOff:
    assert [o.kind for o in state.off] == [kind], state
    off = state.off[0]
    proto = "TCP" if kind is OffloadKind.TCP else "UDP"
    what = f"a {proto} super-packet (write_gso)" if whole else f"a coalesced {proto} write"
    assert off.errno == errno.EINVAL
    assert off.reason == f"the kernel refused {what}: EINVAL (Invalid argument)"
    assert before <= off.when <= time.time()
    assert state.active == ALL - {kind}
    assert state.accepted == ALL  # what the kernel took at first stays as it was
    assert f"{kind.value} off since " in str(state)
    return off


@pytest.mark.timeout(120)
@pytest.mark.parametrize("passthrough", [False, True], ids=["coalesced", "whole"])
def test_refused_tcp_is_turned_off_and_every_byte_arrives(
    make_pair: Callable[..., Pair], passthrough: bool, io_path: str
) -> None:
    pair = make_pair()
    b = _gso(pair.b)
    before = time.time()
    b._fail_gso(_REFUSED_TCP, 1_000_000)  # every TCP super-packet, as a kernel without TSO
    pair.start_copy(passthrough=passthrough)
    tcp_transfer(pair, 16 << 20)
    datagrams = [payload_bytes(1000, seed=i) for i in range(20)]
    _send_udp_gso(pair, datagrams, 1000)
    state = _settle(pair.b, 1)
    _check_off(state, OffloadKind.TCP, passthrough, before)
    stats = pair.settled_stats()[1]
    assert stats.dropped_write == 0
    assert stats.gro_refused == 1  # once: then TCP is split before it is written
    assert not b._coalescer.tcp and b._coalescer.udp
    # UDP stayed whole: super-packets went into b's kernel.
    if passthrough:
        assert stats.gso_written > 0
    else:
        assert stats.gro_coalesced >= len(datagrams)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("passthrough", [False, True], ids=["coalesced", "whole"])
def test_refused_udp_is_turned_off_and_tcp_stays_on(
    make_pair: Callable[..., Pair], passthrough: bool, io_path: str
) -> None:
    pair = make_pair()
    b = _gso(pair.b)
    before = time.time()
    b._fail_gso(_REFUSED_UDP, 1_000_000)
    pair.start_copy(passthrough=passthrough)
    datagrams = [payload_bytes(1000, seed=i) for i in range(30)]
    _send_udp_gso(pair, datagrams, 1000)
    _send_udp_gso(pair, datagrams, 1000)  # after the refusal: split first, still all there
    tcp_transfer(pair, 16 << 20)
    state = _settle(pair.b, 1)
    _check_off(state, OffloadKind.UDP, passthrough, before)
    stats = pair.settled_stats()[1]
    assert stats.dropped_write == 0 and stats.gro_refused == 1
    assert b._coalescer.tcp and not b._coalescer.udp
    if passthrough:
        assert stats.gso_written > 0  # TCP super-packets still go in whole
    else:
        assert stats.gro_coalesced > 0


@pytest.mark.timeout(120)
def test_both_kinds_refused_are_listed_once_each(
    make_pair: Callable[..., Pair], io_path: str
) -> None:
    pair = make_pair()
    b = _gso(pair.b)
    b._fail_gso(_REFUSED_TCP | _REFUSED_UDP, 1_000_000)
    pair.start_copy(passthrough=True)
    for _ in range(2):
        tcp_transfer(pair, 4 << 20)
        _send_udp_gso(pair, [payload_bytes(1000, seed=i) for i in range(10)], 1000)
    state = _settle(pair.b, 2)
    assert sorted(o.kind.value for o in state.off) == ["tcp", "udp"]
    assert all(o.errno == errno.EINVAL for o in state.off)
    assert state.active == {OffloadKind.CHECKSUM}
    assert pair.b.stats().dropped_write == 0


# -- the attach check ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_the_attach_check_sets_a_wrong_header_size_back(netns_factory: MakeNs) -> None:
    """Another queue of the device (they share the header) set it to 12: set back to 10."""
    ns = netns_factory("mq")
    with (
        create_tun("tkmq0", netns=ns, multi_queue=True) as first,
        tunkit.attach_tun("tkmq0", netns=ns) as second,
    ):
        set_vnet_hdr_sz(second.fileno(), 12)
        assert get_vnet_hdr_sz(first.fileno()) == 12
        _gso(first)._check_attach()
        assert get_vnet_hdr_sz(first.fileno()) == 10
        assert first.offload_state().off == ()
        assert second.offload_state().off == ()


@pytest.mark.timeout(30)
def test_the_attach_check_turns_offload_off_when_the_size_does_not_hold(
    netns_factory: MakeNs, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = netns_factory("hold")
    with (
        create_tun("tkhold0", netns=ns, multi_queue=True) as first,
        tunkit.attach_tun("tkhold0", netns=ns) as second,
    ):
        set_vnet_hdr_sz(second.fileno(), 12)
        # A kernel that ignores TUNSETVNETHDRSZ (the setter does nothing here).
        monkeypatch.setattr(gso_device, "set_vnet_hdr_sz", lambda fd, size: None)
        _gso(first)._check_attach()
        state = first.offload_state()
        assert [o.kind for o in state.off] == [OffloadKind.TCP, OffloadKind.UDP]
        assert all(o.errno is None for o in state.off)
        assert state.off[0].reason == (
            "TUNGETVNETHDRSZ reads back 12 bytes on attach, not 10, and setting it did not hold"
        )
        gso = _gso(first)
        assert not gso._coalescer.tcp and not gso._coalescer.udp


@pytest.mark.timeout(30)
def test_attaching_with_offload_to_a_persistent_device_made_without_it(
    netns_factory: MakeNs,
) -> None:
    """Made without the virtio header (and a 12-byte size left by its last owner), attached with
    it: the attach check reads back IFF_VNET_HDR and 10 bytes, and nothing is off."""
    ns = netns_factory("persist")
    with create_tun("tkpst0", netns=ns, persist=True, offload=False) as made:
        set_vnet_hdr_sz(made.fileno(), 12)  # kept by the device, not the descriptor
    try:
        with tunkit.attach_tun("tkpst0", netns=ns, offload=True) as tun:
            assert tun.offload
            assert get_vnet_hdr_sz(tun.fileno()) == 10
            state = tun.offload_state()
            assert state.requested == state.accepted == ALL
            assert state.off == ()
    finally:
        tunkit.delete_tun("tkpst0", netns=ns)

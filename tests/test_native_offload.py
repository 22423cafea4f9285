"""NativeTun with offload, as root in namespaces: split, coalesce, super-packets whole, fallbacks.

The offload engine has its own unit tests (test_offload_*.py); these check
the device around it: what the kernel is asked for, that real TCP and UDP GSO
traffic crosses two devices intact whichever way it is carried, that the
counters show the offload at work, that a kernel refusing super-packets
costs nothing but speed, and that garbage from the kernel is dropped and
counted without stopping the device.
"""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns_util import (  # noqa: F401
    NativeHarness,
    Pair,
    io_path,
    netns_factory,
    ns_socket,
    root,
    tcp_transfer,
)
from packets import ACK, GSO_NONE, GSO_TCPV4, GSO_UDP_L4, PSH, TCP, UDP, Flow, payload_bytes, vnet

from tunkit import ClosedError, GsoTun, OffsetError, TooManySegmentsError
from tunkit._linux import netns as tk_netns
from tunkit._linux.constants import (
    IFF_NO_PI,
    IFF_TUN,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
    TUNSETIFF,
    TUNSETOFFLOAD,
)
from tunkit._linux.device import NativeTun, create_tun, open_tun
from tunkit._linux.gso_device import GsoNativeTun
from tunkit._offload import _impl as tk_impl
from tunkit._offload import _Malformed, _TooBig, split
from tunkit._offload.vnet import gso_segments

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MakeNs = Callable[[str], str]
UDP_SEGMENT = 103  # <linux/udp.h>: the socket option of UDP GSO
SOL_UDP = 17


def _gso(tun: NativeTun) -> GsoNativeTun:
    assert isinstance(tun, GsoNativeTun), tun
    return tun


# -- what the kernel is asked for ----------------------------------------------------


@pytest.mark.timeout(30)
def test_offload_device_asks_for_tso_and_uso(netns_factory: MakeNs) -> None:
    with create_tun(netns=netns_factory("flags")) as tun:
        gso = _gso(tun)
        assert isinstance(tun, GsoTun)
        base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        assert tun.offload_flags & base == base
        uso = tun.offload_flags & (TUN_F_USO4 | TUN_F_USO6) == TUN_F_USO4 | TUN_F_USO6
        release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
        if release >= (6, 2):  # USO on TUN came with Linux 6.2
            assert uso
        assert gso._coalescer.tcp and gso._coalescer.udp == uso
        assert tun.batch_size() == 128 and tun.mwo() == tun.mro() == 16


@pytest.mark.timeout(30)
def test_offload_argument_checks(netns_factory: MakeNs) -> None:
    with create_tun(netns=netns_factory("gargs")) as tun:
        gso = _gso(tun)
        with pytest.raises(ValueError, match="batch_size"):
            tun.read([bytearray(2000)], [0], 16)
        with pytest.raises(OffsetError, match="below mro"):
            gso.read_gso([bytearray(2000)], [0], 15)
        with pytest.raises(OffsetError, match="below mwo"):
            gso.write_gso([bytes(2000)], 15)
        with pytest.raises(ValueError, match="0 buffers"):
            gso.read_gso([], [], 16)
        with pytest.raises(ValueError, match="sizes"):
            gso.read_gso([bytearray(2000)], [], 16)


# -- real traffic --------------------------------------------------------------------


@pytest.fixture
def make_pair(netns_factory: MakeNs) -> Iterator[Callable[..., Pair]]:
    pairs: list[Pair] = []

    def make(**kw: Any) -> Pair:
        p = Pair(netns_factory("oa"), netns_factory("ob"), **kw)
        pairs.append(p)
        return p

    try:
        yield make
    finally:
        for p in pairs:
            p.close()


@pytest.mark.timeout(120)
def test_tcp_200_mb_split_on_read_and_coalesced_on_write(make_pair: Callable[..., Pair]) -> None:
    """Through read/write (passthrough off): every super-packet is split, and merged again."""
    pair = make_pair()
    pair.start_copy(passthrough=False)
    size = 200 << 20
    tcp_transfer(pair, size)
    a, b = pair.settled_stats()
    assert a.gso_split > 0, a  # the sender's kernel handed over super-packets (TSO)
    assert b.gro_coalesced > 0, b  # and they went into b's kernel merged again (GRO)
    assert a.bytes_read > size and b.bytes_written > size
    assert a.dropped_malformed == a.dropped_too_big == b.dropped_write == 0
    assert a.gso_read == b.gso_written == 0  # read_gso/write_gso were not used


@pytest.mark.timeout(120)
def test_small_mtu_super_packets_fit_a_batch(make_pair: Callable[..., Pair]) -> None:
    """At MTU 400 a 64 KB super-packet would be ~180 segments, more than batch_size().

    The device caps the kernel's super-packets at 128 segments (gso_max_segs),
    so read() splits every one into its 128 buffers: nothing dropped.
    """
    pair = make_pair()
    for tun, ns in ((pair.a, pair.ns_a), (pair.b, pair.ns_b)):
        tun.set_mtu(400)  # after the IPv6 addresses, which need 1280: IPv4 only now
        link = subprocess.run(
            ["ip", "-n", ns, "-d", "link", "show", tun.name()],
            capture_output=True, text=True, check=True,
        ).stdout
        assert "gso_max_segs 128 " in link, link
    pair.start_copy(passthrough=False)
    size = 16 << 20
    tcp_transfer(pair, size)
    a, b = pair.settled_stats()
    assert a.gso_split > 0, a  # super-packets came, and were split
    assert a.dropped_too_big == a.dropped_malformed == b.dropped_write == 0, (a, b)


def _gso_loop(src: GsoNativeTun, dst: GsoNativeTun) -> None:
    """The plainest pass-through loop: read_gso from one, write_gso the same buffers on."""
    bufs = [bytearray(16 + 65535) for _ in range(8)]
    views = [memoryview(b) for b in bufs]
    sizes = [0] * len(bufs)
    while True:
        n = src.read_gso(bufs, sizes, 16)
        done = 0
        while done < n:
            done += dst.write_gso([views[i][: 16 + sizes[i]] for i in range(done, n)], 16)


def _gso_copy(a: NativeTun, b: NativeTun) -> None:
    """Both directions of :func:`_gso_loop`; returns when either device closes."""
    ga, gb = _gso(a), _gso(b)
    errors: list[BaseException] = []

    def run(src: GsoNativeTun, dst: GsoNativeTun) -> None:
        try:
            _gso_loop(src, dst)
        except OSError as exc:  # ClosedError included: the test closed the pair
            if not (src.closed or dst.closed):
                errors.append(exc)
        finally:
            a.close()
            b.close()

    other = threading.Thread(target=run, args=(gb, ga), name="test-gso-copy")
    other.start()
    run(ga, gb)
    other.join()
    if errors:
        raise errors[0]


@pytest.mark.timeout(120)
def test_tcp_through_read_gso_and_write_gso(make_pair: Callable[..., Pair], io_path: str) -> None:
    pair = make_pair()
    pair.start_copy(loop=_gso_copy)
    size = 64 << 20
    tcp_transfer(pair, size)
    a, b = pair.settled_stats()
    assert a.gso_read > 0 and b.gso_written > 0  # super-packets crossed whole
    assert a.gso_split == 0 and b.gro_coalesced == 0  # nothing split or merged by tunkit
    assert a.bytes_read > size and b.bytes_written > size
    assert a.dropped_malformed == a.dropped_too_big == b.dropped_write == 0


def _send_udp_gso(pair: Pair, version: int, datagrams: Sequence[bytes], gso_size: int) -> None:
    """Send *datagrams* (all *gso_size* long but the last) as one UDP_SEGMENT send; check them."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    src, dst = (pair.A4, pair.B4) if version == 4 else (pair.A6, pair.B6)
    receiver = ns_socket(pair.ns_b, family, socket.SOCK_DGRAM)
    sender = ns_socket(pair.ns_a, family, socket.SOCK_DGRAM)
    try:
        receiver.bind((dst, 9100))
        sender.bind((src, 0))
        # Right after the link comes up an IPv6 address may not be local yet
        # (addrconf finishes on a workqueue): probe until one datagram arrives.
        receiver.settimeout(0.2)
        for _ in range(25):
            sender.sendto(b"probe", (dst, 9100))
            try:
                if receiver.recvfrom(100)[0] == b"probe":
                    break
            except TimeoutError:
                continue
        receiver.settimeout(5)
        sender.setsockopt(SOL_UDP, UDP_SEGMENT, gso_size)
        sender.sendto(b"".join(datagrams), (dst, 9100))
        got = []
        for _ in datagrams:
            data, peer = receiver.recvfrom(70000)
            assert peer[0] == src
            got.append(data)
        assert got == list(datagrams)
    finally:
        receiver.close()
        sender.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("offload", "passthrough"),
    [(True, False), (True, True), (False, False)],
    ids=["split", "whole", "plain"],
)
@pytest.mark.parametrize("version", [4, 6])
def test_udp_gso_from_a_socket_arrives_as_its_datagrams(
    make_pair: Callable[..., Pair], offload: bool, passthrough: bool, version: int, io_path: str
) -> None:
    pair = make_pair(offload=offload)
    pair.start_copy(passthrough=passthrough)
    for round_, (count, gso_size, last) in enumerate([(10, 1000, 1000), (40, 1200, 77), (2, 8, 3)]):
        datagrams = [payload_bytes(gso_size, seed=round_ * 64 + i) for i in range(count - 1)]
        datagrams.append(payload_bytes(last, seed=99))
        _send_udp_gso(pair, version, datagrams, gso_size)
    a, b = pair.settled_stats()
    if offload and passthrough:
        assert a.gso_read >= 3 and b.gso_written >= 3, (a, b)
    elif offload:
        assert a.gso_split >= 3, a  # USO super-packets from the sender's kernel, split
        assert b.gro_coalesced >= 40, b  # and merged again on write (UDP GRO)
    else:
        assert a.gso_split == b.gro_coalesced == 0
        assert a.packets_read >= 52  # the sender's kernel split them in software
    assert a.dropped_malformed == a.dropped_too_big == b.dropped_write == 0


# -- a kernel that refuses super-packets ---------------------------------------------


class _Refusing:
    """Stands in for a device's descriptor: refuses super-packet writes with EINVAL.

    As a kernel without USO (or with a stricter check) would; everything
    else goes to the real descriptor.
    """

    def __init__(self, inner: object, kinds: set[int]) -> None:
        self._inner = inner
        self.kinds = kinds
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _check(self, first: ReadableBuffer) -> None:
        view = memoryview(first).cast("B")
        if len(view) >= 10 and view[1] & 0x7F in self.kinds:
            self.refused += 1
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def call_locked(self, call: Any, arg: Any, direction: str, block: bool = True) -> int:
        if direction == "write":
            self._check(arg if call is os.write else arg[0])
        return int(self._inner.call_locked(call, arg, direction, block))  # type: ignore[attr-defined]


class _RefusingIo:
    """The same for the C calls (PacketIo): write_gso stops at a packet it would refuse."""

    def __init__(self, inner: Any, refusing: _Refusing) -> None:
        self._inner = inner
        self._refusing = refusing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write_gso(self, bufs: Sequence[ReadableBuffer], at: int, refused: int) -> tuple[int, int]:
        for i, buf in enumerate(bufs):
            view = memoryview(buf).cast("B")[at:]
            kind = view[1] & 0x7F if len(view) >= 10 else GSO_NONE
            if kind not in self._refusing.kinds or refused & (2 if kind == GSO_UDP_L4 else 1):
                continue
            n, err = self._inner.write_gso(bufs[:i], at, refused)
            if err or n < i:
                return n, err
            self._refusing.refused += 1
            return i, -errno.EINVAL
        return self._inner.write_gso(bufs, at, refused)  # type: ignore[no-any-return]


def _refuse(tun: NativeTun, kinds: set[int]) -> _Refusing:
    refusing = _Refusing(tun._fd, kinds)
    tun._fd = refusing  # type: ignore[assignment]
    if tun._io is not None:
        tun._io = _RefusingIo(tun._io, refusing)  # type: ignore[assignment]
    return refusing


@pytest.mark.timeout(90)
@pytest.mark.parametrize("passthrough", [False, True], ids=["coalesced", "whole"])
def test_refused_super_packets_are_split_and_nothing_is_lost(
    make_pair: Callable[..., Pair], passthrough: bool, io_path: str
) -> None:
    pair = make_pair()
    refusing = _refuse(pair.b, {GSO_TCPV4, GSO_UDP_L4})
    gso_b = _gso(pair.b)
    pair.start_copy(passthrough=passthrough)
    tcp_transfer(pair, 16 << 20)
    datagrams = [payload_bytes(1000, seed=i) for i in range(20)]
    _send_udp_gso(pair, 4, datagrams, 1000)
    # The receiver may have every datagram before the copy thread, still in the
    # write that carried them, has counted the refusal: let it finish.
    deadline = time.monotonic() + 5
    while pair.b.stats().gro_refused != refusing.refused and time.monotonic() < deadline:
        time.sleep(0.01)
    b = pair.b.stats()
    assert refusing.refused >= 2 and b.gro_refused == refusing.refused  # TCP and UDP, once each
    assert b.gro_refused <= 2  # then that kind is not offered again
    assert not gso_b._coalescer.tcp and not gso_b._coalescer.udp
    assert b.dropped_write == 0
    if passthrough:
        assert b.gso_written == 0 and pair.a.stats().gso_read > 0
    assert b.bytes_written > 16 << 20


@pytest.mark.timeout(30)
def test_refused_coalesced_batch_is_written_one_by_one(netns_factory: MakeNs) -> None:
    h = NativeHarness(netns_factory("refuse"), offload=True)
    try:
        refusing = _refuse(h.tun, {GSO_TCPV4})
        flow = Flow(src=h.PEER, dst=h.LOCAL, dport=9, sport=43000)
        segs = flow.segments(payload_bytes(5000), 1000, seq=7, flags=ACK | PSH)
        lone = h.packet(1, 300)
        batch = [bytes(16) + p for p in [*segs, lone]]
        assert h.tun.write(batch) == len(batch)
        assert refusing.refused == 1
        got = h.collect(len(batch), timeout=5)
        assert sorted(got) == sorted([*segs, lone])
        stats = h.tun.stats()
        assert stats.gro_refused == 1 and stats.gro_coalesced == 0
        assert stats.packets_written == len(batch) and stats.dropped_write == 0
        # From now on TCP is written packet by packet without asking the kernel.
        assert h.tun.write(batch) == len(batch)
        assert refusing.refused == 1
        assert sorted(h.collect(len(batch), timeout=5)) == sorted([*segs, lone])
    finally:
        h.close()


@pytest.mark.timeout(30)
def test_write_gso_splits_what_the_kernel_refuses(netns_factory: MakeNs, io_path: str) -> None:
    h = NativeHarness(netns_factory("wgso"), offload=True)
    try:
        gso = _gso(h.tun)
        refusing = _refuse(h.tun, {GSO_UDP_L4})
        flow = Flow(proto=UDP, src=h.PEER, dst=h.LOCAL, sport=43001, dport=9)
        payload = payload_bytes(3500)
        superpkt = flow.super_packet(payload, 1000)
        expected = flow.segments(payload, 1000)
        single = vnet() + h.packet(2, 200)
        assert gso.write_gso([bytes(6) + superpkt, bytes(6) + single]) == 2
        got = h.collect(len(expected) + 1, timeout=5)
        assert sorted(got) == sorted([*expected, single[10:]])
        stats = h.tun.stats()
        assert refusing.refused == 1 and stats.gro_refused == 1
        assert stats.packets_written == len(expected) + 1 and stats.dropped_write == 0
        # UDP is split first from now on; any Sequence will do for the batch.
        assert gso.write_gso(deque([bytes(6) + superpkt, bytes(6) + single])) == 2
        got = h.collect(len(expected) + 1, timeout=5)
        assert sorted(got) == sorted([*expected, single[10:]])
        assert refusing.refused == 1 and h.tun.stats().gro_refused == 1
        # A malformed super-packet that the kernel refuses cannot be split: dropped, counted.
        bad = bytearray(superpkt)
        bad[10] = 0x75  # IP version 7
        assert gso.write_gso([bytes(6) + bytes(bad)]) == 1
        assert h.tun.stats().dropped_write == 1
    finally:
        h.close()


# -- garbage from the kernel ---------------------------------------------------------

_FLOWS = [
    Flow(),
    Flow.v6(),
    Flow(proto=UDP),
    Flow.v6(UDP),
    Flow(tcp_options=b"\x01\x01\x08\x0a" + bytes(8)),
]


@st.composite
def kernel_reads(draw: st.DrawFn) -> bytes:
    """What a read of the device might return: real (super-)packets, damaged or not, or noise."""
    kind = draw(st.sampled_from(["valid", "damaged", "header", "noise"]))
    if kind == "noise":
        return draw(st.binary(max_size=200))
    flow = draw(st.sampled_from(_FLOWS))
    payload = payload_bytes(draw(st.integers(0, 6000)))
    gso_size = draw(st.integers(1, 1400))
    data = bytearray(
        flow.super_packet(payload, gso_size, seq=draw(st.integers(0, 2**32 - 1)))
        if payload
        else vnet() + flow.packet(b"")
    )
    if kind == "damaged":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, min(len(data) - 1, 120)))
            data[at] = draw(st.integers(0, 255))
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "header":
        data[:10] = vnet(
            draw(st.integers(0, 3)),
            draw(st.sampled_from([GSO_NONE, 1, 3, 4, 5, 0x81, 0x85, 2, 0x7F])),
            draw(st.integers(0, 0xFFFF)),
            draw(st.integers(0, 0xFFFF)),
            draw(st.integers(0, 0xFFFF)),
            draw(st.integers(0, 0xFFFF)),
        )
    return bytes(data)


@pytest.fixture
def offload_device(netns_factory: MakeNs) -> Iterator[GsoNativeTun]:
    with create_tun(netns=netns_factory("garbage")) as tun:
        yield _gso(tun)


@pytest.mark.timeout(120)
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=kernel_reads())
def test_garbage_from_the_kernel_is_dropped_and_counted(
    offload_device: GsoNativeTun, data: bytes
) -> None:
    tun = offload_device
    bufs = [bytearray(16 + 1500) for _ in range(128)]
    sizes = [-1] * 128
    before = tun.stats()
    try:
        n = tun._handle_kernel_packet(memoryview(data), bufs, sizes, 16)
    except (TooManySegmentsError, _TooBig):
        assert tun.stats() == before  # nothing stored, nothing counted: read() decides
        return
    after = tun.stats()
    assert after.dropped_too_big == before.dropped_too_big
    drops = after.dropped_malformed - before.dropped_malformed
    if n == 0:
        assert drops == 1
        assert after.packets_read == before.packets_read
    else:
        assert drops == 0
        assert after.packets_read == before.packets_read + n
        assert all(0 < sizes[i] <= 1500 for i in range(n))
        assert sizes[n:] == [-1] * (128 - n)


@pytest.mark.timeout(60)
def test_a_device_that_dropped_garbage_still_reads(netns_factory: MakeNs) -> None:
    h = NativeHarness(netns_factory("still"), offload=True)
    try:
        tun = _gso(h.tun)
        bufs = [bytearray(16 + 1500) for _ in range(128)]
        sizes = [0] * 128
        for junk in (
            b"",
            bytes(5),
            vnet(0, 0x7F) + bytes(40),
            vnet(0, GSO_TCPV4, 0, 0) + bytes(60),
        ):
            assert tun._handle_kernel_packet(memoryview(junk), bufs, sizes, 16) == 0
        # A super-packet of more segments than buffers: dropped by read() and counted.
        flow = Flow()
        with pytest.raises(TooManySegmentsError):
            tun._handle_kernel_packet(
                memoryview(flow.super_packet(payload_bytes(200 * 8), 8)), bufs, sizes, 16
            )
        assert tun.stats().dropped_malformed == 4
        packets = [h.packet(i, 100 + i) for i in range(3)]
        h.inject(packets)
        got: list[bytes] = []
        while len(got) < 3:
            n = tun.read(bufs, sizes)
            got += [bytes(bufs[i][16 : 16 + sizes[i]]) for i in range(n)]
        assert got == packets
    finally:
        h.close()


# -- read(): several kernel packets per call, one kept for the next ---------------------


class _Scripted:
    """Stands in for a device's descriptor on the read side: returns scripted kernel reads."""

    def __init__(self, inner: object, reads: list[bytes | OSError]) -> None:
        self._inner = inner
        self.reads = reads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def call_locked(
        self, _call: Any, bufs: Sequence[Any], direction: str, block: bool = True
    ) -> int:
        assert direction == "read"
        if not self.reads:
            assert not block, "a blocking read with nothing scripted"
            return -1
        item = self.reads.pop(0)
        if isinstance(item, OSError):
            raise item
        memoryview(bufs[0])[: len(item)] = item
        return len(item)


@pytest.mark.timeout(30)
def test_read_takes_what_is_waiting_and_keeps_the_rest(offload_device: GsoNativeTun) -> None:
    tun = offload_device
    flow = Flow()
    big = flow.super_packet(payload_bytes(100 * 100), 100)  # 100 segments
    small = [vnet() + flow.packet(payload_bytes(50, seed=i), seq=i) for i in range(3)]
    failure = OSError(errno.EIO, "scripted")
    tun._fd = _Scripted(tun._fd, [small[0], small[1], big, small[2], failure])  # type: ignore[assignment]
    bufs = [bytearray(16 + 1500) for _ in range(128)]
    sizes = [0] * 128
    # One call takes all four kernel reads (1 + 1 + 100 + 1 packets), and
    # keeps the error that came after them for the next call.
    assert tun.read(bufs, sizes) == 103
    got = [bytes(bufs[i][16 : 16 + sizes[i]]) for i in range(103)]
    assert got == [
        small[0][10:],
        small[1][10:],
        *flow.segments(payload_bytes(100 * 100), 100),
        small[2][10:],
    ]
    with pytest.raises(OSError, match="scripted"):
        tun.read(bufs, sizes)
    stats = tun.stats()
    assert stats.gso_split == 1 and stats.packets_read == 103


@pytest.mark.timeout(30)
def test_read_keeps_a_super_packet_that_does_not_fit_the_rest(
    offload_device: GsoNativeTun,
) -> None:
    tun = offload_device
    flow = Flow()
    big = flow.super_packet(payload_bytes(100 * 100), 100)  # 100 segments
    tun._fd = _Scripted(tun._fd, [big, big])  # type: ignore[assignment]
    bufs = [bytearray(16 + 1500) for _ in range(128)]
    sizes = [0] * 128
    expected = flow.segments(payload_bytes(100 * 100), 100)
    for _ in range(2):  # 100 + 100 > 128: the second waits for the next call, whole
        assert tun.read(bufs, sizes) == 100
        assert [bytes(bufs[i][16 : 16 + sizes[i]]) for i in range(100)] == expected
    assert tun.stats().dropped_too_big == 0


@pytest.mark.timeout(30)
def test_read_keeps_a_packet_too_big_for_the_rest_for_the_first_buffer(
    offload_device: GsoNativeTun,
) -> None:
    """A packet of a grown MTU behind another: the next call stores it in its larger first buffer.

    As ``copy`` and ``Forwarder`` read: a first buffer of 64 KB, the others of the
    old MTU. Dropping it would lose packets until the loop saw the new MTU.
    """
    tun = offload_device
    flow = Flow()
    small = vnet() + flow.packet(payload_bytes(50), seq=1)
    big = vnet() + flow.packet(payload_bytes(8000), seq=51)  # GSO_NONE, 8040 bytes
    tun._fd = _Scripted(tun._fd, [small, big])  # type: ignore[assignment]
    bufs = [bytearray(16 + 65535)] + [bytearray(16 + 1500) for _ in range(127)]
    sizes = [0] * 128
    assert tun.read(bufs, sizes) == 1
    assert bytes(bufs[0][16 : 16 + sizes[0]]) == small[10:]
    assert tun.read(bufs, sizes) == 1
    assert bytes(bufs[0][16 : 16 + sizes[0]]) == big[10:]
    assert tun.stats().dropped_too_big == 0
    # A caller whose first buffer is too small for it, too: dropped and counted, once.
    tun._fd.reads = [small, big, small]  # type: ignore[attr-defined]
    small_bufs = [bytearray(16 + 1500) for _ in range(128)]
    assert tun.read(small_bufs, sizes) == 1
    assert tun.read(small_bufs, sizes) == 1  # big dropped, then the second small one
    assert bytes(small_bufs[0][16 : 16 + sizes[0]]) == small[10:]
    assert tun.stats().dropped_too_big == 1


class _SlowIo:
    """Stands in for a device's PacketIo: read_gso stores one packet and reports EIO
    after it, once *go* is set (or a second has passed)."""

    def __init__(self, inner: Any, packet: bytes, go: threading.Event) -> None:
        self._inner = inner
        self._packet = packet
        self._go = go

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read_gso(self, bufs: Sequence[Any], sizes: Any, at: int, overflow: Any) -> tuple[int, int]:
        self._go.wait(1)
        memoryview(bufs[0])[at : at + len(self._packet)] = self._packet
        sizes[0] = len(self._packet) - 10
        return 1, -errno.EIO


@pytest.mark.timeout(30)
def test_read_and_read_gso_from_two_threads_keep_every_error(
    offload_device: GsoNativeTun,
) -> None:
    """The error each call keeps for the next one is raised once, whichever thread calls.

    read() keeps ENOBUFS after a packet while read_gso() (on another thread,
    in C) returns a packet and keeps EIO: one must not overwrite the other.
    """
    tun = offload_device
    if tun._io is None:
        pytest.skip(f"no C extension: {tk_impl.REASON}")
    flow = Flow()
    packet = vnet() + flow.packet(payload_bytes(50), seq=1)
    go = threading.Event()
    scripted = _Scripted(tun._fd, [packet, OSError(errno.ENOBUFS, "scripted")])
    tun._fd = scripted  # type: ignore[assignment]
    tun._io = _SlowIo(tun._io, packet, go)  # type: ignore[assignment]
    bufs = [bytearray(16 + 65535) for _ in range(128)]
    sizes = [0] * 128
    raised: list[int] = []

    def read_gso() -> None:
        assert tun.read_gso(bufs[:1], [0], 16) == 1

    worker = threading.Thread(target=read_gso, name="test-read-gso")
    worker.start()
    time.sleep(0.1)  # read_gso is in its (stand-in) C call
    for _ in range(4):
        try:
            tun.read(bufs, sizes)
        except OSError as exc:
            raised.append(exc.errno)  # type: ignore[arg-type]
        go.set()
        worker.join(5)
        if not scripted.reads and tun._read_error is None:
            break  # the next read would wait for the kernel
    assert not worker.is_alive()
    assert sorted(raised) == sorted([errno.ENOBUFS, errno.EIO])


@pytest.mark.timeout(60)
def test_read_and_read_gso_from_two_threads_take_each_packet_once(
    netns_factory: MakeNs, io_path: str
) -> None:
    h = NativeHarness(netns_factory("two-readers"), offload=True)
    tun = _gso(h.tun)
    got: dict[str, list[bytes]] = {"read": [], "read_gso": []}
    ends: list[BaseException] = []
    count = 300

    def reader(name: str) -> None:
        bufs = [bytearray(16 + 65535) for _ in range(128)]
        sizes = [0] * 128
        call = tun.read if name == "read" else tun.read_gso
        try:
            while True:
                n = call(bufs, sizes, 16)
                got[name] += [bytes(bufs[i][16 : 16 + sizes[i]]) for i in range(n)]
        except BaseException as exc:
            ends.append(exc)

    threads = [threading.Thread(target=reader, args=(n,), name=f"test-{n}") for n in got]
    for t in threads:
        t.start()
    try:
        packets = [h.packet(i, 100 + i % 50) for i in range(count)]
        h.inject(packets)
        deadline = time.monotonic() + 10
        while sum(map(len, got.values())) < count and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        h.close()
        for t in threads:
            t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got["read"] + got["read_gso"]) == sorted(packets)
    assert len(ends) == 2 and all(isinstance(e, ClosedError) for e in ends), ends


# -- the pure header check of read_gso/write_gso ------------------------------------


def test_gso_segments_counts_what_split_makes() -> None:
    for flow in _FLOWS:
        for size, gso_size in ((0, 100), (1, 100), (999, 100), (1000, 100), (5000, 1448)):
            data = (
                flow.super_packet(payload_bytes(size), gso_size)
                if size
                else vnet() + flow.packet(b"")
            )
            segments, hdr_len = gso_segments(memoryview(data))
            expected = flow.segments(payload_bytes(size), gso_size) if size else [data[10:]]
            assert segments == len(expected)
            assert hdr_len == (flow.hdr_len if size else 0)
            if tk_impl.NATIVE is not None:  # PacketIo's check, in C
                from tunkit import _speedups

                assert _speedups.gso_segments(data) == (segments, hdr_len)


@settings(max_examples=500, deadline=None)
@given(data=kernel_reads())
def test_gso_segments_never_raises_and_agrees_with_split(data: bytes) -> None:
    segments, hdr_len = gso_segments(memoryview(data))
    assert segments >= 0 and hdr_len >= 0
    if segments == 0:
        return
    bufs = [bytearray(65535) for _ in range(segments)]
    sizes = [0] * segments
    try:
        n = split(memoryview(data), bufs, sizes, 0)
    except _Malformed:
        return  # split may check more (a partial checksum's place in a GSO_NONE packet)
    assert n == segments


@pytest.mark.skipif(tk_impl.NATIVE is None, reason=f"no C extension: {tk_impl.REASON}")
@settings(max_examples=1500, deadline=None)
@given(data=kernel_reads())
def test_gso_segments_in_c_agrees(data: bytes) -> None:
    """PacketIo.read_gso/write_gso check headers in C: the same verdict as vnet.py."""
    from tunkit import _speedups

    assert _speedups.gso_segments(data) == gso_segments(memoryview(data))


def test_tcp_flow_helpers_agree() -> None:
    # A guard on the test's own assumptions: TCP is 6, the helpers build TCPv4 TSO by default.
    assert TCP == 6 and Flow().gso_type() == GSO_TCPV4


# -- without the virtio header, no super-packets -------------------------------------

SIOCETHTOOL = 0x8946  # <linux/sockios.h>
ETHTOOL_GTSO = 0x1E  # <linux/ethtool.h>: get TCP segmentation offload (struct ethtool_value)


def _tso_on(ns: str, name: str) -> bool:
    """Ask the kernel (SIOCETHTOOL) whether TSO is on for device *name* in *ns*."""
    value = ctypes.create_string_buffer(struct.pack("=II", ETHTOOL_GTSO, 0))
    ifreq = struct.pack("@16sP", name.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    sock = ns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    finally:
        sock.close()
    return bool(struct.unpack_from("=II", value.raw)[1])


@pytest.mark.timeout(30)
def test_without_offload_the_kernel_segments_itself(netns_factory: MakeNs) -> None:
    ns = netns_factory("notso")
    with create_tun("tkoff0", netns=ns) as on, create_tun("tkoff1", netns=ns, offload=False) as off:
        assert _tso_on(ns, on.name()) and not _tso_on(ns, off.name())
    # A descriptor whose earlier owner asked for TSO without the virtio header:
    # open_tun switches it off, or the kernel would hand over 64 KB packets bare.
    with tk_netns.inside(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"tkoff2", IFF_TUN | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        assert _tso_on(ns, "tkoff2")
    except BaseException:
        os.close(fd)
        raise
    with open_tun(fd, netns=ns) as tun:
        assert not tun.offload and not isinstance(tun, GsoTun)
        assert not _tso_on(ns, "tkoff2")

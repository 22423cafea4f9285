"""split(): kernel reads (virtio header + packet or super-packet) into finished packets."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from engines import engine_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import ip4_header_ok, l4_checksum_ok, slow_ones_sum
from packets import (
    ACK,
    CWR,
    ECE,
    F_NEEDS_CSUM,
    FIN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    PSH,
    TCP,
    TIMESTAMPS,
    UDP,
    VNET_LEN,
    Flow,
    partial_none,
    payload_bytes,
    vnet,
    with_vnet_none,
)
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet import UDP as ScapyUDP
from scapy.layers.inet6 import IPv6

from tunkit._errors import TooManySegmentsError
from tunkit._offload import _Malformed, _TooBig, split

engine = engine_fixture(__name__, "split")


OFFSET = 16
ROOM = 1500


def _bufs(n: int, room: int = ROOM, offset: int = OFFSET) -> list[bytearray]:
    return [bytearray(b"\xee" * (offset + room)) for _ in range(n)]


def run_split(raw: bytes, n_bufs: int = 64, room: int = ROOM, offset: int = OFFSET) -> list[bytes]:
    """Split *raw* into fresh buffers; return the packets as bytes."""
    bufs = _bufs(n_bufs, room, offset)
    sizes = [0] * n_bufs
    before = bytes(raw)
    n = split(memoryview(raw), bufs, sizes, offset)
    assert bytes(raw) == before, "split modified its input"
    for buf in bufs:
        assert buf[:offset] == b"\xee" * offset, "split wrote before the offset"
    return [bytes(bufs[i][offset : offset + sizes[i]]) for i in range(n)]


def scapy_agrees(pkt: bytes) -> None:
    """Parse *pkt* with scapy and check that scapy computes the same checksums."""
    parsed = IP(pkt) if pkt[0] >> 4 == 4 else IPv6(pkt)
    assert bytes(parsed) == pkt
    rebuilt = parsed.copy()
    layers = [IP, ScapyTCP, ScapyUDP]
    for layer in layers:
        if layer in rebuilt:
            del rebuilt[layer].chksum
    if IP in parsed:
        del rebuilt[IP].len
    else:
        del rebuilt[IPv6].plen
    if ScapyUDP in parsed:
        del rebuilt[ScapyUDP].len
    again = rebuilt.__class__(bytes(rebuilt))
    for layer in layers:
        if layer in parsed:
            assert again[layer].chksum == parsed[layer].chksum, layer.__name__
    assert len(bytes(again)) == len(pkt)


def check_packet(pkt: bytes) -> None:
    """Every split output: checksums by the slow oracle and by scapy."""
    if pkt[0] >> 4 == 4:
        assert ip4_header_ok(pkt)
    assert l4_checksum_ok(pkt)
    scapy_agrees(pkt)


# --- GSO_NONE ---------------------------------------------------------------

V4_TCP = Flow()
V6_TCP = Flow.v6()
V4_UDP = Flow(proto=UDP)
V6_UDP = Flow.v6(UDP)


@pytest.mark.parametrize(
    ("flow", "payload"),
    [
        (V4_TCP, payload_bytes(100)),
        (V6_TCP, payload_bytes(1200)),
        (V4_UDP, payload_bytes(33)),
        (V6_UDP, b""),
        (V4_TCP.with_(tcp_options=TIMESTAMPS), payload_bytes(7)),
    ],
    ids=["tcp4", "tcp6", "udp4-odd", "udp6-empty", "tcp4-options"],
)
def test_gso_none_packets_are_copied_through(flow: Flow, payload: bytes) -> None:
    pkt = flow.packet(payload, seq=77, ip_id=5)
    assert run_split(with_vnet_none(pkt)) == [pkt]


@pytest.mark.parametrize(
    ("flow", "payload"),
    [
        (V4_TCP, payload_bytes(100)),
        (V6_TCP, payload_bytes(1439)),
        (V4_UDP, payload_bytes(33)),
        (V6_UDP, payload_bytes(1)),
        (V4_TCP.with_(ip_options=b"\x01" * 4), payload_bytes(9)),
    ],
    ids=["tcp4", "tcp6-odd", "udp4", "udp6", "tcp4-ip-options"],
)
def test_gso_none_partial_checksums_are_completed(flow: Flow, payload: bytes) -> None:
    [out] = run_split(partial_none(flow, payload, seq=9, ip_id=3))
    assert out == flow.packet(payload, seq=9, ip_id=3)
    check_packet(out)


def test_gso_none_completed_zero_is_sent_as_ffff() -> None:
    # Choose the last two payload bytes so that the data sums to 0xFFFF: the
    # checksum then computes as 0, which skb_checksum_help sends as 0xFFFF.
    flow = V4_UDP
    body = payload_bytes(20)
    probe = flow.packet(body + b"\x00\x00", partial=True)
    l4 = probe[20:]
    total = slow_ones_sum(l4)  # includes the partial pseudo-header sum in the field
    filler = (0xFFFF - total) & 0xFFFF
    raw = partial_none(flow, body + struct.pack("!H", filler))
    [out] = run_split(raw)
    assert out[26:28] == b"\xff\xff"
    assert l4_checksum_ok(out)


# --- GSO super-packets --------------------------------------------------------


@dataclass(frozen=True)
class GsoCase:
    flow: Flow
    payload_len: int
    gso_size: int
    flags: int = ACK
    seq: int = 1_000_000
    ip_id: int = 100


GSO_CASES = {
    "tcp4-psh-last": GsoCase(V4_TCP, 5000, 1448, ACK | PSH),
    "tcp4-fin-last": GsoCase(V4_TCP, 3000, 1000, ACK | FIN | PSH),
    "tcp4-cwr-first": GsoCase(V4_TCP, 4000, 1000, ACK | CWR | ECE),
    "tcp4-exact-multiple": GsoCase(V4_TCP, 4 * 1448, 1448),
    "tcp4-one-segment": GsoCase(V4_TCP, 500, 1448, ACK | PSH),
    "tcp4-64k": GsoCase(V4_TCP, 65535 - 40, 1460),
    "tcp4-seq-wraps": GsoCase(V4_TCP, 4000, 1000, seq=0xFFFFFFFF - 1500),
    "tcp4-id-wraps": GsoCase(V4_TCP, 4000, 1000, ip_id=0xFFFE),
    "tcp4-timestamps": GsoCase(V4_TCP.with_(tcp_options=TIMESTAMPS), 4000, 1436),
    "tcp4-ip-options": GsoCase(V4_TCP.with_(ip_options=b"\x01\x01\x01\x00"), 3000, 1400),
    "tcp4-no-df": GsoCase(V4_TCP.with_(df=False, tos=0x10), 3000, 1400),
    "tcp4-odd-mss": GsoCase(V4_TCP, 3001, 999),
    "tcp6-psh-last": GsoCase(V6_TCP, 5000, 1428, ACK | PSH),
    "tcp6-cwr-first": GsoCase(V6_TCP, 3000, 1000, ACK | CWR),
    "tcp6-timestamps": GsoCase(V6_TCP.with_(tcp_options=TIMESTAMPS), 9000, 1416),
    "udp4-short-last": GsoCase(V4_UDP, 3000, 1400),
    "udp4-equal": GsoCase(V4_UDP, 3 * 1200, 1200),
    "udp4-no-df": GsoCase(V4_UDP.with_(df=False), 2500, 1000),
    "udp6-short-last": GsoCase(V6_UDP, 3001, 1000),
    "udp6-64k": GsoCase(V6_UDP, 65000, 1452),
    "udp6-odd-size": GsoCase(V6_UDP, 2000, 333),
}


@pytest.mark.parametrize("case", GSO_CASES.values(), ids=GSO_CASES.keys())
def test_super_packets_split_into_kernel_segments(case: GsoCase) -> None:
    payload = payload_bytes(case.payload_len, seed=case.gso_size)
    flow = case.flow
    seq, ip_id, flags = case.seq, case.ip_id, case.flags
    raw = flow.super_packet(payload, case.gso_size, seq=seq, ip_id=ip_id, flags=flags)
    out = run_split(raw)
    expected = flow.segments(payload, case.gso_size, seq=seq, ip_id=ip_id, flags=flags)
    assert len(out) == len(expected) == -(-case.payload_len // case.gso_size)
    assert out == expected
    for pkt in out:
        check_packet(pkt)
    if flow.proto == TCP:
        tcp_flags = [pkt[flow.iph_len + 13] for pkt in out]
        assert all(f & (FIN | PSH) == 0 for f in tcp_flags[:-1])
        assert all(f & CWR == 0 for f in tcp_flags[1:])
        assert tcp_flags[-1] & (FIN | PSH) == case.flags & (FIN | PSH)
        assert tcp_flags[0] & CWR == case.flags & CWR


def test_untrusted_hdr_len_is_ignored() -> None:
    # On the forwarding path the kernel may put the whole first segment's
    # length in hdr_len; the header length comes from the packet instead.
    payload = payload_bytes(4000)
    raw = V4_TCP.super_packet(payload, 1000, hdr_len=1040)
    assert run_split(raw) == V4_TCP.segments(payload, 1000)


def test_udp_segment_checksum_zero_is_sent_as_ffff() -> None:
    # Make the second datagram's data sum so that its checksum computes as 0.
    flow = V4_UDP
    first = payload_bytes(100)
    body = payload_bytes(98, seed=3)
    probe = flow.packet(body + b"\x00\x00", ip_id=1)
    l4 = bytearray(probe[20:])
    l4[6:8] = b"\x00\x00"
    total = slow_ones_sum(bytes(l4), slow_ones_sum(flow.src_bytes + flow.dst_bytes) + UDP + 108)
    filler = (0xFFFF - total) & 0xFFFF
    second = body + struct.pack("!H", filler)
    raw = flow.super_packet(first + second, 100)
    out = run_split(raw)
    assert out[1][26:28] == b"\xff\xff"
    assert out == flow.segments(first + second, 100)
    check_packet(out[1])


def test_segments_land_at_the_offset_of_any_writable_buffer() -> None:
    payload = payload_bytes(3000)
    raw = V6_TCP.super_packet(payload, 1000)
    bufs = [memoryview(bytearray(40 + 1100)) for _ in range(3)]
    sizes = [0, 0, 0, 0]
    assert split(memoryview(raw), bufs, sizes, 40) == 3
    got = [bytes(bufs[i][40 : 40 + sizes[i]]) for i in range(3)]
    assert got == V6_TCP.segments(payload, 1000)


# --- refusals ---------------------------------------------------------------


def _tcp4_super() -> bytearray:
    return bytearray(V4_TCP.super_packet(payload_bytes(3000), 1000))


def _patched(at: int, value: bytes, base: bytearray | None = None) -> bytes:
    raw = _tcp4_super() if base is None else base
    raw[at : at + len(value)] = value
    return bytes(raw)


IP0 = VNET_LEN  # where the IP header starts in a raw read

MALFORMED = {
    "short-vnet-header": b"\x00" * 9,
    "gso-size-zero": _patched(4, struct.pack("=H", 0)),
    "gso-type-ufo": _patched(1, bytes([GSO_UDP])),
    "gso-type-unknown": _patched(1, bytes([9])),
    "tcp6-gso-on-ipv4": _patched(1, bytes([GSO_TCPV6])),
    "tcp4-gso-on-ipv6": bytes(
        _patched(1, bytes([GSO_TCPV4]), bytearray(V6_TCP.super_packet(b"x" * 3000, 1000)))
    ),
    "ip-version-5": _patched(IP0, b"\x55"),
    "ihl-below-5": _patched(IP0, b"\x44"),
    "ihl-beyond-packet": vnet(F_NEEDS_CSUM, GSO_TCPV4, 0, 1000, 60, 16)
    + V4_TCP.packet(b"")[:20].replace(b"\x45", b"\x4f", 1),
    "ipv4-protocol-udp-in-tso": _patched(IP0 + 9, bytes([UDP])),
    "ipv6-next-header-mismatch": bytes(
        _patched(IP0 + 6, b"\x00", bytearray(V6_TCP.super_packet(b"x" * 3000, 1000)))
    ),
    "tcp-data-offset-below-5": _patched(IP0 + 20 + 12, b"\x40"),
    "tcp-data-offset-beyond-packet": vnet(F_NEEDS_CSUM, GSO_TCPV4, 0, 1000, 20, 16)
    + V4_TCP.packet(b"")[:40].replace(b"\x50", b"\xf0", 1),
    "csum-start-mismatch": _patched(6, struct.pack("=H", 24)),
    "csum-offset-mismatch": _patched(8, struct.pack("=H", 6)),
    "truncated-ip-header": vnet(F_NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16) + b"\x45" * 12,
    "empty-after-vnet": vnet(F_NEEDS_CSUM, GSO_UDP_L4, 28, 1000, 20, 6),
    "segments-over-64k": _patched(4, struct.pack("=H", 65535 - 20)),
    "none-empty": vnet(),
    "none-csum-start-beyond": vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, 200, 6) + V4_UDP.packet(b"x"),
    "none-csum-offset-beyond": vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 8) + V4_UDP.packet(b""),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_reads_raise_malformed_and_store_nothing(raw: bytes) -> None:
    bufs = _bufs(8)
    sizes = [-1] * 8
    with pytest.raises(_Malformed):
        split(memoryview(raw), bufs, sizes, OFFSET)
    assert sizes == [-1] * 8
    assert all(buf == b"\xee" * (OFFSET + ROOM) for buf in bufs)


def test_too_many_segments_is_retryable_and_stores_nothing() -> None:
    raw = V4_TCP.super_packet(payload_bytes(65000), 1448)  # 45 segments
    bufs = _bufs(10)
    sizes = [-1] * 10
    with pytest.raises(TooManySegmentsError) as info:
        split(memoryview(raw), bufs, sizes, OFFSET)
    assert "45 segments" in str(info.value)
    assert sizes == [-1] * 10
    assert all(buf == b"\xee" * (OFFSET + ROOM) for buf in bufs)
    # The same read succeeds with enough buffers.
    assert len(run_split(raw, n_bufs=45)) == 45


def test_no_buffer_at_all_is_too_many_segments() -> None:
    with pytest.raises(TooManySegmentsError):
        split(memoryview(with_vnet_none(V4_TCP.packet(b"x"))), [], [], 0)


@pytest.mark.parametrize(
    ("raw", "room"),
    [
        (with_vnet_none(V4_TCP.packet(payload_bytes(1500))), 1500),
        (partial_none(V6_UDP, payload_bytes(1453)), 1500),
        (V4_TCP.super_packet(payload_bytes(5000), 1461), 1500),
        (V6_UDP.super_packet(payload_bytes(5000), 1000), 1047),
    ],
    ids=["none-tcp4", "none-udp6-partial", "tcp4-mss-too-big", "udp6-one-short"],
)
def test_packets_longer_than_their_room_are_too_big(raw: bytes, room: int) -> None:
    bufs = _bufs(8, room)
    sizes = [-1] * 8
    with pytest.raises(_TooBig):
        split(memoryview(raw), bufs, sizes, OFFSET)
    assert sizes == [-1] * 8


# --- hypothesis: nothing but the documented exceptions, and sane output --------

ALLOWED = (_Malformed, _TooBig, TooManySegmentsError)


def _check_output(n: int, bufs: list[bytearray], sizes: list[int]) -> None:
    assert 1 <= n <= len(bufs)
    for i in range(n):
        assert 0 <= sizes[i] <= len(bufs[i]) - OFFSET


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.tuples(
        st.sampled_from([0, 1, 2, 3]),
        st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x85, 7]),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, 80),
        st.integers(0, 20),
    ),
    body=st.binary(max_size=3000),
    n_bufs=st.integers(0, 8),
)
def test_random_reads_raise_only_offload_errors(
    header: tuple[int, int, int, int, int, int], body: bytes, n_bufs: int
) -> None:
    raw = vnet(*header) + body
    bufs = _bufs(n_bufs)
    sizes = [0] * n_bufs
    try:
        n = split(memoryview(raw), bufs, sizes, OFFSET)
    except ALLOWED:
        return
    _check_output(n, bufs, sizes)


_BASES = [
    V4_TCP.super_packet(payload_bytes(4000), 1000, flags=ACK | PSH),
    V6_TCP.with_(tcp_options=TIMESTAMPS).super_packet(payload_bytes(3000), 900),
    V4_UDP.super_packet(payload_bytes(2500), 1000),
    V6_UDP.super_packet(payload_bytes(2500), 700),
    partial_none(V4_TCP, payload_bytes(300)),
]


@settings(max_examples=400)
@given(
    base=st.sampled_from(_BASES),
    edits=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 5000),
)
def test_mutated_super_packets_raise_only_offload_errors(
    base: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    raw = bytearray(base[: max(cut, 0)] if cut < len(base) else base)
    for at, value in edits:
        if at < len(raw):
            raw[at] = value
    bufs = _bufs(6)
    sizes = [0] * 6
    try:
        n = split(memoryview(bytes(raw)), bufs, sizes, OFFSET)
    except ALLOWED:
        return
    _check_output(n, bufs, sizes)


@settings(max_examples=150, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    proto=st.sampled_from([TCP, UDP]),
    payload_len=st.integers(1, 20000),
    gso_size=st.integers(1, 1400),
    seq=st.integers(0, 0xFFFFFFFF),
    ip_id=st.integers(0, 0xFFFF),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | CWR, ACK | ECE | PSH]),
)
def test_split_matches_the_kernel_rules(
    version: int, proto: int, payload_len: int, gso_size: int, seq: int, ip_id: int, flags: int
) -> None:
    flow = Flow(proto=proto) if version == 4 else Flow.v6(proto)
    payload = payload_bytes(payload_len, seed=gso_size)
    count = -(-payload_len // gso_size)
    raw = flow.super_packet(payload, gso_size, seq=seq, ip_id=ip_id, flags=flags)
    if count > 64:
        with pytest.raises(TooManySegmentsError):
            run_split(raw, n_bufs=64)
        return
    out = run_split(raw, n_bufs=64)
    assert out == flow.segments(payload, gso_size, seq=seq, ip_id=ip_id, flags=flags)
    for pkt in out:
        assert l4_checksum_ok(pkt)

"""Coalescer: batches of packets into kernel writes (GRO), and round trips with split()."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from engines import engine_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import fix_checksums, ip4_header_ok, l4_checksum_ok
from packets import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    RST,
    SYN,
    TIMESTAMPS,
    UDP,
    URG,
    VNET_LEN,
    Flow,
    payload_bytes,
    vnet,
)
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6

from tunkit._errors import TooManySegmentsError
from tunkit._offload import (
    ZERO_VNET_HDR,
    Coalescer,
    Write,
    _Malformed,
    _TooBig,
    split,
)

engine = engine_fixture(__name__, "split", "Coalescer")


OFFSET = 16
V4_TCP = Flow()
V6_TCP = Flow.v6()
V4_UDP = Flow(proto=UDP)
V6_UDP = Flow.v6(UDP)
OTHER_TCP = Flow(sport=40001)
NO_DF = Flow(df=False)
OTHER_UDP6 = Flow.v6(UDP, dport=4444)


def framed(pkts: list[bytes], offset: int = OFFSET) -> list[bytearray]:
    """Put each packet behind *offset* bytes of headroom, as a Tun writer does."""
    return [bytearray(b"\xaa" * offset + p) for p in pkts]


def joined(write: Write) -> bytes:
    return b"".join(bytes(piece) for piece in write.iov)


def run(pkts: list[bytes], coalescer: Coalescer | None = None) -> list[Write]:
    bufs = framed(pkts)
    before = [bytes(b) for b in bufs]
    writes = (coalescer or Coalescer()).coalesce(bufs, OFFSET)
    assert [bytes(b) for b in bufs] == before, "coalesce modified the caller's buffers"
    check_cover(writes, len(pkts))
    return writes


def check_cover(writes: list[Write], n: int) -> None:
    """Every packet is in exactly one write, and each write names its packets' indices."""
    seen: list[int] = []
    for w in writes:
        assert w.gso == (len(w.packets) > 1)
        seen.append(w.first)
        assert len(w.indices) == len(w.packets) and w.indices[0] == w.first
        assert list(w.indices) == sorted(w.indices)
        if not w.gso:
            assert len(w.iov) == 2
            assert w.iov[0] is ZERO_VNET_HDR
    assert sorted(i for w in writes for i in w.indices) == list(range(n))
    assert sum(len(w.packets) for w in writes) == n
    assert [w.first for w in writes] == sorted(seen)  # in order of first packet


def seg(flow: Flow, chunk: int, i: int, mss: int, flags: int = ACK, **kw: int) -> bytes:
    """Segment *i* of a TCP/UDP train with *mss* bytes per segment."""
    seq = kw.get("seq", 5000) + i * mss
    ip_id = kw.get("ip_id", 300) + i
    return flow.packet(payload_bytes(chunk, seed=i), seq=seq, ip_id=ip_id, flags=flags)


@dataclass
class Train:
    """A train of segments of one flow: sizes and flags per segment."""

    flow: Flow
    sizes: list[int]
    flags: list[int] = field(default_factory=list)
    seq: int = 5000
    ip_id: int = 300

    def packets(self) -> list[bytes]:
        out = []
        seq = self.seq
        for i, size in enumerate(self.sizes):
            flags = self.flags[i] if self.flags else ACK
            chunk = payload_bytes(size, seed=i)
            out.append(self.flow.packet(chunk, seq=seq, ip_id=self.ip_id + i, flags=flags))
            seq += size
        return out

    def super_packet(self, first: int = 0, end: int | None = None) -> bytes:
        """The virtio header + super-packet that segments first..end must become."""
        end = len(self.sizes) if end is None else end
        flags = [self.flags[i] if self.flags else ACK for i in range(first, end)]
        head = flags[0] | (flags[-1] & (PSH | FIN))
        payload = b"".join(payload_bytes(self.sizes[i], seed=i) for i in range(first, end))
        seq = self.seq + sum(self.sizes[:first])
        return self.flow.super_packet(
            payload, self.sizes[first], seq=seq, ip_id=self.ip_id + first, flags=head
        )


def single(pkt: bytes) -> bytes:
    return vnet() + pkt


def scapy_parses(super_pkt: bytes) -> None:
    """Scapy reads the super-packet's IP and transport lengths as we wrote them."""
    ip = super_pkt[VNET_LEN:]
    parsed = IP(ip) if ip[0] >> 4 == 4 else IPv6(ip)
    if IP in parsed:
        assert parsed[IP].len == len(ip)
        del parsed[IP].chksum
        assert IP(bytes(parsed))[IP].chksum == IP(ip)[IP].chksum
    else:
        assert parsed[IPv6].plen == len(ip) - 40


# --- what merges, table-driven ------------------------------------------------

MERGES: dict[str, Train] = {
    "tcp4-full-train": Train(V4_TCP, [1448] * 5),
    "tcp4-short-last": Train(V4_TCP, [1448, 1448, 700]),
    "tcp4-psh-last": Train(V4_TCP, [1448] * 3, [ACK, ACK, ACK | PSH]),
    "tcp4-fin-last": Train(V4_TCP, [1000] * 3, [ACK, ACK, ACK | FIN | PSH]),
    "tcp4-cwr-first": Train(V4_TCP, [1000] * 3, [ACK | CWR | ECE, ACK | ECE, ACK | ECE]),
    "tcp4-timestamps": Train(V4_TCP.with_(tcp_options=TIMESTAMPS), [1436] * 4),
    "tcp4-seq-wraps": Train(V4_TCP, [1000] * 4, seq=0xFFFFFFFF - 1500),
    "tcp4-id-wraps": Train(V4_TCP, [1000] * 4, ip_id=0xFFFE),
    "tcp4-no-df": Train(V4_TCP.with_(df=False), [1000] * 3),
    "tcp4-tiny-segments": Train(V4_TCP, [1] * 40),
    "tcp6-full-train": Train(V6_TCP, [1428] * 6),
    "tcp6-psh-last": Train(V6_TCP, [1428, 1428, 100], [ACK, ACK, ACK | PSH]),
    "udp4-short-last": Train(V4_UDP, [1200, 1200, 1200, 50]),
    "udp4-equal": Train(V4_UDP, [1400] * 4),
    "udp6-short-last": Train(V6_UDP, [1000, 1000, 999]),
    "udp6-odd-size": Train(V6_UDP, [333] * 7),
}


@pytest.mark.parametrize("train", MERGES.values(), ids=MERGES.keys())
def test_one_flow_becomes_one_super_packet(train: Train) -> None:
    writes = run(train.packets())
    assert len(writes) == 1
    [w] = writes
    assert w.gso and w.first == 0 and w.indices == tuple(range(len(train.sizes)))
    assert joined(w) == train.super_packet()
    scapy_parses(joined(w))


def test_payloads_are_views_of_the_callers_buffers() -> None:
    train = Train(V4_TCP, [1448] * 4)
    bufs = framed(train.packets())
    [w] = Coalescer().coalesce(bufs, OFFSET)
    assert len(w.iov) == 2 + 4
    assert len(w.iov[0]) == VNET_LEN
    assert len(w.iov[1]) == 40
    for piece, buf in zip(w.iov[2:], bufs, strict=True):
        assert piece.obj is buf
        assert bytes(piece) == bytes(buf[OFFSET + 40 :])
    assert [p.obj for p in w.packets] == bufs


# --- what does not merge ------------------------------------------------------


def _mutate(pkt: bytes, at: int, value: bytes, fix: bool = True) -> bytes:
    out = bytearray(pkt)
    out[at : at + len(value)] = value
    return fix_checksums(bytes(out)) if fix else bytes(out)


def _tcp4(i: int, **kw: int) -> bytes:
    return seg(V4_TCP, 1000, i, 1000, **kw)


def _udp6(i: int, size: int = 800) -> bytes:
    return V6_UDP.packet(payload_bytes(size, seed=i))


@dataclass
class Apart:
    """A batch and the grouping it must get: lists of batch indices per write."""

    packets: list[bytes]
    groups: list[list[int]]
    # False when splitting gives back the packets with new IPv4 ids: fixed ids
    # (DF set) merge as in Linux, but the kernel's re-segmentation counts up.
    exact: bool = True


APART: dict[str, Apart] = {
    "tcp4-seq-gap": Apart([_tcp4(0), _tcp4(2)], [[0], [1]]),
    "tcp4-ack-differs": Apart(
        [_tcp4(0), _mutate(_tcp4(1), 28, struct.pack("!I", 1001))], [[0], [1]]
    ),
    "tcp4-window-differs": Apart([_tcp4(0), _mutate(_tcp4(1), 34, b"\x00\x01")], [[0], [1]]),
    "tcp4-urgent-pointer-differs": Apart(
        [_tcp4(0), _mutate(_tcp4(1), 38, b"\x00\x01")], [[0], [1]]
    ),
    "tcp4-ttl-differs": Apart([_tcp4(0), _mutate(_tcp4(1), 8, b"\x07")], [[0], [1]]),
    "tcp4-tos-differs": Apart([_tcp4(0), _mutate(_tcp4(1), 1, b"\x04")], [[0], [1]]),
    "tcp4-df-differs": Apart([_tcp4(0), _mutate(_tcp4(1), 6, b"\x00")], [[0], [1]]),
    "tcp4-id-jumps": Apart([_tcp4(0), _tcp4(1, ip_id=400)], [[0], [1]]),
    "tcp4-id-fixed-with-df": Apart(
        [_tcp4(0), _tcp4(1, ip_id=299), _tcp4(2, ip_id=298)], [[0, 1, 2]], exact=False
    ),
    "tcp4-id-fixed-without-df": Apart(
        [
            seg(NO_DF, 1000, 0, 1000),
            seg(NO_DF, 1000, 1, 1000, ip_id=299),
            seg(NO_DF, 1000, 2, 1000, ip_id=298),
        ],
        [[0], [1], [2]],
    ),
    "tcp4-bad-tcp-checksum": Apart(
        [_tcp4(0), _mutate(_tcp4(1), 36, b"\x12\x34", fix=False), _tcp4(2)], [[0], [1], [2]]
    ),
    "tcp4-bad-ip-checksum-head": Apart(
        [_mutate(_tcp4(0), 10, b"\x12\x34", fix=False), _tcp4(1), _tcp4(2)], [[0], [1, 2]]
    ),
    "tcp4-bad-payload-head": Apart(
        [_mutate(_tcp4(0), 100, b"\xff", fix=False), _tcp4(1), _tcp4(2)], [[0], [1, 2]]
    ),
    "tcp4-syn": Apart([_tcp4(0, flags=SYN | ACK), _tcp4(1)], [[0], [1]]),
    "tcp4-rst": Apart([_tcp4(0), _tcp4(1, flags=RST | ACK)], [[0], [1]]),
    "tcp4-urg": Apart([_tcp4(0), _tcp4(1, flags=URG | ACK)], [[0], [1]]),
    "tcp4-psh-first": Apart([_tcp4(0, flags=PSH | ACK), _tcp4(1)], [[0], [1]]),
    "tcp4-cwr-second": Apart([_tcp4(0), _tcp4(1, flags=CWR | ACK), _tcp4(2)], [[0], [1, 2]]),
    "tcp4-ece-differs": Apart([_tcp4(0), _tcp4(1, flags=ECE | ACK)], [[0], [1]]),
    "tcp4-larger-after-smaller": Apart(
        [seg(V4_TCP, 500, 0, 500), seg(V4_TCP, 1000, 1, 500)], [[0], [1]]
    ),
    "tcp4-after-short-segment": Apart(
        [_tcp4(0), seg(V4_TCP, 10, 1, 1000), seg(V4_TCP, 1000, 1, 1000, seq=5010, ip_id=301)],
        [[0, 1], [2]],
    ),
    "tcp6-pure-ack-closes-flow": Apart(
        [
            seg(V6_TCP, 1000, 0, 1000),
            V6_TCP.packet(b"", seq=6000),
            seg(V6_TCP, 1000, 1, 1000),
        ],
        [[0], [1], [2]],
    ),
    "tcp4-truncated-closes-flow": Apart([_tcp4(0), _tcp4(1)[:40], _tcp4(1)], [[0], [1], [2]]),
    "tcp4-ip-options": Apart(
        [V4_TCP.with_(ip_options=b"\x01" * 4).packet(b"x" * 100, ip_id=i) for i in range(2)],
        [[0], [1]],
    ),
    "tcp4-fragment": Apart([_tcp4(0), _mutate(_tcp4(1), 6, b"\x60\x00")], [[0], [1]]),
    "tcp4-padding-after-packet": Apart([_tcp4(0), _tcp4(1) + b"\x00\x00"], [[0], [1]]),
    "tcp4-options-differ": Apart(
        [
            V4_TCP.with_(tcp_options=TIMESTAMPS).packet(b"x" * 100, seq=0, ip_id=0),
            V4_TCP.with_(tcp_options=TIMESTAMPS[:-1] + b"\x02").packet(
                b"y" * 100, seq=100, ip_id=1
            ),
        ],
        [[0], [1]],
    ),
    "tcp6-flow-label-differs": Apart(
        [V6_TCP.packet(b"x" * 100), V6_TCP.with_(flow_label=7).packet(b"y" * 100, seq=100)],
        [[0], [1]],
    ),
    "tcp6-hop-limit-differs": Apart(
        [V6_TCP.packet(b"x" * 100), V6_TCP.with_(ttl=1).packet(b"y" * 100, seq=100)], [[0], [1]]
    ),
    "udp4-zero-checksum": Apart(
        [
            V4_UDP.packet(b"x" * 100, ip_id=0),
            _mutate(V4_UDP.packet(b"x" * 100, ip_id=1), 26, b"\0\0", fix=False),
        ],
        [[0], [1]],
    ),
    "udp4-bigger-later": Apart(
        [V4_UDP.packet(b"x" * 100, ip_id=0), V4_UDP.packet(b"x" * 101, ip_id=1)], [[0], [1]]
    ),
    "udp6-bad-length-field": Apart([_udp6(0), _mutate(_udp6(1), 44, b"\x00\x09")], [[0], [1]]),
    "udp6-65-datagrams": Apart([_udp6(i, 100) for i in range(65)], [list(range(64)), [64]]),
    "tcp4-over-64k": Apart(
        [seg(V4_TCP, 1460, i, 1460) for i in range(46)], [list(range(44)), [44, 45]]
    ),
    "interleaved-flows": Apart(
        [_tcp4(0), _udp6(0), _tcp4(1), _udp6(1), _tcp4(2)], [[0, 2, 4], [1, 3]]
    ),
    "other-protocols-pass": Apart(
        [b"\x45" + b"\x00" * 8 + b"\x01" + b"\x00" * 30, b"", b"\x60" * 3, b"\x99" * 50],
        [[0], [1], [2], [3]],
    ),
    "a-flow-per-port": Apart(
        [_tcp4(0), seg(OTHER_TCP, 1000, 0, 1000), _tcp4(1), seg(OTHER_TCP, 1000, 1, 1000)],
        [[0, 2], [1, 3]],
    ),
}


def _without_id(pkt: bytes | memoryview) -> bytes:
    """An IPv4 packet with its id and header checksum blanked."""
    out = bytearray(pkt)
    out[4:6] = out[10:12] = b"\0\0"
    return bytes(out)


@pytest.mark.parametrize("case", APART.values(), ids=APART.keys())
def test_what_linux_gro_keeps_apart(case: Apart) -> None:
    writes = run(case.packets)
    got = [[case.packets.index(bytes(p)) for p in w.packets] for w in writes]
    # packets.index finds the first equal packet; make the batch's duplicates
    # (none expected) impossible to confuse.
    assert len(set(case.packets)) == len(case.packets)
    assert got == case.groups
    for w in writes:
        if not w.gso:
            assert joined(w) == single(bytes(w.packets[0]))
        else:
            # Every super-packet splits back into exactly its packets.
            parts = split_all(joined(w))
            if case.exact:
                assert parts == [bytes(p) for p in w.packets]
            else:
                assert [_without_id(p) for p in parts] == [_without_id(p) for p in w.packets]
                assert all(ip4_header_ok(p) and l4_checksum_ok(p) for p in parts)


def test_order_and_indices_of_interleaved_flows() -> None:
    pkts = [_tcp4(0), _udp6(0), _tcp4(1), _udp6(1), _tcp4(2), V4_UDP.packet(b"lone")]
    writes = run(pkts)
    assert [w.first for w in writes] == [0, 1, 5]
    assert [w.indices for w in writes] == [(0, 2, 4), (1, 3), (5,)]


def test_one_by_one_sends_every_packet_behind_a_zero_header() -> None:
    train = Train(V6_TCP, [1000] * 3)
    [w] = run(train.packets())
    iovs = w.one_by_one()
    assert [b"".join(bytes(p) for p in iov) for iov in iovs] == [single(p) for p in train.packets()]


@pytest.mark.parametrize(
    ("tcp", "udp", "expected_writes"),
    [(True, True, 2), (False, True, 4), (True, False, 4), (False, False, 6)],
    ids=["both", "udp-only", "tcp-only", "none"],
)
def test_tcp_and_udp_coalescing_can_be_turned_off(
    tcp: bool, udp: bool, expected_writes: int
) -> None:
    pkts = [_tcp4(0), _tcp4(1), _tcp4(2), _udp6(0), _udp6(1), _udp6(2)]
    assert len(run(pkts, Coalescer(tcp=tcp, udp=udp))) == expected_writes


def test_scratch_grows_and_is_reused() -> None:
    flows = [Flow(sport=1000 + i) for i in range(50)]
    pkts = [f.packet(b"x" * 100, seq=s * 100, ip_id=s) for s in range(2) for f in flows]
    coalescer = Coalescer()
    for _ in range(2):
        writes = run(pkts, coalescer)
        assert len(writes) == 50
        for f, w in zip(flows, writes, strict=True):
            payload = b"x" * 200
            assert joined(w) == f.super_packet(payload, 100)


def test_buffers_of_any_format() -> None:
    train = Train(V4_UDP, [400] * 3)
    bufs = [memoryview(bytes(b)) for b in framed(train.packets())]
    [w] = Coalescer().coalesce(bufs, OFFSET)
    assert joined(w) == train.super_packet()


# --- round trips --------------------------------------------------------------

ALLOWED = (_Malformed, _TooBig, TooManySegmentsError)


def split_all(raw: bytes, room: int = 65535) -> list[bytes]:
    bufs = [bytearray(room) for _ in range(128)]
    sizes = [0] * 128
    n = split(memoryview(raw), bufs, sizes, 0)
    return [bytes(bufs[i][: sizes[i]]) for i in range(n)]


@pytest.mark.parametrize("train", MERGES.values(), ids=MERGES.keys())
def test_coalesce_of_split_gives_the_super_packet_back(train: Train) -> None:
    raw = train.super_packet()
    [w] = run(split_all(raw))
    assert joined(w) == raw


@pytest.mark.parametrize("train", MERGES.values(), ids=MERGES.keys())
def test_split_of_coalesce_gives_the_batch_back(train: Train) -> None:
    pkts = train.packets()
    got = [p for w in run(pkts) for p in split_all(joined(w))]
    assert got == pkts
    for p in got:
        assert l4_checksum_ok(p)
        if p[0] >> 4 == 4:
            assert ip4_header_ok(p)


_FLOWS = [
    V4_TCP,
    V6_TCP,
    V4_UDP,
    V6_UDP,
    OTHER_TCP,
    OTHER_UDP6,
    V4_TCP.with_(tcp_options=TIMESTAMPS, dst="10.9.9.9"),
]


@st.composite
def batches(draw: st.DrawFn) -> list[bytes]:
    """Interleaved trains of several flows, each in order, with varied sizes and flags."""
    n_flows = draw(st.integers(1, 4))
    flows = draw(st.lists(st.sampled_from(_FLOWS), min_size=n_flows, max_size=n_flows, unique=True))
    trains: list[list[bytes]] = []
    for f_i, flow in enumerate(flows):
        mss = draw(st.integers(1, 1400))
        count = draw(st.integers(1, 12))
        seq = draw(st.integers(0, 0xFFFFFFFF))
        ip_id = draw(st.integers(0, 0xFFFF))
        pkts = []
        for i in range(count):
            size = mss if draw(st.integers(0, 4)) else draw(st.integers(1, mss))
            flags = ACK | (PSH if draw(st.integers(0, 6)) == 0 else 0)
            if flow.proto == UDP:
                flags = 0
            pkts.append(
                flow.packet(
                    payload_bytes(size, seed=f_i * 31 + i), seq=seq, ip_id=ip_id + i, flags=flags
                )
            )
            seq = (seq + size) & 0xFFFFFFFF
        trains.append(pkts)
    order = draw(st.permutations([f for f, t in enumerate(trains) for _ in t]))
    cursors = [0] * len(trains)
    batch = []
    for f in order:
        batch.append(trains[f][cursors[f]])
        cursors[f] += 1
    return batch


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches())
def test_split_of_coalesce_round_trips_generated_flows(batch: list[bytes]) -> None:
    writes = run(batch)
    got: list[tuple[int, bytes]] = []
    for w in writes:
        parts = split_all(joined(w))
        assert parts == [bytes(p) for p in w.packets]
        got.extend(zip([batch.index(bytes(p)) for p in w.packets], parts, strict=True))
    # Per flow, the order of the batch is kept.
    assert sorted(got) == sorted(enumerate(batch))


@settings(max_examples=150, deadline=None)
@given(
    flow=st.sampled_from(_FLOWS[:4]),
    payload_len=st.integers(1, 30000),
    gso_size=st.integers(1, 1400),
    seq=st.integers(0, 0xFFFFFFFF),
    ip_id=st.integers(0, 0xFFFF),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | CWR, ACK | ECE | PSH]),
)
def test_coalesce_of_split_round_trips_generated_super_packets(
    flow: Flow, payload_len: int, gso_size: int, seq: int, ip_id: int, flags: int
) -> None:
    count = -(-payload_len // gso_size)
    if count > 128 or (flow.proto == UDP and count > 64):
        return
    if flow.proto == UDP:
        flags = ACK
    raw = flow.super_packet(payload_bytes(payload_len), gso_size, seq=seq, ip_id=ip_id, flags=flags)
    parts = split_all(raw)
    writes = run(parts)
    if count == 1:
        assert [joined(w) for w in writes] == [single(parts[0])]
    else:
        assert [joined(w) for w in writes] == [raw]


# --- hypothesis: garbage in, never an exception -------------------------------


_VALID = [
    *Train(V4_TCP, [300] * 3, [ACK, ACK, ACK | PSH]).packets(),
    *Train(V6_UDP, [200] * 3).packets(),
    *Train(V6_TCP.with_(tcp_options=TIMESTAMPS), [100] * 2).packets(),
]


def _check_writes_split_cleanly(writes: list[Write], n: int) -> None:
    check_cover(writes, n)
    for w in writes:
        raw = joined(w)
        if w.gso:
            parts = split_all(raw)  # a super-packet we built must split
            assert len(parts) == len(w.packets)
            for p in parts:
                assert l4_checksum_ok(p)
        else:
            assert raw == single(bytes(w.packets[0]))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 80), st.integers(0, 255)),
        max_size=8,
    ),
    cuts=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 400)), max_size=3),
    refix=st.booleans(),
)
def test_mutated_batches_pass_through_or_merge_cleanly(
    edits: list[tuple[int, int, int]], cuts: list[tuple[int, int]], refix: bool
) -> None:
    batch = [bytearray(p) for p in _VALID]
    for i, at, value in edits:
        if at < len(batch[i]):
            batch[i][at] = value
    for i, n in cuts:
        del batch[i][n:]
    pkts = [bytes(p) for p in batch]
    if refix:
        pkts = [_try_fix(p) for p in pkts]
    writes = run(pkts)
    _check_writes_split_cleanly(writes, len(pkts))


def _try_fix(pkt: bytes) -> bytes:
    try:
        return fix_checksums(pkt)
    except (IndexError, struct.error):
        return pkt


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=120), max_size=12), st.integers(0, 20))
def test_random_bytes_pass_through(pkts: list[bytes], offset: int) -> None:
    bufs = [bytearray(b"\x00" * offset + p) for p in pkts]
    writes = Coalescer().coalesce(bufs, offset)
    check_cover(writes, len(pkts))
    for w in writes:
        if not w.gso:
            assert bytes(w.packets[0]) in pkts
        else:
            try:
                split_all(joined(w))
            except ALLOWED as exc:  # pragma: no cover - a failure to report
                pytest.fail(f"a super-packet we built does not split: {exc!r}")

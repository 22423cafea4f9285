"""tunkit.capture: a Tun that behaves as its Tun and records what crosses it, bounded.

In memory (pipes, and an in-memory GsoTun that carries virtio-net headers)
and on native devices in namespaces (a real ping and TCP through a captured
pair joined by copy). Files are read back by tshark and scapy.
"""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import errno
import io
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from pathlib import Path
from typing import Any

import pcap_readers
import pytest
from blocking import wait_inside
from conformance import Harness, TunConformance, in_thread, read_packets, write_packets
from netns_util import (  # noqa: F401
    DEVICE_KINDS,
    NativeHarness,
    Pair,
    device_kind,
    need_tool,
    netns_factory,
    ns_run,
    root,
    tcp_transfer,
)
from packets import UDP, Flow, partial_none, payload_bytes
from scapy.all import ICMP, IP, IPv6, raw  # type: ignore[attr-defined]
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest
from test_pipe import PipeHarness, ipv4_packet

import tunkit
from tunkit import GsoTun, Tun, pcap
from tunkit._capture import CapturedTun
from tunkit._offload import split
from tunkit._pipe import PipeTun

MakeNs = Callable[[str], str]
VNET = 10


def records(data: bytes | Path) -> list[pcap.Record]:
    return list(pcap.read(io.BytesIO(data) if isinstance(data, bytes) else data))


def by_end(recs: Sequence[pcap.Record]) -> dict[tuple[str | None, str | None], list[bytes]]:
    """The packets of each (interface, direction), in file order."""
    out: dict[tuple[str | None, str | None], list[bytes]] = {}
    for r in recs:
        out.setdefault((r.interface, r.direction), []).append(r.data)
    return out


# -- the Tun protocol, unchanged -------------------------------------------------------


class CapturedPipeHarness(PipeHarness):
    """The pipe harness with its Tun captured into a BytesIO."""

    def __init__(self, batch_size: int, mwo: int, mro: int) -> None:
        super().__init__(batch_size, mwo, mro)
        self.file = io.BytesIO()
        self.plain = self.tun
        self.tun = tunkit.capture(self.plain, self.file)


class TestCapturedPipeConformance(TunConformance):
    @pytest.fixture(params=[(1, 0, 0), (8, 16, 16), (128, 3, 7)],
                    ids=["batch1", "batch8-off16", "batch128-off3-7"])
    def harness(self, request: pytest.FixtureRequest) -> Iterator[Harness]:
        h = CapturedPipeHarness(*request.param)
        yield h
        h.close()


class TestCapturedNativeConformance(TunConformance):
    """The conformance suite on captured devices in namespaces, with and without offload."""

    @pytest.fixture(params=DEVICE_KINDS)
    def harness(
        self, netns_factory: MakeNs, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch,
    ) -> Iterator[Harness]:
        h = NativeHarness(netns_factory("capconf"), offload=device_kind(request.param,
                                                                        monkeypatch))
        h.tun = tunkit.capture(h.tun, io.BytesIO())  # type: ignore[assignment]
        try:
            yield h
        finally:
            h.close()


def test_packets_both_ways_are_recorded_with_their_directions() -> None:
    h = CapturedPipeHarness(8, 0, 0)
    try:
        came = [ipv4_packet(i, 60 + i) for i in range(20)]
        went = [Flow().packet(payload_bytes(i * 10, i), seq=i) for i in range(12)]
        h.inject(came)
        assert read_packets(h.tun, len(came)) == came
        thread, errors = in_thread(lambda: write_packets(h.tun, went))
        assert h.collect(len(went), timeout=10) == went
        thread.join(10)
        assert not errors
    finally:
        h.close()
    recs = records(h.file.getvalue())
    assert by_end(recs) == {("pipe-tun-0", "in"): came, ("pipe-tun-0", "out"): went}
    assert h.tun.capture_stats() == (len(came) + len(went), 0, 0)  # type: ignore[attr-defined]
    stamps = [r.timestamp_ns for r in recs]
    assert stamps == sorted(stamps) and abs(stamps[0] - time.time_ns()) < 60 * 10**9


# -- two captured pipes joined by copy, one file, read by tshark and scapy ----------------


def _copy_captured(writer: pcap.Writer | Path, **kw: Any) -> tuple[
    PipeTun, PipeTun, CapturedTun, CapturedTun, threading.Thread
]:
    """host_a <-> (captured a) copy (captured b) <-> host_b."""
    host_a, a = tunkit.pipe(8)
    b, host_b = tunkit.pipe(8)
    cap_a = tunkit.capture(a, writer, **kw)
    cap_b = tunkit.capture(b, writer, **kw)
    copier = threading.Thread(target=tunkit.copy, args=(cap_a, cap_b), name="test-copy")
    copier.start()
    return host_a, host_b, cap_a, cap_b, copier


def test_two_tuns_share_one_file_read_by_tshark_and_scapy(tmp_path: Path) -> None:
    path = tmp_path / "two.pcapng"
    a_to_b = [raw(IP(src="10.5.0.1", dst="10.5.0.2") / ICMP(seq=i) / (b"a" * i))
              for i in range(10)]
    b_to_a = [raw(IPv6(src="fd05::2", dst="fd05::1") / ICMPv6EchoReply(seq=i) / (b"b" * i))
              for i in range(7)]
    with pcap.Writer(path) as writer:
        host_a, host_b, cap_a, cap_b, copier = _copy_captured(writer)
        try:
            thread, errors = in_thread(lambda: write_packets(host_a, a_to_b))
            assert read_packets(host_b, len(a_to_b)) == a_to_b
            thread.join(10)
            thread, errors = in_thread(lambda: write_packets(host_b, b_to_a))
            assert read_packets(host_a, len(b_to_a)) == b_to_a
            thread.join(10)
            assert not errors
        finally:
            host_a.close()
            copier.join(10)
        assert cap_a.closed and not writer.closed  # the Writer is the test's to close
    a, b = cap_a.name(), cap_b.name()
    assert a != b
    want = {(a, "in"): a_to_b, (b, "out"): a_to_b, (b, "in"): b_to_a, (a, "out"): b_to_a}
    for reader in (pcap_readers.tshark, pcap_readers.scapy):
        seen = reader(path)
        got: dict[tuple[str | None, str | None], list[bytes]] = {}
        for s in seen:
            got.setdefault((s.interface, s.direction), []).append(s.data)
            assert (s.src, s.dst) in {("10.5.0.1", "10.5.0.2"), ("fd05::2", "fd05::1")}
        assert got == want, reader.__name__
    assert by_end(records(path)) == want


def test_classic_pcap_of_one_tun(tmp_path: Path) -> None:
    path = tmp_path / "one.pcap"
    host, end = tunkit.pipe(4)
    cap = tunkit.capture(end, path, pcap_format="pcap")
    packets = [ipv4_packet(i, 100) for i in range(6)]
    thread, errors = in_thread(lambda: write_packets(host, packets))
    assert read_packets(cap, 6) == packets
    thread.join(10)
    assert not errors
    cap.close()
    assert [s.data for s in pcap_readers.tshark(path)] == packets
    assert [s.data for s in pcap_readers.scapy(path)] == packets  # asserts link type 101
    assert [(r.direction, r.interface) for r in records(path)] == [(None, None)] * 6


def test_a_path_is_closed_a_file_object_left_open_and_flushed(tmp_path: Path) -> None:
    class Flushes(io.BytesIO):
        flushed = 0

        def flush(self) -> None:
            self.flushed += 1
            super().flush()

    f = Flushes()
    host, end = tunkit.pipe()
    cap = tunkit.capture(end, f)
    cap.close()
    cap.close()  # idempotent
    assert not f.closed and f.flushed >= 1
    assert records(f.getvalue()) == []
    # a path: the descriptor is gone after close (the autouse fixture checks it)
    host, end = tunkit.pipe()
    tunkit.capture(end, tmp_path / "p.pcapng").close()
    assert records(tmp_path / "p.pcapng") == []
    assert host.closed


def test_capture_is_a_gsotun_only_around_one() -> None:
    plain = tunkit.capture(tunkit.pipe()[0], io.BytesIO())
    ends = tunkit.pipe(8)
    gso = tunkit.capture(VnetPipe(ends[0]), io.BytesIO())
    try:
        assert isinstance(plain, Tun) and not isinstance(plain, GsoTun)
        assert isinstance(gso, Tun) and isinstance(gso, GsoTun)
        assert not hasattr(plain, "read_gso")
        assert plain.closed is False  # other attributes are the Tun's
        with pytest.raises(AttributeError):
            plain.stats  # noqa: B018 - a pipe has no stats()
    finally:
        plain.close()
        gso.close()
        ends[1].close()


def test_the_captured_tun_is_kept_as_tun_and_answers_for_it() -> None:
    a, b = tunkit.pipe(4, mtu=1400, mwo=3, mro=5)
    cap = tunkit.capture(a, io.BytesIO())
    try:
        assert cap.tun is a
        assert (cap.mwo(), cap.mro(), cap.mtu(), cap.name(), cap.batch_size()) == (
            3, 5, 1400, "pipe-tun-0", 4)
        assert cap.events() is a.events()
        with pytest.raises(io.UnsupportedOperation):
            cap.fileno()
    finally:
        cap.close()
        b.close()


def test_a_classic_pcap_writer_takes_one_tun() -> None:
    writer = pcap.Writer(io.BytesIO(), pcap_format="pcap")
    first = tunkit.capture(tunkit.pipe()[0], writer)
    second_end, _ = tunkit.pipe()
    with pytest.raises(ValueError, match="one interface"):
        tunkit.capture(second_end, writer)
    first.close()
    second_end.close()
    writer.close()
    with pytest.raises(ValueError, match="buffer_size"):
        tunkit.capture(second_end, io.BytesIO(), buffer_size=-1)


def test_close_from_two_threads_at_once() -> None:
    host, end = tunkit.pipe()
    cap = tunkit.capture(end, io.BytesIO())
    barrier = threading.Barrier(3)
    done: list[str] = []

    def closer() -> None:
        barrier.wait()
        cap.close()
        # Whichever close() did the work, each returns once it is done.
        done.append(f"capture thread alive: {cap._thread.is_alive()}")  # type: ignore[attr-defined]

    threads = [threading.Thread(target=closer, name=f"test-close-{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert done == ["capture thread alive: False"] * 3 and host.closed


class HeldReturn:
    """A pipe end whose write returns only when the test lets it, after the packet went out."""

    def __init__(self, end: PipeTun) -> None:
        self.end = end
        self.returning = threading.Event()

    def write(self, bufs: Sequence[Any], offset: int = 0) -> int:
        n = self.end.write(bufs, offset)
        self.returning.wait(10)  # the window between the system call and the return
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.end, name)


def test_close_waits_for_a_call_in_flight_to_record_what_it_moved() -> None:
    host, end = tunkit.pipe()
    file = io.BytesIO()
    held = HeldReturn(end)
    cap = tunkit.capture(held, file)  # type: ignore[arg-type]
    pkt = ipv4_packet(1, 80)
    thread, errors = in_thread(lambda: cap.write([pkt]))
    closer, close_errors = in_thread(lambda: None)
    try:
        assert read_packets(host, 1) == [pkt]  # out, while the write has not returned
        closer, close_errors = in_thread(cap.close)
        # close() waits for the call in flight (which has not returned yet).
        wait_inside(closer, type(cap).close, threading.Condition.wait)
        assert thread.is_alive()
    finally:
        held.returning.set()
        closer.join(10)
        thread.join(10)
    assert not errors and not close_errors
    assert [(r.direction, r.data) for r in records(file.getvalue())] == [("out", pkt)]


# -- a full buffer drops capture records, never packets ---------------------------------


class SlowFile(io.RawIOBase):
    """A binary file that takes its time with every write."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        time.sleep(self.delay)
        self.data += bytes(b)
        return len(b)


@pytest.mark.timeout(120)
def test_copy_at_full_speed_into_a_slow_file_stays_bounded() -> None:
    count, size, limit = 20_000, 1000, 64 << 10
    slow = SlowFile(0.002)
    writer = pcap.Writer(slow)
    host_a, host_b, cap_a, cap_b, copier = _copy_captured(writer, buffer_size=limit)
    packets = [ipv4_packet(i, size) for i in range(count)]
    peak_queued = 0
    tracemalloc.start()
    try:
        thread, errors = in_thread(lambda: write_packets(host_a, packets))
        got = 0
        bufs = [bytearray(1500) for _ in range(8)]
        sizes = [0] * 8
        while got < count:
            n = host_b.read(bufs, sizes)
            for i in range(n):  # every packet arrives, in order
                assert bytes(bufs[i][: sizes[i]]) == packets[got + i]
            got += n
            peak_queued = max(peak_queued, cap_a.capture_stats().queued_bytes,
                              cap_b.capture_stats().queued_bytes)
        thread.join(30)
        assert not errors
        _, peak_traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        host_a.close()
        copier.join(30)
        writer.close()
    assert peak_queued <= limit
    # 2 x 20 MB went through the captures; the buffers hold 2 x 64 KB.
    assert peak_traced < 8 << 20, f"{peak_traced} bytes traced at the peak"
    for cap in (cap_a, cap_b):
        stats = cap.capture_stats()
        assert stats.dropped > 0
        assert stats.recorded + stats.dropped == count
        assert stats.queued_bytes == 0
    recs = records(bytes(slow.data))
    assert len(recs) == cap_a.capture_stats().recorded + cap_b.capture_stats().recorded
    for end, direction in ((cap_a.name(), "in"), (cap_b.name(), "out")):
        kept = [r.data for r in recs if (r.interface, r.direction) == (end, direction)]
        index = iter(packets)  # what was kept is what was sent, in order, minus the drops
        assert all(any(p == k for p in index) for k in kept)


class FailingFile(io.BytesIO):
    """A file that is full after its first *room* bytes."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, b: Any) -> int:
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_a_file_error_drops_records_not_packets_and_close_raises_it() -> None:
    f = FailingFile(room=600)
    host, end = tunkit.pipe(4)
    cap = tunkit.capture(end, f)
    packets = [ipv4_packet(i, 200) for i in range(30)]
    thread, errors = in_thread(lambda: write_packets(host, packets))
    assert read_packets(cap, len(packets)) == packets
    thread.join(10)
    assert not errors
    with pytest.raises(OSError, match="No space") as raised:
        cap.close()
    assert raised.value.errno == errno.ENOSPC
    assert cap.capture_error is raised.value
    cap.close()  # raised once
    stats = cap.capture_stats()
    assert stats.recorded + stats.dropped == len(packets) and stats.dropped > 0
    assert [r.data for r in records(f.getvalue())] == packets[: stats.recorded]


# -- super-packets: passed whole, recorded as their segments ------------------------------


class VnetPipe:
    """An in-memory GsoTun: one end of a pipe whose packets travel with a virtio-net header.

    ``read_gso``/``write_gso`` move the header and packet whole; ``read``
    splits what came with the offload engine, ``write`` sends each packet
    behind a zero header (GSO_NONE). The peer must be a VnetPipe too.
    """

    def __init__(self, end: PipeTun) -> None:
        self.end = end

    def read_gso(
        self, bufs: Sequence[Any], sizes: MutableSequence[int], offset: int = 16
    ) -> int:
        n = self.end.read([memoryview(b)[offset - VNET:] for b in bufs], sizes)
        for i in range(n):
            sizes[i] -= VNET
        return n

    def write_gso(self, bufs: Sequence[Any], offset: int = 16) -> int:
        return self.end.write([memoryview(b)[offset - VNET:] for b in bufs])

    def read(self, bufs: Sequence[Any], sizes: MutableSequence[int], offset: int = 16) -> int:
        frame, frame_size = bytearray(VNET + 65535), [0]
        self.end.read([frame], frame_size)
        return split(memoryview(frame)[: frame_size[0]], bufs, sizes, offset)

    def write(self, bufs: Sequence[Any], offset: int = 16) -> int:
        return self.end.write([bytes(VNET) + bytes(memoryview(b)[offset:]) for b in bufs])

    def mwo(self) -> int:
        return 16

    def mro(self) -> int:
        return 16

    def mtu(self) -> int:
        return 1500

    def name(self) -> str:
        return f"vnet-{self.end.name()}"

    def events(self) -> tunkit.Events:
        return self.end.events()

    def batch_size(self) -> int:
        return self.end.batch_size()

    def fileno(self) -> int:
        return self.end.fileno()

    def close(self) -> None:
        self.end.close()


FLOWS = [Flow(), Flow.v6(), Flow(proto=UDP), Flow.v6(proto=UDP)]


@pytest.mark.parametrize("flow", FLOWS, ids=["tcp4", "tcp6", "udp4", "udp6"])
def test_super_packets_pass_whole_and_are_recorded_as_segments(flow: Flow) -> None:
    payload = payload_bytes(5000, 3)
    sp = flow.super_packet(payload, 1200, seq=100, ip_id=7)
    segments = flow.segments(payload, 1200, seq=100, ip_id=7)  # from the kernel's rules
    assert len(segments) == 5
    csum_payload = b"needs its checksum completed"
    partial = partial_none(flow, csum_payload)
    complete = flow.packet(csum_payload)
    h1, t1 = tunkit.pipe(8)
    t2, h2 = tunkit.pipe(8)
    host_a, host_b = VnetPipe(h1), VnetPipe(h2)
    file = io.BytesIO()
    writer = pcap.Writer(file)
    cap_a = tunkit.capture(VnetPipe(t1), writer)
    cap_b = tunkit.capture(VnetPipe(t2), writer)
    copier = threading.Thread(target=tunkit.copy, args=(cap_a, cap_b), name="test-copy")
    copier.start()
    try:
        thread, errors = in_thread(
            lambda: host_a.write_gso([bytes(6) + sp, bytes(6) + partial])
        )
        bufs = [bytearray(16 + 65535) for _ in range(8)]
        sizes = [0] * 8
        got: list[bytes] = []
        while len(got) < 2:
            n = host_b.read_gso(bufs, sizes)
            got += [bytes(bufs[i][6 : 16 + sizes[i]]) for i in range(n)]
        assert got == [sp, partial]  # copy moved them whole, headers and all
        thread.join(10)
        assert not errors
    finally:
        host_a.close()
        copier.join(10)
        host_b.close()
    writer.close()
    want = [*segments, complete]  # packets.py's, with their checksums from tests/oracles.py
    assert by_end(records(file.getvalue())) == {
        (cap_a.name(), "in"): want, (cap_b.name(), "out"): want}
    assert cap_a.capture_stats().recorded == len(want)


# -- native devices in namespaces: real ping and TCP through captured devices ------------


@pytest.fixture(params=DEVICE_KINDS)
def captured_pair(
    netns_factory: MakeNs, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[tuple[Pair, pcap.Writer, Path]]:
    offload = device_kind(request.param, monkeypatch)
    pair = Pair(netns_factory("capa"), netns_factory("capb"), offload=offload)
    path = tmp_path / "pair.pcapng"
    writer = pcap.Writer(path)

    def loop(a: Tun, b: Tun) -> None:  # both devices are tun0, each in its namespace
        tunkit.copy(tunkit.capture(a, writer, name="A"), tunkit.capture(b, writer, name="B"))

    try:
        pair.start_copy(loop=loop)
        yield pair, writer, path
    finally:
        pair.close()
        writer.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [4, 6])
def test_a_real_ping_through_captured_devices(
    captured_pair: tuple[Pair, pcap.Writer, Path], version: int
) -> None:
    need_tool("ping")
    pair, writer, path = captured_pair
    src, dst = (pair.A4, pair.B4) if version == 4 else (pair.A6, pair.B6)
    result = ns_run(pair.ns_a, "ping", f"-{version}", "-c", "3", "-i", "0.2", "-W", "2", dst,
                    check=False)
    assert "3 received" in result.stdout, result.stdout + result.stderr
    pair.close()  # ends copy, which closes (and flushes) both captures
    writer.close()
    a, b = "A", "B"
    echo = ("icmp.type == 8 || icmp.type == 0" if version == 4
            else "icmpv6.type == 128 || icmpv6.type == 129")
    seen_by = {"tshark": pcap_readers.tshark(path, echo)}

    def is_echo(data: bytes) -> bool:
        if data[0] >> 4 != version:
            return False
        if version == 4:
            return ICMP in IP(data) and IP(data)[ICMP].type in (0, 8)
        return ICMPv6EchoRequest in IPv6(data) or ICMPv6EchoReply in IPv6(data)

    seen_by["scapy"] = [s for s in pcap_readers.scapy(path) if is_echo(s.data)]
    for reader, seen in seen_by.items():
        ends: dict[tuple[str | None, str | None], list[pcap_readers.Seen]] = {}
        for s in seen:
            ends.setdefault((s.interface, s.direction), []).append(s)
        assert Counter({k: len(v) for k, v in ends.items()}) == Counter(
            {(a, "in"): 3, (b, "out"): 3, (b, "in"): 3, (a, "out"): 3}), reader
        assert {(s.src, s.dst) for s in ends[(a, "in")] + ends[(b, "out")]} == {(src, dst)}
        assert {(s.src, s.dst) for s in ends[(b, "in")] + ends[(a, "out")]} == {(dst, src)}
        # copy passed each packet unchanged: what a read is what b wrote, and back
        assert [s.data for s in ends[(a, "in")]] == [s.data for s in ends[(b, "out")]]
        assert [s.data for s in ends[(b, "in")]] == [s.data for s in ends[(a, "out")]]


@pytest.mark.timeout(120)
def test_tcp_through_captured_offload_devices_is_recorded_as_valid_segments(
    netns_factory: MakeNs, tmp_path: Path
) -> None:
    size = 8 << 20
    path = tmp_path / "tcp.pcapng"
    writer = pcap.Writer(path)
    pair = Pair(netns_factory("tcpa"), netns_factory("tcpb"), offload=True)
    caps: list[CapturedTun] = []

    def loop(a: Tun, b: Tun) -> None:
        caps.extend(tunkit.capture(t, writer, buffer_size=256 << 20, name=n)
                    for t, n in ((a, "A"), (b, "B")))
        tunkit.copy(*caps)

    try:
        pair.start_copy(loop=loop)
        tcp_transfer(pair, size)
        gso_read = pair.a.stats().gso_read
    finally:
        pair.close()
        writer.close()
    assert gso_read > 0, "no super-packet was read whole: nothing was split for the capture"
    assert all(c.capture_stats().dropped == 0 for c in caps)
    a, b = "A", "B"
    fields = pcap_readers.tshark_fields(
        path, "frame.interface_name", "frame.packet_flags_direction", "frame.len", "tcp.len",
        "tcp.checksum.status", "ip.checksum.status",
        display_filter="tcp.dstport == 5201",
        prefs=["tcp.check_checksum:TRUE", "ip.check_checksum:TRUE"],
    )
    sent: Counter[tuple[str, str]] = Counter()
    for name, flags, frame_len, tcp_len, tcp_ok, ip_ok in fields:
        assert int(frame_len) <= 1500  # segments, not super-packets
        assert (tcp_ok, ip_ok) == ("1", "1"), "tshark found a bad checksum"
        sent[(name, flags)] += int(tcp_len)
    assert sent[(a, "0x00000001")] >= size  # read from a ("in"), retransmissions included
    assert sent[(a, "0x00000001")] == sent[(b, "0x00000002")]  # and written to b ("out")


def test_a_native_read_without_offset_uses_the_devices_default(netns_factory: MakeNs) -> None:
    h = NativeHarness(netns_factory("capdef"))
    file = io.BytesIO()
    cap = tunkit.capture(h.tun, file)
    try:
        pkt = h.packet(3, 200)
        h.inject([pkt])
        bufs = [bytearray(2000)]
        sizes = [0]
        assert cap.read(bufs, sizes) == 1  # NativeTun.read's offset defaults to its headroom
        assert bytes(bufs[0][16 : 16 + sizes[0]]) == pkt
    finally:
        h.tun = cap  # type: ignore[assignment]
        h.close()
    assert [r.data for r in records(file.getvalue())] == [pkt]

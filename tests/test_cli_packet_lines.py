"""bridge --verbose's line printer: a line per packet read, bounded, what it leaves out counted."""

from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from scapy.all import ICMP, IP, UDP, raw  # type: ignore[attr-defined]

import tunkit
from tunkit.cli.packet_lines import PERIOD, QUEUE_LINES, PacketLines, TeeWriter

# Summaries written out by hand, in tcpdump's manner.
UDP_PKT = raw(IP(src="192.0.2.1", dst="192.0.2.2", id=1) / UDP(sport=5000, dport=53) / b"hi")
UDP_LINE = "IP 192.0.2.1.5000 > 192.0.2.2.53: udp len 2"
PING_PKT = raw(IP(src="192.0.2.2", dst="192.0.2.1") / ICMP(type=0) / bytes(56))
PING_LINE = "IP 192.0.2.2 > 192.0.2.1: icmp echo reply, len 64"

NOTE = re.compile(r"\[([\d,]+) packets not shown: they came faster than lines are printed\]")
LINE = re.compile(r" *\d+\.\d{6} (.*)")


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=80), out


def _split(text: str) -> tuple[list[str], int]:
    """The packet lines (without their times) and the packets the notes say were left out."""
    lines = [m[1] for m in map(LINE.fullmatch, text.splitlines()) if m]
    missed = sum(int(m[1].replace(",", "")) for m in NOTE.finditer(text))
    return lines, missed


def test_a_line_per_packet_with_its_route_and_time() -> None:
    console, out = _console()
    lines = PacketLines(console, ["tka → tkb", "tkb → tka"])
    lines.start()
    now = time.time_ns()
    lines.offer(0, [UDP_PKT], now)
    lines.offer(1, [PING_PKT, b"\x45\x00"], now + 1_500_000)
    lines.close()
    assert _split(out.getvalue()) == ([
        f"tka → tkb {UDP_LINE}",
        f"tkb → tka {PING_LINE}",
        "tkb → tka malformed packet of 2 bytes: IPv4 header truncated: 2 of 20 bytes",
    ], 0)
    first, second = (float(line.split()[0]) for line in out.getvalue().splitlines()[:2])
    assert second - first == pytest.approx(0.0015, abs=1e-6)
    assert (lines.printed(), lines.not_shown()) == (3, 0)


def test_beyond_the_bound_packets_are_counted_and_said_not_shown() -> None:
    console, out = _console()
    lines = PacketLines(console, ["a → b"])
    lines.offer(0, [UDP_PKT] * (QUEUE_LINES + 500), time.time_ns())  # before printing starts
    lines.offer(0, [UDP_PKT] * 7, time.time_ns())
    lines.close()
    shown, missed = _split(out.getvalue())
    assert shown == [f"a → b {UDP_LINE}"] * QUEUE_LINES
    assert missed == 507 and out.getvalue().splitlines()[-1] == (
        "[507 packets not shown: they came faster than lines are printed]")
    assert (lines.printed(), lines.not_shown()) == (QUEUE_LINES, 507)
    lines.offer(0, [UDP_PKT], time.time_ns())  # closed: counted, never printed
    assert (lines.printed(), lines.not_shown()) == (QUEUE_LINES, 508)


def test_a_flood_prints_a_bounded_number_of_lines_and_counts_every_packet() -> None:
    console, out = _console()
    lines = PacketLines(console, ["a → b", "b → a"])
    lines.start()
    offered = [0, 0]
    stop = threading.Event()

    def flood(interface: int) -> None:  # as the two capture threads of a bridge do
        while not stop.is_set():
            lines.offer(interface, [UDP_PKT] * 64, time.time_ns())
            offered[interface] += 64

    started = time.monotonic()
    floods = [threading.Thread(target=flood, args=(i,)) for i in (0, 1)]
    for t in floods:
        t.start()
    time.sleep(4 * PERIOD)
    stop.set()
    for t in floods:
        t.join()
    lines.close()
    elapsed = time.monotonic() - started
    shown, missed = _split(out.getvalue())
    # A batch of at most QUEUE_LINES per PERIOD, and the last one at close.
    assert len(shown) <= QUEUE_LINES * (elapsed / PERIOD + 2)
    assert len(shown) == lines.printed() and missed == lines.not_shown() > 0
    assert len(shown) + missed == sum(offered)
    assert {line.split(" IP ")[0] for line in shown} == {"a → b", "b → a"}


def test_tee_writer_records_both_directions_and_gives_lines_for_packets_read(
    tmp_path: Path,
) -> None:
    console, out = _console()
    path = tmp_path / "t.pcapng"
    writer = TeeWriter(path)
    lines = PacketLines(console, ["x → y"])
    writer.packet_lines = lines
    lines.start()
    host, end = tunkit.pipe()
    tun = tunkit.capture(end, writer, name="x")
    try:
        threading.Thread(target=host.write, args=([UDP_PKT],)).start()
        bufs, sizes = [bytearray(1500)], [0]
        assert tun.read(bufs, sizes) == 1  # "in": a line, and a record
        got, got_sizes = [bytearray(1500)], [0]
        reader = threading.Thread(target=host.read, args=(got, got_sizes))  # a pipe hands over
        reader.start()
        assert tun.write([PING_PKT]) == 1  # "out": a record only
        reader.join()
        assert bytes(got[0][: got_sizes[0]]) == PING_PKT
    finally:
        tun.close()
        host.close()
        writer.close()
        lines.close()
    records = [(r.direction, r.interface, r.data) for r in tunkit.pcap.read(path)]
    assert records == [("in", "x", UDP_PKT), ("out", "x", PING_PKT)]
    assert _split(out.getvalue()) == ([f"x → y {UDP_LINE}"], 0)


def test_tee_writer_without_a_file_only_gives_lines() -> None:
    console, out = _console()
    writer = TeeWriter(None)
    lines = PacketLines(console, ["x → y"])
    writer.packet_lines = lines
    interface = writer.add_interface("x")
    writer.write(interface, [UDP_PKT], "in")
    writer.write(interface, [PING_PKT], "out")
    writer.close()
    lines.close()
    assert _split(out.getvalue()) == ([f"x → y {UDP_LINE}"], 0)

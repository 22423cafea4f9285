"""Behaviour every Tun must show, written once and run on each implementation.

A test module subclasses :class:`TunConformance` and provides a ``harness``
fixture (a :class:`Harness`): the pipe in ``test_pipe.py``, the native device
in namespaces in ``test_native*.py``.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import pytest

from tunkit import ClosedError, Event, OffsetError, Tun


class Harness(Protocol):
    """What a conformance run needs from one implementation."""

    tun: Tun

    def inject(self, packets: Sequence[bytes]) -> None:
        """Make *packets* readable from ``tun``, in order, without waiting for the reads."""

    def collect(self, count: int, timeout: float) -> list[bytes]:
        """Return the *count* packets that ``tun.write`` sent, in order."""

    def packet(self, i: int, size: int) -> bytes:
        """A valid IPv4 packet of exactly *size* bytes, distinct for each *i*."""

    def wait_blocked(self, thread: threading.Thread) -> None:
        """Return once *thread* is blocked in a read of ``tun``; fail if it returns instead."""

    def close(self) -> None:
        """Release what the harness made (the Tun included)."""


def read_packets(
    tun: Tun, count: int, offset: int | None = None, room: int | None = None, timeout: float = 10.0
) -> list[bytes]:
    """Read until *count* packets came (or *timeout* passed); return their bytes."""
    off = tun.mro() if offset is None else offset
    size = off + (tun.mtu() if room is None else room)
    bufs = [bytearray(size) for _ in range(tun.batch_size())]
    sizes = [0] * len(bufs)
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        n = tun.read(bufs, sizes, off)
        assert 0 <= n <= len(bufs)
        out.extend(bytes(bufs[i][off : off + sizes[i]]) for i in range(n))
    return out


def write_packets(tun: Tun, packets: Sequence[bytes], offset: int | None = None) -> None:
    """Write each of *packets* behind *offset* bytes of headroom, looping on partial writes."""
    off = tun.mwo() if offset is None else offset
    bufs = [bytes(off) + p for p in packets]
    done = 0
    while done < len(bufs):
        n = tun.write(bufs[done : done + tun.batch_size()], off)
        assert n > 0
        done += n


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """Start *fn* on a thread; return it and a list that receives its exception."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-worker")
    thread.start()
    return thread, errors


class TunConformance:
    """The Tun protocol's behaviour; subclasses provide the ``harness`` fixture."""

    SIZES = (28, 64, 100, 576, 1000, 1400, 1500)

    def test_is_a_tun(self, harness: Harness) -> None:
        assert isinstance(harness.tun, Tun)
        assert harness.tun.batch_size() >= 1
        assert harness.tun.batch_size() == harness.tun.batch_size()
        assert isinstance(harness.tun.name(), str) and harness.tun.name()
        assert harness.tun.mtu() >= 1280

    def test_fileno_is_a_descriptor_or_unsupported(self, harness: Harness) -> None:
        try:
            fd = harness.tun.fileno()
        except io.UnsupportedOperation:
            return
        assert isinstance(fd, int) and fd >= 0

    def test_packets_arrive_whole_and_in_order(self, harness: Harness) -> None:
        packets = [harness.packet(i, self.SIZES[i % len(self.SIZES)]) for i in range(40)]
        harness.inject(packets)
        assert read_packets(harness.tun, len(packets)) == packets

    @pytest.mark.parametrize("extra", [0, 1, 7, 16, 33])
    def test_read_offsets(self, harness: Harness, extra: int) -> None:
        packets = [harness.packet(i, 200 + i) for i in range(5)]
        harness.inject(packets)
        assert read_packets(harness.tun, 5, offset=harness.tun.mro() + extra) == packets

    @pytest.mark.parametrize("extra", [0, 1, 7, 16, 33])
    def test_write_offsets(self, harness: Harness, extra: int) -> None:
        packets = [harness.packet(i, 300 + i) for i in range(5)]
        thread, errors = in_thread(
            lambda: write_packets(harness.tun, packets, harness.tun.mwo() + extra)
        )
        try:
            assert harness.collect(len(packets), timeout=10) == packets
        finally:
            thread.join(10)
        assert not errors

    def test_offset_below_minimum_raises(self, harness: Harness) -> None:
        tun = harness.tun
        bufs = [bytearray(2000) for _ in range(tun.batch_size())]
        with pytest.raises(OffsetError):
            tun.read(bufs, [0] * len(bufs), tun.mro() - 1)
        with pytest.raises(OffsetError):
            tun.write([bytes(2000)], tun.mwo() - 1)

    def test_packet_longer_than_room_never_overflows(self, harness: Harness) -> None:
        # In-memory kinds truncate it, native kinds drop and count it; the next
        # packet arrives whole either way. Read one packet at a time until the
        # small one comes: a dropped packet never arrives, so never wait for it.
        tun = harness.tun
        big, small = harness.packet(1, 1400), harness.packet(2, 100)
        harness.inject([big, small])
        room = 600
        got: list[bytes] = []
        while small not in got and len(got) < 2:
            got.extend(read_packets(tun, 1, room=room, timeout=3))
        assert got[-1] == small
        assert all(len(p) <= room for p in got)
        if len(got) == 2:
            assert got[0] == big[:room]
        stats = getattr(tun, "stats", None)
        if len(got) == 1:
            assert stats is not None, "a Tun that drops long packets must count them"
            assert stats().dropped_too_big == 1

    def test_close_unblocks_a_blocked_read(self, harness: Harness) -> None:
        tun = harness.tun
        thread, errors = in_thread(lambda: read_packets(tun, 1, timeout=30))
        try:
            harness.wait_blocked(thread)
            thread.join(0.2)  # and it stays blocked
            assert thread.is_alive(), "read returned with no packet"
            started = time.monotonic()
        finally:
            tun.close()
            thread.join(5)
        assert not thread.is_alive()
        assert time.monotonic() - started < 1.0
        assert len(errors) == 1 and isinstance(errors[0], ClosedError)

    def test_calls_after_close_raise_closed(self, harness: Harness) -> None:
        tun = harness.tun
        tun.close()
        tun.close()  # idempotent
        bufs = [bytearray(2000) for _ in range(tun.batch_size())]
        with pytest.raises(ClosedError):
            tun.read(bufs, [0] * len(bufs), tun.mro())
        with pytest.raises(ClosedError):
            tun.write([bytes(tun.mwo()) + harness.packet(0, 100)], tun.mwo())

    def test_events_start_up_and_end_at_close(self, harness: Harness) -> None:
        events = harness.tun.events()
        assert events.get(timeout=5) == Event.UP
        harness.tun.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if events.get(timeout=5) is None:
                break
        else:
            pytest.fail("events stream did not end after close()")
        assert events.get(timeout=1) is None

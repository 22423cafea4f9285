"""copy, Forwarder and Point2Point over pipes: delivery, batching, errors, pools, threads."""

from __future__ import annotations

import threading
import time
from collections.abc import MutableSequence, Sequence
from typing import Any

import pytest
from blocking import wait_channel, wait_inside, wait_until
from conformance import in_thread, read_packets, write_packets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pipe import ipv4_packet

import tunkit
from tunkit import (
    CallbackTun,
    DebugPool,
    Forwarder,
    ForwarderStats,
    Point2Point,
    TooManySegmentsError,
    TunError,
)


class ScriptedTun(CallbackTun):
    """A pipe end whose calls raise what ``read_errors``/``write_errors`` queue."""

    def __init__(self, tun: Any) -> None:
        super().__init__(tun)
        # Queued per call; None lets that call through.
        self.read_errors: list[BaseException | None] = []
        self.write_errors: list[BaseException | None] = []
        self.write_sizes: list[int] = []

    def read(self, bufs: Sequence[Any], sizes: MutableSequence[int], offset: int = 0) -> int:
        if self.read_errors and (error := self.read_errors.pop(0)) is not None:
            raise error
        return super().read(bufs, sizes, offset)

    def write(self, bufs: Sequence[Any], offset: int = 0) -> int:
        if self.write_errors and (error := self.write_errors.pop(0)) is not None:
            raise error
        self.write_sizes.append(len(bufs))
        return super().write(bufs, offset)


def _tunkit_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tunkit-")]


# -- copy -------------------------------------------------------------------------


@pytest.mark.parametrize(("mwo", "mro"), [(0, 0), (3, 0), (0, 5), (16, 16), (29, 1)])
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_copy_carries_both_ways(batch: int, mwo: int, mro: int) -> None:
    t1, t2 = tunkit.pipe(batch, 1500, mwo, mro)
    t3, t4 = tunkit.pipe(batch, 1500, mwo, mro)
    copier, copy_errors = in_thread(lambda: tunkit.copy(t2, t3))
    out1 = [ipv4_packet(i, 28 + (i * 53) % 1400) for i in range(100)]
    out4 = [ipv4_packet(1000 + i, 28 + (i * 71) % 1400) for i in range(100)]
    w1, e1 = in_thread(lambda: write_packets(t1, out1))
    w4, e4 = in_thread(lambda: write_packets(t4, out4))
    assert read_packets(t4, 100) == out1
    assert read_packets(t1, 100) == out4
    w1.join(5)
    w4.join(5)
    t1.close()
    t4.close()
    copier.join(5)
    assert not copier.is_alive() and not copy_errors and not e1 and not e4


def test_copy_chunks_writes_to_the_destination_batch_size() -> None:
    """A destination that takes one packet per write gets three writes of one."""
    src_user, src = tunkit.pipe(batch_size=3)
    dst_raw, dst_user = tunkit.pipe(batch_size=1)
    dst = ScriptedTun(dst_raw)
    copier, _ = in_thread(lambda: tunkit.copy(src, dst))
    packets = [ipv4_packet(i, 60) for i in range(3)]
    writer, _ = in_thread(lambda: src_user.write(packets))
    assert read_packets(dst_user, 3) == packets
    writer.join(5)
    assert dst.write_sizes == [1, 1, 1]
    src_user.close()
    copier.join(5)


def test_copy_returns_none_when_a_tun_is_closed_and_closes_the_other() -> None:
    a_user, a = tunkit.pipe()
    b, b_user = tunkit.pipe()
    copier, errors = in_thread(lambda: tunkit.copy(a, b))
    try:
        # Both directions running: each blocked in a read of its Tun.
        wait_channel(a._rx, writers=0, readers=1)
        wait_channel(b._rx, writers=0, readers=1)
    finally:
        a_user.close()
        copier.join(5)
    assert not copier.is_alive() and errors == []
    with pytest.raises(tunkit.ClosedError):
        b_user.write([b"x"])


def test_copy_raises_the_first_real_error_and_retries_retryable_reads() -> None:
    a_user, a_raw = tunkit.pipe()
    b, b_user = tunkit.pipe()
    a = ScriptedTun(a_raw)
    a.read_errors = [TooManySegmentsError("need more buffers")]
    result: list[BaseException] = []

    def run() -> None:
        try:
            tunkit.copy(a, b)
        except BaseException as exc:
            result.append(exc)

    copier = threading.Thread(target=run)
    copier.start()
    writer, _ = in_thread(lambda: a_user.write([b"after retry"]))
    assert read_packets(b_user, 1) == [b"after retry"]
    writer.join(5)
    a.read_errors.append(RuntimeError("device exploded"))
    # The copy is either about to call read (and meets the error at once) or
    # blocked in one: "y" ends that read and the next one meets the error.
    writer, _ = in_thread(lambda: a_user.write([b"y"]))
    drain, _ = in_thread(lambda: read_packets(b_user, 1, timeout=5))
    copier.join(5)
    writer.join(5)
    drain.join(5)
    assert not copier.is_alive()
    assert len(result) == 1 and isinstance(result[0], RuntimeError)


def test_write_that_makes_no_progress_raises() -> None:
    class Stuck(ScriptedTun):
        def write(self, bufs: Sequence[Any], offset: int = 0) -> int:
            return 0

    a_user, a = tunkit.pipe()
    b_raw, b_user = tunkit.pipe()
    with pytest.raises(TunError, match="tun: write made no progress"):
        writer, _ = in_thread(lambda: a_user.write([b"p"]))
        try:
            tunkit.copy(a, Stuck(b_raw))
        finally:
            writer.join(5)
            b_user.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=20),
                     min_size=1, max_size=8),
    batch_size=st.integers(1, 16),
)
def test_pipe_copy_pipe_is_byte_identical_and_in_order(
    batches: list[list[bytes]], batch_size: int
) -> None:
    t1, t2 = tunkit.pipe(batch_size)
    t3, t4 = tunkit.pipe(batch_size)
    copier, errors = in_thread(lambda: tunkit.copy(t2, t3))
    sent = [p for batch in batches for p in batch]
    writer, _ = in_thread(lambda: [write_packets(t1, batch) for batch in batches])
    got = read_packets(t4, len(sent), room=1500)
    writer.join(5)
    t1.close()
    copier.join(5)
    t4.close()
    assert got == sent and not errors


# -- Forwarder and Point2Point -------------------------------------------------------


@pytest.mark.parametrize("pool_kind", ["none", "debug", "pool"])
def test_forwarder_carries_packets_and_returns_every_buffer(pool_kind: str) -> None:
    pool: Any = {"none": None, "debug": DebugPool(), "pool": tunkit.Pool()}[pool_kind]
    src_user, src = tunkit.pipe(8, mwo=4)
    dst, dst_user = tunkit.pipe(4, mwo=16)
    fwd = Forwarder(pool)
    fwd.set_read_tun(src)
    fwd.set_write_tun(dst)
    packets = [ipv4_packet(i, 40 + i) for i in range(200)]
    writer, _ = in_thread(lambda: write_packets(src_user, packets))
    assert read_packets(dst_user, 200) == packets
    writer.join(5)
    fwd.stop()
    fwd.stop()  # idempotent
    assert not [n for n in _tunkit_threads() if n.startswith("tunkit-fwd")]
    if isinstance(pool, DebugPool):
        assert pool.outstanding == 0
        pool.close()
    with pytest.raises(tunkit.ClosedError):
        src_user.write([bytes(4) + b"x"], 4)


def test_forwarder_waits_without_tuns_and_stop_joins_its_threads() -> None:
    before = set(_tunkit_threads())
    with Forwarder() as fwd:
        started = [t for t in threading.enumerate() if t.name.startswith("tunkit-fwd")]
        assert len(set(_tunkit_threads()) - before) == 2 and len(started) == 2
        # Waiting: each asleep on the Forwarder's condition, not spinning, not gone.
        reader, writer = sorted(started, key=lambda t: "write" in t.name)
        wait_inside(reader, Forwarder._read_loop, threading.Condition.wait)
        wait_inside(writer, Forwarder._writer, threading.Condition.wait)
    assert fwd.stopped
    assert set(_tunkit_threads()) == before
    a, _b = tunkit.pipe()
    fwd.set_read_tun(a)  # does nothing after stop
    assert not a.closed
    a.close()


@pytest.mark.parametrize("batch", [4, 1], ids=["batches", "streak"])
def test_forwarder_hot_swap_of_the_write_tun_loses_no_accepted_packet(batch: int) -> None:
    """Each swap comes while a write to the old Tun is blocked, with batches queued behind it.

    The reader of each write Tun but the last stops after a share of the
    packets, so the Forwarder is stuck in a write to it when it is swapped
    out: the rest of that batch, and the queue, must go to the new one. Batch
    1 (no offload) is moved by the reader's streak of its own writes.
    """
    pool = DebugPool()
    src_user, src = tunkit.pipe(batch)
    fwd = Forwarder(pool)
    fwd.set_read_tun(src)
    total, share = 400, 40
    packets = [ipv4_packet(i, 64) for i in range(total)]
    received: list[bytes] = []
    lock = threading.Lock()

    def drain(tun: Any, limit: int | None) -> None:
        """Read until *tun* closes, or until *limit* packets came (then read no more)."""
        bufs = [bytearray(1500) for _ in range(4)]
        sizes = [0] * 4
        got = 0
        while limit is None or got < limit:
            try:
                n = tun.read(bufs, sizes)
            except tunkit.ClosedError:
                return
            got += n
            with lock:
                received.extend(bytes(bufs[i][: sizes[i]]) for i in range(n))

    accepted: list[int] = []

    def produce() -> None:
        i = 0
        while i < total:
            n = src_user.write(packets[i : i + 4])
            accepted.append(n)
            i += n

    writer, werr = in_thread(produce)
    outs = []
    try:
        for k in range(6):
            nxt, nxt_user = tunkit.pipe(2 if k == 0 else 3)
            limit = share if k < 5 else None
            outs.append((nxt_user, in_thread(lambda u=nxt_user, n=limit: drain(u, n))[0]))
            fwd.set_write_tun(nxt)
            if limit is not None:
                outs[-1][1].join(10)  # took its share and reads no more: the next write blocks
                wait_channel(nxt._tx, writers=1, readers=0)
        writer.join(10)
        wait_until(lambda: len(received) >= sum(accepted), "every accepted packet arrived", 5)
    finally:
        fwd.stop()
        src_user.close()
        writer.join(5)
        for user, thread in outs:
            user.close()
            thread.join(5)
    assert not werr and sum(accepted) == total
    assert sorted(received) == sorted(packets)
    assert pool.outstanding == 0


def test_forwarder_read_error_closes_that_tun_and_waits_for_a_new_one() -> None:
    src_user, src_raw = tunkit.pipe()
    src = ScriptedTun(src_raw)
    src.read_errors = [RuntimeError("read failed")]
    dst, dst_user = tunkit.pipe()
    with Forwarder() as fwd:
        fwd.set_write_tun(dst)
        fwd.set_read_tun(src)
        deadline = time.monotonic() + 5
        while not src_raw.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert src_raw.closed
        new_user, new_src = tunkit.pipe()
        fwd.set_read_tun(new_src)
        writer, _ = in_thread(lambda: new_user.write([b"still forwarding"]))
        assert read_packets(dst_user, 1) == [b"still forwarding"]
        writer.join(5)
    # stop() closed both Tuns: that ClosedError is not counted.
    assert fwd.stats() == ForwarderStats(read_errors=1, last_error="RuntimeError: read failed")
    new_user.close()
    dst_user.close()
    src_user.close()


def test_forwarder_write_error_drops_the_batch_and_waits_for_a_new_write_tun() -> None:
    src_user, src = tunkit.pipe()
    bad_raw, bad_user = tunkit.pipe()
    bad = ScriptedTun(bad_raw)
    bad.write_errors = [RuntimeError("write failed")]
    with Forwarder() as fwd:
        fwd.set_read_tun(src)
        fwd.set_write_tun(bad)
        src_user.write([b"dropped"])
        deadline = time.monotonic() + 5
        while not bad_raw.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bad_raw.closed
        good, good_user = tunkit.pipe()
        fwd.set_write_tun(good)
        writer, _ = in_thread(lambda: src_user.write([b"delivered"]))
        assert read_packets(good_user, 1) == [b"delivered"]
        writer.join(5)
    assert fwd.stats() == ForwarderStats(
        write_errors=1, dropped=1, last_error="RuntimeError: write failed"
    )
    for t in (src_user, bad_user, good_user):
        t.close()


def _wait_closed(tun: Any) -> None:
    deadline = time.monotonic() + 5
    while not tun.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tun.closed


def test_forwarder_write_error_in_a_streak_drops_that_packet() -> None:
    """Batch 1: after the first packet the reader writes a streak; an error there is as ever."""
    src_user, src = tunkit.pipe()
    bad_raw, bad_user = tunkit.pipe()
    bad = ScriptedTun(bad_raw)
    bad.write_errors = [None, None, RuntimeError("write failed")]
    packets = [ipv4_packet(i, 60) for i in range(4)]
    pool = DebugPool()
    with Forwarder(pool) as fwd:
        fwd.set_write_tun(bad)
        fwd.set_read_tun(src)
        writer, _ = in_thread(lambda: write_packets(src_user, packets))
        assert read_packets(bad_user, 2) == packets[:2]
        _wait_closed(bad_raw)  # packet 2 met the error: dropped with the Tun
        good, good_user = tunkit.pipe()
        fwd.set_write_tun(good)
        assert read_packets(good_user, 1) == packets[3:]  # held for the new write Tun
        writer.join(5)
    assert pool.outstanding == 0
    assert fwd.stats() == ForwarderStats(
        write_errors=1, dropped=1, last_error="RuntimeError: write failed"
    )
    for t in (src_user, bad_user, good_user):
        t.close()


def test_forwarder_read_error_in_a_streak_closes_that_tun() -> None:
    src_user, src_raw = tunkit.pipe()
    src = ScriptedTun(src_raw)
    src.read_errors = [None, None, RuntimeError("read failed")]
    dst, dst_user = tunkit.pipe()
    packets = [ipv4_packet(i, 60) for i in range(4)]
    with Forwarder() as fwd:
        fwd.set_write_tun(dst)
        fwd.set_read_tun(src)
        writer, _ = in_thread(lambda: write_packets(src_user, packets[:2]))
        assert read_packets(dst_user, 2) == packets[:2]
        writer.join(5)
        _wait_closed(src_raw)  # the third read failed, in the streak
        new_user, new_src = tunkit.pipe()
        fwd.set_read_tun(new_src)
        writer, _ = in_thread(lambda: write_packets(new_user, packets[2:]))
        assert read_packets(dst_user, 2) == packets[2:]
        writer.join(5)
    assert fwd.stats() == ForwarderStats(read_errors=1, last_error="RuntimeError: read failed")
    for t in (src_user, dst_user, new_user):
        t.close()


def test_forwarder_counts_retried_reads_and_the_batches_stop_drops() -> None:
    """A retryable read is counted and retried; batches held for a write Tun that never
    came are dropped by stop(), and counted."""
    src_user, src_raw = tunkit.pipe()
    src = ScriptedTun(src_raw)
    src.read_errors = [TooManySegmentsError("need more buffers")]
    packets = [ipv4_packet(i, 60) for i in range(3)]
    fwd = Forwarder(DebugPool())
    try:
        fwd.set_read_tun(src)
        write_packets(src_user, packets)  # the pipe returns once the reader took them
        assert fwd.stats() == ForwarderStats(read_retries=1)
    finally:
        fwd.stop()
    assert fwd.stats() == ForwarderStats(read_retries=1, dropped=3)
    src_user.close()


def test_point_to_point_stats_add_both_directions() -> None:
    a_user, a_raw = tunkit.pipe()
    b_raw, b_user = tunkit.pipe()
    a, b = ScriptedTun(a_raw), ScriptedTun(b_raw)
    a.read_errors = [RuntimeError("a read")]
    b.read_errors = [RuntimeError("b read")]
    with Point2Point() as p2p:
        p2p.set_a(a)
        p2p.set_b(b)
        _wait_closed(a_raw)
        _wait_closed(b_raw)
    assert p2p.a2b.stats() == ForwarderStats(read_errors=1, last_error="RuntimeError: a read")
    assert p2p.stats() == ForwarderStats(
        read_errors=2, last_error="RuntimeError: a read; RuntimeError: b read"
    )
    a_user.close()
    b_user.close()


def test_point_to_point_both_ways_with_a_debug_pool() -> None:
    pool = DebugPool()
    a_user, a = tunkit.pipe(4)
    b, b_user = tunkit.pipe(16)
    with Point2Point(pool) as p2p:
        p2p.set_a(a)
        p2p.set_b(b)
        to_b = [ipv4_packet(i, 100 + i) for i in range(50)]
        to_a = [ipv4_packet(500 + i, 900 + i) for i in range(50)]
        w1, _ = in_thread(lambda: write_packets(a_user, to_b))
        w2, _ = in_thread(lambda: write_packets(b_user, to_a))
        assert read_packets(b_user, 50) == to_b
        assert read_packets(a_user, 50) == to_a
        w1.join(5)
        w2.join(5)
    assert a.closed and b.closed
    assert pool.outstanding == 0
    assert not [n for n in _tunkit_threads() if n.startswith("tunkit-fwd")]

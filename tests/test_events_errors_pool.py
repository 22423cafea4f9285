"""Events, the exception tree, and the buffer pools."""

from __future__ import annotations

import threading

import pytest
from blocking import wait_inside

import tunkit
from tunkit import (
    BufferPoolError,
    ClosedError,
    DebugPool,
    Event,
    Events,
    OffsetError,
    Pool,
    RetryableError,
    TooManySegmentsError,
    TunError,
)


def test_event_values_match_the_seed() -> None:
    assert (Event.UP, Event.DOWN, Event.MTU_UPDATE) == (1, 2, 4)
    assert Event.UP | Event.MTU_UPDATE == 5


def test_events_deliver_queued_then_end() -> None:
    events = Events(Event.UP)
    events.put(Event.MTU_UPDATE)
    events.close()
    events.put(Event.DOWN)  # ignored after close
    assert list(events) == [Event.UP, Event.MTU_UPDATE]
    assert events.get() is None


def test_events_get_times_out_and_wakes_on_put() -> None:
    events = Events()
    with pytest.raises(TimeoutError):
        events.get(timeout=0.05)
    got: list[object] = []
    getter = threading.Thread(target=lambda: got.append(events.get(timeout=60)), name="test-get")
    getter.start()
    try:
        wait_inside(getter, Events.get, threading.Condition.wait)  # put comes while get waits
        events.put(Event.DOWN)
        getter.join(10)
        woken = not getter.is_alive()
    finally:
        events.close()  # ends a get that put did not wake (it then returns the queued event)
        getter.join(5)
    assert woken, "put did not wake the waiting get"
    assert got == [Event.DOWN]


def test_close_wakes_a_blocked_get() -> None:
    events = Events()
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(events.get()), name="test-get")
    thread.start()
    try:
        wait_inside(thread, Events.get, threading.Condition.wait)
    finally:
        events.close()
        thread.join(2)
    assert got == [None]


@pytest.mark.parametrize(
    ("cls", "bases", "message"),
    [
        (tunkit.ReadOnClosedChannelError, (ClosedError, OSError), "read on closed Tun channel"),
        (tunkit.WriteOnClosedChannelError, (ClosedError,), "tun: write on closed Tun channel"),
        (tunkit.ReadOnClosedPipeError, (ClosedError,), "tun: read on closed Tun"),
        (tunkit.WriteOnClosedPipeError, (ClosedError,), "tun: write on closed Tun"),
        (OffsetError, (TunError, ValueError), None),
        (TooManySegmentsError, (RetryableError, TunError), None),
        (BufferPoolError, (TunError,), None),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_exception_tree(cls: type[Exception], bases: tuple[type, ...], message: str | None) -> None:
    assert issubclass(cls, TunError)
    for base in bases:
        assert issubclass(cls, base)
    if message is not None:
        text = str(cls())
        assert message in text and "file already closed" in text


def test_pool_reuses_buffers_of_the_same_size() -> None:
    pool = Pool()
    a = pool.get(100)
    assert len(a) == 100
    pool.put(a)
    assert pool.get(100) is a
    assert pool.get(100) is not a
    assert len(pool.get(7)) == 7


def test_debug_pool_finds_double_put_foreign_buffer_and_leak() -> None:
    pool = DebugPool()
    a, b = pool.get(10), pool.get(20)
    assert pool.outstanding == 2
    pool.put(a)
    with pytest.raises(BufferPoolError):
        pool.put(a)
    with pytest.raises(BufferPoolError):
        pool.put(bytearray(10))
    with pytest.raises(BufferPoolError, match="1 buffers"):
        pool.close()
    pool.put(b)
    pool.close()
    assert pool.outstanding == 0


def test_pools_are_buffer_pools() -> None:
    assert isinstance(Pool(), tunkit.BufferPool)
    assert isinstance(DebugPool(), tunkit.BufferPool)

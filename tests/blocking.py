"""Seeing that a thread is blocked, instead of sleeping and hoping it is.

A test that says "this call blocks" or "writer 0 came first" must see it:
``time.sleep(0.05)`` passes just as well when the call never blocked (it
spun, or returned and was retried) and orders nothing on a loaded machine.
These helpers wait, without a fixed delay, for evidence the kernel or the
object itself gives:

- :func:`wait_in_poll`: the thread sleeps in the kernel in ``poll()``
  (``/proc/self/task/<tid>/stat`` state ``S``, ``wchan`` a poll function).
  Only a descriptor wait looks like that; a thread waiting for the GIL sleeps
  in a futex, and a spinning one runs.
- :func:`wait_inside`: the thread's Python stack holds the given functions
  and the kernel has it asleep (a futex for a lock or condition). Used for
  in-memory objects, whose waits are Python locks.
- :func:`signal_when_polling`: a signal for the main thread, sent only once
  it sleeps in ``poll()`` (a timer may fire before the call even began).
- :func:`channel_waiters`: how many writers and readers a Channel has queued,
  the order it serves them in (a test seam on its private queues).

Each fails the test, naming what it waited for, if the thread returns first
or the evidence does not come within *timeout*.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import CodeType
from typing import Any

import pytest

from tunkit import Channel


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll *predicate* every millisecond until it holds; fail the test after *timeout*."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {timeout} s: {what}")
        time.sleep(0.001)


def kernel_state(thread: threading.Thread) -> tuple[str, str]:
    """The state letter (``R``, ``S``, ...) and ``wchan`` of *thread*, as Linux reports them.

    Raises:
        AssertionError: the thread has ended.
    """
    assert thread.native_id is not None, f"{thread.name} was never started"
    task = f"/proc/self/task/{thread.native_id}"
    try:
        with open(f"{task}/stat") as f:
            stat = f.read()
        with open(f"{task}/wchan") as f:
            wchan = f.read()
    except FileNotFoundError:
        raise AssertionError(f"{thread.name} ended instead of blocking") from None
    return stat[stat.rindex(")") + 2], wchan  # the name in parentheses may hold spaces


def _alive(thread: threading.Thread) -> None:
    assert thread.is_alive(), f"{thread.name} returned instead of blocking"


def _polling(thread: threading.Thread) -> bool:
    state, wchan = kernel_state(thread)
    return state == "S" and "poll" in wchan


def wait_in_poll(thread: threading.Thread, timeout: float = 10.0) -> None:
    """Return once *thread* sleeps in ``poll()`` in the kernel; fail if it returns first."""

    def polling() -> bool:
        _alive(thread)
        return _polling(thread)

    wait_until(polling, f"{thread.name} asleep in poll()", timeout)


@contextlib.contextmanager
def signal_when_polling(handler: signal._HANDLER, timeout: float = 10.0) -> Iterator[None]:
    """Run *handler* on SIGUSR1, sent to the main thread (this one) once it sleeps in poll().

    The block must make the blocking call. Should the thread not be seen in
    poll() within *timeout*, the signal is sent all the same (so the call
    ends) and the test fails when the block is done. No signal comes after
    the block.
    """
    main = threading.current_thread()
    assert main is threading.main_thread(), "signals go to the main thread"
    assert main.ident is not None
    ident = main.ident
    seen: list[bool] = []
    done = threading.Event()
    sending = threading.Lock()  # held while deciding to send: none after the block

    def send() -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline and not _polling(main):
            time.sleep(0.001)
        with sending:
            if not done.is_set():
                seen.append(_polling(main))
                signal.pthread_kill(ident, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    sender = threading.Thread(target=send, name="test-signal")
    sender.start()
    try:
        yield
    finally:
        with sending:
            done.set()
        sender.join()
        signal.signal(signal.SIGUSR1, old)
    assert seen == [True], "the signal did not come while the main thread slept in poll()"


def _stack(thread: threading.Thread) -> list[CodeType]:
    frame = sys._current_frames().get(thread.ident or 0)
    codes = []
    while frame is not None:
        codes.append(frame.f_code)
        frame = frame.f_back
    return codes


def code_of(fn: Any) -> CodeType:
    """The code object of a function or method, for :func:`wait_inside`."""
    code: CodeType = fn.__code__
    return code


def asleep_in(thread: threading.Thread, *fns: Any) -> bool:
    """Whether *thread* sleeps in a futex now, with each of *fns* on its Python stack."""
    codes = [code_of(fn) for fn in fns]
    if not all(code in _stack(thread) for code in codes):
        return False
    try:
        state, wchan = kernel_state(thread)
    except AssertionError:  # it ended
        return False
    return state == "S" and "futex" in wchan


def wait_inside(thread: threading.Thread, *fns: Any, timeout: float = 10.0) -> None:
    """Return once *thread* sleeps in a futex with each of *fns* on its Python stack.

    Pass the blocking call last (``Condition.wait``) and the caller before it
    (``Events.get``): a thread that merely runs through them is either
    running or, waiting for the GIL, soon past them; one that sleeps there
    while the test thread sleeps too (releasing the GIL) is blocked.
    """
    codes = [code_of(fn) for fn in fns]

    def blocked() -> bool:
        _alive(thread)
        return asleep_in(thread, *fns)

    names = ", ".join(c.co_qualname for c in codes)
    # Seen twice, a few milliseconds apart: a GIL wait does not last that long.
    wait_until(blocked, f"{thread.name} asleep in {names}", timeout)
    time.sleep(0.005)
    wait_until(blocked, f"{thread.name} still asleep in {names}", timeout)


def channel_waiters(ch: Channel) -> tuple[int, int]:
    """``(writers, readers)`` queued in *ch*: each is blocked until served or closed.

    A writer is queued under the channel's lock just before it waits for its
    batch to be taken, a reader just before it waits for a batch; the queues
    are the order the channel serves them in.
    """
    return len(ch._writers), len(ch._readers)


def wait_channel(ch: Channel, writers: int, readers: int, timeout: float = 10.0) -> None:
    """Wait until *ch* has exactly *writers* and *readers* queued, each blocked."""
    wait_until(
        lambda: channel_waiters(ch) == (writers, readers),
        f"{writers} writers and {readers} readers queued in {ch!r}",
        timeout,
    )

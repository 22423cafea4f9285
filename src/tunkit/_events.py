"""Device events and the stream that delivers them."""

from __future__ import annotations

import enum
import os
import threading
import time
from collections import deque
from collections.abc import Iterator

__all__ = ["Event", "Events"]


class Event(enum.IntFlag):
    """What happened to a device: the seed's ``EventUp``, ``EventDown``, ``EventMTUUpdate``."""

    UP = 1
    DOWN = 2
    MTU_UPDATE = 4


class Events:
    """A closable stream of :class:`Event` values, one producer side and any readers.

    A Tun owns its stream: it calls :meth:`put` as things happen and
    :meth:`close` when it closes. Readers call :meth:`get` or iterate. Events
    put before the close are still delivered; after them ``get()`` returns
    ``None`` and iteration stops. Safe to use from any thread.
    """

    __slots__ = ("_closed", "_cond", "_queue", "_wakeup_fds")

    def __init__(self, initial: Event | None = None) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Event] = deque()  # guarded by _cond
        self._closed = False  # guarded by _cond
        self._wakeup_fds: list[int] = []  # guarded by _cond: see add_wakeup_fd()
        if initial is not None:
            self._queue.append(initial)

    def put(self, event: Event) -> None:
        """Queue *event* for readers; does nothing once the stream is closed."""
        with self._cond:
            if self._closed:
                return
            self._queue.append(event)
            self._cond.notify()
            self._wake_fds()

    def close(self) -> None:
        """End the stream after the events already queued; idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._wake_fds()

    def add_wakeup_fd(self, fd: int) -> None:
        """Make each later :meth:`put` and :meth:`close` write 1 to the eventfd *fd*.

        For a reader that waits in an event loop rather than in :meth:`get`
        (``tunkit.aio``): it waits for *fd* to be readable, then calls
        ``get(timeout=0)``. Call :meth:`remove_wakeup_fd` before closing *fd*.
        """
        with self._cond:
            self._wakeup_fds.append(fd)
            if self._queue or self._closed:
                os.eventfd_write(fd, 1)

    def remove_wakeup_fd(self, fd: int) -> None:
        """Stop writing to *fd* (see :meth:`add_wakeup_fd`); nothing if it was not added."""
        with self._cond:
            if fd in self._wakeup_fds:
                self._wakeup_fds.remove(fd)

    def _wake_fds(self) -> None:
        for fd in self._wakeup_fds:
            os.eventfd_write(fd, 1)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (queued events may remain)."""
        return self._closed

    def get(self, timeout: float | None = None) -> Event | None:
        """Return the next event, blocking until one comes.

        Returns ``None`` once the stream is closed and drained.

        Raises:
            TimeoutError: *timeout* seconds passed with no event.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no event within {timeout} s")
                    self._cond.wait(remaining)
            return self._queue.popleft()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    def __repr__(self) -> str:
        state = " [closed]" if self._closed else ""
        return f"<Events queued={len(self._queue)}{state}>"

"""Channel: a batched rendezvous channel, the in-memory half of a pipe."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, final

from ._errors import OffsetError, ReadOnClosedChannelError, WriteOnClosedChannelError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["Channel"]


@final
class _Batch:
    """One writer's batch while readers take packets from it."""

    __slots__ = ("done", "offset", "packets", "taken")

    def __init__(self, packets: Sequence[ReadableBuffer], offset: int) -> None:
        self.packets = packets
        self.offset = offset
        self.taken = 0
        self.done = threading.Lock()  # held until the batch is taken or the channel closes
        self.done.acquire()


class Channel:
    """A batched rendezvous channel: ``write`` blocks until readers have taken every packet.

    A reader takes ``min(len(bufs), len(sizes), remaining)`` packets of the
    current batch per ``read`` and copies ``packet[w_offset:]`` to
    ``buf[r_offset:]``, truncated to fit. Concurrent writers are served one
    whole batch at a time, in arrival order. Any number of reader and writer
    threads may use it. ``close()`` (idempotent, any thread) makes blocked and
    later calls raise :class:`ReadOnClosedChannelError` /
    :class:`WriteOnClosedChannelError`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readable = threading.Condition(self._lock)  # a batch was posted, or closed
        self._writers: deque[_Batch] = deque()  # guarded by _lock; [0] is being read
        self._closed = False  # guarded by _lock

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Post ``bufs[i][offset:]`` as one batch and block until readers took all of it.

        Returns ``len(bufs)``, or fewer if the channel closed after readers took
        some (the next call then raises).

        Raises:
            WriteOnClosedChannelError: the channel is closed and nothing was taken.
        """
        if offset < 0:
            raise OffsetError(f"write offset {offset} is negative")
        if not bufs:
            with self._lock:
                if self._closed:
                    raise WriteOnClosedChannelError()
            return 0
        batch = _Batch(bufs, offset)
        with self._lock:
            if self._closed:
                raise WriteOnClosedChannelError()
            self._writers.append(batch)
            if len(self._writers) == 1:
                self._readable.notify()
        batch.done.acquire()  # released by the reader that takes the last packet, or close()
        if batch.taken == 0:
            raise WriteOnClosedChannelError()
        return batch.taken

    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """Block for a writer's batch and copy up to ``min(len(bufs), len(sizes))`` packets.

        Packet ``i`` lands in ``bufs[i][offset:offset + sizes[i]]``, truncated to fit.

        Raises:
            ReadOnClosedChannelError: the channel is closed.
        """
        if offset < 0:
            raise OffsetError(f"read offset {offset} is negative")
        want = min(len(bufs), len(sizes))
        with self._lock:
            while True:
                if self._closed:
                    raise ReadOnClosedChannelError()
                if self._writers:
                    break
                self._readable.wait()
            if want == 0:
                return 0
            batch = self._writers[0]
            packets = batch.packets
            start = batch.taken
            n = min(want, len(packets) - start)
            w_off = batch.offset
            for i in range(n):
                src = memoryview(packets[start + i])[w_off:]
                dst = memoryview(bufs[i])[offset:]
                size = min(len(src), len(dst))
                dst[:size] = src[:size]
                sizes[i] = size
            batch.taken = start + n
            if batch.taken == len(packets):
                self._writers.popleft()
                batch.done.release()
            # Either packets remain or another batch waits: wake the next reader.
            if self._writers:
                self._readable.notify()
            return n

    def close(self) -> None:
        """Close the channel: blocked and later calls raise; idempotent, any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._writers)
            self._writers.clear()
            self._readable.notify_all()
        for batch in waiting:
            batch.done.release()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " [closed]" if self._closed else ""
        return f"<Channel waiting_writers={len(self._writers)}{state}>"

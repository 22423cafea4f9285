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

    def __init__(self, packets: Sequence[ReadableBuffer], offset: int, taken: int) -> None:
        self.packets = packets
        self.offset = offset
        self.taken = taken
        self.done = threading.Lock()  # held until the batch is taken or the channel closes
        self.done.acquire()


@final
class _Waiter:
    """A reader blocked for a batch: a writer may fill its buffers directly."""

    __slots__ = ("bufs", "count", "offset", "ready", "sizes", "want")

    def __init__(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int, want: int
    ) -> None:
        self.bufs = bufs
        self.sizes = sizes
        self.offset = offset
        self.want = want
        self.count = -1  # packets stored; -1 until filled (stays -1 if the channel closed)
        self.ready = threading.Lock()  # held until filled or closed
        self.ready.acquire()


def _move(
    packets: Sequence[ReadableBuffer],
    start: int,
    n: int,
    w_off: int,
    bufs: Sequence[WriteableBuffer],
    sizes: MutableSequence[int],
    r_off: int,
) -> None:
    """Copy ``packets[start + i][w_off:]`` to ``bufs[i][r_off:]`` for i < n, truncated to fit.

    Buffers hold bytes (one-byte items). A whole packet is assigned as it is;
    only a part of one goes through a memoryview, so nothing is copied twice.
    """
    for i in range(n):
        pkt = packets[start + i]
        buf = bufs[i]
        pkt_len = len(pkt)  # type: ignore[arg-type]
        size = min(pkt_len - w_off, len(buf) - r_off)  # type: ignore[arg-type]
        if size <= 0:
            sizes[i] = 0
        elif w_off == 0 and size == pkt_len:
            buf[r_off : r_off + size] = pkt  # type: ignore[index]
            sizes[i] = size
        else:
            buf[r_off : r_off + size] = memoryview(pkt)[w_off : w_off + size]  # type: ignore[index]
            sizes[i] = size


class Channel:
    """A batched rendezvous channel: ``write`` blocks until readers have taken every packet.

    A reader takes ``min(len(bufs), len(sizes), remaining)`` packets of the
    current batch per ``read`` and copies ``packet[w_offset:]`` to
    ``buf[r_offset:]``, truncated to fit. Concurrent writers are served one
    whole batch at a time, in arrival order. Any number of reader and writer
    threads may use it. ``close()`` (idempotent, any thread) makes blocked and
    later calls raise :class:`ReadOnClosedChannelError` /
    :class:`WriteOnClosedChannelError`.

    When a reader is already waiting, the writer copies straight into its
    buffers and goes on without a thread switch: the packets were taken.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writers: deque[_Batch] = deque()  # guarded by _lock; [0] is being read
        self._readers: deque[_Waiter] = deque()  # guarded by _lock; only while no batch waits
        self._closed = False  # guarded by _lock

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Hand ``bufs[i][offset:]`` to readers as one batch; block until they took all of it.

        Returns ``len(bufs)``, or fewer if the channel closed after readers took
        some (the next call then raises).

        Raises:
            WriteOnClosedChannelError: the channel is closed and nothing was taken.
        """
        if offset < 0:
            raise OffsetError(f"write offset {offset} is negative")
        total = len(bufs)
        with self._lock:
            if self._closed:
                raise WriteOnClosedChannelError()
            taken = 0
            # Readers wait only while no batch is queued, so serving them first
            # keeps whole batches in arrival order.
            while taken < total and self._readers:
                waiter = self._readers.popleft()
                n = min(waiter.want, total - taken)
                _move(bufs, taken, n, offset, waiter.bufs, waiter.sizes, waiter.offset)
                waiter.count = n
                waiter.ready.release()
                taken += n
            if taken == total:
                return total
            batch = _Batch(bufs, offset, taken)
            self._writers.append(batch)
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
            if self._closed:
                raise ReadOnClosedChannelError()
            if self._writers:
                if want == 0:
                    return 0
                batch = self._writers[0]
                packets = batch.packets
                start = batch.taken
                n = min(want, len(packets) - start)
                _move(packets, start, n, batch.offset, bufs, sizes, offset)
                batch.taken = start + n
                if batch.taken == len(packets):
                    self._writers.popleft()
                    batch.done.release()
                return n
            waiter = _Waiter(bufs, sizes, offset, want)
            self._readers.append(waiter)
        waiter.ready.acquire()  # released by a writer that filled it, or close()
        if waiter.count < 0:
            raise ReadOnClosedChannelError()
        return waiter.count

    def close(self) -> None:
        """Close the channel: blocked and later calls raise; idempotent, any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writers = list(self._writers)
            readers = list(self._readers)
            self._writers.clear()
            self._readers.clear()
        for batch in writers:
            batch.done.release()
        for waiter in readers:
            waiter.ready.release()

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
        return (
            f"<Channel waiting_writers={len(self._writers)} "
            f"waiting_readers={len(self._readers)}{state}>"
        )

"""aio.pipe(): two connected AsyncTuns in memory, pure async (no thread, no descriptor).

Each direction is a rendezvous as the sync :class:`tunkit.Channel` is: a
write queues its batch and waits until readers took all of it; a read takes
up to ``len(bufs)`` packets of the oldest batch. Everything runs on the
event loop's thread, so the state needs no lock, and cancellation is exact:
a read cancelled while waiting took nothing; a write cancelled while waiting
withdraws the packets nobody took (the prefix taken was handed over).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, MutableSequence, Sequence
from typing import TYPE_CHECKING, final

import anyio
import anyio.lowlevel

from .._errors import ReadOnClosedPipeError, WriteOnClosedPipeError
from .._events import Event
from .._pipe import PipeEnd, check_pipe_args
from .._tun import check_offset
from ._tun import AsyncEvents

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["AsyncPipeTun", "pipe"]


@final
class _Batch:
    """One writer's batch while readers take its packets."""

    __slots__ = ("done", "offset", "packets", "taken")

    def __init__(self, packets: Sequence[ReadableBuffer], offset: int) -> None:
        self.packets = packets
        self.offset = offset
        self.taken = 0
        self.done = anyio.Event()  # set once every packet was taken, or the pipe closed


@final
class _Direction:
    """One direction of the pipe: the queued batches and the readers waiting for one."""

    __slots__ = ("batches", "closed", "readers")

    def __init__(self) -> None:
        self.batches: deque[_Batch] = deque()
        self.readers: list[anyio.Event] = []  # each set when a batch comes, or at close
        self.closed = False

    def wake_readers(self) -> None:
        for ready in self.readers:
            ready.set()
        self.readers.clear()

    def close(self) -> None:
        self.closed = True
        self.wake_readers()
        for batch in self.batches:
            batch.done.set()
        self.batches.clear()

    async def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int
    ) -> int:
        await anyio.lowlevel.checkpoint()  # a cancellation lands here, before anything is taken
        while True:
            if self.closed:
                raise ReadOnClosedPipeError()
            if self.batches:
                return self._take(bufs, sizes, offset)
            ready = anyio.Event()
            self.readers.append(ready)
            try:
                await ready.wait()
            finally:
                if ready in self.readers:
                    self.readers.remove(ready)

    def _take(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int
    ) -> int:
        batch = self.batches[0]
        packets, start, w_off = batch.packets, batch.taken, batch.offset
        n = min(len(bufs), len(sizes), len(packets) - start)
        for i in range(n):
            pkt = memoryview(packets[start + i]).cast("B")[w_off:]
            buf = memoryview(bufs[i]).cast("B")
            size = min(len(pkt), len(buf) - offset)
            if size <= 0:
                sizes[i] = 0
                continue
            buf[offset : offset + size] = pkt[:size]
            sizes[i] = size
        batch.taken = start + n
        if batch.taken == len(packets):
            self.batches.popleft()
            batch.done.set()
        return n

    async def write(self, bufs: Sequence[ReadableBuffer], offset: int) -> int:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self.closed:
            raise WriteOnClosedPipeError()
        if not bufs:
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return 0
        batch = _Batch(bufs, offset)
        self.batches.append(batch)
        self.wake_readers()
        try:
            await batch.done.wait()
        finally:
            # Cancelled, or closed: what nobody took is withdrawn (never read later).
            if batch in self.batches:
                self.batches.remove(batch)
        if batch.taken == 0 and self.closed:
            raise WriteOnClosedPipeError()
        return batch.taken


@final
class AsyncPipeTun(PipeEnd):
    """One end of :func:`pipe`: reads what the other end writes, and the reverse.

    Use it from one event loop (its tasks may be many). Does not enforce the MTU.
    """

    __slots__ = ("_peer", "_rx", "_streams", "_tx")

    def __init__(
        self, name: str, rx: _Direction, tx: _Direction, batch_size: int, mtu: int, mwo: int,
        mro: int,
    ) -> None:
        super().__init__(name, batch_size, mtu, mwo, mro)
        self._rx = rx
        self._tx = tx
        self._streams: list[AsyncEvents] = []
        self._peer: AsyncPipeTun | None = None

    async def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """Wait until the other end writes, then store up to ``len(bufs)`` packets.

        Raises:
            OffsetError: *offset* is below ``mro()``.
            ReadOnClosedPipeError: either end was closed.
        """
        check_offset("read", offset, self._mro)
        return await self._rx.read(bufs, sizes, offset)

    async def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Hand ``bufs[i][offset:]`` to the other end; wait until it has read them all.

        Returns ``len(bufs)``, or how many were taken when the pipe closed meanwhile.

        Raises:
            OffsetError: *offset* is below ``mwo()``.
            WriteOnClosedPipeError: either end was closed before any packet was taken.
        """
        check_offset("write", offset, self._mwo)
        return await self._tx.write(bufs, offset)

    def events(self) -> AsyncIterator[Event]:
        """``Event.UP``, then the end of the stream when the pipe closes."""
        stream = AsyncEvents(self._events)
        self._streams.append(stream)
        return stream

    async def aclose(self) -> None:
        """Close both directions; pending calls at either end raise at once. Idempotent."""
        for end in (self, self._peer):
            if end is not None:
                end._rx.close()
                end._events.close()
                for stream in end._streams:
                    stream.close()
                end._streams.clear()
        await anyio.lowlevel.checkpoint()

    @property
    def closed(self) -> bool:
        """Whether the pipe was closed (from either end)."""
        return self._rx.closed

    async def __aenter__(self) -> AsyncPipeTun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def pipe(
    batch_size: int = 1, mtu: int = 1500, mwo: int = 0, mro: int = 0
) -> tuple[AsyncPipeTun, AsyncPipeTun]:
    """Return two connected AsyncTuns: what one writes, the other reads (pure async).

    As :func:`tunkit.pipe`: names ``"pipe-tun-0"``/``"pipe-tun-1"``,
    events start with ``Event.UP``, closing either end closes both.

    Raises:
        ValueError: *batch_size* is below 1, or *mtu*, *mwo* or *mro* is negative.
    """
    check_pipe_args(batch_size, mtu, mwo, mro)
    a2b, b2a = _Direction(), _Direction()
    a = AsyncPipeTun("pipe-tun-0", b2a, a2b, batch_size, mtu, mwo, mro)
    b = AsyncPipeTun("pipe-tun-1", a2b, b2a, batch_size, mtu, mwo, mro)
    a._peer = b
    b._peer = a
    return a, b

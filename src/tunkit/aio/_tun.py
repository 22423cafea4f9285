"""The AsyncTun protocol, and wrap(): a Tun made awaitable on any event loop anyio runs on.

A Tun with a descriptor (``NativeTun``, ``UdpTun``, ``StreamTun``: each has
``set_blocking``) is put in non-blocking mode and waited for in the event
loop itself: a call tries the Tun's own non-blocking call, and on
``BlockingIOError`` awaits the descriptor's readiness. No thread at all.

Any other Tun (a ``pipe`` end, a ``CallbackTun``) gets one worker thread per
direction, started on first use and joined by ``aclose()``; the loop waits
for the worker's answer on an eventfd. A read that is cancelled leaves the
worker's packets in a stash for the next read (nothing lost); a write's
packets are copied before the worker gets them, so a cancelled write may
still hand its batch over, whole and once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, MutableSequence, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import anyio.lowlevel

from .._errors import ClosedError
from .._events import Event, Events
from .._gso import GSO_BUF_LEN, VNET_HDR_LEN, split_for
from .._tun import GsoTun, Tun

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["AsyncGsoTun", "AsyncTun", "wrap"]

# A wrapped descriptor's calls that found it ready yield to the loop's other
# tasks once per this many (a call that waits yields anyway).
YIELD_EVERY = 8


@runtime_checkable
class AsyncTun(Protocol):
    """A Tun whose ``read`` and ``write`` are awaited: the :class:`tunkit.Tun` protocol,
    async.

    ``read``/``write`` mean what they mean on a Tun. A cancelled ``read``
    did not happen: it stored nothing and lost nothing. A cancelled
    ``write`` may have handed over a prefix of its batch, never part of a
    packet and never a packet twice. ``aclose()`` is idempotent and makes
    every pending and later call raise :class:`tunkit.ClosedError`.
    """

    async def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """Read a batch of packets into *bufs* at *offset*; return the count."""
        ...

    async def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Write ``bufs[i][offset:]`` as one packet each; return the count handed over."""
        ...

    def mwo(self) -> int:
        """Minimal write offset."""
        ...

    def mro(self) -> int:
        """Minimal read offset."""
        ...

    def mtu(self) -> int:
        """The MTU."""
        ...

    def name(self) -> str:
        """The name."""
        ...

    def batch_size(self) -> int:
        """How many packets one call may carry."""
        ...

    def events(self) -> AsyncIterator[Event]:
        """The events, as an async iterator that ends at close."""
        ...

    async def aclose(self) -> None:
        """Close; pending and later calls raise ClosedError. Idempotent."""
        ...


@runtime_checkable
class AsyncGsoTun(AsyncTun, Protocol):
    """An AsyncTun that also moves super-packets whole (a wrapped :class:`tunkit.GsoTun`)."""

    async def read_gso(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 16
    ) -> int:
        """``GsoTun.read_gso``, awaited."""
        ...

    async def write_gso(self, bufs: Sequence[ReadableBuffer], offset: int = 16) -> int:
        """``GsoTun.write_gso``, awaited."""
        ...


def wrap(tun: Tun) -> AsyncTun:
    """Return *tun* as an :class:`AsyncTun`; takes ownership of *tun* (``aclose()`` closes it).

    A Tun with ``set_blocking`` and a descriptor is waited for in the event
    loop; any other is served by one worker thread per direction. A
    :class:`tunkit.GsoTun` comes back as an :class:`AsyncGsoTun`. Close *tun*
    only through the AsyncTun from now on.
    """
    if _has_descriptor(tun):
        return _FdGsoTun(tun) if isinstance(tun, GsoTun) else _FdTun(tun)
    return _ThreadGsoTun(tun) if isinstance(tun, GsoTun) else _ThreadTun(tun)


def _has_descriptor(tun: Tun) -> bool:
    if not callable(getattr(tun, "set_blocking", None)):
        return False
    try:
        return tun.fileno() >= 0
    except (OSError, ValueError):
        return False


def closed_error(direction: str, name: str) -> ClosedError:
    """The ClosedError of a call on a closed AsyncTun."""
    return ClosedError(f"tun: {direction} on closed AsyncTun {name}")


async def wait_fd(wait: Callable[[int], Any], fd: int, direction: str, name: str) -> None:
    """Await readiness of *fd* (``anyio.wait_readable``/``wait_writable``); ClosedError
    when ``notify_closing`` ends the wait."""
    try:
        await wait(fd)
    except anyio.ClosedResourceError:
        raise closed_error(direction, name) from None


class AsyncEvents:
    """An :class:`Events` stream as an async iterator: waits on an eventfd, no thread.

    Owned by one AsyncTun, which calls :meth:`close` as it closes.
    """

    __slots__ = ("_efd", "_events", "_released")

    def __init__(self, events: Events) -> None:
        self._events = events
        self._efd = -1
        self._released = False  # close() ran: no more waiting

    def __aiter__(self) -> AsyncEvents:
        return self

    async def __anext__(self) -> Event:
        while True:
            try:
                event = self._events.get(timeout=0)
            except TimeoutError:
                pass
            else:
                if event is None:
                    self.close()
                    raise StopAsyncIteration
                await anyio.lowlevel.checkpoint()
                return event
            if self._released:
                raise StopAsyncIteration
            if self._efd < 0:
                self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._events.add_wakeup_fd(self._efd)
                continue  # an event may have come before the fd was added
            try:
                await anyio.wait_readable(self._efd)
            except anyio.ClosedResourceError:
                continue  # close(): deliver what was queued, then end
            _drain(self._efd)

    def close(self) -> None:
        """Release the eventfd (the events queued before the close are still
        delivered, then the iteration ends); idempotent. Call it in the loop."""
        self._released = True
        efd, self._efd = self._efd, -1
        if efd >= 0:
            self._events.remove_wakeup_fd(efd)
            anyio.notify_closing(efd)
            os.close(efd)


def _drain(efd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(efd)


class _Base:
    """What both kinds of wrapper share: the Tun's accessors, events, aclose's bookkeeping."""

    def __init__(self, tun: Tun) -> None:
        self._tun = tun
        self._name = tun.name()
        self._closed = False
        self._read_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._event_streams: list[AsyncEvents] = []

    def mwo(self) -> int:
        """The Tun's minimal write offset."""
        return self._tun.mwo()

    def mro(self) -> int:
        """The Tun's minimal read offset."""
        return self._tun.mro()

    def mtu(self) -> int:
        """The Tun's MTU, as it is now."""
        return self._tun.mtu()

    def name(self) -> str:
        """The Tun's name."""
        return self._name

    def batch_size(self) -> int:
        """The Tun's batch size."""
        return self._tun.batch_size()

    @property
    def tun(self) -> Tun:
        """The wrapped Tun (for its ``stats()`` and settings; close it only by ``aclose()``)."""
        return self._tun

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    def events(self) -> AsyncIterator[Event]:
        """The Tun's events as an async iterator; it ends when the Tun closes."""
        stream = AsyncEvents(self._tun.events())
        self._event_streams.append(stream)
        return stream

    def _check(self, direction: str) -> None:
        if self._closed:
            raise closed_error(direction, self._name)

    def _close_streams(self) -> None:
        for stream in self._event_streams:
            stream.close()
        self._event_streams.clear()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        state = " [closed]" if self._closed else ""
        return f"<{type(self).__name__.lstrip('_')} {self._name}{state}>"


class _FdTun(_Base):
    """A Tun with a descriptor, in non-blocking mode, waited for in the event loop."""

    def __init__(self, tun: Tun) -> None:
        super().__init__(tun)
        tun.set_blocking(False)  # type: ignore[attr-defined]
        self._fd = tun.fileno()
        # Fast locks: taken without a turn of the loop when free (see _now_and_then).
        self._read_lock = anyio.Lock(fast_acquire=True)
        self._write_lock = anyio.Lock(fast_acquire=True)
        self._unyielded = 0  # calls since the last yield to the loop
        # StreamTun: a write the socket took in part keeps its last bytes.
        self._flush: Callable[[], None] | None = getattr(tun, "flush", None)

    async def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """``Tun.read``, awaited: waits for the descriptor in the event loop."""
        async with self._read_lock:
            return await self._read_with(self._tun.read, bufs, sizes, offset)

    async def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """``Tun.write``, awaited: waits for the descriptor in the event loop."""
        async with self._write_lock:
            return await self._write_with(self._tun.write, bufs, offset)

    async def _read_with(
        self,
        call: Callable[[Sequence[WriteableBuffer], MutableSequence[int], int], int],
        bufs: Sequence[WriteableBuffer],
        sizes: MutableSequence[int],
        offset: int,
    ) -> int:
        # Cancellation can only strike at an await before the non-blocking
        # call, or while waiting: the call stored packets, which are returned
        # (a shielded yield now and then lets the loop's other tasks run), or
        # stored nothing.
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check("read")
            try:
                n = call(bufs, sizes, offset)
            except BlockingIOError:
                pass
            except ClosedError:
                self._closed_below()
                raise
            else:
                await self._now_and_then()
                return n
            self._unyielded = 0
            await wait_fd(anyio.wait_readable, self._fd, "read", self._name)

    async def _write_with(
        self, call: Callable[[Sequence[ReadableBuffer], int], int],
        bufs: Sequence[ReadableBuffer], offset: int,
    ) -> int:
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check("write")
            try:
                n = call(bufs, offset)
            except BlockingIOError:
                await wait_fd(anyio.wait_writable, self._fd, "write", self._name)
                continue
            except ClosedError:
                self._closed_below()
                raise
            if self._flush is not None:
                await self._finish_frames()
            await self._now_and_then()
            return n

    async def _now_and_then(self) -> None:
        """Yield to the loop's other tasks every YIELD_EVERY calls that did not wait.

        A call that waited has yielded already; one per call would cost a
        turn of the loop per packet on a device without offload.
        """
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await anyio.lowlevel.cancel_shielded_checkpoint()

    async def _finish_frames(self) -> None:
        """Send what a StreamTun kept of frames it took in part (they count as handed over)."""
        assert self._flush is not None
        while True:
            try:
                self._flush()
                return
            except BlockingIOError:
                await wait_fd(anyio.wait_writable, self._fd, "write", self._name)

    def _closed_below(self) -> None:
        """The Tun closed itself (a StreamTun whose peer ended): wake the other direction."""
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._fd)
            self._close_streams()
            self._tun.close()

    async def aclose(self) -> None:
        """Close the Tun; pending calls raise ClosedError at once. Idempotent."""
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._fd)  # before the number can be reused
            self._close_streams()
            self._tun.close()
        await anyio.lowlevel.checkpoint()


class _FdGsoTun(_FdTun):
    """A GsoTun with a descriptor: read_gso and write_gso, awaited."""

    async def read_gso(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 16
    ) -> int:
        """``GsoTun.read_gso``, awaited."""
        async with self._read_lock:
            return await self._read_with(self._tun.read_gso, bufs, sizes, offset)  # type: ignore[attr-defined]

    async def write_gso(self, bufs: Sequence[ReadableBuffer], offset: int = 16) -> int:
        """``GsoTun.write_gso``, awaited."""
        async with self._write_lock:
            return await self._write_with(self._tun.write_gso, bufs, offset)  # type: ignore[attr-defined]


class _Worker:
    """One thread making one direction's blocking calls, one job at a time.

    The thread (``tunkit-aio-<role>:<name>``) starts with the first job and
    is joined by :meth:`stop`; the event loop learns of a finished job from
    an eventfd. A job's result waits until :meth:`result` collects it, so a
    caller that was cancelled loses nothing: the next caller collects it.
    """

    def __init__(self, label: str) -> None:
        self._label = label
        self._cond = threading.Condition(threading.Lock())
        self._job: Callable[[], object] | None = None  # guarded by _cond
        self._result: tuple[bool, Any] | None = None  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._thread: threading.Thread | None = None
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.busy = False  # a job was submitted and its result not collected (loop only)

    def submit(self, job: Callable[[], object]) -> None:
        """Start *job* on the thread; the previous result must have been collected."""
        assert not self.busy
        with self._cond:
            self._job = job
            self._cond.notify()
        self.busy = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._label)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._stopping:
                    self._cond.wait()
                if self._job is None:
                    return
                job = self._job
                self._job = None
            try:
                result: tuple[bool, Any] = (True, job())
            except BaseException as exc:  # handed to the awaiting caller
                result = (False, exc)
            with self._cond:
                self._result = result
                os.eventfd_write(self.efd, 1)

    async def result(self, direction: str, name: str) -> Any:
        """Await the submitted job's result: its value, or raise what it raised."""
        while True:
            with self._cond:
                result, self._result = self._result, None
            if result is not None:
                self.busy = False
                ok, value = result
                if ok:
                    return value
                raise value
            await wait_fd(anyio.wait_readable, self.efd, direction, name)
            _drain(self.efd)

    def wake(self) -> None:
        """End the loop's wait for a result (it raises ClosedError): call in the loop."""
        anyio.notify_closing(self.efd)

    def stop(self) -> None:
        """Join the thread (its job must be able to end: close the Tun first); release the fd."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        os.close(self.efd)
        self.efd = -1


class _ThreadTun(_Base):
    """A Tun without a descriptor: a worker thread per direction makes its calls."""

    def __init__(self, tun: Tun) -> None:
        super().__init__(tun)
        self._reader = _Worker(f"tunkit-aio-read:{self._name}")
        self._writer = _Worker(f"tunkit-aio-write:{self._name}")
        # Packets the reader thread read and no caller took yet: (with header, bytes).
        self._stash: deque[tuple[bool, bytes]] = deque()
        self._rbufs: list[bytearray] = []

    async def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """``Tun.read``, awaited: the reader thread calls it."""
        return await self._read(False, bufs, sizes, offset)

    async def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """``Tun.write``, awaited: the writer thread calls it with a copy of *bufs*."""
        return await self._write(self._tun.write, bufs, offset)

    async def _read(
        self, gso: bool, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int],
        offset: int,
    ) -> int:
        async with self._read_lock:
            self._check("read")
            if not self._stash:
                if not self._reader.busy:
                    self._reader.submit(self._read_job(gso, len(bufs), offset))
                self._stash.extend(await self._reader.result("read", self._name))
            return self._take(gso, bufs, sizes, offset)

    def _read_job(
        self, gso: bool, count: int, offset: int
    ) -> Callable[[], list[tuple[bool, bytes]]]:
        """A read of up to *count* packets into the reader's own buffers, as stash entries."""
        tun = self._tun
        room = offset + GSO_BUF_LEN
        while len(self._rbufs) < count:
            self._rbufs.append(bytearray(room))
        bufs = [b if len(b) >= room else bytearray(room) for b in self._rbufs[:count]]
        self._rbufs[:count] = bufs
        sizes = [0] * count
        pre = VNET_HDR_LEN if gso else 0
        call = tun.read_gso if gso else tun.read  # type: ignore[attr-defined]

        def job() -> list[tuple[bool, bytes]]:
            n = call(bufs, sizes, offset)
            return [(gso, bytes(memoryview(bufs[i])[offset - pre : offset + sizes[i]]))
                    for i in range(n)]

        return job

    def _take(
        self, gso: bool, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int],
        offset: int,
    ) -> int:
        """Move stashed packets into *bufs*, as many as fit the batch."""
        pre = VNET_HDR_LEN if gso else 0
        n = 0
        stash = self._stash
        while stash and n < len(bufs):
            has_hdr, data = stash[0]
            if has_hdr and not gso:
                # read_gso's packets, asked for by read: a super-packet goes as its segments.
                stash.popleft()
                segments, lens = split_for(self._tun, memoryview(data), 0)
                stash.extendleft(
                    reversed([(False, bytes(s[:k])) for s, k in zip(segments, lens, strict=True)])
                )
                continue
            if gso and not has_hdr:
                data = bytes(VNET_HDR_LEN) + data  # a plain packet behind an all-zero header
            stash.popleft()
            view = memoryview(bufs[n]).cast("B")
            size = min(len(data) - pre, len(view) - offset)
            view[offset - pre : offset + size] = data[: pre + size]
            sizes[n] = size
            n += 1
        return n

    async def _write(
        self, call: Callable[[Sequence[ReadableBuffer], int], int],
        bufs: Sequence[ReadableBuffer], offset: int,
    ) -> int:
        async with self._write_lock:
            self._check("write")
            if self._writer.busy:
                # A cancelled write's batch is still going out: after it, in order.
                try:
                    await self._writer.result("write", self._name)
                except ClosedError:
                    raise
                except Exception:
                    pass  # that caller is gone; the next write meets the error itself
            copies = [bytes(b) for b in bufs]
            self._writer.submit(lambda: call(copies, offset))
            n: int = await self._writer.result("write", self._name)
            return n

    async def aclose(self) -> None:
        """Close the Tun, join the worker threads; pending calls raise ClosedError. Idempotent."""
        if not self._closed:
            self._closed = True
            self._reader.wake()
            self._writer.wake()
            self._close_streams()
            self._tun.close()  # ends the jobs in progress
            self._reader.stop()
            self._writer.stop()
        await anyio.lowlevel.checkpoint()


class _ThreadGsoTun(_ThreadTun):
    """A GsoTun without a descriptor: read_gso and write_gso on the worker threads."""

    async def read_gso(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 16
    ) -> int:
        """``GsoTun.read_gso``, awaited."""
        return await self._read(True, bufs, sizes, offset)

    async def write_gso(self, bufs: Sequence[ReadableBuffer], offset: int = 16) -> int:
        """``GsoTun.write_gso``, awaited."""
        return await self._write(self._tun.write_gso, bufs, offset)  # type: ignore[attr-defined]


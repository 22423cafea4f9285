"""Forwarder and Point2Point: hot-swappable forwarding between Tuns on two threads."""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from typing import TYPE_CHECKING, Final, final

from ._errors import ClosedError, RetryableError, TunError
from ._gso import GSO_BATCH, GSO_BUF_LEN, VNET_HDR_LEN, gso_offset, gso_pair, write_split
from ._pool import BufferPool, get_buffer, put_buffer
from ._tun import GsoTun
from ._write import WRITE_NO_PROGRESS, close_quietly

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from _typeshed import ReadableBuffer

    from ._tun import Tun

__all__ = ["Forwarder", "ForwarderStats", "Point2Point"]

# Batches read and not yet written. More than one lets the reader run ahead
# while the writer is in a system call, so neither waits on the other per
# packet: in CPython every such wait is a thread switch (tens of µs here).
_QUEUE_DEPTH: Final = 32
# Packets a reader moves in one streak of its own writes (see Forwarder._streak).
_STREAK: Final = 256


@dataclasses.dataclass(frozen=True, slots=True)
class ForwarderStats:
    """What a :class:`Forwarder` swallowed since it was made, rather than raise it.

    A Forwarder keeps running through the errors of its Tuns (it closes the
    one that failed and waits for another): these count them, so that a
    program can show them and fail on them. A ``ClosedError`` is not an
    error here: the Tun was closed (swapped, stopped, or by its owner). Each
    field is exact; they are counted as it happens, off the path of a
    packet that goes through.
    """

    # Reads that raised (not ClosedError, not retryable); each closed the read Tun.
    read_errors: int = 0
    # Reads that raised a RetryableError and were tried again (the Tun counts what it dropped).
    read_retries: int = 0
    # Writes that raised (not ClosedError); each closed the write Tun.
    write_errors: int = 0
    # Packets read and never written (a super-packet passed whole counts as one).
    dropped: int = 0
    # The last read or write error counted, as "Type: message".
    last_error: str = ""

    def __add__(self, other: ForwarderStats) -> ForwarderStats:
        """Both directions' counts together (what :meth:`Point2Point.stats` returns)."""
        return ForwarderStats(
            self.read_errors + other.read_errors,
            self.read_retries + other.read_retries,
            self.write_errors + other.write_errors,
            self.dropped + other.dropped,
            "; ".join(e for e in (self.last_error, other.last_error) if e),
        )


@final
class _Batch:
    """Packets read from the read Tun, on their way to the write Tun."""

    __slots__ = ("bufs", "done", "gso_mtu", "offset", "sizes")

    def __init__(
        self, bufs: list[bytearray], sizes: list[int], offset: int, gso_mtu: int = 0
    ) -> None:
        self.bufs = bufs
        # Nonzero: the packets are whole super-packets (virtio header in front)
        # read from a GsoTun of this MTU.
        self.gso_mtu = gso_mtu
        self.sizes = sizes
        self.offset = offset
        self.done = 0  # packets already written



class Forwarder:
    """Forward packets one way, from a read Tun to a write Tun, on two threads.

    It starts with neither Tun and waits; :meth:`set_read_tun` and
    :meth:`set_write_tun` set or swap them while it runs, closing the one
    replaced. A batch already read is handed on even if the read Tun is
    swapped meanwhile; a batch interrupted because the write Tun was swapped
    goes on to the new one. A read error that is not retryable, or a write
    error, closes that Tun and leaves that side waiting for a new one (the
    batch whose write failed is dropped). :meth:`stop` closes both Tuns,
    joins the threads (``tunkit-fwd-read:<id>``, ``tunkit-fwd-write:<id>``)
    and returns every pooled buffer. :meth:`stats` counts the errors it
    swallowed and the packets it dropped.
    """

    def __init__(self, pool: BufferPool | None = None, *, passthrough: bool = True) -> None:
        self._pool = pool
        self._passthrough = passthrough
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # any field below changed
        self._read_tun: Tun | None = None  # guarded by _lock
        self._write_tun: Tun | None = None  # guarded by _lock
        self._queue: deque[_Batch] = deque()  # guarded by _lock; reader -> writer
        self._stopped = False  # guarded by _lock
        self._writing = False  # guarded by _lock; a batch is being written (one at a time)
        self._spare: list[bytearray] = []  # reader thread only: buffers for the next read
        self._stats = ForwarderStats()  # guarded by _lock; replaced, never changed
        label = f"{id(self):x}"
        self._threads = (
            threading.Thread(target=self._reader, name=f"tunkit-fwd-read:{label}"),
            threading.Thread(target=self._writer, name=f"tunkit-fwd-write:{label}"),
        )
        for thread in self._threads:
            thread.start()

    # -- configuration -----------------------------------------------------------

    def set_read_tun(self, tun: Tun | None) -> None:
        """Read from *tun* from now on (``None``: read nothing), closing the previous one.

        Setting the Tun already set does nothing; after :meth:`stop` nothing happens.
        """
        with self._lock:
            if self._stopped or tun is self._read_tun:
                return
            old, self._read_tun = self._read_tun, tun
            self._changed.notify_all()
        if old is not None:
            close_quietly(old)  # wakes the reader if it is blocked on *old*

    def set_write_tun(self, tun: Tun | None) -> None:
        """Write to *tun* from now on (``None``: hold batches), closing the previous one.

        Setting the Tun already set does nothing; after :meth:`stop` nothing happens.
        """
        with self._lock:
            if self._stopped or tun is self._write_tun:
                return
            old, self._write_tun = self._write_tun, tun
            self._changed.notify_all()
        if old is not None:
            close_quietly(old)

    def stop(self) -> None:
        """Close both Tuns, join both threads and return every pooled buffer; idempotent."""
        with self._lock:
            already = self._stopped
            self._stopped = True
            tuns = [t for t in (self._read_tun, self._write_tun) if t is not None]
            self._changed.notify_all()
        if not already:
            for tun in tuns:
                close_quietly(tun)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
        if left:
            self._swallowed(dropped=sum(len(b.bufs) - b.done for b in left))
        for batch in left:
            self._release(batch.bufs)

    def stats(self) -> ForwarderStats:
        """What it swallowed so far: read and write errors, retried reads, dropped packets."""
        return self._stats

    def _swallowed(
        self,
        exc: BaseException | None = None,
        *,
        read: bool = False,
        dropped: int = 0,
    ) -> None:
        """Count *exc* (from a read if *read*, else a write; None: none) and *dropped* packets.

        A ``ClosedError`` is not counted, a ``RetryableError`` counts as a retry.
        """
        retry = isinstance(exc, RetryableError)
        error = exc is not None and not retry and not isinstance(exc, ClosedError)
        with self._lock:
            st = self._stats
            self._stats = ForwarderStats(
                read_errors=st.read_errors + (error and read),
                read_retries=st.read_retries + retry,
                write_errors=st.write_errors + (error and not read),
                dropped=st.dropped + dropped,
                last_error=f"{type(exc).__name__}: {exc}" if error else st.last_error,
            )

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = " [stopped]" if self._stopped else ""
        return f"<Forwarder read={self._read_tun!r} write={self._write_tun!r}{state}>"

    # -- the two threads ---------------------------------------------------------

    def _release(self, bufs: list[bytearray]) -> None:
        for buf in bufs:
            put_buffer(self._pool, buf)

    def _reader(self) -> None:
        try:
            self._read_loop()
        finally:
            self._release(self._spare)
            self._spare = []

    def _read_loop(self) -> None:
        changed = self._changed
        # How to read for the current pair of Tuns, worked out again only when
        # either Tun or MTU changes: gso_pair's isinstance checks against the
        # GsoTun protocol alone cost microseconds, as much as a packet's system
        # call when each batch is one packet (no offload).
        key: tuple[object, ...] = ()
        gso_mtu = offset = count = first = size = 0
        read: Callable[..., int] = _no_read
        sizes: list[int] = []
        while True:
            with self._lock:
                while not self._stopped and self._read_tun is None:
                    changed.wait()
                if self._stopped:
                    return
                tun = self._read_tun
                assert tun is not None
                writer = self._write_tun
            mtu = tun.mtu()
            now = (tun, writer, mtu, writer.mtu() if writer is not None else 0)
            if now != key:
                key = now
                if self._passthrough and writer is not None and gso_pair(tun, writer):
                    gso_mtu = mtu
                    offset = gso_offset(tun, writer)
                    count = GSO_BATCH
                    first = size = offset + GSO_BUF_LEN
                    read = tun.read_gso  # type: ignore[attr-defined]
                else:
                    # Read with the headroom the write Tun needs, so the batch is
                    # written in place. The first buffer takes any packet: a
                    # read already waiting when the MTU grows stores the next
                    # one there (a device keeps one that does not fit a later
                    # buffer for its next read); one buffer per read (no
                    # offload) leaves the MTU out of the question.
                    gso_mtu = 0
                    offset = max(tun.mro(), writer.mwo() if writer is not None else 0)
                    count = max(tun.batch_size(), 1)
                    first = offset + GSO_BUF_LEN
                    size = first if count == 1 else offset + mtu
                    read = tun.read
                sizes = [0] * count
            # Buffers not handed on with a batch are kept for the next read: only
            # the buffers of queued batches are taken from the pool again.
            spare = self._spare
            if len(spare) < count or len(spare[0]) != first or len(spare[-1]) != size:
                spare = self._refill(count, first, size)
            bufs = spare[:count] if len(spare) > count else spare
            try:
                n = read(bufs, sizes, offset)
            except RetryableError as exc:
                self._swallowed(exc, read=True)
                continue
            except Exception as exc:
                self._drop_read(tun, exc)
                continue
            if n <= 0:
                continue
            # Super-packets read while the MTU grew may hold segments of the new one.
            batch_mtu = gso_mtu and max(gso_mtu, tun.mtu())
            with self._lock:
                # Write it on this thread when nothing is queued and the writer is
                # idle: no hand-off, so no thread switch on the common path.
                inline = self._write_tun if not self._queue and not self._writing else None
                if inline is not None:
                    self._writing = True
                else:
                    batch = _Batch(spare[:n], sizes[:n], offset, batch_mtu)
                    del spare[:n]
                    while not self._stopped and len(self._queue) >= _QUEUE_DEPTH:
                        changed.wait()
                    if self._stopped:
                        self._swallowed(dropped=n)
                        self._release(batch.bufs)
                        return
                    self._queue.append(batch)
                    if len(self._queue) == 1:
                        changed.notify_all()  # the writer may be waiting for work
            if inline is not None:
                self._deliver_inline(inline, n, sizes, offset, batch_mtu, tun, read)

    def _refill(self, count: int, first: int, size: int) -> list[bytearray]:
        """Make ``_spare`` *count* buffers: one of *first* bytes, then *size* bytes each.

        Buffers of an earlier MTU or offset go back to the pool. Reader thread only.
        """
        spare = self._spare
        stale = len(spare) > 1 and len(spare[-1]) != size
        if stale or (spare and len(spare[0]) not in (first, size)):
            self._release(spare)
            spare = self._spare = []
        if not spare or len(spare[0]) != first:
            spare.insert(0, get_buffer(self._pool, first))
        while len(spare) < count:
            spare.append(get_buffer(self._pool, size))
        return spare

    def _deliver_inline(
        self,
        tun: Tun,
        n: int,
        sizes: list[int],
        offset: int,
        gso_mtu: int,
        src: Tun,
        read: Callable[..., int],
    ) -> None:
        """Write the *n* packets just read into ``_spare[:n]`` on the reader's thread.

        Like :meth:`_deliver`, holding the writing turn. Written in place, the
        buffers stay spare for the next read, with no trip through the pool;
        a batch cut short by a swap takes them to the queue. One packet at a
        time (no offload), the turn is kept for a :meth:`_streak` of more.
        """
        spare = self._spare
        batch = _Batch(spare[:n], sizes[:n], offset, gso_mtu)
        in_place = bool(gso_mtu) or offset >= tun.mwo()
        if not in_place:
            del spare[:n]  # _write copies them behind more headroom, and releases them
        rest: _Batch | None = None  # for the new write Tun
        if not self._write_or_drop(tun, batch, release=not in_place):
            if in_place:
                del spare[:n]  # now the batch's
            rest = batch
        elif in_place and not gso_mtu and len(sizes) == 1:
            rest = self._streak(src, read, tun, sizes, offset)
        with self._lock:
            self._writing = False
            if rest is not None:
                self._queue.appendleft(rest)
            if self._queue:
                self._changed.notify_all()  # see _deliver

    def _streak(
        self, src: Tun, read: Callable[..., int], dst: Tun, sizes: list[int], offset: int
    ) -> _Batch | None:
        """Read from *src* and write to *dst* one packet at a time, holding the writing turn.

        The loop of :func:`copy` with the Forwarder's rules: at one packet per
        system call, the read loop's setup and hand-over checks would cost
        more than the calls. Nothing can be queued meanwhile (only this
        thread queues), and every change that matters closes the Tun a call
        is using, which ends the streak: a swap of either Tun, stop(). An
        MTU change does not matter here: the one buffer holds 64 KB. A streak
        also ends after ``_STREAK`` packets, so the read loop looks at the
        pair again now and then. Returns a packet cut short by a swap of
        *dst*, for the new write Tun (its buffer leaves ``_spare``), else None.
        """
        spare = self._spare
        buf = spare[0]
        bufs = [buf]
        view = memoryview(buf)
        write = dst.write
        for _ in range(_STREAK):
            try:
                if read(bufs, sizes, offset) <= 0:
                    continue
            except RetryableError as exc:
                self._swallowed(exc, read=True)
                continue
            except Exception as exc:
                self._drop_read(src, exc)
                return None
            try:
                if write((view[: offset + sizes[0]],), offset) <= 0:
                    raise TunError(WRITE_NO_PROGRESS)
            except Exception as exc:
                if not self._write_failed(dst, exc, 1):
                    return None  # dropped with dst, as _write_or_drop does
                del spare[:1]
                return _Batch(bufs, sizes[:1], offset)
        return None

    def _drop_read(self, tun: Tun, exc: Exception) -> None:
        """Close *tun* after it failed with *exc*; wait for a new one unless it was swapped."""
        self._swallowed(exc, read=True)
        with self._lock:
            if self._read_tun is tun:
                self._read_tun = None
        close_quietly(tun)

    def _writer(self) -> None:
        changed = self._changed
        while True:
            with self._lock:
                while not self._stopped and (
                    self._write_tun is None or not self._queue or self._writing
                ):
                    changed.wait()
                if self._stopped:
                    return
                tun = self._write_tun
                assert tun is not None
                batch = self._queue.popleft()
                self._writing = True
                if len(self._queue) == _QUEUE_DEPTH - 1:
                    changed.notify_all()  # the reader may be waiting for room
            self._deliver(tun, batch)

    def _deliver(self, tun: Tun, batch: _Batch) -> None:
        """Write *batch* to *tun* holding the writing turn (``_writing``), then give it back.

        The reader (inline) and the writer both end a write here; a batch cut
        short because *tun* was swapped out goes back to the queue's front.
        """
        finished = self._write_or_drop(tun, batch)
        with self._lock:
            self._writing = False
            if not finished:
                self._queue.appendleft(batch)  # the rest goes to the new write Tun
            if self._queue:
                # The writer waits for a queued batch and a free turn: it has
                # both now. With nothing queued nobody waits for this turn, and
                # a wake-up would cost a thread switch per inline batch.
                self._changed.notify_all()

    def _write_or_drop(self, tun: Tun, batch: _Batch, *, release: bool = True) -> bool:
        """Write *batch* to *tun*; return False when it must go on to a swapped-in Tun.

        A write error closes *tun* and drops the batch; a ``ClosedError``
        because *tun* was swapped out keeps the unwritten rest for the new one.
        The batch's buffers are returned to the pool once it is finished
        (with *release*; else the caller keeps them).
        """
        try:
            self._write(tun, batch)
        except Exception as exc:
            if self._write_failed(tun, exc, len(batch.bufs) - batch.done):
                return False
        if release:
            self._release(batch.bufs)
        return True

    def _write_failed(self, tun: Tun, exc: Exception, unwritten: int) -> bool:
        """*tun* failed a write with *exc*: close it; return whether the rest goes on.

        True when *tun* was swapped out (its ``ClosedError`` came from that):
        the *unwritten* packets go to the new write Tun. Else the write Tun
        is gone (None: batches wait for a new one) and they are dropped, and
        counted with the error.
        """
        with self._lock:
            swapped = self._write_tun is not tun
            if not swapped:
                self._write_tun = None
        close_quietly(tun)
        goes_on = swapped and isinstance(exc, ClosedError) and not self._stopped
        if not goes_on:
            self._swallowed(exc, dropped=unwritten)
        return goes_on

    def _write(self, tun: Tun, batch: _Batch) -> None:
        """Write the unwritten packets of *batch* to *tun*, recording progress in ``done``."""
        if batch.gso_mtu:
            self._write_gso(tun, batch)
            return
        mwo = tun.mwo()
        bufs, sizes = batch.bufs, batch.sizes
        n = len(bufs)
        chunk = max(tun.batch_size(), 1)
        if batch.offset >= mwo:
            offset = batch.offset
            views = [memoryview(bufs[i])[: offset + sizes[i]] for i in range(n)]
        else:
            # Too little headroom for this Tun (it was swapped in after the read):
            # copy the packets behind mwo() bytes of headroom.
            offset = mwo
            views = []
            for i in range(n):
                start = batch.offset
                buf = get_buffer(self._pool, mwo + sizes[i])
                buf[mwo:] = bufs[i][start : start + sizes[i]]
                put_buffer(self._pool, bufs[i])
                bufs[i] = buf
                views.append(memoryview(buf))
            batch.offset = mwo
        _write_tracked(tun.write, chunk, views, offset, batch)

    def _write_gso(self, tun: Tun, batch: _Batch) -> None:
        """Write a batch of super-packets: whole when *tun* takes them, else split."""
        bufs, sizes, offset = batch.bufs, batch.sizes, batch.offset
        n = len(bufs)
        whole = (
            isinstance(tun, GsoTun) and tun.mtu() >= batch.gso_mtu and offset >= tun.mwo()
        )
        if whole:
            views = [memoryview(bufs[i])[: offset + sizes[i]] for i in range(n)]
            write_gso = tun.write_gso  # type: ignore[attr-defined]
            _write_tracked(write_gso, max(tun.batch_size(), 1), views, offset, batch)
            return
        # The write Tun changed to one that cannot take super-packets: split each
        # one into plain packets behind the headroom it needs.
        headroom = tun.mwo()
        while batch.done < n:
            i = batch.done
            packet = memoryview(bufs[i])[offset - VNET_HDR_LEN : offset + sizes[i]]
            if not write_split(tun, packet, headroom):
                self._swallowed(dropped=1)  # malformed: nothing to write
            batch.done += 1


def _write_tracked(
    write: Callable[[Sequence[ReadableBuffer], int], int],
    chunk: int,
    views: Sequence[ReadableBuffer],
    offset: int,
    batch: _Batch,
) -> None:
    """Write ``views[batch.done:]`` *chunk* at a time, recording progress in ``batch.done``.

    Unlike ``write_all``, progress survives an exception: a write Tun swapped
    out mid-batch leaves the rest for the next one.

    Raises:
        TunError: a write made no progress.
    """
    n = len(views)
    while batch.done < n:
        written = write(views[batch.done : min(batch.done + chunk, n)], offset)
        if written <= 0:
            raise TunError(WRITE_NO_PROGRESS)
        batch.done += written


def _no_read(*args: object) -> int:
    raise AssertionError("read before the Tuns were known")  # pragma: no cover


class Point2Point:
    """Forward packets both ways between two Tuns, A and B, with two :class:`Forwarder` s.

    :meth:`set_a` makes a Tun the read side of A→B and the write side of
    B→A; :meth:`set_b` the mirror. Either may be swapped while it runs.
    """

    def __init__(self, pool: BufferPool | None = None, *, passthrough: bool = True) -> None:
        self.a2b = Forwarder(pool, passthrough=passthrough)
        self.b2a = Forwarder(pool, passthrough=passthrough)

    def set_a(self, tun: Tun | None) -> None:
        """Make *tun* endpoint A: read for B, and written with what B sends."""
        self.a2b.set_read_tun(tun)
        self.b2a.set_write_tun(tun)

    def set_b(self, tun: Tun | None) -> None:
        """Make *tun* endpoint B: read for A, and written with what A sends."""
        self.b2a.set_read_tun(tun)
        self.a2b.set_write_tun(tun)

    def stats(self) -> ForwarderStats:
        """Both forwarders' :meth:`Forwarder.stats` together (each direction: ``a2b``, ``b2a``)."""
        return self.a2b.stats() + self.b2a.stats()

    def stop(self) -> None:
        """Stop both forwarders; idempotent."""
        self.a2b.stop()
        self.b2a.stop()

    def __enter__(self) -> Point2Point:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Point2Point a2b={self.a2b!r} b2a={self.b2a!r}>"

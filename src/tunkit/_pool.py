"""Buffer pools: reuse packet buffers instead of allocating one per packet."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Protocol, runtime_checkable

from ._errors import BufferPoolError

__all__ = ["BufferPool", "DebugPool", "Pool", "get_buffer", "put_buffer"]


@runtime_checkable
class BufferPool(Protocol):
    """Hands out writable buffers of an exact size and takes them back."""

    def get(self, size: int) -> bytearray:
        """Return a writable buffer of exactly *size* bytes (contents unspecified)."""
        ...

    def put(self, buf: bytearray) -> None:
        """Give back a buffer that :meth:`get` returned."""
        ...


def get_buffer(pool: BufferPool | None, size: int) -> bytearray:
    """Return a buffer of *size* bytes from *pool*, or a fresh one when it is ``None``."""
    return bytearray(size) if pool is None else pool.get(size)


def put_buffer(pool: BufferPool | None, buf: bytearray) -> None:
    """Return *buf* to *pool*; with no pool the buffer is left to the garbage collector."""
    if pool is not None:
        pool.put(buf)


class Pool:
    """A thread-safe pool that keeps returned buffers, by size, for later ``get`` calls.

    At most *max_per_size* free buffers are kept for each size; more are dropped.
    """

    def __init__(self, max_per_size: int = 1024) -> None:
        self._lock = threading.Lock()
        self._free: defaultdict[int, list[bytearray]] = defaultdict(list)  # guarded by _lock
        self._max_per_size = max_per_size

    def get(self, size: int) -> bytearray:
        """Return a buffer of exactly *size* bytes, reused when one is free."""
        if size < 0:
            raise ValueError(f"buffer size {size} is negative")
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        """Keep *buf* for reuse by a later ``get`` of the same size."""
        with self._lock:
            free = self._free[len(buf)]
            if len(free) < self._max_per_size:
                free.append(buf)

    def __repr__(self) -> str:
        with self._lock:
            kept = sum(len(v) for v in self._free.values())
        return f"<Pool free={kept}>"


class DebugPool:
    """A pool that tracks every buffer it hands out, to find leaks and double puts.

    ``put`` of a buffer it did not hand out, or of one already returned, raises
    :class:`BufferPoolError`; :attr:`outstanding` counts buffers not yet
    returned; :meth:`close` raises :class:`BufferPoolError` if any are.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # id -> buffer; holding the buffer keeps its id from being reused.
        self._out: dict[int, bytearray] = {}  # guarded by _lock
        self._closed = False

    def get(self, size: int) -> bytearray:
        """Return a fresh buffer of exactly *size* bytes and remember it."""
        if size < 0:
            raise ValueError(f"buffer size {size} is negative")
        buf = bytearray(size)
        with self._lock:
            self._out[id(buf)] = buf
        return buf

    def put(self, buf: bytearray) -> None:
        """Take back *buf*.

        Raises:
            BufferPoolError: *buf* was not handed out by this pool, or was already put.
        """
        with self._lock:
            if self._out.get(id(buf)) is not buf:
                raise BufferPoolError(
                    f"put of a buffer ({len(buf)} bytes) this pool did not hand out "
                    "or that was already put back"
                )
            del self._out[id(buf)]

    @property
    def outstanding(self) -> int:
        """How many buffers were handed out and not yet put back."""
        with self._lock:
            return len(self._out)

    def close(self) -> None:
        """Check that every buffer came back.

        Raises:
            BufferPoolError: some buffers are still outstanding.
        """
        with self._lock:
            self._closed = True
            n = len(self._out)
        if n:
            raise BufferPoolError(f"{n} buffers were never put back")

    def __enter__(self) -> DebugPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " [closed]" if self._closed else ""
        return f"<DebugPool outstanding={self.outstanding}{state}>"

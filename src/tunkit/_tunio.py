"""TunIO: an io.RawIOBase over a Tun, one packet per call."""

from __future__ import annotations

import io
from collections import deque
from typing import TYPE_CHECKING

from ._errors import RetryableError
from ._pool import BufferPool, get_buffer, put_buffer
from ._tun import Wrapping
from ._write import write_all

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from ._tun import Tun

__all__ = ["TunIO"]


class TunIO(Wrapping, io.RawIOBase):
    """An ``io.RawIOBase`` over *tun*: ``readinto`` returns one packet, ``write`` sends one.

    The other packets of a batch read from the Tun are kept whole, in order,
    for the next ``readinto`` calls, so a batch is never read twice. A Tun
    read that returns nothing is retried, as is one that raised
    :class:`RetryableError`; other errors propagate. ``close()`` closes the
    Tun. Buffers come from *pool* when one is given. One reader and one
    writer thread may use it at once.
    """

    def __init__(self, tun: Tun, pool: BufferPool | None = None) -> None:
        super().__init__()
        self.tun = tun
        self._pool = pool
        self._pending: deque[bytes] = deque()  # rest of the last batch; reader thread only

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        """Store one packet in *buffer*, truncated to its length; return the bytes stored.

        Blocks until a packet is there. Returns 0 only for an empty *buffer*.
        """
        self._checkClosed()
        out = memoryview(buffer).cast("B")
        if len(out) == 0:
            return 0
        if not self._pending:
            self._fill(len(out))
        packet = self._pending.popleft()
        size = min(len(packet), len(out))
        out[:size] = packet[:size]
        return size

    def _fill(self, want: int) -> None:
        """Read the next non-empty batch from the Tun into :attr:`_pending`."""
        tun = self.tun
        offset = tun.mro()
        size = offset + max(tun.mtu(), want)
        count = max(tun.batch_size(), 1)
        bufs = [get_buffer(self._pool, size) for _ in range(count)]
        sizes = [0] * count
        try:
            while True:
                try:
                    n = tun.read(bufs, sizes, offset)
                except RetryableError:
                    continue
                if n > 0:
                    break
            for i in range(n):
                self._pending.append(bytes(bufs[i][offset : offset + sizes[i]]))
        finally:
            for buf in bufs:
                put_buffer(self._pool, buf)

    def write(self, b: ReadableBuffer, /) -> int:
        """Send *b* as one packet (with ``mwo()`` bytes of headroom); return ``len(b)``.

        An empty *b* sends nothing and returns 0.

        Raises:
            TunError: the Tun accepted nothing (no progress).
        """
        self._checkClosed()
        data = memoryview(b).cast("B")
        size = len(data)
        if size == 0:
            return 0
        headroom = self.tun.mwo()
        if headroom == 0:
            write_all(self.tun, [data], 0)
            return size
        buf = get_buffer(self._pool, headroom + size)
        try:
            buf[headroom:] = data
            write_all(self.tun, [buf], headroom)
        finally:
            put_buffer(self._pool, buf)
        return size

    def close(self) -> None:
        """Close the Tun, then this object; idempotent."""
        if not self.closed:
            try:
                self.tun.close()
            finally:
                self._pending.clear()
                super().close()

    def __repr__(self) -> str:
        state = " [closed]" if self.closed else ""
        return f"<TunIO {self.tun!r}{state}>"

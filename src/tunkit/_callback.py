"""CallbackTun: a Tun wrapper that reports every read and write to callbacks."""

from __future__ import annotations

from collections.abc import Callable, MutableSequence, Sequence
from typing import TYPE_CHECKING

from ._tun import Wrapping

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from ._tun import Tun

__all__ = ["Callback", "CallbackTun"]

Callback = Callable[[int, BaseException | None], None]
"""``callback(count, error)``: the packets moved, or 0 and the exception raised."""


class CallbackTun(Wrapping):
    """A Tun that delegates to *tun* and reports each ``read``/``write`` to a callback.

    After every call, ``on_read(n, None)`` / ``on_write(n, None)`` get the
    count, or ``(0, exc)`` when the call raised; the exception is then
    re-raised. Callbacks run on the calling thread with no tunkit lock held.
    The wrapped Tun is kept as :attr:`tun`; closing this closes it.
    """

    __slots__ = ("on_read", "on_write", "tun")

    def __init__(
        self, tun: Tun, on_read: Callback | None = None, on_write: Callback | None = None
    ) -> None:
        self.tun = tun
        self.on_read = on_read
        self.on_write = on_write

    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """Read from the wrapped Tun, then call ``on_read``."""
        try:
            n = self.tun.read(bufs, sizes, offset)
        except BaseException as exc:
            if self.on_read is not None:
                self.on_read(0, exc)
            raise
        if self.on_read is not None:
            self.on_read(n, None)
        return n

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Write to the wrapped Tun, then call ``on_write``."""
        try:
            n = self.tun.write(bufs, offset)
        except BaseException as exc:
            if self.on_write is not None:
                self.on_write(0, exc)
            raise
        if self.on_write is not None:
            self.on_write(n, None)
        return n

    def close(self) -> None:
        """Close the wrapped Tun."""
        self.tun.close()

    def __enter__(self) -> CallbackTun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CallbackTun {self.tun!r}>"

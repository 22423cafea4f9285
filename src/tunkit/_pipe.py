"""pipe(): two connected in-memory Tuns, like socket.socketpair()."""

from __future__ import annotations

import io
from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, final

from ._channel import Channel
from ._errors import (
    ReadOnClosedChannelError,
    ReadOnClosedPipeError,
    WriteOnClosedChannelError,
    WriteOnClosedPipeError,
)
from ._events import Event, Events
from ._tun import check_offset

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["PipeTun", "pipe"]


class PipeEnd:
    """What the two kinds of pipe end (:class:`PipeTun`, ``aio.AsyncPipeTun``) share:
    the values :func:`pipe` was given, the calls that answer with them, and the
    events stream that starts with ``Event.UP``."""

    __slots__ = ("_batch_size", "_events", "_mro", "_mtu", "_mwo", "_name")

    def __init__(self, name: str, batch_size: int, mtu: int, mwo: int, mro: int) -> None:
        self._name = name
        self._batch_size = batch_size
        self._mtu = mtu
        self._mwo = mwo
        self._mro = mro
        self._events = Events(Event.UP)

    def mwo(self) -> int:
        """Minimal write offset, as given to :func:`pipe`."""
        return self._mwo

    def mro(self) -> int:
        """Minimal read offset, as given to :func:`pipe`."""
        return self._mro

    def mtu(self) -> int:
        """The MTU given to :func:`pipe` (not enforced)."""
        return self._mtu

    def name(self) -> str:
        """``"pipe-tun-0"`` or ``"pipe-tun-1"``."""
        return self._name

    def batch_size(self) -> int:
        """The batch size given to :func:`pipe`."""
        return self._batch_size

    def fileno(self) -> int:
        """Raise ``io.UnsupportedOperation``: a pipe has no OS descriptor."""
        raise io.UnsupportedOperation(f"{self._name} has no file descriptor")

    @property
    def closed(self) -> bool:
        """Whether this pipe was closed (from either end)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        state = " [closed]" if self.closed else ""
        return (f"<{type(self).__name__} {self._name} batch={self._batch_size} "
                f"mtu={self._mtu}{state}>")


def check_pipe_args(batch_size: int, mtu: int, mwo: int, mro: int) -> None:
    """Raise ``ValueError`` for what :func:`pipe` refuses (both kinds)."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")
    for label, value in (("mtu", mtu), ("mwo", mwo), ("mro", mro)):
        if value < 0:
            raise ValueError(f"{label} {value} must not be negative")


@final
class PipeTun(PipeEnd):
    """One end of a :func:`pipe`: reads what the other end writes, and the reverse.

    Safe for one reader and one writer thread at a time (more work too: the
    channels beneath serve any number). Does not enforce the MTU.
    """

    __slots__ = ("_peer", "_rx", "_tx")

    def __init__(
        self, name: str, rx: Channel, tx: Channel, batch_size: int, mtu: int, mwo: int, mro: int
    ) -> None:
        super().__init__(name, batch_size, mtu, mwo, mro)
        self._rx = rx
        self._tx = tx
        self._peer: PipeTun | None = None

    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """Block until the other end writes, then store up to ``len(bufs)`` packets.

        Raises:
            OffsetError: *offset* is below ``mro()``.
            ReadOnClosedPipeError: either end was closed.
        """
        check_offset("read", offset, self._mro)
        try:
            return self._rx.read(bufs, sizes, offset)
        except ReadOnClosedChannelError:
            raise ReadOnClosedPipeError() from None

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Send ``bufs[i][offset:]`` to the other end; block until it has read them all.

        Raises:
            OffsetError: *offset* is below ``mwo()``.
            WriteOnClosedPipeError: either end was closed.
        """
        check_offset("write", offset, self._mwo)
        try:
            return self._tx.write(bufs, offset)
        except WriteOnClosedChannelError:
            raise WriteOnClosedPipeError() from None

    def events(self) -> Events:
        """The events stream: ``Event.UP``, then its end when the pipe closes."""
        return self._events

    def close(self) -> None:
        """Close both directions of the pipe; the other end's calls raise too. Idempotent."""
        self._rx.close()
        self._tx.close()
        self._events.close()
        if self._peer is not None:
            self._peer._events.close()

    @property
    def closed(self) -> bool:
        """Whether this pipe was closed (from either end)."""
        return self._rx.closed

    def __enter__(self) -> PipeTun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pipe(
    batch_size: int = 1, mtu: int = 1500, mwo: int = 0, mro: int = 0
) -> tuple[PipeTun, PipeTun]:
    """Return two connected Tuns: what one writes, the other reads.

    Names are ``"pipe-tun-0"`` and ``"pipe-tun-1"``; each events stream starts
    with ``Event.UP``. Closing either end closes both directions.

    Raises:
        ValueError: *batch_size* is below 1, or *mtu*, *mwo* or *mro* is negative.
    """
    check_pipe_args(batch_size, mtu, mwo, mro)
    a2b = Channel()
    b2a = Channel()
    a = PipeTun("pipe-tun-0", b2a, a2b, batch_size, mtu, mwo, mro)
    b = PipeTun("pipe-tun-1", a2b, b2a, batch_size, mtu, mwo, mro)
    a._peer = b
    b._peer = a
    return a, b

"""WebSocketTun: an AsyncTun whose packets are the binary messages of a WebSocket.

The seed's own example app is a VPN whose transport is a WebSocket that
implements Tun; this is that transport: ``aio.copy(aio.wrap(device),
WebSocketTun(ws))`` is a tunnel. One binary message is one IP packet, nothing
added. It takes a connection of the ``websockets`` package (the ``ws``
extra): ``websockets.asyncio`` on asyncio and uvloop, ``websockets.trio`` on
trio.

Over ``ws://`` nothing is encrypted or authenticated: anyone on the path
reads and forges packets. Use ``wss://`` (TLS) to a server you verify.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableSequence, Sequence
from typing import TYPE_CHECKING, Any, final

import anyio
import anyio.lowlevel
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from .._errors import ClosedError, TunError
from .._events import Event, Events
from .._linux.device import TunStats
from .._tun import check_offset
from ._tun import AsyncEvents, closed_error

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["WebSocketTun"]

# Packets per write call: each is one message (one send) all the same; a
# batch only saves a forwarding loop its calls.
BATCH = 32


@final
class WebSocketTun:
    """An AsyncTun over a ``websockets`` connection; takes ownership of *ws*.

    ``read`` returns one packet, the next binary message. A text message,
    an empty one, or one longer than the room in the buffer (or than
    ``mtu()``) is dropped and counted (``stats().dropped_malformed`` for the
    first two, ``dropped_too_big`` for the last); memory stays bounded by the
    connection's own ``max_size`` and ``max_queue``. ``write`` sends each
    packet of its batch as one binary message. The peer closing the
    connection normally ends it as a close does: ``read`` raises
    :class:`tunkit.ClosedError`, so :func:`tunkit.aio.copy` ends normally; a
    connection that failed raises :class:`tunkit.TunError` naming why.
    ``aclose()`` wakes pending calls at once, then closes the connection.

    Not encrypted over ``ws://`` (see the module's docstring).
    """

    def __init__(self, ws: Any, *, mtu: int = 1500) -> None:
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 1 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu!r} is outside 1..65535")
        self._ws = ws
        self._mtu = mtu
        try:
            peer = ws.remote_address
        except Exception:  # a connection that has none: the name only shows it
            peer = None
        host_port = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._name = f"ws:{host_port}"
        self._closed = False
        self._scopes: set[anyio.CancelScope] = set()  # of the calls pending now
        self._read_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._events = Events(Event.UP)
        self._streams: list[AsyncEvents] = []
        self._packets_read = self._bytes_read = 0
        self._packets_written = self._bytes_written = 0
        self._dropped_too_big = self._dropped_malformed = 0

    async def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """Wait for the next binary message and store it in ``bufs[0][offset:]``; return 1.

        Raises:
            OffsetError: *offset* is negative.
            ValueError: no buffers, or fewer sizes than buffers.
            ClosedError: closed, or the peer closed the connection normally.
            TunError: the connection failed.
        """
        check_offset("read", offset, 0)
        if not bufs or len(sizes) < 1:
            raise ValueError("read with no buffers or no sizes")
        async with self._read_lock:
            out = memoryview(bufs[0]).cast("B")
            room = min(len(out) - offset, self._mtu)
            while True:
                message = await self._call("read", self._ws.recv)
                if not isinstance(message, bytes | bytearray | memoryview):
                    self._dropped_malformed += 1  # a text message: not a packet
                    continue
                size = len(message)
                if size == 0:
                    self._dropped_malformed += 1
                elif size > room:
                    self._dropped_too_big += 1
                else:
                    out[offset : offset + size] = message
                    sizes[0] = size
                    self._packets_read += 1
                    self._bytes_read += size
                    return 1

    async def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Send ``bufs[i][offset:]`` as one binary message each; return how many went.

        A packet longer than ``mtu()`` is not sent but counted
        (``dropped_too_big``) and included in the count. Cancelled, it has
        handed over the messages before the one it waited on, and maybe that
        one, whole.

        Raises:
            OffsetError: *offset* is negative.
            ClosedError: closed before any packet went.
            TunError: the connection failed before any packet went.
        """
        check_offset("write", offset, 0)
        async with self._write_lock:
            done = 0
            for buf in bufs:
                pkt = bytes(memoryview(buf).cast("B")[offset:])
                if len(pkt) > self._mtu:
                    self._dropped_too_big += 1
                    done += 1
                    continue
                try:
                    await self._call("write", self._ws.send, pkt)
                except (ClosedError, TunError):
                    if done:
                        return done  # the caller's retry meets the error
                    raise
                done += 1
                self._packets_written += 1
                self._bytes_written += len(pkt)
            return done

    async def _call(self, direction: str, fn: Any, *args: Any) -> Any:
        """``await fn(*args)``, which aclose() cancels (recv and send are safe to cancel)."""
        if self._closed:
            raise closed_error(direction, self._name)
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                return await fn(*args)
            except ConnectionClosedOK:
                raise ClosedError(
                    f"tun: {direction} on closed WebSocketTun {self._name}: the peer closed it"
                ) from None
            except ConnectionClosed as exc:
                raise TunError(f"WebSocketTun {self._name}: the connection failed: {exc}") from exc
            finally:
                self._scopes.discard(scope)
        raise closed_error(direction, self._name)  # aclose() cancelled the call

    def mwo(self) -> int:
        """Minimal write offset: 0."""
        return 0

    def mro(self) -> int:
        """Minimal read offset: 0."""
        return 0

    def mtu(self) -> int:
        """The longest packet carried, either way (the *mtu* given)."""
        return self._mtu

    def name(self) -> str:
        """``ws:HOST:PORT``: the peer."""
        return self._name

    def batch_size(self) -> int:
        """32: a write may carry that many packets (a read returns one)."""
        return BATCH

    def events(self) -> AsyncIterator[Event]:
        """``Event.UP`` at once; the iteration ends at close."""
        stream = AsyncEvents(self._events)
        self._streams.append(stream)
        return stream

    def stats(self) -> TunStats:
        """A snapshot of the counters."""
        return TunStats(
            packets_read=self._packets_read,
            bytes_read=self._bytes_read,
            packets_written=self._packets_written,
            bytes_written=self._bytes_written,
            dropped_too_big=self._dropped_too_big,
            dropped_malformed=self._dropped_malformed,
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    async def aclose(self) -> None:
        """Wake pending calls (they raise ClosedError), then close the connection. Idempotent."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        for scope in list(self._scopes):
            scope.cancel()
        self._events.close()
        for stream in self._streams:
            stream.close()
        close = getattr(self._ws, "aclose", None) or self._ws.close  # trio's, asyncio's
        with anyio.CancelScope(shield=True):
            await close()

    async def __aenter__(self) -> WebSocketTun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = " [closed]" if self._closed else ""
        return f"<WebSocketTun {self._name} mtu={self._mtu}{state}>"

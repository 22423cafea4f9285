"""StreamTun: IP packets as length-prefixed frames over a connected stream socket.

Each packet travels as one frame: its length in two bytes, big-endian, then
its bytes. The stream is TCP, a Unix socket, or an :class:`ssl.SSLSocket`
for a tunnel that is encrypted and authenticated. A read receives as much
of the stream as is there (one ``recv``) and hands out every whole frame in
it as one batch; a write frames a whole batch into one buffer and sends it
with one ``send``.

The socket is non-blocking; a call that would block waits in ``poll()`` on it
and on the eventfd of :class:`tunkit._linux.fd._Descriptor`, so that
:meth:`StreamTun.close` from another thread ends it at once.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import struct
import threading
from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, Final, final

from .._errors import ClosedError, TunError
from .._events import Event, Events
from .._linux.device import TunStats
from .._linux.fd import _Descriptor
from .._offload.headers import byte_view
from .._tun import check_offset

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["FRAME_HDR_LEN", "MAX_FRAME", "StreamTun"]

# The frame header: the packet's length, network byte order.
_FRAME_HDR: Final = struct.Struct("!H")
FRAME_HDR_LEN: Final = _FRAME_HDR.size  # 2
MAX_FRAME: Final = 0xFFFF
"""The longest packet a frame can carry, and so the largest ``mtu``."""

_BATCH: Final = 128
# What one recv may fill: a batch of full frames at the default MTU, and
# always room for two of the largest frames, so that the partial frame kept
# at the front of the buffer leaves room for at least one more whole frame.
_RECV_BUF_LEN: Final = 256 * 1024
# How long a call that waits for the other direction's readiness (a TLS read
# that must write, a TLS write that must read) sleeps before it tries again:
# the other direction's thread may have done what was needed meanwhile.
_CROSS_WAIT_MS: Final = 50
# How many bytes of a bad frame an error message shows.
_SHOWN: Final = 16

_WOULD_BLOCK: Final = -1  # nothing to read yet: wait until the socket is readable
_WANTS_WRITE: Final = -2  # TLS must send before it can read: wait until writable


@final
class StreamTun:
    """A Tun whose packets travel as frames over a connected stream socket.

    A frame is the packet's length (two bytes, big-endian) and the packet.
    *sock* is a connected ``SOCK_STREAM`` socket: TCP, a Unix socket, or an
    :class:`ssl.SSLSocket` (an encrypted tunnel; the TLS handshake may be done
    or left to the first read or write). The Tun takes ownership of *sock*,
    makes it non-blocking and closes it on :meth:`close`. For TCP it sets
    ``TCP_NODELAY``: a frame is sent when it is written, not held back for
    more (a packet tunnel carries ping and interactive traffic).

    ``batch_size()`` is 128: a read returns every whole frame that one
    ``recv`` brought, up to ``len(bufs)``; a write sends its batch as one
    buffer. *mtu* (1 to 65535, the most a frame can hold) is the longest
    packet accepted both ways. One reader and one writer thread may use it
    at once; over TLS their calls into the one ``SSL`` object take turns
    (OpenSSL allows no concurrent use of it), each without blocking.

    The stream's end is the peer closing, and a frame that breaks the format
    a protocol error; in both cases the Tun is then closed, and nothing
    already received is lost:

    - A stream that ends between frames: ``read`` returns the frames before
      the end, then raises :class:`ClosedError` (so ``tunkit.copy`` ends
      normally).
    - A frame longer than ``mtu()``, or a stream that ends inside a frame:
      ``read`` returns the frames before it, then raises :class:`TunError`
      naming the bytes seen.

    Memory is bounded whatever the peer sends: frames are parsed in a
    receive buffer of fixed size (256 KiB, or two frames of *mtu* if that is
    more), and a frame header claiming more than ``mtu()`` ends the stream
    before any of it is stored.

    Counted in :meth:`stats`: packets and bytes (of packets, not frames) read
    and written; ``dropped_too_big``: a frame longer than the room in the
    caller's buffer (dropped, the read goes on), or a written packet longer
    than ``mtu()`` (not sent: the peer would take it for a broken stream);
    ``dropped_malformed``: frames of length 0 (no packet) and the frame that
    ended a stream as a protocol error.
    """

    def __init__(self, sock: socket.socket, *, mtu: int = 1500) -> None:
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 1 <= mtu <= MAX_FRAME:
            raise ValueError(f"mtu {mtu!r} is outside 1..{MAX_FRAME}")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"StreamTun needs a stream socket, not {sock.type!r}")
        try:
            peer = sock.getpeername()
        except OSError as exc:
            raise ValueError(f"StreamTun needs a connected socket: {exc.strerror or exc}") from exc
        self._tls = isinstance(sock, ssl.SSLSocket)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Timeout 0: an SSLSocket then raises SSLWantReadError/SSLWantWriteError
        # instead of waiting inside OpenSSL, where close() could not reach it.
        sock.setblocking(False)
        self._sock = sock
        self._fd = _Descriptor(sock.fileno(), "StreamTun")
        self._read_lock = self._fd.read_lock
        self._write_lock = self._fd.write_lock
        # OpenSSL's SSL object takes no concurrent calls, not even one read
        # and one write: each non-blocking call into it holds this lock.
        self._ssl_lock = threading.Lock()
        self._close_lock = threading.Lock()  # serialises close(): it returns when done
        self._mtu = mtu
        self._name = _describe(sock, peer, self._tls)
        self._events = Events(Event.UP)
        # Read side, guarded by the read lock. The bytes received and not yet
        # handed out are _rbuf[_start:_end]: whole frames, then at most one
        # partial frame, which moves to the front before the next recv.
        self._rbuf = bytearray(max(_RECV_BUF_LEN, 2 * (FRAME_HDR_LEN + mtu)))
        self._rview = memoryview(self._rbuf)
        self._start = 0
        self._end = 0
        self._received = 0  # stream bytes received, for the position in messages
        self._read_error: BaseException | None = None  # raised by the next read
        self._read_error_ends = False  # that error ends the stream: close the Tun
        self._packets_read = 0
        self._bytes_read = 0
        self._dropped_too_big_read = 0
        self._dropped_malformed = 0
        # Write side, guarded by the write lock.
        self._packets_written = 0
        self._bytes_written = 0
        self._dropped_too_big_write = 0
        # Non-blocking mode (set_blocking): the unsent end of the last frames a
        # write handed over, sent first by the next write or by flush().
        self._tail: memoryview | None = None

    # -- reading ----------------------------------------------------------------

    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """Read a batch of packets into *bufs* at *offset*; block until one frame is whole.

        Returns how many packets were stored: every whole frame received so
        far, up to ``len(bufs)``. A frame longer than the room in its buffer
        is dropped and counted (``stats().dropped_too_big``).

        Raises:
            ValueError: no buffers, or fewer sizes than buffers.
            ClosedError: the Tun is closed or closes while the call waits, or
                the peer ended the stream between frames (the Tun is then closed).
            TunError: a frame longer than ``mtu()``, or the stream ended inside
                a frame (the Tun is then closed).
            OSError: the socket failed (a reset connection, a TLS error).
        """
        if offset < 0:
            check_offset("read", offset, 0)
        if not bufs:
            raise ValueError("read with no buffers")
        if len(sizes) < len(bufs):
            raise ValueError(f"read with {len(sizes)} sizes for {len(bufs)} buffers")
        with self._read_lock:
            error = self._read_error
            if error is None:
                n = self._read_frames(bufs, sizes, offset)
                if n:
                    return n
                error = self._read_error
                assert error is not None  # _read_frames returns 0 only with an error kept
            self._read_error = None
            ends = self._read_error_ends
        if ends:
            self.close()  # outside the read lock, which close() takes
        raise error

    def _read_frames(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int
    ) -> int:
        """Hand out buffered frames, receiving more until at least one is whole.

        Holds the read lock. Returns the count stored; an error met on the way
        is kept in ``_read_error`` (and 0 returned if nothing was stored).
        """
        rbuf, view, mtu = self._rbuf, self._rview, self._mtu
        count = len(bufs)
        n = nbytes = 0  # counted into self._* once, at the end: no attribute per packet
        start, end = self._start, self._end
        try:
            while True:
                # The whole frames buffered, as long as there are buffers.
                while n < count and end - start >= FRAME_HDR_LEN:
                    length = rbuf[start] << 8 | rbuf[start + 1]
                    if length > mtu:
                        self._protocol_error(
                            f"stream frame of {length} bytes is longer than mtu() {mtu}",
                            start, end,
                        )
                        return n
                    stop = start + FRAME_HDR_LEN + length
                    if stop > end:
                        break
                    dst = bufs[n]
                    if length > len(dst) - offset:  # type: ignore[arg-type]
                        self._dropped_too_big_read += 1
                    elif length == 0:
                        self._dropped_malformed += 1
                    else:
                        dst[offset : offset + length] = view[start + FRAME_HDR_LEN : stop]  # type: ignore[index]
                        sizes[n] = length
                        nbytes += length
                        n += 1
                    start = stop
                if n == count:
                    break
                # More bytes: the partial frame (if any) moves to the front,
                # so the rest of it and more frames fit behind it.
                if start == end:
                    start = end = 0
                elif start:
                    tail = end - start
                    rbuf[:tail] = bytes(view[start:end])  # may overlap: copy first
                    start, end = 0, tail
                self._start, self._end = start, end
                got = self._recv(view[end:])
                if got > 0:
                    end += got
                    self._received += got
                    continue
                if got == 0:
                    self._stream_ended(start, end)
                    break
                if n:
                    break  # nothing more for now: hand out what came
                if got == _WOULD_BLOCK:
                    self._fd.wait_readable()
                else:
                    self._fd.wait(select.POLLOUT, "read", _CROSS_WAIT_MS)
        except (ClosedError, OSError) as exc:
            if not n:
                raise
            self._read_error = exc  # the packets stored are returned first
            self._read_error_ends = False
        finally:
            self._start, self._end = start, end
            self._packets_read += n
            self._bytes_read += nbytes
        return n

    def _recv(self, space: memoryview) -> int:
        """Receive into *space*: the count, 0 at the stream's end, or a negative reason to wait."""
        sock = self._sock
        if not self._tls:
            try:
                return sock.recv_into(space)
            except BlockingIOError:
                return _WOULD_BLOCK
            except OSError as exc:
                raise self._fd.failure(exc, "read") from None
        with self._ssl_lock:
            if self._fd.closed:
                # OpenSSL keeps the descriptor's number, which may be another
                # file's by now: no SSL call once close() has begun.
                raise self._fd.closed_error("read")
            try:
                # An SSLSocket returns 0 at the peer's close_notify and, with
                # suppress_ragged_eofs (the default), at a bare end of the TCP
                # stream. Data OpenSSL holds already decrypted (pending()) is
                # returned here, before any poll(): poll() only knows the socket.
                return sock.recv_into(space)
            except ssl.SSLWantReadError:
                return _WOULD_BLOCK
            except ssl.SSLWantWriteError:
                return _WANTS_WRITE
            except ssl.SSLEOFError:
                return 0  # a ragged end (suppress_ragged_eofs=False): the end all the same
            except OSError as exc:
                raise self._fd.failure(exc, "read") from None

    def _stream_ended(self, start: int, end: int) -> None:
        """Keep the error for a stream that ended with _rbuf[start:end] unread."""
        if start == end:
            self._read_error = ClosedError(
                f"tun: read on closed StreamTun {self._name}: the peer ended the stream"
            )
            self._read_error_ends = True
            return
        have = end - start
        if have < FRAME_HDR_LEN:
            what = f"{have} of the {FRAME_HDR_LEN} bytes of a frame header"
        else:
            length = _FRAME_HDR.unpack_from(self._rbuf, start)[0]
            what = f"{have} of the {FRAME_HDR_LEN + length} bytes of a frame"
        self._protocol_error(f"stream ended inside a frame: {what}", start, end)

    def _protocol_error(self, what: str, start: int, end: int) -> None:
        """Keep a :class:`TunError` for a frame that breaks the format at _rbuf[start]."""
        seen = self._rbuf[start : min(end, start + _SHOWN)].hex(" ")
        more = " ..." if end - start > _SHOWN else ""
        position = self._received - (end - start)
        self._dropped_malformed += 1
        self._read_error = TunError(
            f"{what} (StreamTun {self._name}, at stream byte {position}; "
            f"bytes seen: {seen}{more})"
        )
        self._read_error_ends = True

    # -- writing ----------------------------------------------------------------

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Send ``bufs[i][offset:]`` as one frame each, all in one send; return how many.

        Blocks until every frame is in the socket (a partial send is finished
        before the call returns, so frames never interleave). A packet longer
        than ``mtu()`` is not sent, but counted (``stats().dropped_too_big``)
        and included in the count returned.

        Raises:
            ClosedError: the Tun is closed before any frame was sent whole (a
                close during the send returns the frames already sent, and the
                next call raises).
            OSError: the socket failed (the peer reset the connection, say).
        """
        if offset < 0:
            check_offset("write", offset, 0)
        with self._write_lock:
            if self._fd.closed:
                raise self._fd.closed_error("write")
            if self._tail is not None:
                self._flush_tail()  # non-blocking: BlockingIOError, nothing of bufs taken
            parts: list[ReadableBuffer] = []
            append, pack, mtu = parts.append, _FRAME_HDR.pack, self._mtu
            too_big = nbytes = 0
            for buf in bufs:
                view = buf if type(buf) is memoryview else memoryview(buf)
                if view.itemsize != 1:
                    view = byte_view(view)
                pkt = view[offset:] if offset else view
                length = len(pkt)
                if length > mtu:
                    too_big += 1
                    continue
                append(pack(length))
                append(pkt)
                nbytes += length
            if parts:
                data = b"".join(parts)
                sent = self._send_all(data)  # BlockingIOError: nothing was taken
                self._dropped_too_big_write += too_big
                if sent < len(data):  # closed during the send
                    done = _whole_frames(data, sent)
                    if not done:
                        raise self._fd.closed_error("write")
                    return done + too_big  # the retry meets the closed Tun
                self._packets_written += len(parts) // 2
                self._bytes_written += nbytes
            else:
                self._dropped_too_big_write += too_big
        return len(bufs)

    def _send_all(self, data: bytes | memoryview) -> int:
        """Send all of *data*; return how much was sent (less only if close() came between)."""
        sock, total, sent = self._sock, len(data), 0
        view = memoryview(data)
        try:
            while sent < total:
                if self._fd.closed:
                    return sent
                if not self._tls:
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:
                        self._fd.wait_writable()
                    continue
                with self._ssl_lock:
                    try:
                        # Not a partial write: OpenSSL sends the whole buffer or
                        # wants to be called again with the same bytes.
                        sent += sock.send(view[sent:])
                        continue
                    except ssl.SSLWantWriteError:
                        wants_read = False
                    except ssl.SSLWantReadError:
                        wants_read = True
                if wants_read:
                    self._fd.wait(select.POLLIN, "write", _CROSS_WAIT_MS)
                else:
                    self._fd.wait_writable()
        except ClosedError:
            return sent
        except BlockingIOError:
            # Non-blocking mode: the frames begun are handed over, the rest of
            # their bytes goes first next time (frames never interleave).
            if not sent:
                raise
            self._tail = view[sent:]
            return total
        except OSError as exc:
            raise self._fd.failure(exc, "write") from None
        return sent

    def _flush_tail(self) -> None:
        """Send the tail a non-blocking write left; hold the write lock.

        Raises:
            BlockingIOError: some of it is still unsent (kept for the next try).
        """
        tail = self._tail
        assert tail is not None
        self._tail = None
        try:
            self._send_all(tail)  # keeps a new, shorter tail when it sent some
        except BlockingIOError:
            self._tail = tail
            raise
        if self._tail is not None:
            raise BlockingIOError(errno.EAGAIN, "write would block")

    def flush(self) -> None:
        """Send what a non-blocking write left unsent of its frames (see :meth:`set_blocking`).

        Raises:
            BlockingIOError: the socket is still full; some bytes remain.
        """
        with self._write_lock:
            if self._tail is not None and not self._fd.closed:
                self._flush_tail()

    def set_blocking(self, flag: bool) -> None:
        """Blocking mode (the default), or not: then a call that would wait raises
        ``BlockingIOError`` instead (``tunkit.aio`` waits for the socket in its
        event loop). A read keeps a partial frame for the next call; a write
        that the socket takes only in part returns its frames as sent and
        keeps their last bytes, which the next write, or :meth:`flush`, sends
        first: frames never interleave, none goes twice.
        """
        self._fd.set_blocking(flag)

    # -- the rest of the Tun protocol ---------------------------------------------

    def mwo(self) -> int:
        """Minimal write offset: 0 (the frame header is built apart from the packet)."""
        return 0

    def mro(self) -> int:
        """Minimal read offset: 0."""
        return 0

    def mtu(self) -> int:
        """The longest packet carried, either way (the *mtu* given)."""
        return self._mtu

    def name(self) -> str:
        """``tcp:HOST:PORT``, ``tls:HOST:PORT`` or ``unix:PATH``: the kind and the peer."""
        return self._name

    def events(self) -> Events:
        """``Event.UP`` at once; the stream ends at close()."""
        return self._events

    def batch_size(self) -> int:
        """128: a read returns up to that many frames of one receive."""
        return _BATCH

    def fileno(self) -> int:
        """The socket's descriptor, still owned by this object; -1 once closed."""
        return self._fd.fileno()

    def stats(self) -> TunStats:
        """A snapshot of the counters (see the class docstring for what each counts)."""
        return TunStats(
            packets_read=self._packets_read,
            bytes_read=self._bytes_read,
            packets_written=self._packets_written,
            bytes_written=self._bytes_written,
            dropped_malformed=self._dropped_malformed,
            dropped_too_big=self._dropped_too_big_read + self._dropped_too_big_write,
        )

    def close(self) -> None:
        """Close the socket; idempotent, from any thread.

        Blocked reads and writes raise :class:`ClosedError` at once; returns
        once the socket is closed and the events stream has ended.
        """
        with self._close_lock:
            if self._fd.fileno() < 0:
                return
            self._fd.close()  # wakes the waiters, then closes the descriptor under both locks
            # The descriptor is closed: the socket object must not close its number again.
            self._sock.detach()
            self._events.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has begun (by the user, or at the stream's end)."""
        return self._fd.closed

    def __enter__(self) -> StreamTun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " [closed]" if self._fd.closed else ""
        return f"<StreamTun {self._name} mtu={self._mtu}{state}>"


def _describe(sock: socket.socket, peer: object, tls: bool) -> str:
    if sock.family == socket.AF_UNIX:
        where = peer or sock.getsockname() or "unnamed"
        if isinstance(where, bytes):  # an abstract address
            where = where.decode(errors="replace")
        return f"unix:{where}"
    assert isinstance(peer, tuple)
    host = f"[{peer[0]}]" if sock.family == socket.AF_INET6 else peer[0]
    return f"{'tls' if tls else 'tcp'}:{host}:{peer[1]}"


def _whole_frames(data: bytes, sent: int) -> int:
    """How many of the frames in *data* lie wholly in its first *sent* bytes."""
    done = pos = 0
    while pos + FRAME_HDR_LEN <= sent:
        pos += FRAME_HDR_LEN + _FRAME_HDR.unpack_from(data, pos)[0]
        if pos > sent:
            break
        done += 1
    return done

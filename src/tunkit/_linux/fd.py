"""One non-blocking descriptor whose blocked readers and writers close() wakes."""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

from .._errors import ClosedError
from .._offload._impl import NATIVE_MODULE

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from .._speedups import PacketIo

__all__ = ["PACKET_IO", "PacketIoType", "_Descriptor"]


class PacketIoType(Protocol):
    """``PacketIo``: the system calls of a TUN descriptor in C (see _speedups.pyi)."""

    def __call__(self, fd: int, wake: int) -> PacketIo: ...


# getattr: an extension built from an older tunkit (a stale in-place build)
# has no PacketIo, or one without read_gso; the Python path serves then.
_packet_io = getattr(NATIVE_MODULE, "PacketIo", None)
PACKET_IO: Final[PacketIoType | None] = _packet_io if hasattr(_packet_io, "read_gso") else None
"""The C extension's PacketIo when it is loaded, else None (the Python path)."""

_POLL_ERR: Final = select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Descriptor:
    """Own one descriptor: vectored reads and writes that close() interrupts.

    Takes ownership of *fd* and makes it non-blocking. A call that would block
    waits in ``poll()`` on the descriptor and on a wake-up ``eventfd``;
    :meth:`close` makes the eventfd readable for good, so every waiter returns
    and raises :class:`ClosedError`. One reader and one writer may run at the
    same time (a lock per direction); the descriptor is closed only once
    neither lock is held, so no system call can reach a reused descriptor
    number.

    The system call is tried first and ``poll()`` runs only on EAGAIN; each
    direction keeps its own poll object, made once and used only under its
    lock (a poll object holds descriptor numbers, not the files: it is never
    used once :meth:`close` has begun).

    A hot path may make its own system call on :attr:`fd` (one packet per
    call leaves no room for a layer of Python): holding the direction's
    lock, it tries the call, on ``BlockingIOError`` calls
    :meth:`wait_readable`/:meth:`wait_writable` and tries again, and passes
    any other ``OSError`` through :meth:`failure`.

    With *packet_io* (the C extension's ``PacketIo``), :attr:`io` reads and
    writes one packet per call without these locks; :meth:`close` then drains
    it (refuses new calls, waits for those in progress) before it closes.
    """

    __slots__ = (
        "_closing",
        "_label",
        "_read_lock",
        "_read_poll",
        "_state_lock",
        "_write_lock",
        "_write_poll",
        "fd",
        "io",
        "wake_fd",
    )

    def __init__(
        self, fd: int, label: str = "device", packet_io: PacketIoType | None = None
    ) -> None:
        os.set_blocking(fd, False)
        # Made readable for good by close(): every poll() on it returns. A
        # caller that waits in its own poll() (the C I/O of device.py)
        # includes it, under the direction's lock, as fd.
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # The descriptor number, -1 once closed: closed under both direction
        # locks, so a holder of either lock sees a number that is still ours
        # (a late call gets EBADF from -1, never another file's number).
        self.fd = fd
        self._label = label
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closing = False  # guarded by _state_lock; read without it as a hint
        # One poll object per direction, guarded by that direction's lock.
        self._read_poll = select.poll()
        self._read_poll.register(fd, select.POLLIN)
        self._read_poll.register(self.wake_fd, select.POLLIN)
        self._write_poll = select.poll()
        self._write_poll.register(fd, select.POLLOUT)
        self._write_poll.register(self.wake_fd, select.POLLIN)
        # The C extension's one-packet calls on fd (see PacketIo), when asked
        # for: they keep no lock, so close() drains them before it closes.
        self.io = None if packet_io is None else packet_io(fd, self.wake_fd)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has begun."""
        return self._closing

    def fileno(self) -> int:
        """The owned descriptor; -1 once closed."""
        return self.fd

    def _closed_error(self, direction: str) -> ClosedError:
        return ClosedError(f"tun: {direction} on closed {self._label}: file already closed")

    def closed_error(self, direction: str) -> ClosedError:
        """The :class:`ClosedError` of a *direction* (``"read"``/``"write"``) after close()."""
        return self._closed_error(direction)

    def wait_readable(self) -> None:
        """Block until the descriptor is readable; hold :attr:`read_lock`.

        Raises:
            ClosedError: close() has begun (then or while waiting).
        """
        if self._closing:
            raise self._closed_error("read")
        self._read_poll.poll()
        if self._closing:
            raise self._closed_error("read")

    def wait_writable(self) -> None:
        """Block until the descriptor is writable; hold :attr:`write_lock`.

        Raises:
            ClosedError: close() has begun (then or while waiting).
        """
        if self._closing:
            raise self._closed_error("write")
        self._write_poll.poll()
        if self._closing:
            raise self._closed_error("write")

    def wait(self, events: int, direction: str, timeout_ms: int | None = None) -> None:
        """Block until the descriptor reports *events* or *timeout_ms* passes.

        For a call of *direction* that needs the other direction's readiness
        (a TLS read that must first write a handshake message, say): it polls
        with a poll object of its own, as the direction's poll objects belong
        to their locks.

        Raises:
            ClosedError: close() has begun (then or while waiting).
        """
        if self._closing:
            raise self._closed_error(direction)
        poller = select.poll()
        poller.register(self.fd, events)
        poller.register(self.wake_fd, select.POLLIN)
        poller.poll(timeout_ms)
        if self._closing:
            raise self._closed_error(direction)

    def failure(self, exc: OSError, direction: str) -> OSError:
        """The exception to raise for *exc* from a system call of *direction* on :attr:`fd`.

        EBADF after close() (the number is -1) becomes :class:`ClosedError`;
        anything else stays itself.
        """
        if exc.errno == errno.EBADF and self._closing:
            return self._closed_error(direction)
        return exc

    def errno_failure(self, err: int, direction: str) -> OSError:
        """:meth:`failure` for *err*, a ``-errno`` that a :attr:`io` call returned."""
        return self.failure(OSError(-err, os.strerror(-err)), direction)

    def readv(self, bufs: Sequence[WriteableBuffer]) -> int:
        """Read one record (one packet for a TUN device) into *bufs*; block until one comes.

        Raises:
            ClosedError: the descriptor is closed or closes while waiting.
            OSError: the kernel refused the read.
        """
        with self._read_lock:
            return self.readv_locked(bufs)

    def readv_locked(self, bufs: Sequence[WriteableBuffer]) -> int:
        """Like :meth:`readv`, for a caller that holds :attr:`read_lock`."""
        while True:
            if self._closing:
                raise self._closed_error("read")
            try:
                return os.readv(self.fd, bufs)
            except BlockingIOError:
                self._read_poll.poll()
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF and self._closing:
                    raise self._closed_error("read") from None
                raise

    def try_readv_locked(self, bufs: Sequence[WriteableBuffer]) -> int:
        """Read one record into *bufs* if one is ready, else return -1; hold :attr:`read_lock`.

        Raises:
            ClosedError: the descriptor is closed.
            OSError: the kernel refused the read.
        """
        while True:
            if self._closing:
                raise self._closed_error("read")
            try:
                return os.readv(self.fd, bufs)
            except BlockingIOError:
                return -1
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF and self._closing:
                    raise self._closed_error("read") from None
                raise

    @property
    def read_lock(self) -> threading.Lock:
        """The lock of the read direction; hold it to guard state that goes with a read."""
        return self._read_lock

    def writev(self, bufs: Sequence[ReadableBuffer]) -> int:
        """Write *bufs* as one record (one packet for a TUN device); block while the kernel is full.

        Raises:
            ClosedError: the descriptor is closed or closes while waiting.
            OSError: the kernel refused the packet.
        """
        with self._write_lock:
            return self.writev_locked(bufs)

    def writev_locked(self, bufs: Sequence[ReadableBuffer]) -> int:
        """Like :meth:`writev`, for a caller that holds :attr:`write_lock` (a batch)."""
        while True:
            if self._closing:
                raise self._closed_error("write")
            try:
                return os.writev(self.fd, bufs)
            except BlockingIOError:
                self._write_poll.poll()
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF and self._closing:
                    raise self._closed_error("write") from None
                raise

    def write_locked(self, buf: ReadableBuffer) -> int:
        """Like :meth:`writev_locked` with one buffer (``os.write``: no list to build)."""
        while True:
            if self._closing:
                raise self._closed_error("write")
            try:
                return os.write(self.fd, buf)
            except BlockingIOError:
                self._write_poll.poll()
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF and self._closing:
                    raise self._closed_error("write") from None
                raise

    @property
    def write_lock(self) -> threading.Lock:
        """The lock of the write direction; hold it to write a batch without interleaving."""
        return self._write_lock

    def close(self) -> None:
        """Close the descriptor, waking blocked callers first; idempotent, any thread.

        Returns once the descriptor is closed, which waits for the system call
        in progress (if any) to return.
        """
        with self._state_lock:
            if self._closing:
                return
            self._closing = True
        os.eventfd_write(self.wake_fd, 1)  # stays readable: every waiter returns
        if self.io is not None:
            self.io.drain()  # refuses new calls, waits for those in progress
        with self._read_lock, self._write_lock:
            # No system call on _fd can be running now. A closed descriptor's
            # number is reused at once; a late read would hit another file.
            os.close(self.fd)
            os.close(self.wake_fd)
            self.fd = self.wake_fd = -1

    def __repr__(self) -> str:
        state = " [closed]" if self._closing else ""
        return f"<_Descriptor fd={self.fd}{state}>"

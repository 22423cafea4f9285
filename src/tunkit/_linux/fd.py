"""One non-blocking descriptor whose blocked readers and writers close() wakes."""

from __future__ import annotations

import errno
import os
import select
import threading
from typing import TYPE_CHECKING, Final

from .._errors import ClosedError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["_Descriptor"]

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
    """

    __slots__ = ("_closing", "_fd", "_label", "_read_lock", "_state_lock", "_wake", "_write_lock")

    def __init__(self, fd: int, label: str = "device") -> None:
        os.set_blocking(fd, False)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fd = fd  # closed under both direction locks
        self._label = label
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closing = False  # guarded by _state_lock; read without it as a hint

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has begun."""
        return self._closing

    def fileno(self) -> int:
        """The owned descriptor; -1 once closed."""
        return self._fd

    def _closed_error(self, direction: str) -> ClosedError:
        return ClosedError(f"tun: {direction} on closed {self._label}: file already closed")

    def _wait(self, events: int) -> None:
        poller = select.poll()  # one per waiter: the two directions wait apart
        poller.register(self._fd, events)
        poller.register(self._wake, select.POLLIN)
        poller.poll()

    def readv(self, bufs: list[WriteableBuffer]) -> int:
        """Read one record (one packet for a TUN device) into *bufs*; block until one comes.

        Raises:
            ClosedError: the descriptor is closed or closes while waiting.
            OSError: the kernel refused the read.
        """
        with self._read_lock:
            return self.readv_locked(bufs)

    def readv_locked(self, bufs: list[WriteableBuffer]) -> int:
        """Like :meth:`readv`, for a caller that holds :attr:`read_lock`."""
        while True:
            if self._closing:
                raise self._closed_error("read")
            try:
                return os.readv(self._fd, bufs)
            except BlockingIOError:
                self._wait(select.POLLIN)
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

    def writev(self, bufs: list[ReadableBuffer]) -> int:
        """Write *bufs* as one record (one packet for a TUN device); block while the kernel is full.

        Raises:
            ClosedError: the descriptor is closed or closes while waiting.
            OSError: the kernel refused the packet.
        """
        with self._write_lock:
            return self.writev_locked(bufs)

    def writev_locked(self, bufs: list[ReadableBuffer]) -> int:
        """Like :meth:`writev`, for a caller that holds :attr:`write_lock` (a batch)."""
        while True:
            if self._closing:
                raise self._closed_error("write")
            try:
                return os.writev(self._fd, bufs)
            except BlockingIOError:
                self._wait(select.POLLOUT)
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
        os.eventfd_write(self._wake, 1)  # stays readable: every waiter returns
        with self._read_lock, self._write_lock:
            # No system call on _fd can be running now. A closed descriptor's
            # number is reused at once; a late read would hit another file.
            os.close(self._fd)
            os.close(self._wake)
            self._fd = self._wake = -1

    def __repr__(self) -> str:
        state = " [closed]" if self._closing else ""
        return f"<_Descriptor fd={self._fd}{state}>"

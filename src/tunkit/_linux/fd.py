"""One non-blocking descriptor whose blocked readers and writers close() wakes."""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, TypeVar, final

from .._errors import ClosedError
from .._offload._impl import NATIVE_MODULE

if TYPE_CHECKING:
    from .._speedups import PacketIo

__all__ = ["PACKET_IO", "CloseOnce", "PacketIoType", "_Descriptor"]


class PacketIoType(Protocol):
    """``PacketIo``: the system calls of a TUN descriptor in C (see _speedups.pyi)."""

    def __call__(self, fd: int, wake: int) -> PacketIo: ...


# getattr: an extension built from an older tunkit (a stale in-place build)
# has no PacketIo, or one without read_gso; the Python path serves then.
_packet_io = getattr(NATIVE_MODULE, "PacketIo", None)
PACKET_IO: Final[PacketIoType | None] = _packet_io if hasattr(_packet_io, "read_gso") else None
"""The C extension's PacketIo when it is loaded, else None (the Python path)."""

_A = TypeVar("_A")  # what call_locked passes on to its system call
_READ: Final = 0  # index of a direction in _Descriptor._waiting
_WRITE: Final = 1


@final
class CloseOnce:
    """The bookkeeping of an idempotent close(): who closes, and when it is done.

    The first :meth:`begin` closes; a later one waits until that close is
    done (:meth:`end`), so that no close() returns while another thread's is
    still releasing things (SPEC: nothing remains once close() returned). A
    later one on the closing thread itself (a signal handler that runs
    inside close()) returns at once: it cannot wait for itself.
    """

    __slots__ = ("_closer", "_done", "_lock")

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: see above
        self._done = threading.Event()
        self._closer: int | None = None  # the closing thread, guarded by _lock

    def begin(self) -> bool:
        """Whether the caller is the one to close (then it calls :meth:`end` when done).

        False: it was closed, or is being closed by another thread, whose
        close has ended by the time this returns.
        """
        me = threading.get_ident()
        with self._lock:
            closer = self._closer
            if closer is None:
                self._closer = me
                return True
        if closer != me:
            self._done.wait()
        return False

    def end(self) -> None:
        """The close that :meth:`begin` let through is done."""
        self._done.set()

    @property
    def begun(self) -> bool:
        """Whether a close has begun."""
        return self._closer is not None


class _Descriptor:
    """Own one descriptor: vectored reads and writes that close() interrupts.

    Takes ownership of *fd* and makes it non-blocking. A call that would block
    waits in ``poll()`` on the descriptor and on a wake-up ``eventfd``;
    :meth:`close` makes the eventfd readable for good, so every waiter returns
    and raises :class:`ClosedError`. One reader and one writer may run at the
    same time (a lock per direction); the descriptor is closed only once
    neither lock is held by another thread, so no system call can reach a
    reused descriptor number.

    The system call is tried first and ``poll()`` runs only on EAGAIN
    (:meth:`call_locked`, the one loop); each direction keeps its own poll
    object, made once and used only under its lock (a poll object holds
    descriptor numbers, not the files: it is never used once :meth:`close`
    has begun).

    A hot path may make its own system call on :attr:`fd` (one packet per
    call leaves no room for a layer of Python): holding the direction's
    lock, it tries the call, on ``BlockingIOError`` calls
    :meth:`wait_readable`/:meth:`wait_writable` and tries again, and passes
    any other ``OSError`` through :meth:`failure`.

    With *packet_io* (the C extension's ``PacketIo``), :attr:`io` makes the
    system calls of a packet or a batch without these locks; :meth:`close`
    then drains it (refuses new calls, waits for those in progress) before
    it closes.

    **Signal handlers.** A handler may call :meth:`close` on the thread that
    is inside a call here (blocked in ``read``, say): the direction locks
    are re-entrant, so close() does not wait for its own thread. When that
    thread was waiting in ``poll()``, Python retries the poll on the same
    descriptor numbers once the handler returns (PEP 475); close() then
    releases the device at once but keeps the two numbers taken (the
    device's becomes a copy of the readable eventfd) until that poll has
    returned, and the interrupted call closes them as it raises
    :class:`ClosedError`.
    """

    __slots__ = (
        "_blocking",
        "_closing",
        "_label",
        "_late",
        "_once",
        "_read_lock",
        "_read_poll",
        "_waiting",
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
        # Re-entrant: a signal handler that closes the device runs on a thread
        # that may hold one of them (see the class docstring).
        self._read_lock = threading.RLock()
        self._write_lock = threading.RLock()
        self._once = CloseOnce()
        self._closing = False  # set once by close(); read without a lock as a hint
        # One poll object per direction, guarded by that direction's lock, and
        # whether its holder waits in it now (set before the _closing check).
        self._read_poll = select.poll()
        self._read_poll.register(fd, select.POLLIN)
        self._read_poll.register(self.wake_fd, select.POLLIN)
        self._write_poll = select.poll()
        self._write_poll.register(fd, select.POLLOUT)
        self._write_poll.register(self.wake_fd, select.POLLIN)
        self._waiting = [False, False]  # [_READ], [_WRITE]
        # False: a wait that would block raises BlockingIOError (set_blocking).
        self._blocking = True
        # (device number, eventfd, thread): numbers a close() from a signal
        # handler left for the interrupted poll() of that thread to close.
        self._late: tuple[int, int, int] | None = None
        # The C extension's calls on fd (see PacketIo), when asked for: they
        # keep no lock, so close() drains them before it closes.
        self.io = None if packet_io is None else packet_io(fd, self.wake_fd)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has begun."""
        return self._closing

    def fileno(self) -> int:
        """The owned descriptor; -1 once closed."""
        return self.fd

    def closed_error(self, direction: str) -> ClosedError:
        """The :class:`ClosedError` of a *direction* (``"read"``/``"write"``) after close()."""
        return ClosedError(f"tun: {direction} on closed {self._label}: file already closed")

    def wait_readable(self) -> None:
        """Block until the descriptor is readable; hold :attr:`read_lock`.

        Raises:
            ClosedError: close() has begun (then or while waiting).
        """
        self._wait(self._read_poll, _READ, "read")

    def wait_writable(self) -> None:
        """Block until the descriptor is writable; hold :attr:`write_lock`.

        Raises:
            ClosedError: close() has begun (then or while waiting).
        """
        self._wait(self._write_poll, _WRITE, "write")

    def set_blocking(self, flag: bool) -> None:
        """Blocking mode (the default) or not, for this descriptor's waits and :attr:`io`.

        In non-blocking mode a wait finds the descriptor ready or raises
        ``BlockingIOError`` at once, and the C calls return ``-EAGAIN``: an
        event loop waits for readiness in their stead (``tunkit.aio``).
        """
        self._blocking = flag
        if self.io is not None:
            self.io.set_blocking(flag)

    def _would_block(self, poll: select.poll, direction: str) -> None:
        """Non-blocking mode's wait: return if ready, else raise ``BlockingIOError``."""
        if self._closing:
            raise self.closed_error(direction)
        if not poll.poll(0):
            raise BlockingIOError(errno.EAGAIN, f"{direction} would block")
        if self._closing:
            raise self.closed_error(direction)

    def _wait(self, poll: select.poll, side: int, direction: str) -> None:
        if not self._blocking:
            self._would_block(poll, direction)
            return
        waiting = self._waiting
        waiting[side] = True  # before the check: see close()
        try:
            if not self._closing:
                poll.poll()
        finally:
            waiting[side] = False
            if self._late is not None:
                self._close_late()
        if self._closing:
            raise self.closed_error(direction)

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
            raise self.closed_error(direction)
        poller = select.poll()
        poller.register(self.fd, events)
        poller.register(self.wake_fd, select.POLLIN)
        if not self._blocking:
            self._would_block(poller, direction)
            return
        poller.poll(timeout_ms)
        if self._closing:
            raise self.closed_error(direction)

    def failure(self, exc: OSError, direction: str) -> OSError:
        """The exception to raise for *exc* from a system call of *direction* on :attr:`fd`.

        EBADF after close() (the number is -1) becomes :class:`ClosedError`;
        anything else stays itself.
        """
        if exc.errno == errno.EBADF and self._closing:
            return self.closed_error(direction)
        return exc

    def errno_failure(self, err: int, direction: str) -> OSError:
        """:meth:`failure` for *err*, a ``-errno`` that a :attr:`io` call returned."""
        return self.failure(OSError(-err, os.strerror(-err)), direction)

    def call_locked(
        self, call: Callable[[int, _A], int], arg: _A, direction: str, block: bool = True
    ) -> int:
        """Return ``call(fd, arg)`` (``os.readv``, ``os.writev``, ``os.write``); hold the lock
        of *direction* (``"read"`` or ``"write"``).

        The one loop of every such call: EAGAIN waits in ``poll()`` until the
        descriptor is ready and tries again, or with ``block=False`` returns
        -1. (EINTR never reaches here: Python retries the call itself.)

        Raises:
            ClosedError: the descriptor is closed or closes while waiting.
            OSError: the kernel refused the call.
        """
        while True:
            if self._closing:
                raise self.closed_error(direction)
            try:
                return call(self.fd, arg)
            except BlockingIOError:
                if not block:
                    return -1
                if direction == "read":
                    self._wait(self._read_poll, _READ, "read")
                else:
                    self._wait(self._write_poll, _WRITE, "write")
            except OSError as exc:
                raise self.failure(exc, direction) from None

    @property
    def read_lock(self) -> threading.RLock:
        """The lock of the read direction; hold it to guard state that goes with a read."""
        return self._read_lock

    @property
    def write_lock(self) -> threading.RLock:
        """The lock of the write direction; hold it to write a batch without interleaving."""
        return self._write_lock

    def close(self) -> None:
        """Close the descriptor, waking blocked callers first; idempotent, any thread.

        Returns once the device's descriptor is closed, which waits for the
        system calls in progress on other threads (if any) to return, and for
        a close() that another thread began. From a signal handler, see the
        class docstring.
        """
        if not self._once.begin():
            return
        try:
            self._close()
        finally:
            self._once.end()

    def _close(self) -> None:
        self._closing = True
        os.eventfd_write(self.wake_fd, 1)  # stays readable: every waiter returns
        if self.io is not None:
            self.io.drain()  # refuses new calls, waits for those in progress
        with self._read_lock, self._write_lock:
            # No system call on fd can be running on another thread now. A
            # closed descriptor's number is reused at once; a late read would
            # hit another file.
            fd, wake = self.fd, self.wake_fd
            self.fd = self.wake_fd = -1
            if True in self._waiting:
                # Only this thread can be waiting while it holds both locks: a
                # signal handler runs this inside its wait, and poll() will run
                # again on these numbers. Release the device now; keep the
                # numbers taken, and readable, until that poll has returned.
                os.dup2(wake, fd, inheritable=False)
                self._late = (fd, wake, threading.get_ident())
                return
        os.close(fd)
        os.close(wake)

    def _close_late(self) -> None:
        """Close the numbers close() left for the interrupted wait of this thread, if any."""
        late = self._late
        if late is not None and late[2] == threading.get_ident():
            self._late = None
            os.close(late[0])
            os.close(late[1])

    def __repr__(self) -> str:
        state = " [closed]" if self._closing else ""
        return f"<_Descriptor fd={self.fd}{state}>"

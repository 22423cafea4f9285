"""The exceptions tunkit raises on purpose; every one derives from TunError."""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BufferPoolError",
    "ClosedError",
    "OffsetError",
    "ReadOnClosedChannelError",
    "ReadOnClosedPipeError",
    "RetryableError",
    "TooManySegmentsError",
    "TunError",
    "WriteOnClosedChannelError",
    "WriteOnClosedPipeError",
]

# Go joins each closed error with os.ErrClosed, whose text is this.
_GO_ERR_CLOSED = "file already closed"


class TunError(Exception):
    """Base class of every exception that tunkit raises on purpose."""


class ClosedError(TunError, OSError):
    """Use of a Tun, Channel or device that was closed.

    Raised with no argument, the message is the class's Go message joined
    with Go's ``os.ErrClosed`` text, as the seed's ``errors.Join`` does.
    """

    go_message: ClassVar[str] = "tun: use of closed Tun"

    def __init__(self, *args: object) -> None:
        if not args:
            args = (f"{self.go_message}: {_GO_ERR_CLOSED}",)
        super().__init__(*args)

    def __str__(self) -> str:
        # OSError formats (errno, strerror) pairs specially; a closed error
        # carries a plain message, so show it as Exception would.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ReadOnClosedChannelError(ClosedError):
    """Read on a closed Channel (Go's ``ErrReadOnClosedChan``)."""

    go_message = "tun: read on closed Tun channel"


class WriteOnClosedChannelError(ClosedError):
    """Write on a closed Channel (Go's ``ErrWriteOnClosedChan``)."""

    go_message = "tun: write on closed Tun channel"


class ReadOnClosedPipeError(ClosedError):
    """Read on a closed pipe end (Go's ``ErrReadOnClosedPipe``)."""

    go_message = "tun: read on closed Tun"


class WriteOnClosedPipeError(ClosedError):
    """Write on a closed pipe end (Go's ``ErrWriteOnClosedPipe``)."""

    go_message = "tun: write on closed Tun"


class OffsetError(TunError, ValueError):
    """A read offset below ``mro()`` or a write offset below ``mwo()``."""


class RetryableError(TunError):
    """A read that failed but may simply be tried again."""


class TooManySegmentsError(RetryableError):
    """One kernel packet needed more buffers than the caller gave."""


class BufferPoolError(TunError):
    """A buffer pool was misused: double put, foreign buffer, or a leak at close."""

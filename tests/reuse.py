"""Taking a closed descriptor's number, so that a call that comes too late shows.

The kernel gives a new descriptor the lowest free number, so a number that
``close()`` freed is the next one taken. A call still in flight (or one
that kept the number) then reads or writes whatever file got it. A check
that looks only when ``os.pipe()`` happens to land on the number asserts
nothing the rest of the time; :func:`occupy` always puts a file there.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator

import pytest


@contextlib.contextmanager
def occupy(number: int) -> Iterator[Callable[[], None]]:
    """Put one end of a fresh socket pair at *number*; yield a check that nobody used it.

    *number* must be free (closed); the test fails at once if it is still
    open. The socket there holds one record, so a late read would take it;
    a late write would land at the other end. Call the check once the calls
    that might be late have ended. Records (SOCK_SEQPACKET) keep packets
    whole, as a TUN descriptor does.
    """
    ours, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if other.fileno() == number:
        ours, other = other, ours
    held: list[int] = []
    try:
        taken = ours.fileno()
        while taken < number:  # fill the lower free numbers until ours comes
            taken = os.dup(ours.fileno())
            held.append(taken)
        assert taken == number, f"descriptor {number} is still open (the kernel gave {taken})"
        other.send(b"sentinel")

        def check() -> None:
            other.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing was written to the number
                other.recv(70000)
            ours.setblocking(False)
            assert ours.recv(100) == b"sentinel", "a late read took a record from the number"

        yield check
    finally:
        for fd in held:
            os.close(fd)
        ours.close()
        other.close()

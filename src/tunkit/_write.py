"""Writing a whole batch to a Tun: the one rule that copy, Forwarder and TunIO share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ._errors import TunError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from ._tun import Tun

__all__ = ["WRITE_NO_PROGRESS", "close_quietly", "write_all", "write_all_with"]

WRITE_NO_PROGRESS: str = "tun: write made no progress"


def write_all(tun: Tun, bufs: Sequence[ReadableBuffer], offset: int) -> None:
    """Write every packet of *bufs* to *tun*, chunked by its batch size, looping on partial writes.

    Raises:
        TunError: a write returned 0 (no progress) instead of spinning.
    """
    write_all_with(tun.write, max(tun.batch_size(), 1), bufs, offset)


def write_all_with(
    write: Callable[[Sequence[ReadableBuffer], int], int],
    batch: int,
    bufs: Sequence[ReadableBuffer],
    offset: int,
) -> None:
    """Write all of *bufs* with *write* (``write`` or ``write_gso``), *batch* at a time.

    Raises:
        TunError: a write returned 0 (no progress) instead of spinning.
    """
    done = 0
    total = len(bufs)
    while done < total:
        n = write(bufs[done : min(done + batch, total)], offset)
        if n <= 0:
            raise TunError(WRITE_NO_PROGRESS)
        done += n


def close_quietly(tun: Tun) -> None:
    """Close *tun*, ignoring its errors: used where the Tun is being dropped either way."""
    with contextlib.suppress(Exception):
        tun.close()

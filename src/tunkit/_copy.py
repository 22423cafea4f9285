"""copy(): move packets both ways between two Tuns until one of them ends."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ._errors import ClosedError, RetryableError, TunError
from ._gso import GSO_BATCH, GSO_BUF_LEN, gso_offset, gso_pair
from ._write import WRITE_NO_PROGRESS, close_quietly, write_all, write_all_with

if TYPE_CHECKING:
    from ._tun import Tun

__all__ = ["copy"]



def _pump(src: Tun, dst: Tun, passthrough: bool) -> None:
    """Copy packets from *src* to *dst* until a call raises.

    Packets are read at an offset that satisfies both ``src.mro()`` and
    ``dst.mwo()`` and written from the same buffers: no copy in between.
    """
    if passthrough and gso_pair(src, dst):
        _pump_gso(src, dst)
        return
    offset = max(src.mro(), dst.mwo())
    count = max(src.batch_size(), 1)
    size = offset + max(src.mtu(), dst.mtu())
    bufs = [bytearray(size) for _ in range(count)]
    views = [memoryview(buf) for buf in bufs]
    sizes = [0] * count
    read = src.read
    if count == 1 and dst.batch_size() == 1:
        # One packet per call both ways (no offload): the shortest loop, with
        # none of the chunking that batches need.
        view, write = views[0], dst.write
        while True:
            try:
                if not read(bufs, sizes, offset):
                    continue
            except RetryableError:
                continue
            if write((view[: offset + sizes[0]],), offset) <= 0:
                raise TunError(WRITE_NO_PROGRESS)
    while True:
        try:
            n = read(bufs, sizes, offset)
        except RetryableError:
            continue
        if n == 1:
            write_all(dst, (views[0][: offset + sizes[0]],), offset)
        elif n > 1:
            write_all(dst, [views[i][: offset + sizes[i]] for i in range(n)], offset)


def _pump_gso(src: Tun, dst: Tun) -> None:
    """Copy whole super-packets from *src* to *dst* (both GsoTuns) until a call raises."""
    read = src.read_gso  # type: ignore[attr-defined]
    write = dst.write_gso  # type: ignore[attr-defined]
    offset = gso_offset(src, dst)
    count = GSO_BATCH
    bufs = [bytearray(offset + GSO_BUF_LEN) for _ in range(count)]
    views = [memoryview(buf) for buf in bufs]
    sizes = [0] * count
    chunk = max(dst.batch_size(), 1)
    while True:
        try:
            n = read(bufs, sizes, offset)
        except RetryableError:
            continue
        if n > 0:
            write_all_with(write, chunk, [views[i][: offset + sizes[i]] for i in range(n)], offset)


def copy(a: Tun, b: Tun, *, passthrough: bool = True) -> None:
    """Copy packets both ways between *a* and *b* until either direction ends.

    Reads use each source's batch size; writes are chunked to the other
    side's batch size. When a direction ends (a Tun closed or failed), both
    Tuns are closed so the other direction ends too; ``copy`` returns once
    both have ended. The second direction runs on a thread named
    ``tunkit-copy:<b>-><a>``, joined before returning.

    With *passthrough* (the default), two :class:`GsoTun` ends exchange whole
    super-packets; with ``passthrough=False`` every packet goes through
    ``read``/``write``.

    Returns:
        ``None`` when it ended because a Tun was closed.

    Raises:
        Exception: the first error, in time, that was not a :class:`ClosedError`.
    """
    failures: list[BaseException] = []  # in the order they happened (appends are atomic)

    def run(src: Tun, dst: Tun) -> None:
        try:
            _pump(src, dst, passthrough)
        except ClosedError:
            pass
        except BaseException as exc:  # re-raised by the calling thread below
            failures.append(exc)
        finally:
            close_quietly(a)
            close_quietly(b)

    other = threading.Thread(
        target=run, args=(b, a), name=f"tunkit-copy:{_label(b)}->{_label(a)}"
    )
    other.start()
    try:
        run(a, b)
    finally:
        other.join()
    if failures:
        raise failures[0]


def _label(tun: Tun) -> str:
    try:
        return tun.name()
    except Exception:  # a name is only for the thread's label
        return "?"

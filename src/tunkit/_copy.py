"""copy(): move packets both ways between two Tuns until one of them ends."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ._errors import ClosedError, RetryableError, TunError
from ._gso import (
    GSO_BATCH,
    GSO_BUF_LEN,
    VNET_HDR_LEN,
    CopyBuffers,
    fits_whole,
    gso_offset,
    gso_pair,
    write_split,
)
from ._tun import GsoTun
from ._write import WRITE_NO_PROGRESS, close_quietly, write_all, write_all_with

if TYPE_CHECKING:
    from ._tun import Tun

__all__ = ["copy"]


def _pump(src: Tun, dst: Tun, passthrough: bool) -> None:
    """Copy packets from *src* to *dst* until a call raises.

    Packets are read at an offset that satisfies both ``src.mro()`` and
    ``dst.mwo()`` and written from the same buffers: no copy in between.
    Whether super-packets pass whole is decided again whenever either MTU
    changes (:func:`gso_pair`).
    """
    may_pass = passthrough and isinstance(src, GsoTun) and isinstance(dst, GsoTun)
    if not may_pass and src.batch_size() <= 1 and dst.batch_size() <= 1:
        _pump_one(src, dst)
    while True:
        if may_pass and gso_pair(src, dst, checked=True):
            _pump_gso(src, dst)
        else:
            _pump_batches(src, dst, may_pass)


def _pump_one(src: Tun, dst: Tun) -> None:
    """One packet per call both ways (no offload): the shortest loop, until a call raises.

    One buffer of 64 KB takes any packet, whatever the source's MTU is or
    becomes: no MTU to follow, nothing more per packet than the two calls.
    """
    offset = max(src.mro(), dst.mwo())
    bufs = [bytearray(offset + GSO_BUF_LEN)]
    view = memoryview(bufs[0])
    sizes = [0]
    read, write = src.read, dst.write
    while True:
        try:
            if not read(bufs, sizes, offset):
                continue
        except RetryableError:
            continue
        if write((view[: offset + sizes[0]],), offset) <= 0:
            raise TunError(WRITE_NO_PROGRESS)


def _pump_batches(src: Tun, dst: Tun, may_pass: bool) -> None:
    """Copy batches with ``read``/``write`` until a call raises, or (*may_pass*)
    until the MTUs let super-packets pass whole.

    The buffers (:class:`CopyBuffers`) follow the source's MTU.
    """
    offset = max(src.mro(), dst.mwo())
    batch = CopyBuffers(offset, max(src.batch_size(), 1))
    bufs, views, sizes = batch.bufs, batch.views, batch.sizes
    read = src.read
    while True:
        batch.follow(src.mtu())
        if may_pass and gso_pair(src, dst, checked=True):
            return
        try:
            n = read(bufs, sizes, offset)
        except RetryableError:
            continue
        if n == 1:
            write_all(dst, (views[0][: offset + sizes[0]],), offset)
        elif n > 1:
            write_all(dst, batch.packets(n), offset)


def _pump_gso(src: Tun, dst: Tun) -> None:
    """Copy whole super-packets from *src* to *dst* (both GsoTuns) until a call raises,
    or until an MTU changes.

    A batch read while an MTU changed goes out split (see :func:`gso_pair`),
    and the caller decides again.
    """
    read = src.read_gso  # type: ignore[attr-defined]
    write = dst.write_gso  # type: ignore[attr-defined]
    offset = gso_offset(src, dst)
    batch = CopyBuffers(offset, GSO_BATCH, gso=True)
    bufs, sizes = batch.bufs, batch.sizes
    chunk = max(dst.batch_size(), 1)
    before = src.mtu(), dst.mtu()
    while True:
        try:
            n = read(bufs, sizes, offset)
        except RetryableError:
            continue
        if n <= 0:
            continue
        now = src.mtu(), dst.mtu()
        whole = batch.packets(n)
        if now == before:
            write_all_with(write, chunk, whole, offset)
            continue
        # An MTU changed: the batch may hold segments of the old MTU or the new one.
        if fits_whole(before, now):
            write_all_with(write, chunk, whole, offset)
        else:
            headroom = dst.mwo()
            for packet in whole:
                write_split(dst, packet[offset - VNET_HDR_LEN :], headroom)
        return


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

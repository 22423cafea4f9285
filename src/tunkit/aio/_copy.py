"""aio.copy(): move packets both ways between two AsyncTuns until one of them ends.

The async twin of :func:`tunkit.copy`: the same buffers, offsets and
pass-through of super-packets, with the two directions as two tasks of one
task group instead of two threads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from .._errors import ClosedError, RetryableError, TunError
from .._gso import GSO_BATCH, VNET_HDR_LEN, CopyBuffers, fits_whole, split_for
from .._write import WRITE_NO_PROGRESS
from ._tun import AsyncGsoTun

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from ._tun import AsyncTun

__all__ = ["copy", "write_all"]


async def write_all(
    write: Callable[[Sequence[ReadableBuffer], int], Awaitable[int]],
    bufs: Sequence[ReadableBuffer],
    offset: int,
    chunk: int,
) -> None:
    """Await ``write`` until every packet of *bufs* went, *chunk* at a time.

    Raises:
        TunError: a write made no progress.
    """
    done, total = 0, len(bufs)
    while done < total:
        n = await write(bufs[done : done + chunk], offset)
        if n <= 0:
            raise TunError(WRITE_NO_PROGRESS)
        done += n


def _can_pass(src: AsyncTun, dst: AsyncTun) -> bool:
    """Whether super-packets can go whole: the destination's MTU fits the source's segments."""
    return dst.mtu() >= src.mtu()


async def _pump(src: AsyncTun, dst: AsyncTun, passthrough: bool) -> None:
    """Copy packets from *src* to *dst* until a call raises (see ``tunkit.copy``'s _pump)."""
    may_pass = passthrough and isinstance(src, AsyncGsoTun) and isinstance(dst, AsyncGsoTun)
    while True:
        if may_pass and _can_pass(src, dst):
            await _pump_gso(src, dst)  # type: ignore[arg-type]
        else:
            await _pump_batches(src, dst, may_pass)


async def _pump_batches(src: AsyncTun, dst: AsyncTun, may_pass: bool) -> None:
    """Batches by ``read``/``write``; the first buffer holds 64 KB, the others ``mtu()``,
    grown when the source's MTU changes. Returns when (*may_pass*) super-packets may pass."""
    offset = max(src.mro(), dst.mwo())
    batch = CopyBuffers(offset, max(src.batch_size(), 1))
    chunk = max(dst.batch_size(), 1)
    while True:
        batch.follow(src.mtu())
        if may_pass and _can_pass(src, dst):
            return
        try:
            n = await src.read(batch.bufs, batch.sizes, offset)
        except RetryableError:
            continue
        if n > 0:
            await write_all(dst.write, batch.packets(n), offset, chunk)


async def _pump_gso(src: AsyncGsoTun, dst: AsyncGsoTun) -> None:
    """Whole super-packets until a call raises, or until an MTU changes (then the caller
    decides again; a batch read meanwhile goes out split when it must)."""
    offset = max(VNET_HDR_LEN, src.mro(), dst.mwo())
    batch = CopyBuffers(offset, GSO_BATCH, gso=True)
    chunk = max(dst.batch_size(), 1)
    before = src.mtu(), dst.mtu()
    while True:
        try:
            n = await src.read_gso(batch.bufs, batch.sizes, offset)
        except RetryableError:
            continue
        if n <= 0:
            continue
        now = src.mtu(), dst.mtu()
        whole = batch.packets(n)
        if now == before or fits_whole(before, now):
            await write_all(dst.write_gso, whole, offset, chunk)
            if now == before:
                continue
            return
        headroom = dst.mwo()
        for packet in whole:
            segments, lens = split_for(dst, packet[offset - VNET_HDR_LEN :], headroom)  # type: ignore[arg-type]
            out = [memoryview(s)[: headroom + k] for s, k in zip(segments, lens, strict=True)]
            await write_all(dst.write, out, headroom, chunk)
        return


async def copy(a: AsyncTun, b: AsyncTun, *, passthrough: bool = True) -> None:
    """Copy packets both ways between *a* and *b* until either direction ends.

    As :func:`tunkit.copy`: when a direction ends (an AsyncTun closed or
    failed) both are closed, so the other ends too; with *passthrough* two
    AsyncGsoTuns exchange whole super-packets. The directions are two tasks
    of a task group of its own; both are done when this returns. Cancelling
    ``copy`` closes both AsyncTuns.

    Returns:
        ``None`` when it ended because an AsyncTun was closed.

    Raises:
        Exception: the first error, in time, that was not a :class:`ClosedError`.
    """
    failures: list[Exception] = []

    async def run(src: AsyncTun, dst: AsyncTun) -> None:
        try:
            await _pump(src, dst, passthrough)
        except ClosedError:
            pass
        except Exception as exc:  # raised below, after both directions ended
            failures.append(exc)
        finally:
            with anyio.CancelScope(shield=True):
                await a.aclose()
                await b.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, b, a, name=f"tunkit-aio-copy:{b.name()}->{a.name()}")
        await run(a, b)
    if failures:
        raise failures[0]

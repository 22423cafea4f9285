"""Running a test body on each event loop tunkit.aio supports, and async harnesses.

``run(loop, fn, *args)`` runs ``await fn(*args)`` on ``"asyncio"``,
``"uvloop"`` or ``"trio"`` (through anyio). An :class:`AsyncHarness` gives
the async conformance tests (``aio_conformance.py``) one AsyncTun and the
world around it: :class:`AioPipeHarness` (one end of ``aio.pipe``, the other
end plays the world) and :class:`WrappedHarness` (any sync conformance
harness, its Tun wrapped by ``aio.wrap``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

import tunkit.aio as aio
from tunkit import ClosedError
from tunkit.aio import AsyncTun

LOOPS = ["asyncio", "uvloop", "trio"]


def run(loop: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``anyio.run(fn, *args)`` on *loop*: asyncio's default loop, uvloop, or trio."""
    if loop == "uvloop":
        return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(fn, *args, backend=loop)


async def _nothing() -> None:
    pass


# libuv makes a pipe for its signal handling once per process, on the first
# uvloop loop, and keeps it: make it now, so no test counts it as its leak.
run("uvloop", _nothing)


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    """Each event loop in turn."""
    name: str = request.param
    return name


async def in_thread(fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Run blocking *fn* on a thread of the test's own, awaiting it without blocking the loop."""
    box: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-aio-helper")
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while thread.is_alive():
            if time.monotonic() > deadline:
                pytest.fail(f"{fn!r} did not return within {timeout} s")
            await anyio.sleep(0.005)
    finally:
        thread.join(timeout)
    if errors:
        raise errors[0]
    return box[0]


async def read_packets(
    tun: AsyncTun, count: int, offset: int | None = None, room: int | None = None,
    timeout: float = 10.0,
) -> list[bytes]:
    """Read until *count* packets came (or *timeout* passed); return their bytes."""
    off = tun.mro() if offset is None else offset
    size = off + (tun.mtu() if room is None else room)
    bufs = [bytearray(size) for _ in range(tun.batch_size())]
    sizes = [0] * len(bufs)
    out: list[bytes] = []
    with anyio.move_on_after(timeout):
        while len(out) < count:
            n = await tun.read(bufs, sizes, off)
            assert 0 <= n <= len(bufs)
            out.extend(bytes(bufs[i][off : off + sizes[i]]) for i in range(n))
    return out


async def write_packets(tun: AsyncTun, packets: Sequence[bytes], offset: int | None = None) -> None:
    """Write each of *packets* behind *offset* bytes of headroom, looping on partial writes."""
    off = tun.mwo() if offset is None else offset
    bufs = [bytes(off) + p for p in packets]
    done = 0
    while done < len(bufs):
        n = await tun.write(bufs[done : done + tun.batch_size()], off)
        assert n > 0
        done += n


class AsyncHarness(Protocol):
    """What an async conformance run needs from one kind of AsyncTun."""

    atun: AsyncTun
    workers: bool  # served by worker threads (a Tun without a descriptor)

    async def inject(self, packets: Sequence[bytes]) -> None:
        """Make *packets* readable from ``atun``, in order, without waiting for the reads."""

    async def collect(self, count: int, timeout: float) -> list[bytes]:
        """Return the *count* packets that ``atun.write`` sent, in order."""

    def packet(self, i: int, size: int) -> bytes:
        """A valid IPv4 packet of exactly *size* bytes, distinct for each *i*."""

    async def aclose(self) -> None:
        """Release what the harness made (the AsyncTun included)."""


class AioPipeHarness:
    """One end of ``aio.pipe``; the other end, on a task of the harness's, plays the world."""

    workers = False  # pure async

    def __init__(self, tg: anyio.abc.TaskGroup, packet: Callable[[int, int], bytes],
                 batch_size: int = 8, mwo: int = 0, mro: int = 0) -> None:
        self.atun, self.peer = aio.pipe(batch_size, 1500, mwo, mro)
        self._tg = tg
        self._packet = packet

    def packet(self, i: int, size: int) -> bytes:
        return self._packet(i, size)

    async def inject(self, packets: Sequence[bytes]) -> None:
        async def feed() -> None:
            # ClosedError: the test closed the pipe before the world's packets were read.
            with contextlib.suppress(ClosedError):
                await write_packets(self.peer, packets)

        self._tg.start_soon(feed)
        await anyio.lowlevel.checkpoint()

    async def collect(self, count: int, timeout: float) -> list[bytes]:
        return await read_packets(self.peer, count, timeout=timeout)

    async def aclose(self) -> None:
        await self.atun.aclose()
        await self.peer.aclose()


class WrappedHarness:
    """A sync conformance harness (test_pipe, test_udp, test_stream, netns_util) whose Tun
    is wrapped by ``aio.wrap``; its blocking helpers run on a thread of the test's."""

    def __init__(self, sync: Any) -> None:
        self.sync = sync
        self.atun = aio.wrap(sync.tun)
        self.workers = not _has_fd(sync.tun)

    def packet(self, i: int, size: int) -> bytes:
        packet: bytes = self.sync.packet(i, size)
        return packet

    async def inject(self, packets: Sequence[bytes]) -> None:
        self.sync.inject(list(packets))  # never blocks: a socket send, or a thread of its own
        await anyio.lowlevel.checkpoint()

    async def collect(self, count: int, timeout: float) -> list[bytes]:
        got: list[bytes] = await in_thread(lambda: self.sync.collect(count, timeout))
        return got

    async def aclose(self) -> None:
        await self.atun.aclose()
        self.sync.close()  # the rest of the harness; the Tun's close is idempotent


def _has_fd(tun: Any) -> bool:
    try:
        return callable(getattr(tun, "set_blocking", None)) and tun.fileno() >= 0
    except OSError:
        return False


async def with_harness(make: Callable[[anyio.abc.TaskGroup], AsyncHarness],
                       body: Callable[[AsyncHarness], Awaitable[None]]) -> None:
    """Make a harness in the running loop, run ``await body(harness)``, then close it all."""
    async with anyio.create_task_group() as tg:
        harness = make(tg)
        try:
            await body(harness)
        finally:
            with anyio.CancelScope(shield=True):
                await harness.aclose()
            tg.cancel_scope.cancel()

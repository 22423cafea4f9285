"""Behaviour every AsyncTun must show, on every event loop: the async twin of conformance.py.

A test module subclasses :class:`AsyncTunConformance` and provides a
``make`` fixture: ``make(task_group) -> AsyncHarness``, called inside the
running loop. The ``loop`` fixture (aio_util) runs each test on asyncio,
uvloop and trio.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import anyio.abc
import pytest
from aio_util import AsyncHarness, read_packets, run, with_harness, write_packets

from tunkit import ClosedError, Event, OffsetError
from tunkit.aio import AsyncTun

Make = Callable[[anyio.abc.TaskGroup], AsyncHarness]


def _aio_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tunkit-aio")]


class AsyncTunConformance:
    """The AsyncTun protocol's behaviour; subclasses provide the ``make`` fixture."""

    SIZES = (28, 64, 100, 576, 1000, 1400, 1500)

    def test_is_an_async_tun(self, loop: str, make: Make) -> None:
        async def body(h: AsyncHarness) -> None:
            tun = h.atun
            assert isinstance(tun, AsyncTun)
            assert tun.batch_size() >= 1
            assert isinstance(tun.name(), str) and tun.name()
            assert tun.mtu() >= 1280
            assert "[closed]" not in repr(tun)

        run(loop, with_harness, make, body)

    def test_packets_arrive_whole_and_in_order(self, loop: str, make: Make) -> None:
        async def body(h: AsyncHarness) -> None:
            packets = [h.packet(i, self.SIZES[i % len(self.SIZES)]) for i in range(40)]
            await h.inject(packets)
            assert await read_packets(h.atun, len(packets)) == packets
            out = [h.packet(100 + i, self.SIZES[i % len(self.SIZES)]) for i in range(40)]
            async with anyio.create_task_group() as tg:
                tg.start_soon(write_packets, h.atun, out)
                assert await h.collect(len(out), timeout=10) == out

        run(loop, with_harness, make, body)

    @pytest.mark.parametrize("extra", [0, 7, 33])
    def test_read_and_write_offsets(self, loop: str, make: Make, extra: int) -> None:
        async def body(h: AsyncHarness) -> None:
            packets = [h.packet(i, 200 + i) for i in range(5)]
            await h.inject(packets)
            got = await read_packets(h.atun, 5, offset=h.atun.mro() + extra)
            assert got == packets
            async with anyio.create_task_group() as tg:
                tg.start_soon(write_packets, h.atun, packets, h.atun.mwo() + extra)
                assert await h.collect(5, timeout=10) == packets

        run(loop, with_harness, make, body)

    def test_offset_below_minimum_raises(self, loop: str, make: Make) -> None:
        async def body(h: AsyncHarness) -> None:
            tun = h.atun
            bufs = [bytearray(2000) for _ in range(tun.batch_size())]
            if tun.mro() > 0:
                with pytest.raises(OffsetError):
                    await tun.read(bufs, [0] * len(bufs), tun.mro() - 1)
            if tun.mwo() > 0:
                with pytest.raises(OffsetError):
                    await tun.write([bytes(2000)], tun.mwo() - 1)
            with pytest.raises(OffsetError):
                await tun.read(bufs, [0] * len(bufs), -1)

        run(loop, with_harness, make, body)

    def test_a_cancelled_read_stores_nothing_and_loses_nothing(self, loop: str, make: Make) -> None:
        async def body(h: AsyncHarness) -> None:
            tun = h.atun
            bufs = [bytearray(tun.mro() + 2000) for _ in range(tun.batch_size())]
            sizes = [0] * len(bufs)
            for _ in range(20):
                with anyio.move_on_after(0.002) as scope:
                    await tun.read(bufs, sizes, tun.mro())
                assert scope.cancelled_caught, "a read with nothing to read returned"
            packets = [h.packet(i, 100 + i) for i in range(10)]
            await h.inject(packets)
            assert await read_packets(tun, 10) == packets

        run(loop, with_harness, make, body)

    def test_aclose_wakes_a_pending_read_within_100_ms(self, loop: str, make: Make) -> None:
        async def body(h: AsyncHarness) -> None:
            tun = h.atun
            errors: list[BaseException] = []
            woke: list[float] = []

            async def reader() -> None:
                bufs = [bytearray(tun.mro() + 2000) for _ in range(tun.batch_size())]
                try:
                    await tun.read(bufs, [0] * len(bufs), tun.mro())
                except BaseException as exc:
                    errors.append(exc)
                woke.append(time.monotonic())

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.05)
                assert not woke, "the read returned with nothing to read"
                started = time.monotonic()
                await tun.aclose()
            assert woke and woke[0] - started < 0.1
            assert len(errors) == 1 and isinstance(errors[0], ClosedError), errors

        run(loop, with_harness, make, body)

    def test_calls_after_aclose_raise_closed(self, loop: str, make: Make) -> None:
        async def body(h: AsyncHarness) -> None:
            tun = h.atun
            await tun.aclose()
            await tun.aclose()  # idempotent
            bufs = [bytearray(tun.mro() + 2000) for _ in range(tun.batch_size())]
            with pytest.raises(ClosedError):
                await tun.read(bufs, [0] * len(bufs), tun.mro())
            with pytest.raises(ClosedError):
                await tun.write([bytes(tun.mwo()) + h.packet(0, 100)], tun.mwo())
            assert "[closed]" in repr(tun)

        run(loop, with_harness, make, body)

    def test_events_start_up_and_end_at_close(self, loop: str, make: Make) -> None:
        async def body(h: AsyncHarness) -> None:
            events = h.atun.events()
            with anyio.fail_after(5):
                assert await events.__anext__() == Event.UP
            async def drain() -> None:
                async for _ in events:
                    pass

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain)
                    await anyio.sleep(0.02)
                    await h.atun.aclose()

        run(loop, with_harness, make, body)

    def test_threads_none_with_a_descriptor_else_one_per_direction(
        self, loop: str, make: Make
    ) -> None:
        async def body(h: AsyncHarness) -> None:
            before = set(threading.enumerate())
            packets = [h.packet(i, 300) for i in range(20)]
            await h.inject(packets)
            assert await read_packets(h.atun, 20) == packets
            async with anyio.create_task_group() as tg:
                tg.start_soon(write_packets, h.atun, packets)
                assert await h.collect(20, timeout=10) == packets
                mine = _aio_threads()
            started = {t.name for t in set(threading.enumerate()) - before}
            if h.workers:
                assert sorted(mine) == [f"tunkit-aio-read:{h.atun.name()}",
                                        f"tunkit-aio-write:{h.atun.name()}"]
            else:
                assert not {n for n in started if n.startswith("tunkit")}, started
            await h.atun.aclose()
            assert not _aio_threads(), "aclose() left a worker thread"

        run(loop, with_harness, make, body)

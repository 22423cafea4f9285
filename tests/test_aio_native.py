"""tunkit.aio on real devices in network namespaces (root), on asyncio, uvloop and trio:
the async conformance behaviours, aio.copy between two devices (ping, 64 MB of TCP,
super-packets whole), events, and close during a pending read, many times over."""

# ruff: noqa: F811  (the fixtures imported from netns_util and aio_util are parameters here)

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import anyio
import anyio.abc
import anyio.from_thread
import pytest
from aio_conformance import AsyncTunConformance, Make
from aio_util import LOOPS, AsyncHarness, WrappedHarness, loop, run  # noqa: F401
from netns_util import (  # noqa: F401
    DEVICE_KINDS,
    NativeHarness,
    Pair,
    device_kind,
    need_tool,
    netns_factory,
    ns_run,
    root,
    tcp_transfer,
)

import tunkit.aio as aio
from tunkit import ClosedError, Event
from tunkit._linux.device import create_tun

MakeNs = Callable[[str], str]


class TestAsyncNativeConformance(AsyncTunConformance):
    @pytest.fixture(params=DEVICE_KINDS)
    def make(
        self, netns_factory: MakeNs, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch,
    ) -> Iterator[Make]:
        offload = device_kind(request.param, monkeypatch)
        made: list[NativeHarness] = []

        def make(tg: anyio.abc.TaskGroup) -> AsyncHarness:
            made.append(NativeHarness(netns_factory("aconf"), offload=offload))
            return WrappedHarness(made[-1])

        try:
            yield make
        finally:
            for h in made:
                h.close()


def _portal(loop: str) -> contextlib.AbstractContextManager[anyio.from_thread.BlockingPortal]:
    """A blocking portal: the event loop of *loop* on a thread of its own, for this test."""
    if loop == "uvloop":
        return anyio.from_thread.start_blocking_portal("asyncio", {"use_uvloop": True})
    return anyio.from_thread.start_blocking_portal(loop)


@pytest.fixture(params=DEVICE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.mark.timeout(180)
def test_copy_between_two_devices_carries_ping_and_64_mb_of_tcp(
    loop: str, kind: str, netns_factory: MakeNs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aio.copy on the loop's own thread (a blocking portal) joins two devices: ping
    both ways, 64 MB of TCP whose SHA-256 matches, no thread of tunkit's but the
    devices' event threads, and nothing left after."""
    need_tool("ping")
    offload = device_kind(kind, monkeypatch)
    pair = Pair(netns_factory("aa"), netns_factory("ab"), offload=offload)
    try:
        before = {t.name for t in threading.enumerate()}
        with _portal(loop) as portal:
            a, b = aio.wrap(pair.a), aio.wrap(pair.b)
            done = portal.start_task_soon(aio.copy, a, b)
            for ns, dst in ((pair.ns_a, pair.B4), (pair.ns_b, pair.A6)):
                result = ns_run(ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", dst, check=False)
                assert result.returncode == 0 and "3 received" in result.stdout, result.stdout
            tcp_transfer(pair, 64 << 20)
            started = {t.name for t in threading.enumerate()} - before
            assert not {n for n in started if n.startswith("tunkit")}, started
            stats_a, stats_b = pair.a.stats(), pair.b.stats()
            portal.call(a.aclose)
            assert done.result(5) is None
        assert isinstance(a, aio.AsyncGsoTun) == offload
        assert stats_a.packets_read >= (64 << 20) // 65536 and stats_b.packets_written > 0
        if offload:  # super-packets passed whole: far fewer reads than 1500-byte packets
            assert stats_a.gso_read > 0 and stats_b.gso_written > 0
        assert pair.a.closed and pair.b.closed
    finally:
        pair.close()


@pytest.mark.timeout(60)
def test_events_come_as_an_async_iterator_that_ends_at_close(
    loop: str, netns_factory: MakeNs
) -> None:
    tun = create_tun(netns=netns_factory("aev"))

    async def body() -> None:
        atun = aio.wrap(tun)
        events = atun.events()
        seen: list[Event] = []
        with anyio.fail_after(10):
            tun.up()
            async for event in events:
                seen.append(event)
                if event == Event.UP:
                    break
            tun.set_mtu(1400)
            async for event in events:
                seen.append(event)
                if event == Event.MTU_UPDATE:
                    break
            assert atun.mtu() == 1400
            await atun.aclose()
            rest = [event async for event in events]
        assert Event.UP in seen and seen[-1] == Event.MTU_UPDATE, (seen, rest)

    try:
        run(loop, body)
    finally:
        tun.close()


@pytest.mark.timeout(300)
def test_uvloop_close_during_a_pending_read_1000_times(netns_factory: MakeNs) -> None:
    """uvloop makes descriptors non-blocking and drops its readers late: a device
    closed while a read waits must wake that read at once, every time, and leave
    nothing registered for the next descriptor with the same number."""
    ns = netns_factory("auv")
    slowest: list[float] = []

    async def body() -> None:
        for _ in range(1000):
            atun = aio.wrap(create_tun(netns=ns))
            errors: list[BaseException] = []

            async def reader(
                tun: aio.AsyncTun = atun, errors: list[BaseException] = errors
            ) -> None:
                try:
                    count = tun.batch_size()
                    bufs = [bytearray(tun.mro() + 1500) for _ in range(count)]
                    await tun.read(bufs, [0] * count, tun.mro())
                except BaseException as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.002)  # the reader is waiting on the descriptor by now
                started = time.monotonic()
                await atun.aclose()
            slowest.append(time.monotonic() - started)
            assert len(errors) == 1 and isinstance(errors[0], ClosedError), errors

    run("uvloop", body)
    assert len(slowest) == 1000
    assert max(slowest) < 0.1, f"a close took {max(slowest) * 1000:.1f} ms to wake the read"

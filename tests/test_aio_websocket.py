"""WebSocketTun over real websockets connections on loopback (ws:// and wss:// with
certificates the test makes), on asyncio, uvloop and trio; and a tunnel between two
devices in namespaces whose transport is a WebSocket."""

# ruff: noqa: F811  (the fixtures imported from aio_util and netns_util are parameters here)

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
import sniffio
from aio_util import LOOPS, in_thread, loop, read_packets, run, write_packets  # noqa: F401
from netns_util import Pair, need_tool, netns_factory, ns_run, root, tcp_transfer  # noqa: F401
from test_pipe import ipv4_packet
from tls_util import Pki, make_pki

import tunkit.aio as aio
from tunkit import ClosedError, Event
from tunkit.aio import WebSocketTun

MakeNs = Callable[[str], str]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextlib.asynccontextmanager
async def ws_pair(pki: Pki | None) -> AsyncIterator[tuple[object, object]]:
    """(client, server) websockets connections on loopback, wss:// with *pki*, else ws://;
    of websockets.asyncio or websockets.trio, as the running loop needs."""
    server_ctx = pki.server_context() if pki else None
    client_ctx = pki.client_context() if pki else None
    scheme = "wss" if pki else "ws"
    accepted: list[object] = []
    finished = anyio.Event()
    ready = anyio.Event()

    async def handler(ws: object) -> None:
        accepted.append(ws)
        ready.set()
        await finished.wait()  # the connection lives until the test is done with it

    opts = {"compression": None, "ping_interval": None, "close_timeout": 2}
    if sniffio.current_async_library() == "trio":
        import trio
        from websockets.trio.client import connect as trio_connect
        from websockets.trio.server import serve as trio_serve

        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: trio_serve(handler, 0, host="127.0.0.1", ssl=server_ctx,
                                               task_status=task_status, **opts)
            )
            port = server.listeners[0].socket.getsockname()[1]
            try:
                async with trio_connect(f"{scheme}://127.0.0.1:{port}", ssl=client_ctx,
                                        **opts) as client:
                    await ready.wait()
                    yield client, accepted[0]
            finally:
                finished.set()
                await server.aclose()
        return
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async with serve(handler, "127.0.0.1", 0, ssl=server_ctx, **opts) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        try:
            async with connect(f"{scheme}://127.0.0.1:{port}", ssl=client_ctx, **opts) as client:
                await ready.wait()
                yield client, accepted[0]
        finally:
            finished.set()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_packets_cross_both_ways_whole_and_in_order(loop: str, tls: bool, pki: Pki) -> None:
    async def body() -> None:
        async with ws_pair(pki if tls else None) as (client, server):
            a, b = WebSocketTun(client), WebSocketTun(server)
            there = [ipv4_packet(i, 28 + 37 * i) for i in range(40)]
            back = [ipv4_packet(100 + i, 1500 - 11 * i) for i in range(40)]
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(write_packets, a, there)
                    tg.start_soon(write_packets, b, back)
                    assert await read_packets(b, 40) == there
                    assert await read_packets(a, 40) == back
            assert a.stats().packets_written == b.stats().packets_read == 40
            assert a.stats().bytes_written == sum(map(len, there))
            assert a.name().startswith("ws:127.0.0.1:")
            await a.aclose()
            await b.aclose()
            assert "[closed]" in repr(a)

    run(loop, body)


def test_text_empty_and_oversized_messages_are_dropped_and_counted(loop: str) -> None:
    async def body() -> None:
        async with ws_pair(None) as (client, server):
            b = WebSocketTun(server, mtu=1000)
            for message in ("a text message", b"", bytes(1001), ipv4_packet(1, 1000)):
                await client.send(message)  # type: ignore[attr-defined]
            with anyio.fail_after(5):
                assert await read_packets(b, 1, room=1500) == [ipv4_packet(1, 1000)]
            stats = b.stats()
            assert (stats.dropped_malformed, stats.dropped_too_big, stats.packets_read) == (2, 1, 1)
            await b.aclose()

    run(loop, body)


def test_the_peer_closing_ends_reads_and_copy_normally(loop: str) -> None:
    async def body() -> None:
        async with ws_pair(None) as (client, server):
            a, b = WebSocketTun(client), WebSocketTun(server)
            left, right = aio.pipe()
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    result: list[object] = []

                    async def run_copy() -> None:
                        result.append(await aio.copy(right, b))

                    tg.start_soon(run_copy)
                    await write_packets(a, [ipv4_packet(7, 100)])
                    assert await read_packets(left, 1) == [ipv4_packet(7, 100)]
                    await a.aclose()  # the peer closes: copy ends, returning None
            assert result == [None] and b.closed and left.closed

    run(loop, body)


def test_aclose_wakes_a_pending_read_within_100_ms_and_loses_nothing(loop: str) -> None:
    async def body() -> None:
        async with ws_pair(None) as (client, server):
            b = WebSocketTun(server)
            bufs, sizes = [bytearray(1500)], [0]
            for _ in range(10):  # cancelled reads take nothing
                with anyio.move_on_after(0.002):
                    await b.read(bufs, sizes)
            await client.send(ipv4_packet(3, 60))  # type: ignore[attr-defined]
            assert await read_packets(b, 1) == [ipv4_packet(3, 60)]
            errors: list[BaseException] = []
            events = b.events()
            assert await events.__anext__() == Event.UP

            async def reader() -> None:
                try:
                    await b.read(bufs, sizes)
                except BaseException as exc:
                    errors.append(exc)

            # The peer stops reading, so it never answers the closing handshake:
            # the read must wake at aclose() all the same, not when the close times out.
            trio_side = hasattr(client, "pause_reading")  # websockets.trio's connection
            flow = client if trio_side else client.transport  # type: ignore[attr-defined]
            flow.pause_reading()
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.05)
                started = time.monotonic()
                with anyio.CancelScope() as scope:
                    tg.start_soon(b.aclose)
                    while not errors:
                        await anyio.sleep(0.001)
                woke = time.monotonic() - started
                assert not scope.cancelled_caught
            flow.resume_reading()
            assert woke < 0.1
            assert len(errors) == 1 and isinstance(errors[0], ClosedError)
            assert [e async for e in events] == []

    run(loop, body)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="mtu 0"):
        WebSocketTun(object(), mtu=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_tunnel_between_two_devices_over_wss(
    loop_name: str, netns_factory: MakeNs, pki: Pki
) -> None:
    """The seed's VPN: device a <-> WebSocket (TLS, loopback) <-> device b, each end an
    aio.copy; ping crosses and 8 MB of TCP arrive with the same SHA-256."""
    need_tool("ping")
    pair = Pair(netns_factory("wa"), netns_factory("wb"), offload=False)

    async def body() -> None:
        async with ws_pair(pki) as (client, server):
            wa, wb = WebSocketTun(client), WebSocketTun(server)
            da, db = aio.wrap(pair.a), aio.wrap(pair.b)
            async with anyio.create_task_group() as tg:
                tg.start_soon(aio.copy, da, wa)
                tg.start_soon(aio.copy, db, wb)
                ping = await in_thread(
                    lambda: ns_run(pair.ns_a, "ping", "-c", "3", "-i", "0.2", "-W", "2",
                                   pair.B4, check=False))
                assert "3 received" in ping.stdout, ping.stdout
                await in_thread(lambda: tcp_transfer(pair, 8 << 20), timeout=60)
                assert wa.stats().packets_written > 1000
                await da.aclose()
                await db.aclose()

    try:
        run(loop_name, body)
    finally:
        pair.close()


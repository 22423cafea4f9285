"""tunkit.aio in memory and on sockets, on asyncio, uvloop and trio: the conformance
behaviours, aio.pipe, aio.copy, and cancellation at random points (hypothesis)."""

# ruff: noqa: F811  (the fixtures imported from aio_util are parameters here)

from __future__ import annotations

import itertools
import socket
import struct
import threading
from collections.abc import Callable

import anyio
import anyio.abc
import pytest
from aio_conformance import AsyncTunConformance, Make
from aio_util import (  # noqa: F401
    LOOPS,
    AioPipeHarness,
    AsyncHarness,
    WrappedHarness,
    loop,
    read_packets,
    run,
    write_packets,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pipe import PipeHarness, ipv4_packet
from test_stream import StreamHarness
from test_udp import UdpHarness
from tls_util import Pki, make_pki

import tunkit
import tunkit.aio as aio
from tunkit import ReadOnClosedPipeError, WriteOnClosedPipeError

KINDS = ["aio-pipe", "aio-pipe-offsets", "wrap-pipe", "wrap-udp", "wrap-tcp", "wrap-tls",
         "wrap-unix"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def harness_maker(kind: str, pki: Pki) -> Make:
    """``make(task_group)`` for one kind of AsyncTun."""

    def make(tg: anyio.abc.TaskGroup) -> AsyncHarness:
        if kind == "aio-pipe":
            return AioPipeHarness(tg, ipv4_packet)
        if kind == "aio-pipe-offsets":
            return AioPipeHarness(tg, ipv4_packet, batch_size=128, mwo=3, mro=7)
        if kind == "wrap-pipe":
            return WrappedHarness(PipeHarness(8, 16, 16))
        if kind == "wrap-udp":
            return WrappedHarness(UdpHarness())
        return WrappedHarness(StreamHarness(kind.removeprefix("wrap-"), pki))

    return make


class TestAsyncConformance(AsyncTunConformance):
    @pytest.fixture(params=KINDS)
    def make(self, request: pytest.FixtureRequest, pki: Pki) -> Make:
        return harness_maker(request.param, pki)


# -- aio.pipe ------------------------------------------------------------------------


def test_pipe_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size 0"):
        aio.pipe(batch_size=0)
    for name in ("mtu", "mwo", "mro"):
        with pytest.raises(ValueError, match=name):
            aio.pipe(**{name: -1})  # type: ignore[arg-type]
    a, b = aio.pipe(batch_size=4, mtu=9000, mwo=2, mro=3)
    assert (a.batch_size(), a.mtu(), a.mwo(), a.mro()) == (4, 9000, 2, 3)
    assert (a.name(), b.name()) == ("pipe-tun-0", "pipe-tun-1")
    with pytest.raises(OSError):  # io.UnsupportedOperation: no descriptor
        a.fileno()


def test_closing_one_end_closes_both_and_wakes_the_other(loop: str) -> None:
    async def body() -> None:
        a, b = aio.pipe()
        errors: list[BaseException] = []

        async def read_b() -> None:
            try:
                await b.read([bytearray(100)], [0])
            except BaseException as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_b)
            await anyio.sleep(0.01)
            await a.aclose()
        assert len(errors) == 1 and isinstance(errors[0], ReadOnClosedPipeError)
        assert a.closed and b.closed
        with pytest.raises(WriteOnClosedPipeError):
            await b.write([b"x"])

    run(loop, body)


def test_a_cancelled_write_withdraws_what_nobody_took(loop: str) -> None:
    async def body() -> None:
        a, b = aio.pipe(batch_size=2)
        bufs, sizes = [bytearray(10) for _ in range(2)], [0, 0]
        batch = [bytes([i]) * 5 for i in range(5)]
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def write() -> None:
                with scope:
                    await a.write(batch)

            tg.start_soon(write)
            await anyio.sleep(0.01)
            assert await b.read(bufs, sizes) == 2  # the prefix handed over
            scope.cancel()
        assert [bytes(bufs[i][: sizes[i]]) for i in range(2)] == batch[:2]
        with anyio.move_on_after(0.02) as waited:
            await b.read(bufs, sizes)
        assert waited.cancelled_caught, "a withdrawn packet was read"
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.write, [b"next"])
            assert await read_packets(b, 1) == [b"next"]
        await a.aclose()

    run(loop, body)


# -- aio.copy ------------------------------------------------------------------------


def test_copy_moves_packets_both_ways_and_returns_none_at_close(loop: str) -> None:
    async def body() -> None:
        left, a = aio.pipe(batch_size=8)
        b, right = aio.pipe(batch_size=8)
        there = [ipv4_packet(i, 60 + i) for i in range(50)]
        back = [ipv4_packet(100 + i, 80 + i) for i in range(50)]
        result: list[object] = []

        async def run_copy() -> None:
            result.append(await aio.copy(a, b))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_copy)
            tg.start_soon(write_packets, left, there)
            tg.start_soon(write_packets, right, back)
            assert await read_packets(right, 50) == there
            assert await read_packets(left, 50) == back
            await left.aclose()
        assert result == [None]
        assert a.closed and b.closed and right.closed

    run(loop, body)


class _Failing:
    """An AsyncTun whose read fails: copy must raise that error and close both sides."""

    def __init__(self) -> None:
        self.closed = False

    async def read(self, bufs: object, sizes: object, offset: int = 0) -> int:
        await anyio.sleep(0.01)
        raise RuntimeError("the read failed")

    async def write(self, bufs: object, offset: int = 0) -> int:
        await anyio.sleep(3600)
        return 0

    def mwo(self) -> int:
        return 0

    def mro(self) -> int:
        return 0

    def mtu(self) -> int:
        return 1500

    def name(self) -> str:
        return "failing"

    def batch_size(self) -> int:
        return 1

    def events(self) -> object:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.closed = True


def test_copy_raises_the_first_error_and_closes_both(loop: str) -> None:
    async def body() -> None:
        a, other = aio.pipe()
        failing = _Failing()
        with pytest.raises(RuntimeError, match="the read failed"):
            await aio.copy(a, failing)  # type: ignore[arg-type]
        assert a.closed and other.closed and failing.closed

    run(loop, body)


def test_cancelling_copy_closes_both(loop: str) -> None:
    async def body() -> None:
        a, _ = aio.pipe()
        b, _ = aio.pipe()
        with anyio.move_on_after(0.05) as scope:
            await aio.copy(a, b)
        assert scope.cancelled_caught and a.closed and b.closed

    run(loop, body)


def test_copy_through_wrapped_sync_pipes_uses_one_worker_per_direction(loop: str) -> None:
    async def body() -> None:
        x, a = tunkit.pipe(batch_size=4)
        b, y = tunkit.pipe(batch_size=4)
        wa, wb = aio.wrap(a), aio.wrap(b)
        packets = [ipv4_packet(i, 100) for i in range(30)]
        got: list[bytes] = []

        from conformance import read_packets as sync_read
        from conformance import write_packets as sync_write

        sender = threading.Thread(target=sync_write, args=(x, packets), name="test-send")
        receiver = threading.Thread(target=lambda: got.extend(sync_read(y, 30)), name="test-recv")
        async with anyio.create_task_group() as tg:
            tg.start_soon(aio.copy, wa, wb)
            sender.start()
            receiver.start()
            with anyio.fail_after(20):
                while receiver.is_alive():
                    await anyio.sleep(0.01)
            names = sorted(t.name for t in threading.enumerate() if t.name.startswith("tunkit"))
            await wa.aclose()
        sender.join()
        receiver.join()
        x.close()
        y.close()
        assert got == packets
        # At most one per direction of each AsyncTun, started when first needed:
        # nothing is written to a, so its writer never started.
        assert names == sorted([f"tunkit-aio-read:{a.name()}", f"tunkit-aio-read:{b.name()}",
                                f"tunkit-aio-write:{b.name()}"])

    run(loop, body)


# -- cancellation at random points (hypothesis) -------------------------------------

_DELAYS = st.sampled_from([None, None, 0.0, 0.0001, 0.0005, 0.002])
_SEQ = struct.Struct("!I")


def _seq_packet(seq: int) -> bytes:
    return ipv4_packet(seq, 40)[:20] + _SEQ.pack(seq) + bytes(16)


def _seq_of(packet: bytes) -> int:
    seq: int = _SEQ.unpack_from(packet, 20)[0]
    return seq


def _ends(kind: str) -> tuple[Callable[[], tuple[aio.AsyncTun, aio.AsyncTun]], Callable[[], None]]:
    """(make the writer's and the reader's AsyncTun, release the rest) for *kind*."""
    held: list[socket.socket] = []
    if kind == "aio-pipe":
        return (lambda: aio.pipe(batch_size=4)), (lambda: None)
    if kind == "wrap-pipe":
        return (lambda: tuple(map(aio.wrap, tunkit.pipe(batch_size=4)))), (lambda: None)  # type: ignore[return-value]

    def udp() -> tuple[aio.AsyncTun, aio.AsyncTun]:
        ra = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ra.bind(("127.0.0.1", 0))
        rb.bind(("127.0.0.1", 0))
        a = tunkit.UdpTun(ra, rb.getsockname())
        b = tunkit.UdpTun(rb, ra.getsockname())
        return aio.wrap(a), aio.wrap(b)

    return udp, (lambda: [s.close() for s in held] and None)


async def _cancel_while_flowing(
    kind: str, writes: list[tuple[int, float | None]], reads: list[float | None]
) -> None:
    make, release = _ends(kind)
    sender, receiver = make()
    outcomes: list[tuple[list[int], int | None]] = []  # (batch, handed over; None: cancelled)
    got: list[int] = []
    end = sum(k for k, _ in writes)
    reads = [*reads, None]  # one read in each round may finish: the reader gets on

    async def write_all() -> None:
        seq = 0
        for k, delay in writes:
            batch = list(range(seq, seq + k))
            seq += k
            bufs = [_seq_packet(i) for i in batch]
            n: int | None = None
            if delay is None:
                n = await sender.write(bufs)
            else:
                with anyio.move_on_after(delay):
                    n = await sender.write(bufs)
            outcomes.append((batch, n))
        await sender.write([_seq_packet(end)])  # the last one, never cancelled

    async def read_all() -> None:
        bufs = [bytearray(2000) for _ in range(receiver.batch_size())]
        sizes = [0] * len(bufs)
        i = 0
        while not got or got[-1] != end:
            delay = reads[i % len(reads)]
            i += 1
            n = 0
            if delay is None:
                n = await receiver.read(bufs, sizes)
            else:
                with anyio.move_on_after(delay):
                    n = await receiver.read(bufs, sizes)
            got.extend(_seq_of(bytes(bufs[j][: sizes[j]])) for j in range(n))

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_all)
                await write_all()
    finally:
        await sender.aclose()
        await receiver.aclose()
        release()
    # Exactly once, in order: strictly increasing.
    assert all(x < y for x, y in itertools.pairwise(got)), got
    arrived = set(got)
    for batch, n in outcomes:
        came = [s for s in batch if s in arrived]
        if n is not None:  # a write that returned: its count, and only those
            assert came == batch[:n], (batch, n, came)
        else:  # cancelled: a prefix of the batch, never part of one
            assert came == batch[: len(came)], (batch, came)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["aio-pipe", "wrap-pipe", "wrap-udp"])
@pytest.mark.parametrize("loop_name", LOOPS)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(writes=st.lists(st.tuples(st.integers(1, 6), _DELAYS), min_size=1, max_size=25),
       reads=st.lists(_DELAYS, min_size=1, max_size=10))
def test_cancelled_reads_and_writes_lose_nothing_and_duplicate_nothing(
    loop_name: str, kind: str, writes: list[tuple[int, float | None]], reads: list[float | None]
) -> None:
    run(loop_name, _cancel_while_flowing, kind, writes, reads)

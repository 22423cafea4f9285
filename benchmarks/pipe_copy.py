"""Packets/s of pipe -> copy -> pipe, beside two baselines measured in the same run.

    python benchmarks/pipe_copy.py [--seconds 1.0] [--repeat 3] [--json out.json]

Three threads each time: a writer, the middle stage, a reader.

- ``tunkit``: writer -> pipe -> tunkit.copy -> pipe -> reader, batched writes
  and reads of the pipe's batch size.
- ``queue``: what a Python user would write instead: the same three threads
  joined by two ``queue.Queue`` of ``bytes``, one packet per put/get.
- ``floor``: a plain loop copying the same bytes between preallocated buffers
  (no threads): the most any in-process pipeline could do.
- ``handoff``: two threads passing a lock back and forth: the round trips per
  second that CPython's thread switching allows here. A rendezvous (a write
  returns only once a reader took the packet) pays at least one per packet
  whenever the reader is not already waiting, so at batch 1 it bounds tunkit.

- ``aio-<loop>`` (``--aio``): writer task -> ``aio.pipe`` -> ``aio.copy`` ->
  ``aio.pipe`` -> reader task, all on one event loop (asyncio, uvloop, trio),
  at the same size and batch: the async pipeline beside the threaded one.

Reported: packets/s of each and the ratio of tunkit to queue (and of each
aio pipeline to the threaded tunkit one). Medians of
``--repeat`` runs. The goals (issue 3): at batch 128 tunkit >= 5x queue; at
batch 1 >= 0.25x.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import tunkit


def bench_tunkit(
    size: int, batch: int, seconds: float, wrap: Callable[[tunkit.Tun], tunkit.Tun] | None = None
) -> float:
    """Packets/s through writer -> pipe -> copy -> pipe -> reader; *wrap* the Tuns copy joins."""
    t1, t2 = tunkit.pipe(batch)
    t3, t4 = tunkit.pipe(batch)
    middle = (t2, t3) if wrap is None else (wrap(t2), wrap(t3))
    copier = threading.Thread(target=tunkit.copy, args=middle)
    copier.start()
    packet = bytes(size)
    batch_bufs = [packet] * batch
    stop = threading.Event()
    received = 0

    def writer() -> None:
        try:
            while not stop.is_set():
                done = 0
                while done < batch:
                    done += t1.write(batch_bufs[done:])
        except tunkit.ClosedError:
            pass

    def reader() -> None:
        nonlocal received
        bufs = [bytearray(1500) for _ in range(batch)]
        sizes = [0] * batch
        try:
            while True:
                received += t4.read(bufs, sizes)
        except tunkit.ClosedError:
            pass

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # warm up
    start_count, start = received, time.perf_counter()
    time.sleep(seconds)
    count, elapsed = received - start_count, time.perf_counter() - start
    stop.set()
    t1.close()
    t4.close()
    for t in [*threads, copier]:
        t.join()
    return count / elapsed


def bench_aio(size: int, batch: int, seconds: float, loop: str) -> float:
    """Packets/s through writer -> aio.pipe -> aio.copy -> aio.pipe -> reader on *loop*."""
    import anyio

    import tunkit.aio as aio

    async def run() -> float:
        t1, t2 = aio.pipe(batch)
        t3, t4 = aio.pipe(batch)
        batch_bufs = [bytes(size)] * batch
        received = 0

        async def writer() -> None:
            try:
                while True:
                    done = 0
                    while done < batch:
                        done += await t1.write(batch_bufs[done:])
            except tunkit.ClosedError:
                pass

        async def reader() -> None:
            nonlocal received
            bufs = [bytearray(1500) for _ in range(batch)]
            sizes = [0] * batch
            try:
                while True:
                    received += await t4.read(bufs, sizes)
            except tunkit.ClosedError:
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(aio.copy, t2, t3)
            tg.start_soon(writer)
            tg.start_soon(reader)
            await anyio.sleep(0.2)  # warm up
            start_count, start = received, time.perf_counter()
            await anyio.sleep(seconds)
            count, elapsed = received - start_count, time.perf_counter() - start
            await t1.aclose()
            await t4.aclose()
        return count / elapsed

    if loop == "uvloop":
        pps: float = anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        pps = anyio.run(run, backend=loop)
    return pps


def bench_queue(size: int, seconds: float) -> float:
    q1: queue.Queue[bytes | None] = queue.Queue(maxsize=1024)
    q2: queue.Queue[bytes | None] = queue.Queue(maxsize=1024)
    packet = bytes(size)
    stop = threading.Event()
    received = 0

    def writer() -> None:
        while not stop.is_set():
            q1.put(packet)
        q1.put(None)

    def middle() -> None:
        while (item := q1.get()) is not None:
            q2.put(bytes(item))  # the middle stage copies, as copy() does
        q2.put(None)

    def reader() -> None:
        nonlocal received
        while q2.get() is not None:
            received += 1

    threads = [threading.Thread(target=f) for f in (writer, middle, reader)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    start_count, start = received, time.perf_counter()
    time.sleep(seconds)
    count, elapsed = received - start_count, time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    return count / elapsed


def bench_floor(size: int, seconds: float) -> float:
    src = memoryview(bytearray(size))
    bufs = [bytearray(1500) for _ in range(128)]
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for buf in bufs:
            buf[:size] = src
        count += len(bufs)
    return count / (time.perf_counter() - start)


def bench_handoff(seconds: float) -> float:
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()
    stop = False
    count = 0

    def other() -> None:
        while True:
            ping.acquire()
            if stop:
                return
            pong.release()

    thread = threading.Thread(target=other)
    thread.start()
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            ping.release()
            pong.acquire()
        count += 100
    elapsed = time.perf_counter() - start
    stop = True
    ping.release()
    thread.join()
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--aio", action="store_true",
                        help="also aio.pipe -> aio.copy -> aio.pipe on asyncio, uvloop and trio")
    args = parser.parse_args(argv)

    rows: list[dict[str, Any]] = []
    handoff = statistics.median(bench_handoff(args.seconds) for _ in range(args.repeat))
    print(f"thread handoff floor: {handoff:,.0f} lock round trips/s")
    print(f"{'size':>5} {'batch':>5} {'tunkit pkt/s':>13} {'queue pkt/s':>12} "
          f"{'floor pkt/s':>12} {'tunkit/queue':>12}")
    for size in (64, 1500):
        queue_pps = statistics.median(bench_queue(size, args.seconds) for _ in range(args.repeat))
        floor_pps = statistics.median(bench_floor(size, args.seconds) for _ in range(args.repeat))
        for batch in (1, 8, 32, 128):
            pps = statistics.median(
                bench_tunkit(size, batch, args.seconds) for _ in range(args.repeat)
            )
            ratio = pps / queue_pps
            row = {"size": size, "batch": batch, "tunkit_pps": pps,
                   "queue_pps": queue_pps, "floor_pps": floor_pps, "ratio": ratio}
            print(f"{size:>5} {batch:>5} {pps:>13,.0f} {queue_pps:>12,.0f} "
                  f"{floor_pps:>12,.0f} {ratio:>11.2f}x", flush=True)
            if args.aio:
                for loop in ("asyncio", "uvloop", "trio"):
                    aio_pps = statistics.median(
                        bench_aio(size, batch, args.seconds, loop) for _ in range(args.repeat)
                    )
                    row[f"aio_{loop}_pps"] = aio_pps
                    print(f"{'':>11} aio on {loop}: {aio_pps:,.0f} pkt/s "
                          f"({aio_pps / pps:.2f}x the threaded pipeline)", flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"handoff_round_trips_s": handoff, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

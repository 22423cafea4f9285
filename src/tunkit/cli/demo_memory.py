"""The in-memory demo: two pipes joined by a Point2Point, traffic both ways, checked."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .._forwarder import Point2Point
from .._pipe import PipeTun, pipe
from .._pool import Pool
from .._tunio import TunIO

__all__ = ["DirectionResult", "demo_packet", "run_memory_demo"]

# A minimal IPv4 + UDP header (RFC 791, RFC 768) so the demo carries packet-shaped data.
_IP4_UDP: Final = struct.Struct("!BBHHHBBH4s4sHHHH")
_SRC: Final = bytes((192, 0, 2, 1))  # TEST-NET-1 (RFC 5737): never routed anywhere
_DST: Final = bytes((192, 0, 2, 2))


def demo_packet(direction: int, seq: int) -> bytes:
    """Return the demo's packet number *seq* of *direction* (0: A→B, 1: B→A).

    Its length varies with *seq* (28 to 1400 bytes) and its payload is a
    pattern derived from both numbers, so the receiver can check every byte.
    """
    payload_len = (seq * 37) % 1373
    src, dst = (_SRC, _DST) if direction == 0 else (_DST, _SRC)
    header = _IP4_UDP.pack(
        0x45, 0, 28 + payload_len, seq & 0xFFFF, 0, 64, 17, 0, src, dst, 5000, 5001,
        8 + payload_len, 0,
    )
    stamp = struct.pack("!BI", direction, seq)
    pattern = (stamp * (payload_len // len(stamp) + 1))[:payload_len]
    return header + pattern


@dataclass
class DirectionResult:
    """What one direction of the demo moved, and in how long: from its first write
    to the arrival of its last packet (each direction has its own clock)."""

    label: str
    sent: int = 0
    received: int = 0
    bytes: int = 0
    errors: int = 0
    seconds: float = 0.0
    started: float = 0.0  # time.perf_counter() of the first write
    problems: list[str] = field(default_factory=list)

    @property
    def packets_per_second(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


def _send_io(io: TunIO, count: int, result: DirectionResult) -> None:
    result.started = time.perf_counter()
    for seq in range(count):
        io.write(demo_packet(0, seq))
        result.sent += 1


def _send_batched(tun: PipeTun, count: int, batch: int, result: DirectionResult) -> None:
    seq = 0
    result.started = time.perf_counter()
    while seq < count:
        packets = [demo_packet(1, s) for s in range(seq, min(seq + batch, count))]
        done = 0
        while done < len(packets):
            done += tun.write(packets[done:])
        seq += len(packets)
        result.sent = seq


def _receive_batched(tun: PipeTun, count: int, result: DirectionResult) -> None:
    bufs = [bytearray(tun.mro() + tun.mtu()) for _ in range(tun.batch_size())]
    sizes = [0] * len(bufs)
    while result.received < count:
        n = tun.read(bufs, sizes, tun.mro())
        for i in range(n):
            _check(result, 0, bytes(bufs[i][tun.mro() : tun.mro() + sizes[i]]))
    result.seconds = time.perf_counter() - result.started


def _receive_io(io: TunIO, count: int, result: DirectionResult) -> None:
    buf = bytearray(io.mtu())
    while result.received < count:
        n = io.readinto(buf)
        _check(result, 1, bytes(buf[:n]))
    result.seconds = time.perf_counter() - result.started


def _check(result: DirectionResult, direction: int, packet: bytes) -> None:
    expected = demo_packet(direction, result.received)
    if packet != expected:
        result.errors += 1
        if len(result.problems) < 3:
            result.problems.append(f"packet {result.received}: {len(packet)} bytes, not as sent")
    result.received += 1
    result.bytes += len(packet)


def run_memory_demo(
    packets: int = 20000,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> list[DirectionResult]:
    """Send *packets* each way through ``pipe → Point2Point → pipe`` and check them.

    Host A talks through a :class:`TunIO` (one packet per call); host B
    writes and reads whole batches. Returns one result per direction, A → B
    first, each timed on its own.
    """
    host_a, left = pipe(batch_size, mtu=1500)
    right, host_b = pipe(batch_size, mtu=1500)
    a2b = DirectionResult("A → B")
    b2a = DirectionResult("B → A")
    io_a = TunIO(host_a)
    p2p = Point2Point(Pool())
    p2p.set_a(left)
    p2p.set_b(right)
    failures: list[BaseException] = []
    lock = threading.Lock()
    running = [4]  # guarded by lock: the threads not yet finished
    finished = threading.Event()  # all four finished, or one failed

    def guarded(role: str, fn: Callable[..., None], *args: object) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                failures.append(exc)
                finished.set()
            finally:
                with lock:
                    running[0] -= 1
                    if not running[0]:
                        finished.set()

        return threading.Thread(target=run, name=f"tunkit-demo:{role}")

    threads = [
        guarded("a2b-send", _send_io, io_a, packets, a2b),
        guarded("a2b-receive", _receive_batched, host_b, packets, a2b),
        guarded("b2a-send", _send_batched, host_b, packets, batch_size, b2a),
        guarded("b2a-receive", _receive_io, io_a, packets, b2a),
    ]
    for t in threads:
        t.start()
    try:
        # Event.wait, not Thread.join: on Python 3.11 a join interrupted by
        # Ctrl-C can mark a running thread as finished.
        while not finished.wait(0.05):
            if progress is not None:
                progress(a2b.received + b2a.received, 2 * packets)
    finally:
        p2p.stop()
        io_a.close()
        host_b.close()
        for t in threads:
            t.join()
    for exc in failures:
        a2b.errors += 1
        a2b.problems.append(f"{type(exc).__name__}: {exc}")
    return [a2b, b2a]

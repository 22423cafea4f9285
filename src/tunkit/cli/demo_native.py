"""The local demo (``--local``): two namespaces, a NativeTun in each, joined in this process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Final

from .._forwarder import ForwarderStats, Point2Point
from .._linux.device import NativeTun, TunStats, create_tun
from .._linux.netns import create_netns, delete_netns, unique_netns_name
from .._pool import Pool
from . import children

__all__ = ["NativeDemoResult", "PingResult", "TrafficResult", "ping", "run_native_demo", "tcp_run"]

# Addresses exist only inside the two namespaces this demo makes (RFC 1918 and
# RFC 4193 ranges, never routed out of them).
A_V4: Final = "10.213.0.1"
B_V4: Final = "10.213.0.2"
A_V6: Final = "fd00:213::1"
B_V6: Final = "fd00:213::2"
_TCP_PORT: Final = 5201
_NS_PREFIX: Final = "tk"

# The far end of the TCP test: runs inside namespace B, counts what arrives.
# It dies with the demo (children.start) and in any case gives up after 30 s
# without a sender or without data.
_RECEIVER: Final = """
import socket, sys, time
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
srv.settimeout(30)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
total = 0
start = None
while True:
    data = conn.recv(1 << 20)
    if not data:
        break
    if start is None:
        start = time.monotonic()
    total += len(data)
elapsed = time.monotonic() - start if start else 0.0
print(total, elapsed, flush=True)
"""

# The near end: runs inside namespace A, sends for the given seconds.
_SENDER: Final = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
chunk = bytes(1 << 18)
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    conn.sendall(chunk)
conn.shutdown(socket.SHUT_WR)
conn.close()
"""


@dataclass
class PingResult:
    """Round-trip times of one ``ping`` run, in milliseconds."""

    family: str
    sent: int = 0
    received: int = 0
    rtt_min: float = 0.0
    rtt_avg: float = 0.0
    rtt_max: float = 0.0
    error: str = ""


@dataclass
class TrafficResult:
    """What a real demo's traffic measured: the pings and the TCP run."""

    pings: list[PingResult] = field(default_factory=list)
    tcp_bytes: int = 0
    tcp_seconds: float = 0.0
    tcp_error: str = ""

    @property
    def gbit_s(self) -> float:
        return self.tcp_bytes * 8 / self.tcp_seconds / 1e9 if self.tcp_seconds else 0.0

    def traffic_errors(self) -> int:
        """Pings lost or failed, and a TCP run that failed or moved nothing."""
        bad = sum(1 for p in self.pings if p.error or p.received != p.sent)
        return bad + (1 if self.tcp_error or not self.tcp_bytes else 0)


@dataclass
class NativeDemoResult(TrafficResult):
    """What the local demo measured."""

    a_stats: TunStats | None = None
    b_stats: TunStats | None = None
    # What each direction's Forwarder swallowed (errors it did not raise, drops).
    a2b: ForwarderStats = field(default_factory=ForwarderStats)
    b2a: ForwarderStats = field(default_factory=ForwarderStats)
    offload: bool = False

    @property
    def errors(self) -> int:
        swallowed = sum(forwarder_errors(f) + f.dropped for f in (self.a2b, self.b2a))
        return self.traffic_errors() + swallowed


def forwarder_errors(stats: ForwarderStats) -> int:
    """The read and write errors a Forwarder swallowed (the demo's "errors" column)."""
    return stats.read_errors + stats.write_errors


def _ns_exec(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


_RTT_RE: Final = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/")
_COUNT_RE: Final = re.compile(r"(\d+) packets transmitted, (\d+) received")


def _last_line(text: str, status: int, who: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else f"{who} exited {status}"


def ping(ns: str, family: str, target: str, count: int,
         tick: Callable[[], None]) -> PingResult:
    """Ping *target* from *ns* *count* times, calling *tick* meanwhile; its figures."""
    result = PingResult(family)
    argv = _ns_exec(ns, "ping", "-6" if family == "IPv6" else "-4", "-c", str(count),
                    "-i", "0.2", "-W", "2", target)
    proc = children.run(argv, timeout=30, tick=tick)
    if m := _COUNT_RE.search(proc.stdout):
        result.sent, result.received = int(m[1]), int(m[2])
    if m := _RTT_RE.search(proc.stdout):
        result.rtt_min, result.rtt_avg, result.rtt_max = (float(m[i]) for i in (1, 2, 3))
    if proc.returncode != 0:
        result.error = _last_line(proc.stderr.strip() or proc.stdout, proc.returncode, "ping")
    return result


@contextmanager
def _namespaces(tags: tuple[str, ...]) -> Iterator[list[str]]:
    names = [unique_netns_name(f"demo-{t}", _NS_PREFIX) for t in tags]
    made: list[str] = []
    try:
        for name in names:
            create_netns(name)
            made.append(name)
        yield names
    finally:
        for name in made:
            with suppress(FileNotFoundError):
                delete_netns(name)


def _device(stack: ExitStack, ns: str, addr4: str, addr6: str, offload: bool) -> NativeTun:
    tun = stack.enter_context(create_tun(f"tkd{os.getpid()}", 1500, offload=offload, netns=ns))
    tun.add_address(f"{addr4}/24")
    tun.add_address(f"{addr6}/64")
    tun.up()
    return tun


def tcp_run(ns_a: str, ns_b: str, seconds: float, result: TrafficResult,
            tick: Callable[[], None]) -> None:
    """Send TCP from *ns_a* to B_V4 in *ns_b* for *seconds*; set *result*'s figures."""
    receiver = children.start(
        _ns_exec(ns_b, sys.executable, "-c", _RECEIVER, str(_TCP_PORT)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "ready":
            result.tcp_error = "the TCP receiver did not start"
            return
        try:
            sender = children.run(
                _ns_exec(ns_a, sys.executable, "-c", _SENDER, B_V4, str(_TCP_PORT),
                         str(seconds)),
                timeout=seconds + 30, tick=tick,
            )
            if sender.returncode != 0:
                result.tcp_error = _last_line(sender.stderr, sender.returncode, "sender")
            out, err = receiver.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            result.tcp_error = result.tcp_error or "the TCP test did not finish in time"
            return
        if receiver.returncode != 0:
            result.tcp_error = result.tcp_error or _last_line(err, receiver.returncode,
                                                              "receiver")
            return
        total, elapsed = out.split()
        result.tcp_bytes, result.tcp_seconds = int(total), float(elapsed)
    finally:
        children.end(receiver)


def run_native_demo(
    seconds: float = 3.0,
    pings: int = 5,
    offload: bool = False,
    status: Callable[[str], None] | None = None,
    tick: Callable[[NativeTun, NativeTun], None] | None = None,
) -> NativeDemoResult:
    """Run the real demo: namespaces A and B, a NativeTun in each, a Point2Point between.

    Pings B from A (IPv4, IPv6), then sends TCP from A to B for *seconds*.
    Everything it makes carries this process's id and is removed on the way
    out (Ctrl-C and SIGTERM included, when the caller turns SIGTERM into an
    exception), the programs it runs too; what dead runs left (namespaces and
    the processes in them) is removed first.
    """
    say = status or (lambda _msg: None)
    children.remove_leftovers(_NS_PREFIX)
    result = NativeDemoResult(offload=offload)
    with _namespaces(("a", "b")) as (ns_a, ns_b), ExitStack() as stack:
        say(f"namespaces {ns_a} and {ns_b}")
        tun_a = _device(stack, ns_a, A_V4, A_V6, offload)
        tun_b = _device(stack, ns_b, B_V4, B_V6, offload)
        p2p = Point2Point(Pool())
        stack.callback(p2p.stop)
        p2p.set_a(tun_a)
        p2p.set_b(tun_b)

        def tick_fn() -> None:
            if tick is not None:
                tick(tun_a, tun_b)

        for family, target in (("IPv4", B_V4), ("IPv6", B_V6)):
            say(f"ping -{family[-1]} {target} from {ns_a}")
            result.pings.append(ping(ns_a, family, target, pings, tick_fn))
        say(f"TCP from {ns_a} to {ns_b} for {seconds:g} s")
        tcp_run(ns_a, ns_b, seconds, result, tick_fn)
        p2p.stop()  # what it drops on the way out counts too
        result.a2b, result.b2a = p2p.a2b.stats(), p2p.b2a.stats()
        result.a_stats = tun_a.stats()
        result.b_stats = tun_b.stats()
    return result

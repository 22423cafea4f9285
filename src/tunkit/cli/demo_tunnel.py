"""The main demo: two "hosts" and a ``tunkit tunnel`` process on each, traffic across the overlay.

Namespaces A and B are joined by a veth underlay, like a wire between two
machines (:func:`.hosts.two_hosts`); in each a ``tunkit tunnel`` process
over UDP (a process per host, as on two real machines) makes its TUN device
and carries the overlay. The demo pings B from A across the overlay (IPv4,
IPv6), sends TCP for a few seconds, and reads its figures from what the two
processes print: their counters while it runs and their totals when
SIGTERM ends them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from . import children
from .demo_native import A_V4, A_V6, B_V4, B_V6, TrafficResult, ping, tcp_run
from .hosts import Counters, TunnelEnd, tunnel_ends, two_hosts

__all__ = ["TunnelDemoResult", "run_tunnel_demo"]

_NS_PREFIX: Final = "tk"


@dataclass
class TunnelDemoResult(TrafficResult):
    """What the tunnel demo measured: pings, TCP, and each tunnel end's totals."""

    a: Counters | None = None  # host A's tunnel end, its totals
    b: Counters | None = None
    # How each tunnel process ended (0: as asked, by SIGTERM), and its last line otherwise.
    statuses: list[int | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        """Packets the tunnel ends themselves dropped (malformed, too big, refused)."""
        return sum(c.dropped for c in (self.a, self.b) if c is not None)

    @property
    def errors(self) -> int:
        bad = sum(1 for s in self.statuses if s != 0)
        bad += 0 if self.a is not None and self.b is not None else 1  # no totals
        return self.traffic_errors() + bad + self.dropped


def run_tunnel_demo(
    seconds: float = 3.0,
    pings: int = 5,
    status: Callable[[str], None] | None = None,
    tick: Callable[[Counters | None, Counters | None], None] | None = None,
) -> TunnelDemoResult:
    """Run the demo: two hosts, a ``tunkit tunnel`` (UDP) in each, ping and TCP across.

    *tick* gets the two ends' latest counters (A's, B's) a few times a
    second. Everything it makes carries this process's id and is removed on
    the way out (Ctrl-C and SIGTERM included, when the caller turns SIGTERM
    into an exception), the processes it runs too; what dead runs left
    (namespaces and the processes in them) is removed first.
    """
    say = status or (lambda _msg: None)
    children.remove_leftovers(_NS_PREFIX)
    result = TunnelDemoResult()
    with two_hosts("demo", _NS_PREFIX) as hosts:
        say(f"hosts {hosts.a} and {hosts.b}, joined by a veth")
        ends: list[TunnelEnd] = []
        try:
            say("a tunkit tunnel (udp) on each host")
            ends = tunnel_ends(hosts, "udp", (f"{A_V4}/24", f"{B_V4}/24", f"{A_V6}/64",
                                              f"{B_V6}/64"), interval=0.5)

            def tick_fn() -> None:
                if tick is not None:
                    tick(ends[0].counters(), ends[1].counters())

            for family, target in (("IPv4", B_V4), ("IPv6", B_V6)):
                say(f"ping -{family[-1]} {target} from {hosts.a}, across the tunnel")
                result.pings.append(ping(hosts.a, family, target, pings, tick_fn))
            say(f"TCP from {hosts.a} to {hosts.b} for {seconds:g} s, across the tunnel")
            tcp_run(hosts.a, hosts.b, seconds, result, tick_fn)
        finally:
            for end in ends:
                result.statuses.append(end.stop())
        if ends:
            result.a, result.b = ends[0].counters(), ends[1].counters()
            for end, code in zip(ends, result.statuses, strict=True):
                if code != 0:
                    last = end.lines[-1] if end.lines else "no output"
                    result.problems.append(f"the tunnel on host {end.label} ended with "
                                           f"status {code}: {last}")
    return result

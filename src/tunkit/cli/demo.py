"""``tunkit demo``: real traffic between two namespaces through tunkit, or the in-memory demo."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .demo_memory import DirectionResult, run_memory_demo
from .preflight import HelpFormatter, UsageError, positive, require

if TYPE_CHECKING:  # the real demos' modules load only when they run
    from .demo_native import PingResult, TrafficResult

__all__ = ["DEMO_HELP", "add_parser", "run"]

DEMO_HELP = """\
Show tunkit carrying real traffic through a tunnel between two hosts.

As root with /dev/net/tun: makes two "hosts", network namespaces A and B
(named with this process's id) joined by a veth pair like a wire between two
machines, and runs a `tunkit tunnel` process on each (UDP, as two machines
would: a process per host), which makes a TUN device there and carries the
overlay network between them. Then it pings B from A across the tunnel
(IPv4 and IPv6) and sends TCP from A to B for a few seconds, with live
counters, ending with a table of round-trip times, throughput, packets and
bytes each way, drops and errors. Everything it made is removed on exit,
Ctrl-C and SIGTERM.

With --local: the one-process demo instead, a TUN device in each namespace
joined by a Point2Point in this process. Without root or /dev/net/tun (or
with --memory): the in-memory demo, two pipes joined by a Point2Point,
every packet checked byte for byte on arrival.

examples:
  sudo tunkit demo
  sudo tunkit demo --seconds 5
  sudo tunkit demo --local --no-offload
  tunkit demo --memory --packets 100000 --batch 128
"""

def add_parser(sub: Any) -> None:
    """Add ``demo`` to the subcommands *sub* (``argparse``'s subparsers action)."""
    demo = sub.add_parser(
        "demo",
        help="show packets crossing tunkit, checked on arrival",
        description=DEMO_HELP,
        formatter_class=HelpFormatter,
    )
    demo.add_argument("--memory", action="store_true", help="run the in-memory demo only")
    demo.add_argument("--local", action="store_true",
                      help="join the two devices in this process instead of a tunnel")
    demo.add_argument("--seconds", type=positive, default=3, metavar="S",
                      help="seconds of TCP in the real demo")
    demo.add_argument("--no-offload", action="store_true",
                      help="--local: devices without offload")
    demo.add_argument("--packets", type=positive, default=20000, metavar="N",
                      help="packets each way in the in-memory demo")
    demo.add_argument("--batch", type=positive, default=32, metavar="N",
                      help="pipe batch size in the in-memory demo")


def _results_table(title: str, results: Sequence[DirectionResult]) -> Table:
    table = Table(title=title, caption="A writes one packet per call (TunIO), B whole "
                  "batches; each direction is timed from its first write to its last arrival")
    table.add_column("direction")
    for name in ("packets", "bytes", "seconds", "packets/s", "errors"):
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(
            r.label,
            f"{r.received:,}",
            f"{r.bytes:,}",
            f"{r.seconds:.3f}",
            f"{r.packets_per_second:,.0f}",
            str(r.errors),
        )
    return table


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``tunkit demo`` with parsed *args*; return the exit status."""
    if not args.memory:
        try:
            require("the real-device demo")
        except UsageError as exc:
            console.print(
                f"[yellow]{exc}[/yellow]: showing the in-memory demo. "
                "To see the real one, on Linux: sudo tunkit demo"
            )
        else:
            if args.local:
                return _native_demo(args, console)
            return _tunnel_demo(args, console)
    return _memory_demo(args, console)


def _ping_table(title: str, pings: Sequence[PingResult], console: Console) -> None:
    rtt = Table(title=title)
    for name in ("", "sent", "received", "min ms", "avg ms", "max ms"):
        rtt.add_column(name, justify="right" if name else "left")
    for p in pings:
        rtt.add_row(p.family, str(p.sent), str(p.received), f"{p.rtt_min:.3f}",
                    f"{p.rtt_avg:.3f}", f"{p.rtt_max:.3f}")
    console.print(rtt)
    for p in pings:  # below the table, where a long message can wrap
        if p.error:
            console.print(f"[red]{p.family} ping error:[/red] {escape(p.error)}")


def _tcp_line(result: TrafficResult) -> str:
    return (f"TCP A → B: {result.tcp_bytes / 1e6:,.1f} MB in {result.tcp_seconds:.1f} s = "
            f"[bold]{result.gbit_s:.2f} Gbit/s[/bold]"
            + (f"  [red]error: {escape(result.tcp_error)}[/red]" if result.tcp_error else ""))


@contextmanager
def _live(console: Console) -> Iterator[tuple[Callable[[str], None],
                                              Callable[[int, int, int, int], None]]]:
    """A live line while a real demo runs: what it does now, and the packets each way.

    Yields ``status(text)`` and ``show(a_packets, a_bytes, b_packets, b_bytes)``.
    """
    with Progress(
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[counters]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", counters="")

        def status(text: str) -> None:
            progress.update(task, description=text)

        def show(a_packets: int, a_bytes: int, b_packets: int, b_bytes: int) -> None:
            progress.update(task, counters=f"A→B {a_packets:,} pkts {a_bytes / 1e6:,.1f} MB   "
                                           f"B→A {b_packets:,} pkts {b_bytes / 1e6:,.1f} MB")

        yield status, show


def _tunnel_demo(args: argparse.Namespace, console: Console) -> int:
    from .demo_tunnel import run_tunnel_demo
    from .hosts import Counters

    with _live(console) as (status, show):

        def tick(a: Counters | None, b: Counters | None) -> None:
            if a is not None and b is not None:
                show(a.sent, a.sent_bytes, b.sent, b.sent_bytes)

        result = run_tunnel_demo(seconds=args.seconds, status=status, tick=tick)
    _ping_table("ping across the tunnel (host A to B)", result.pings, console)
    flows = Table(title="tunkit tunnel demo (udp, a process per host)",
                  caption="sent: what one end's tunnel sent to its peer; received: what "
                  "the other end's got; dropped: packets the tunnel ends dropped")
    for name in ("direction", "sent", "received", "bytes", "dropped"):
        flows.add_column(name, justify="left" if name == "direction" else "right")
    if result.a is not None and result.b is not None:
        for label, src, dst in (("A → B", result.a, result.b), ("B → A", result.b, result.a)):
            flows.add_row(label, f"{src.sent:,}", f"{dst.received:,}", f"{src.sent_bytes:,}",
                          f"{src.dropped:,}")
    console.print(flows)
    for problem in result.problems:
        console.print(f"[red]error:[/red] {escape(problem)}")
    console.print(_tcp_line(result))
    console.print(f"errors: {result.errors}")
    return 1 if result.errors else 0


def _native_demo(args: argparse.Namespace, console: Console) -> int:
    from .._linux.device import NativeTun
    from .demo_native import forwarder_errors, run_native_demo

    with _live(console) as (status, show):

        def tick(a: NativeTun, b: NativeTun) -> None:
            sa, sb = a.stats(), b.stats()
            show(sa.packets_read, sa.bytes_read, sb.packets_read, sb.bytes_read)

        result = run_native_demo(
            seconds=args.seconds, offload=not args.no_offload, status=status, tick=tick
        )
    _ping_table("ping across tunkit (from namespace A to B)", result.pings, console)
    flows = Table(title=f"tunkit real-device demo (offload {'on' if result.offload else 'off'})")
    for name in ("direction", "packets", "bytes", "super-packets", "dropped", "errors"):
        flows.add_column(name, justify="left" if name == "direction" else "right")
    directions = (("A → B", result.a_stats, result.b_stats, result.a2b),
                  ("B → A", result.b_stats, result.a_stats, result.b2a))
    for label, src, dst, fwd in directions:
        if src is None or dst is None:
            continue
        dropped = src.dropped_malformed + src.dropped_too_big + dst.dropped_write + fwd.dropped
        supers = src.gso_read + src.gso_split  # passed through whole, or split on read
        flows.add_row(label, f"{src.packets_read:,}", f"{src.bytes_read:,}", f"{supers:,}",
                      str(dropped), str(forwarder_errors(fwd)))
    console.print(flows)
    for label, _, _, fwd in directions:
        if forwarder_errors(fwd) or fwd.dropped:
            console.print(
                f"[red]error: forwarder {label}: read errors {fwd.read_errors}, write errors "
                f"{fwd.write_errors}, packets dropped {fwd.dropped}"
                + (f"; last: {fwd.last_error}" if fwd.last_error else "") + "[/red]",
                highlight=False,
            )
    console.print(_tcp_line(result))
    console.print(f"errors: {result.errors}")
    return 1 if result.errors else 0


def _memory_demo(args: argparse.Namespace, console: Console) -> int:
    with Progress(
        TextColumn("[bold]in-memory demo"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} packets"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("demo", total=2 * args.packets)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        results = run_memory_demo(args.packets, args.batch, update)
    console.print(_results_table("tunkit in-memory demo: pipe → Point2Point → pipe", results))
    problems = [p for r in results for p in r.problems]
    for problem in problems:
        console.print(f"[red]error:[/red] {escape(problem)}")
    errors = sum(r.errors for r in results)
    return 1 if errors else 0

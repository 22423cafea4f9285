"""``tunkit bench`` and ``tunkit bench tunnel``: the pair-load and tunnel-load benchmarks.

Each as a command: progress while it runs, then a table, JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .._offload import speedups_enabled
from . import children
from .pair_load import OFFLOAD_SETUPS, VIAS, BenchResult, all_setups, ratios, run_pair_load
from .preflight import HelpFormatter, UsageError, positive, positive_float
from .tunnel_load import TUNNEL_SETUPS, run_tunnel_load, tunnel_ratios

__all__ = ["BENCH_HELP", "add_parser", "run"]

BENCH_HELP = """\
Measure bulk TCP (iperf3) between two network namespaces, through tunkit and
beside two baselines measured in the same run:

  tunkit            NativeTuns with offload, super-packets passed through whole
  tunkit-split      the same with passthrough off: split on read, coalesced
                    on write
  tunkit-nooffload  NativeTuns without offload: one packet per system call
  veth              a veth pair: the kernel alone, the ceiling
  naive             a bare read/write loop per packet, no offload, run as a
                    program of its own: the floor

and with --queues N also, each after its twin:

  tunkit-mq         tunkit on multi-queue devices, joined by N worker
                    processes, each owning one queue of each device (copy)
  tunkit-split-mq   the same with passthrough off: where more cores pay

Prints Gbit/s, the ratios to naive and veth, retransmits, the CPU that each
process moving the packets used (% of one core: this process, the naive
program, or each worker), and the offload counters of the setups with
offload. Needs root, /dev/net/tun, ip (iproute2) and iperf3. Namespaces
carry this process's id and are removed.

`tunkit bench tunnel` measures a tunnel between two hosts instead (see
`tunkit bench tunnel --help`).

examples:
  sudo tunkit bench
  sudo tunkit bench --seconds 5 --streams 4 --via p2p
  sudo tunkit bench --streams 4 --queues 2
  sudo tunkit bench --no-offload --json out.json --plot out.png
  sudo tunkit bench tunnel
"""

TUNNEL_HELP = """\
Measure bulk TCP (iperf3) across a tunnel between two "hosts": two network
namespaces joined by a veth pair (the underlay, MTU 1500), a tunnel across
it, iperf3 from one host to the other through the tunnel. In one run:

  tunkit-udp  a `tunkit tunnel --transport udp` process per host: IP-in-UDP
              with UDP GSO/GRO, the device's super-packets kept whole
  tunkit-tcp  the same over TCP (StreamTun, device MTU 9000)
  tunkit-tls  the same inside TLS, certificates on both sides (throwaway
              ones made for the run: needs the cryptography package)
  vxlan       the kernel's own UDP tunnel over the same underlay: the ceiling
  underlay    the veth alone
  naive-udp   the tunnel a Python user writes first, a program per host:
              os.read + sendto per packet one way, recvfrom + os.write back

Prints Gbit/s, the ratios to naive-udp and vxlan, retransmits and the CPU
each tunnel process used (% of one core). Needs root, /dev/net/tun, ip
(iproute2) and iperf3. Namespaces carry this process's id and are removed.

examples:
  sudo tunkit bench tunnel
  sudo tunkit bench tunnel --seconds 5 --streams 4 --json tunnel.json
"""


# Below the figures, in words that wrap at any width.
_CPU_NOTE = ("% core: CPU time of each process moving the packets while iperf3 ran, as a share "
             "of one core (this one, the naive program, or each worker); {cores} core(s) here, "
             "shared with iperf3.")


_TUNNEL_CPU_NOTE = ("% core: CPU time of each tunnel process (host A's, then B's) while "
                    "iperf3 ran, as a share of one core; {cores} core(s) here, shared with "
                    "iperf3. vxlan and underlay are the kernel alone.")


def add_parser(sub: Any) -> None:
    """Add ``bench`` (and ``bench tunnel``) to the subcommands *sub* (argparse's subparsers)."""
    bench = sub.add_parser(
        "bench",
        help="measure TCP between two namespaces through tunkit, veth and a naive loop",
        description=BENCH_HELP,
        formatter_class=HelpFormatter,
    )
    _common_options(bench)
    bench.add_argument("--via", choices=VIAS, default="copy", help="how tunkit joins the devices")
    bench.add_argument("--no-offload", action="store_true", help="skip the offload setups")
    bench.add_argument("--queues", type=positive, metavar="N",
                       help="also run tunkit-mq and tunkit-split-mq with N worker processes")
    what = bench.add_subparsers(dest="bench", metavar="{tunnel}")
    tunnel = what.add_parser(
        "tunnel", help="measure TCP across a tunnel between two hosts",
        description=TUNNEL_HELP, formatter_class=HelpFormatter,
    )
    _common_options(tunnel)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=positive_float, default=10.0, metavar="S",
                        help="seconds of TCP per setup")
    parser.add_argument("--streams", type=positive, default=1, metavar="N",
                        help="parallel TCP streams")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw a bar chart (needs matplotlib)")


def _check_plot_support() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib: pip install 'tunkit[plot]' (or pip install matplotlib)"
        ) from None


def _plot(results: list[BenchResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    values = [r.gbit_s for r in results]
    colours = ["#2b6cb0" if n.startswith("tunkit") else "#a0aec0" for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    bars = ax.barh(names[::-1], values[::-1], color=colours[::-1])
    for bar, value in zip(bars, values[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.2f}",
                va="center", fontsize=10)
    ax.set_xlabel("Gbit/s (iperf3, receiver side)")
    ax.set_title(title)
    ax.set_xlim(0, max([*values, 0.1]) * 1.15)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _measure(args: argparse.Namespace, setups: tuple[str, ...], console: Console,
             measure: Callable[[Callable[[str], None]], list[BenchResult]],
             ) -> list[BenchResult]:
    """Run *measure* (given the start-of-setup callback) on a worker thread, showing progress.

    Ctrl-C or SIGTERM ends it early.
    """
    total = len(setups) * args.seconds
    results: list[BenchResult] = []
    failure: list[BaseException] = []
    current: list[tuple[str, float, int]] = [("starting", time.monotonic(), 0)]
    finished = threading.Event()

    def on_start(name: str) -> None:
        current[0] = (name, time.monotonic(), setups.index(name))

    def work() -> None:
        try:
            results.extend(measure(on_start))
        except BaseException as exc:
            failure.append(exc)
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="tunkit-bench:worker")
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task("starting", total=total)
        worker.start()
        try:
            # Event.wait, not Thread.join: on Python 3.11 a join interrupted by
            # Ctrl-C can mark a running thread as finished.
            while not finished.wait(0.2):
                name, since, index = current[0]
                elapsed = min(time.monotonic() - since, args.seconds)
                progress.update(task, description=name, completed=index * args.seconds + elapsed)
        except KeyboardInterrupt:
            console.print("tunkit: interrupted, cleaning up")
            children.end_all()  # ends iperf3 and the rest: the worker unwinds at once
            finished.wait()
            raise
        finally:
            worker.join()
    if failure:
        raise failure[0]
    return results


def _figures(title: str, results: list[BenchResult], by_ratio: dict[str, dict[str, float]],
             bases: tuple[str, str]) -> Table:
    """Gbit/s, the ratios to *bases*, retransmits and CPU per process: fits 80 columns."""
    figures = Table(title=title)
    for col in ("setup", "Gbit/s", *(f"x {b}" for b in bases), "retrans", "% core"):
        figures.add_column(col, justify="left" if col == "setup" else "right")
    for r in results:
        rr = by_ratio.get(r.name, {})
        figures.add_row(
            r.name, "-" if r.error else f"{r.gbit_s:.2f}",
            *(f"{rr[b]:.2f}" if b in rr else "-" for b in bases),
            "-" if r.error else f"{r.retransmits:,}",
            # one figure per process, space apart: many workers wrap, never cut
            " ".join(f"{p.share:.0%}".removesuffix("%") for p in r.cpu) or "-",
        )
    return figures


def _tables(results: list[BenchResult], by_ratio: dict[str, dict[str, float]],
            args: argparse.Namespace) -> list[Table]:
    """The figures, and the offload counters of the setups that have offload.

    Two narrow tables rather than one wide one: both read whole in 80 columns.
    """
    figures = _figures(f"pair-load: {args.streams} TCP stream(s), {args.seconds:g} s each, "
                       f"via {args.via}", results, by_ratio, ("naive", "veth"))
    offload = Table(title="offload counters, both devices")
    for col in ("setup", "gso whole", "gso split", "gro coalesced"):
        offload.add_column(col, justify="left" if col == "setup" else "right")
    for r in results:
        if r.name in OFFLOAD_SETUPS and r.stats:
            offload.add_row(r.name, *(
                f"{sum(s.get(key, 0) for s in r.stats.values()):,}"
                for key in ("gso_read", "gso_split", "gro_coalesced")
            ))
    return [figures, offload] if offload.row_count else [figures]


def _check_outputs(args: argparse.Namespace) -> None:
    """Found out before minutes of measuring, not after."""
    if args.plot:
        _check_plot_support()
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            folder = os.path.dirname(path)
            raise UsageError(f"{option} {path}: the folder {folder!r} does not exist")


def _report(results: list[BenchResult], by_ratio: dict[str, dict[str, float]],
            args: argparse.Namespace, console: Console, plot_title: str) -> int:
    """The errors, the JSON and the plot of a run; return the exit status."""
    for r in results:  # below the tables, where a long message can wrap
        if r.error:
            console.print(f"[red]{r.name} failed:[/red] {escape(r.error)}")
    console.print(f"offload engine: {'C speedups' if speedups_enabled() else 'pure Python'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": [r.as_json() for r in results], "ratios": by_ratio}, f, indent=2)
        console.print(f"wrote {args.json}")
    if args.plot:
        _plot(results, args.plot, plot_title)
        console.print(f"wrote {args.plot}")
    return 1 if any(r.error for r in results) else 0


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``tunkit bench`` (or ``bench tunnel``) with parsed *args*; return the exit status."""
    _check_outputs(args)
    if getattr(args, "bench", None) == "tunnel":
        return _run_tunnel(args, console)
    if args.queues and args.no_offload:
        raise UsageError("--queues runs tunkit-mq and tunkit-split-mq, which have offload: "
                         "drop --no-offload")
    setups = all_setups(args.queues, offload=not args.no_offload)
    results = _measure(args, setups, console, lambda on_start: run_pair_load(
        args.seconds, args.streams, args.via, setups, on_start, queues=args.queues or 1))
    by_ratio = ratios(results)
    for table in _tables(results, by_ratio, args):
        console.print(table)
    console.print(_CPU_NOTE.format(cores=os.cpu_count() or 1), highlight=False)
    return _report(results, by_ratio, args, console,
                   f"tunkit pair-load, {args.streams} stream(s), via {args.via}")


def _run_tunnel(args: argparse.Namespace, console: Console) -> int:
    results = _measure(args, TUNNEL_SETUPS, console, lambda on_start: run_tunnel_load(
        args.seconds, args.streams, TUNNEL_SETUPS, on_start))
    by_ratio = tunnel_ratios(results)
    console.print(_figures(f"tunnel-load: {args.streams} TCP stream(s), {args.seconds:g} s each",
                           results, by_ratio, ("naive-udp", "vxlan")))
    console.print(_TUNNEL_CPU_NOTE.format(cores=os.cpu_count() or 1), highlight=False)
    return _report(results, by_ratio, args, console,
                   f"tunkit tunnel-load, {args.streams} stream(s)")

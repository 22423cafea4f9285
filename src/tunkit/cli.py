"""The ``tunkit`` command line: ``tunkit demo`` and friends."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._demo_memory import DirectionResult, run_memory_demo

__all__ = ["main"]

_DEMO_HELP = """\
Show tunkit moving packets, checked byte for byte on arrival.

In memory: two pipes joined by a Point2Point; host A talks through TunIO (one
packet per call), host B through batched reads and writes. Needs no root.

example:
  tunkit demo
  tunkit demo --packets 100000 --batch 128
"""


class _UsageError(Exception):
    """A person's mistake: reported in one line, exit status 2."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunkit",
        description="TUN devices for Python: see them work (demo).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="show packets crossing tunkit, checked on arrival",
        description=_DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--packets", type=_positive, default=20000, help="packets each way")
    demo.add_argument("--batch", type=_positive, default=32, help="batch size of the pipes")
    return parser


def _results_table(title: str, results: Sequence[DirectionResult]) -> Table:
    table = Table(title=title)
    table.add_column("direction")
    for name in ("packets", "bytes", "packets/s", "errors"):
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(
            r.label,
            f"{r.received:,}",
            f"{r.bytes:,}",
            f"{r.packets_per_second:,.0f}",
            str(r.errors),
        )
    return table


def _demo(args: argparse.Namespace, console: Console) -> int:
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
        console.print(f"[red]error:[/red] {problem}")
    errors = sum(r.errors for r in results)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with *argv* (default ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "demo":
            return _demo(args, console)
    except _UsageError as exc:
        print(f"tunkit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunkit: interrupted", file=sys.stderr)
        return 130
    return 2

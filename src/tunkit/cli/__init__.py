"""The ``tunkit`` command line: one module per subcommand, and :func:`main`.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args,
console) -> int``. A person's mistake raises :class:`UsageError` anywhere
below: :func:`main` prints its one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from rich.console import Console

from . import bench, bridge, demo, doctor
from .preflight import UsageError

__all__ = ["UsageError", "main"]

_COMMANDS = {"demo": demo, "bench": bench, "bridge": bridge, "doctor": doctor}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunkit",
        description="TUN devices for Python: see them work (demo), measure them (bench), "
        "put them to use (bridge).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS.values():
        module.add_parser(sub)
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with *argv* (default ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    console = Console()
    # SIGTERM unwinds like Ctrl-C, so every namespace and device made is removed.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        status: int = _COMMANDS[args.command].run(args, console)
    except UsageError as exc:
        print(f"tunkit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunkit: interrupted", file=sys.stderr)
        return 130
    return status

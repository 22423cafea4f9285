"""The ``tunkit`` command line: one module per subcommand, and :func:`main`.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args,
console) -> int``. A person's mistake raises :class:`UsageError` anywhere
below: :func:`main` prints its one line and exits with status 2. Programs a
command runs are started through :mod:`.children`, which ends them all on
the way out.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from rich.console import Console

from . import bench, bridge, children, create, demo, doctor
from .preflight import HelpFormatter, UsageError

__all__ = ["UsageError", "main"]

_COMMANDS = {
    "demo": demo,
    "bench": bench,
    "bridge": bridge,
    "create": create,
    "delete": create,
    "doctor": doctor,
}


_DESCRIPTION = """\
TUN devices for Python: see them work (demo), measure them (bench), put them
to use (bridge), make devices for users without root (create, delete), and
ask whether this machine can run them, and how fast (doctor). Each command's
--help explains it, with examples.

examples:
  tunkit demo --memory
  sudo tunkit demo
  tunkit bench --help
  sudo tunkit doctor
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunkit",
        description=_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS.values():
        module.add_parser(sub)
    return parser


class _Terminated(KeyboardInterrupt):
    """A signal such as SIGTERM, raised where the main thread is, as Ctrl-C is."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with *argv* (default ``sys.argv[1:]``); return the exit status.

    A command ended by a signal returns 128 plus its number, as a shell
    reports it: 130 for Ctrl-C (SIGINT), 143 for SIGTERM, after removing
    what it made and ending every process it started.
    """
    args = _parser().parse_args(argv)
    console = Console()
    # SIGTERM unwinds like Ctrl-C, so every namespace and device made is removed.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with children.session():
            status: int = _COMMANDS[args.command].run(args, console)
    except UsageError as exc:
        print(f"tunkit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
        print(f"tunkit: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    return status

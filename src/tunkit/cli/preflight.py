"""What must hold before a command runs: privileges, ``/dev/net/tun``, programs, arguments.

Every check here fails with :class:`UsageError`, whose message is the one
line that ``tunkit`` prints (exit status 2): a person's mistake or a missing
piece of the machine, never a traceback. :class:`HelpFormatter` is how every
``--help`` shows its arguments.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Final

__all__ = [
    "DEVICE_TOOLS",
    "HelpFormatter",
    "UsageError",
    "missing_capabilities",
    "positive",
    "positive_float",
    "require",
]


class UsageError(Exception):
    """A person's mistake, or what the machine lacks: one line, exit status 2."""


# Bits of the capability sets in /proc/self/status, <linux/capability.h>.
_CAP_NET_ADMIN: Final = 12
_CAP_SYS_ADMIN: Final = 21

# The programs the commands that make namespaces run, with the Debian package of each.
DEVICE_TOOLS: Final = (("ip", "iproute2"), ("ping", "iputils-ping"))


def missing_capabilities() -> list[str]:
    """The capabilities that making devices in namespaces needs and this process lacks."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("CapEff:"))
    except (OSError, StopIteration):
        return ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    effective = int(line.split()[1], 16)
    return [
        name
        for name, bit in (("CAP_NET_ADMIN", _CAP_NET_ADMIN), ("CAP_SYS_ADMIN", _CAP_SYS_ADMIN))
        if not effective >> bit & 1
    ]


def require(what: str, tools: tuple[tuple[str, str], ...] = DEVICE_TOOLS) -> None:
    """Check that *what* (``"tunkit bench"``, say) can make devices and run *tools* here.

    *tools* are the programs it will run, each with its Debian package.

    Raises:
        UsageError: one line naming what is missing.
    """
    missing = missing_capabilities()
    if missing:
        raise UsageError(f"{what} needs root ({' and '.join(missing)} missing)")
    if not os.path.exists("/dev/net/tun"):
        raise UsageError(f"{what} needs /dev/net/tun, which is missing (try: modprobe tun)")
    for tool, package in tools:
        if shutil.which(tool) is None:
            raise UsageError(f"{what} needs '{tool}', which is missing (Debian package: {package})")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A description as written (its examples keep their lines), each option with its default.

    ``(default: ...)`` follows the help of an option whose default is a value
    (not ``None``, a flag's ``True``/``False`` or the empty list of a repeatable
    option) and whose help does not say it already.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or default == [] or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)"


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be above 0")
    return value

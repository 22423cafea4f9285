"""Helpers for the command-line tests: run ``tunkit``, watch its children, read its output."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable

TUNKIT = [sys.executable, "-m", "tunkit"]
# What a person sees in an 80-column terminal, or when the output is piped
# (rich then assumes 80 columns; COLUMNS says it outright).
ENV80 = {**os.environ, "COLUMNS": "80"}


def run_tunkit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``tunkit *args`` to its end with 80 columns; return its status and output."""
    return subprocess.run([*TUNKIT, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV80, check=False)


def assert_readable_at_80(out: str) -> None:
    """Every line fits 80 columns and no cell was cut short ("…")."""
    assert "…" not in out, out
    wide = [line for line in out.splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)


def our_namespaces(pid: int) -> list[str]:
    """The named namespaces that process *pid* made (``tk-<pid>-...``)."""
    try:
        names = os.listdir("/var/run/netns")
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(f"tk-{pid}-")]


def _parent_and_cmdline(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as g:
            cmdline = g.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1]), cmdline


def children_of(pid: int) -> dict[int, str]:
    """The processes whose parent is *pid*, with their command lines."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := _parent_and_cmdline(int(name))) and info[0] == pid:
            out[int(name)] = info[1]
    return out


class ChildWatch:
    """Pidfds of every child of a process seen so far: whether each has exited, for certain.

    A pidfd names one process for good, so "exited" cannot be fooled by a reused pid.
    """

    def __init__(self, parent: int) -> None:
        self.parent = parent
        self.pidfds: dict[int, int] = {}
        self.cmdlines: dict[int, str] = {}

    def look(self) -> dict[int, str]:
        """Record the children running now; return them."""
        now = children_of(self.parent)
        for pid, cmdline in now.items():
            if pid in self.pidfds:
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            info = _parent_and_cmdline(pid)  # the same process as the pidfd's, or gone
            if info is None or info[0] != self.parent:
                os.close(fd)
                continue
            self.pidfds[pid], self.cmdlines[pid] = fd, cmdline
        return now

    def wait_for(self, match: Callable[[str], bool], timeout: float = 60) -> None:
        """Watch until a child whose command line *match*es is running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(match(c) for c in self.look().values()):
                return
            time.sleep(0.02)
        raise AssertionError(f"no such child of {self.parent} within {timeout} s")

    def running(self, timeout: float = 0.0) -> dict[int, str]:
        """The children seen that have not exited within *timeout* seconds from now."""
        deadline = time.monotonic() + timeout
        left = dict(self.cmdlines)
        while left:
            poller = select.poll()
            for pid in left:
                poller.register(self.pidfds[pid], select.POLLIN)
            for fd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                left = {p: c for p, c in left.items() if self.pidfds[p] != fd}
            if time.monotonic() >= deadline:
                break
        return left

    def close(self) -> None:
        for fd in self.pidfds.values():
            os.close(fd)
        self.pidfds.clear()

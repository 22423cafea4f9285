"""Two "hosts" joined by a wire, and a ``tunkit tunnel`` process on each.

The demo and the tunnel-load benchmark both need what two machines on a
network would be: here two network namespaces, A and B, joined by a veth
pair (the "underlay"), and in each a ``tunkit tunnel`` process of its own,
the listening end in A, the connecting end in B, carrying an overlay network
between their TUN devices. :func:`two_hosts` makes the namespaces and the
wire; :func:`tunnel_ends` starts the two processes (through
:mod:`.children`: they die with this process) and waits until they carry
packets; :class:`TunnelEnd` follows one process's output: its counter lines
and, once ended, its totals.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._linux.netns import create_netns, delete_netns, unique_netns_name
from . import children

__all__ = ["Counters", "Hosts", "TunnelEnd", "tunnel_ends", "two_hosts"]

# Addresses exist only inside the namespaces made here.
UNDER: Final = ("10.217.0.1", "10.217.0.2")  # the veth wire between the hosts
TUNNEL_PORT: Final = 4790


@dataclass(frozen=True)
class Hosts:
    """Namespaces A and B and their addresses on the wire between them."""

    a: str
    b: str
    under: tuple[str, str] = UNDER


def _ip(*args: str) -> None:
    proc = children.run(["ip", *args], timeout=30)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)


@contextlib.contextmanager
def two_hosts(tag: str, prefix: str) -> Iterator[Hosts]:
    """Namespaces ``<prefix>-<pid>-<tag>-a`` and ``-b`` joined by a veth pair, MTU 1500.

    Both are removed on the way out (the veth goes with them), however it ends.
    """
    names = [unique_netns_name(f"{tag}-{side}", prefix) for side in "ab"]
    made: list[str] = []
    try:
        for name in names:
            create_netns(name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        wires = (f"tkwa{os.getpid()}", f"tkwb{os.getpid()}")
        _ip("link", "add", wires[0], "netns", names[0], "type", "veth", "peer", "name",
            wires[1], "netns", names[1])
        for name, wire, addr in zip(names, wires, UNDER, strict=True):
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", wire)
            _ip("-n", name, "link", "set", wire, "up")
        yield Hosts(names[0], names[1])
    finally:
        for name in made:
            with contextlib.suppress(FileNotFoundError):
                delete_netns(name)


@dataclass(frozen=True)
class Counters:
    """One counter line of ``tunkit tunnel``: packets and bytes to and from its peer."""

    sent: int
    sent_bytes: int
    received: int
    received_bytes: int
    dropped: int
    connections: int


_COUNTERS: Final = re.compile(
    r"to peer: ([\d,]+) packets, ([\d,]+) bytes; from peer: ([\d,]+) packets, "
    r"([\d,]+) bytes; dropped: ([\d,]+); connections: (\d+)"
)


def parse_counters(line: str) -> Counters | None:
    """The counters of a ``tunkit tunnel`` counter line, or None for another line."""
    m = _COUNTERS.search(line)
    if m is None:
        return None
    return Counters(*(int(g.replace(",", "")) for g in m.groups()))


class TunnelEnd:
    """One ``tunkit tunnel`` process; a thread collects its output lines.

    Started through :mod:`.children` (so the kernel ends it if this process
    dies); :meth:`stop` ends it with SIGTERM, as a person would, so that it
    prints its totals, and joins the thread.
    """

    def __init__(self, label: str, argv: Sequence[str]) -> None:
        self.label = label
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = children.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._collect, name=f"tunkit-hosts:{label}")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under us
            for line in self.proc.stdout:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, prefixes: tuple[str, ...], timeout: float) -> None:
        """Wait for a line that starts with one of *prefixes*.

        Raises:
            RuntimeError: the process ended first, or *timeout* seconds passed
                (with its last line, which says why).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(line.startswith(prefixes) for line in self.lines):
                left = deadline - time.monotonic()
                if not self._reader.is_alive() or left <= 0:
                    last = self.lines[-1] if self.lines else "no output"
                    what = "ended" if not self._reader.is_alive() else "did not start in time"
                    raise RuntimeError(f"tunkit tunnel in {self.label} {what}: {last}")
                self._cond.wait(min(left, 0.2))

    def counters(self) -> Counters | None:
        """The last counter line so far (the totals, once it stopped)."""
        with self._cond:
            for line in reversed(self.lines):
                if (found := parse_counters(line)) is not None:
                    return found
        return None

    def stop(self, timeout: float = 10) -> int | None:
        """End it with SIGTERM (by its PID), wait, join the reader; return its exit status.

        None if it had to be killed.
        """
        status: int | None = None
        self.proc.send_signal(signal.SIGTERM)  # only if not yet reaped: never another PID
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join()  # the output ends with the process
        children.end(self.proc)  # forgets it and closes the pipe
        return status


def tunnel_ends(
    hosts: Hosts,
    transport: str,
    over: tuple[str, ...],
    *,
    mtu: int | None = None,
    pki: Path | None = None,
    interval: float = 3600,
    timeout: float = 20,
) -> list[TunnelEnd]:
    """A ``tunkit tunnel`` listening in A and one connecting from B, both carrying packets.

    *over* are the addresses (CIDR) of the two devices, A's first: two, or
    four (A's and B's IPv4, then A's and B's IPv6). *pki* is a folder of
    :func:`.pki.make_pki` files, for ``tls``. The caller ends them with
    :meth:`TunnelEnd.stop` (this function does when one fails to start).
    """
    per_side = [over[0::2], over[1::2]]
    ends: list[TunnelEnd] = []
    try:
        for i, (role, who, host) in enumerate((("--listen", "server", hosts.a),
                                               ("--connect", "client", hosts.b))):
            argv = [sys.executable, "-m", "tunkit", "tunnel", role,
                    f"{hosts.under[0]}:{TUNNEL_PORT}", "--transport", transport,
                    "--netns", host, "--dev", f"tkt{os.getpid()}",
                    "--interval", f"{interval:g}"]
            for cidr in per_side[i]:
                argv += ["--address", cidr]
            if mtu is not None:
                argv += ["--mtu", str(mtu)]
            if transport == "tls":
                assert pki is not None, "tls needs certificates"
                argv += ["--cert", str(pki / f"{who}.pem"), "--key", str(pki / f"{who}.key"),
                         "--ca", str(pki / "ca.pem")]
            end = TunnelEnd("A" if i == 0 else "B", argv)
            ends.append(end)
            if i == 0:  # the listener first, as the command's help says
                end.wait_for(("tunnel:",), timeout)
        for end in ends:
            end.wait_for(("ready:", "connected:"), timeout)
        return ends
    except BaseException:
        for end in ends:
            end.stop()
        raise

"""The tunnel-load benchmark: bulk TCP across an overlay between two "hosts", and its baselines.

Each setup gets two fresh namespaces, A and B, joined by a veth underlay
(MTU 1500, :func:`.hosts.two_hosts`); iperf3 runs from A to B across:

- ``tunkit-udp``: a ``tunkit tunnel --transport udp`` process per host (a
  :class:`tunkit.UdpTun` with UDP GSO/GRO, the device's super-packets whole);
- ``tunkit-tcp``: the same over TCP (:class:`tunkit.StreamTun`, device MTU
  9000, ``tunkit tunnel``'s default over streams);
- ``tunkit-tls``: the same inside TLS with certificates on both sides (a
  throwaway authority made for the run: needs the ``cryptography`` package);
- ``vxlan``: the kernel's own UDP tunnel over the same underlay: the ceiling
  of a UDP tunnel, its super-packets kept whole end to end;
- ``underlay``: the veth alone;
- ``naive-udp``: the tunnel a Python user writes today, a program per host:
  a TUN device without offload, one thread doing ``os.read`` and
  ``sock.sendto`` per packet, one ``recvfrom`` and ``os.write``.

The figures are the receiver's Gbit/s, the sender's retransmits, and the
CPU each tunnel process used meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from . import children
from .hosts import TUNNEL_PORT, UNDER, Hosts, TunnelEnd, tunnel_ends, two_hosts
from .pair_load import BenchResult, iperf, ratios
from .preflight import DEVICE_TOOLS, require

__all__ = ["TUNNEL_SETUPS", "run_tunnel_load", "tunnel_ratios"]

TUNNEL_SETUPS: Final = ("tunkit-udp", "tunkit-tcp", "tunkit-tls", "vxlan", "underlay",
                        "naive-udp")
_OVER: Final = ("10.218.0.1", "10.218.0.2")  # the overlay, inside the namespaces only
_NS_PREFIX: Final = "tk"
# The inner MTU of the UDP tunnels: the underlay's 1500 less IPv4 and UDP headers
# (tunkit-udp's default; naive-udp gets the same).
_UDP_MTU: Final = 1500 - 28

# One host of the naive tunnel, as a person writes it first: a TUN device
# without offload, one thread each way, one system call per packet.
_NAIVE_UDP: Final = """
import os, socket, sys, threading, tunkit
local, peer, addr = sys.argv[1:4]
port, mtu = int(sys.argv[4]), int(sys.argv[5])
dev = tunkit.create_tun(sys.argv[6], mtu=mtu, offload=False)
dev.add_address(addr + "/24"); dev.up()
fd = dev.fileno(); os.set_blocking(fd, True)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sock.bind((local, port))
to = (peer, port)
def out():
    while True:
        sock.sendto(os.read(fd, 65536), to)
def back():
    while True:
        data, _ = sock.recvfrom(65536)
        try:
            os.write(fd, data)
        except OSError:
            pass
threading.Thread(target=back, daemon=True).start()
print("ready", flush=True)
out()
"""


def _ip(ns: str, *args: str) -> None:
    proc = children.run(["ip", "-n", ns, *args], timeout=30)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)


def _vxlan(hosts: Hosts) -> None:
    dev = f"tkvx{os.getpid()}"
    for i, ns in enumerate((hosts.a, hosts.b)):
        _ip(ns, "link", "add", dev, "type", "vxlan", "id", "42", "local", hosts.under[i],
            "remote", hosts.under[1 - i], "dstport", str(TUNNEL_PORT))
        _ip(ns, "addr", "add", f"{_OVER[i]}/24", "dev", dev)
        _ip(ns, "link", "set", dev, "up")


@contextlib.contextmanager
def _naive(hosts: Hosts) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        for i, ns in enumerate((hosts.a, hosts.b)):
            proc = children.start(
                ["ip", "netns", "exec", ns, sys.executable, "-c", _NAIVE_UDP, hosts.under[i],
                 hosts.under[1 - i], _OVER[i], str(TUNNEL_PORT), str(_UDP_MTU),
                 f"tkn{os.getpid()}"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None and proc.stderr is not None
            if proc.stdout.readline().strip() != "ready":
                lines = proc.stderr.read().strip().splitlines()
                raise RuntimeError(f"the naive tunnel did not start: {lines[-1] if lines else '?'}")
        yield procs
    finally:
        for proc in procs:
            children.end(proc)


def _settle(hosts: Hosts) -> None:
    """One ping across the overlay, so that the first second of iperf3 is not ARP and the like."""
    children.run(["ip", "netns", "exec", hosts.a, "ping", "-c", "1", "-W", "2", _OVER[1]],
                 timeout=10)


def _run_setup(name: str, seconds: float, streams: int, pki: Path | None) -> BenchResult:
    result = BenchResult(name, 0.0, streams, seconds)
    with two_hosts(name.removeprefix("tunkit-"), _NS_PREFIX) as hosts:
        if name == "underlay":
            iperf(result, hosts.a, hosts.b, target=hosts.under[1])
            return result
        if name == "vxlan":
            _vxlan(hosts)
            _settle(hosts)
            iperf(result, hosts.a, hosts.b, target=_OVER[1])  # the kernel alone
            return result
        if name == "naive-udp":
            with _naive(hosts) as procs:
                _settle(hosts)
                iperf(result, hosts.a, hosts.b, [("naive A", procs[0].pid),
                                                 ("naive B", procs[1].pid)], target=_OVER[1])
            return result
        transport = name.removeprefix("tunkit-")
        if transport == "tls" and pki is None:
            raise RuntimeError("tunkit-tls needs the cryptography package (for throwaway "
                               "certificates): pip install cryptography")
        ends: list[TunnelEnd] = []
        try:
            ends = tunnel_ends(hosts, transport, tuple(f"{a}/24" for a in _OVER), pki=pki)
            _settle(hosts)
            iperf(result, hosts.a, hosts.b, [(f"tunnel {e.label}", e.pid) for e in ends],
                  target=_OVER[1])
        finally:
            for end in ends:
                end.stop()
        totals = [end.counters() for end in ends]
        result.stats = {end.label: dataclasses.asdict(c)
                        for end, c in zip(ends, totals, strict=True) if c is not None}
    return result


@contextlib.contextmanager
def _certificates(setups: tuple[str, ...]) -> Iterator[Path | None]:
    """A folder of throwaway certificates for tunkit-tls, or None (not asked for, or no package)."""
    if "tunkit-tls" not in setups:
        yield None
        return
    try:
        from .pki import make_pki
    except ImportError:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="tunkit-bench-") as folder:
        make_pki(Path(folder), hosts=(UNDER[0],))  # the listener's address
        yield Path(folder)


def run_tunnel_load(
    seconds: float = 10.0,
    streams: int = 1,
    setups: tuple[str, ...] = TUNNEL_SETUPS,
    on_start: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Run each of *setups* for *seconds* with *streams* TCP streams; return the figures.

    A setup that fails is reported with its error and 0 Gbit/s; the others go on.

    Raises:
        UsageError: no root, no /dev/net/tun, ``ip`` or ``iperf3``.
        ValueError: an unknown setup.
    """
    require("the tunnel benchmark", (*DEVICE_TOOLS, ("iperf3", "iperf3")))
    unknown = [s for s in setups if s not in TUNNEL_SETUPS]
    if unknown:
        raise ValueError(f"unknown setup {unknown[0]!r}; choose from {', '.join(TUNNEL_SETUPS)}")
    children.remove_leftovers(_NS_PREFIX)
    results = []
    with _certificates(setups) as pki:
        for name in setups:
            if on_start is not None:
                on_start(name)
            try:
                results.append(_run_setup(name, seconds, streams, pki))
            except (OSError, RuntimeError, ValueError, KeyError,
                    subprocess.SubprocessError) as exc:
                results.append(BenchResult(name, 0.0, streams, seconds, error=f"{exc}"))
    return results


def tunnel_ratios(results: list[BenchResult]) -> dict[str, dict[str, float]]:
    """Each result's ratio to ``naive-udp`` and to ``vxlan`` (when those ran)."""
    return ratios(results, ("naive-udp", "vxlan"))

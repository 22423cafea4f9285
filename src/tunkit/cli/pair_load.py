"""The pair-load benchmark: bulk TCP between two namespaces, through tunkit and baselines.

Each setup gets two fresh network namespaces, A and B, joined by one of:

- ``tunkit``: a NativeTun in each (offload on), joined in this process,
  super-packets passed through whole;
- ``tunkit-split``: the same with ``passthrough=False``: every super-packet is
  split on read and coalesced again on write;
- ``tunkit-nooffload``: NativeTuns without offload: one packet per system call;
- ``veth``: a veth pair, the kernel alone (the ceiling);
- ``naive``: TUN devices without offload joined by the loop anyone would write
  first, run as its own program (as a person would run it): one blocking read
  and one write per packet, a thread each way.

iperf3 runs in the namespaces (server in B, client in A) for the given seconds
and streams; the result is the receiver's Gbit/s and the sender's retransmits.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from .._copy import copy
from .._forwarder import Forwarder, Point2Point
from .._linux.device import NativeTun, create_tun
from .._linux.netns import create_netns, delete_netns, unique_netns_name
from .._pool import Pool
from . import children
from .preflight import DEVICE_TOOLS, require

__all__ = ["OFFLOAD_SETUPS", "SETUPS", "VIAS", "BenchResult", "ratios", "run_pair_load"]

SETUPS: Final = ("tunkit", "tunkit-split", "tunkit-nooffload", "veth", "naive")
OFFLOAD_SETUPS: Final = ("tunkit", "tunkit-split")  # the setups whose devices have offload
VIAS: Final = ("copy", "forwarder", "p2p")

# Addresses exist only inside the namespaces made here.
_A_ADDR: Final = "10.214.0.1"
_B_ADDR: Final = "10.214.0.2"
_PREFIX_LEN: Final = 24
_PORT: Final = 5201
_NS_PREFIX: Final = "tk"


@dataclass
class BenchResult:
    """One setup's figures."""

    name: str
    gbit_s: float
    streams: int
    seconds: float
    retransmits: int = 0
    via: str = ""
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# The naive baseline, as a person writes it: a program of its own, one thread
# each way, a blocking read and a write per packet. It is given the two
# devices' descriptors (argv, pass_fds) and runs until it is killed.
_NAIVE: Final = """
import os, sys, threading

def forward(src, dst):
    while True:
        try:
            os.write(dst, os.read(src, 65536))
        except OSError:
            pass  # the kernel refused one packet: a naive loop drops it

a, b = int(sys.argv[1]), int(sys.argv[2])
for fd in (a, b):
    os.set_blocking(fd, True)
threading.Thread(target=forward, args=(b, a), daemon=True).start()
print("ready", flush=True)
forward(a, b)
"""


def _ip(*args: str) -> None:
    proc = children.run(["ip", *args], timeout=30)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)


@contextlib.contextmanager
def _pair(tag: str) -> Iterator[tuple[str, str]]:
    a = unique_netns_name(f"bench-{tag}-a", _NS_PREFIX)
    b = unique_netns_name(f"bench-{tag}-b", _NS_PREFIX)
    made = []
    try:
        for name in (a, b):
            create_netns(name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        yield a, b
    finally:
        for name in made:
            with contextlib.suppress(FileNotFoundError):
                delete_netns(name)


def _tun(ns: str, addr: str, offload: bool) -> NativeTun:
    tun = create_tun(f"tkb{os.getpid()}", 1500, offload=offload, netns=ns)
    try:
        tun.add_address(f"{addr}/{_PREFIX_LEN}")
        tun.up()
    except BaseException:
        tun.close()
        raise
    return tun


def _iperf(ns_a: str, ns_b: str, seconds: float, streams: int) -> tuple[float, int]:
    server = children.start(
        ["ip", "netns", "exec", ns_b, "iperf3", "-s", "-1", "-p", str(_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):  # wait for the server's socket
            probe = children.run(["ip", "netns", "exec", ns_b, "ss", "-Hltn", f"sport = :{_PORT}"],
                                 timeout=10)
            if probe.stdout.strip():
                break
            time.sleep(0.1)
        client = children.run(
            ["ip", "netns", "exec", ns_a, "iperf3", "-c", _B_ADDR, "-p", str(_PORT),
             "-t", f"{seconds:g}", "-P", str(streams), "--json"],
            timeout=seconds + 60,
        )
        report = json.loads(client.stdout)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        end = report["end"]
        return end["sum_received"]["bits_per_second"] / 1e9, int(
            end["sum_sent"].get("retransmits", 0)
        )
    finally:
        children.end(server)


def _join(via: str, a: NativeTun, b: NativeTun, passthrough: bool) -> Callable[[], None]:
    """Join *a* and *b* the way *via* says; return the function that ends it."""
    if via == "copy":
        thread = threading.Thread(
            target=copy, args=(a, b), kwargs={"passthrough": passthrough}, name="tunkit-bench-copy"
        )
        thread.start()

        def stop_copy() -> None:
            a.close()
            thread.join()

        return stop_copy
    if via == "p2p":
        p2p = Point2Point(Pool(), passthrough=passthrough)
        p2p.set_a(a)
        p2p.set_b(b)
        return p2p.stop
    a2b = Forwarder(Pool(), passthrough=passthrough)
    b2a = Forwarder(Pool(), passthrough=passthrough)
    a2b.set_read_tun(a)
    a2b.set_write_tun(b)
    b2a.set_read_tun(b)
    b2a.set_write_tun(a)

    def stop_forwarders() -> None:
        a2b.stop()
        b2a.stop()

    return stop_forwarders


def _run_naive(result: BenchResult, ns_a: str, ns_b: str, a: NativeTun, b: NativeTun) -> None:
    fds = (a.fileno(), b.fileno())
    loop = children.start([sys.executable, "-c", _NAIVE, *map(str, fds)], pass_fds=fds,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert loop.stdout is not None and loop.stderr is not None
        if loop.stdout.readline().strip() != "ready":
            lines = loop.stderr.read().strip().splitlines()
            raise RuntimeError(f"the naive loop did not start: {lines[-1] if lines else '?'}")
        result.gbit_s, result.retransmits = _iperf(ns_a, ns_b, result.seconds, result.streams)
    finally:
        children.end(loop)
        for fd in fds:  # the loop made the descriptions blocking; the devices expect otherwise
            os.set_blocking(fd, False)


def _run_setup(name: str, via: str, seconds: float, streams: int) -> BenchResult:
    result = BenchResult(name, 0.0, streams, seconds, via=via if name.startswith("tunkit") else "")
    with _pair(name) as (ns_a, ns_b):
        if name == "veth":
            va, vb = f"tkva{os.getpid()}", f"tkvb{os.getpid()}"
            _ip("link", "add", va, "netns", ns_a, "type", "veth", "peer", "name", vb,
                "netns", ns_b)
            for ns, dev, addr in ((ns_a, va, _A_ADDR), (ns_b, vb, _B_ADDR)):
                _ip("-n", ns, "addr", "add", f"{addr}/{_PREFIX_LEN}", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            result.gbit_s, result.retransmits = _iperf(ns_a, ns_b, seconds, streams)
            return result
        offload = name in ("tunkit", "tunkit-split")
        with _tun(ns_a, _A_ADDR, offload) as a, _tun(ns_b, _B_ADDR, offload) as b:
            if name == "naive":
                _run_naive(result, ns_a, ns_b, a, b)
                return result
            end = _join(via, a, b, passthrough=name != "tunkit-split")
            try:
                result.gbit_s, result.retransmits = _iperf(ns_a, ns_b, seconds, streams)
            finally:
                result.stats = {"a": asdict(a.stats()), "b": asdict(b.stats())}
                end()
    return result


def run_pair_load(
    seconds: float = 10.0,
    streams: int = 1,
    via: str = "copy",
    setups: tuple[str, ...] = SETUPS,
    on_start: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Run each of *setups* for *seconds* with *streams* TCP streams; return the figures.

    A setup that fails is reported with its error and 0 Gbit/s; the others go on.

    Raises:
        UsageError: no root, no /dev/net/tun, ``ip`` or ``iperf3``.
        ValueError: an unknown setup or *via*.
    """
    require("the benchmark", (*DEVICE_TOOLS, ("iperf3", "iperf3")))
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        raise ValueError(f"unknown setup {unknown[0]!r}; choose from {', '.join(SETUPS)}")
    if via not in VIAS:
        raise ValueError(f"unknown via {via!r}; choose from {', '.join(VIAS)}")
    children.remove_leftovers(_NS_PREFIX)
    results = []
    for name in setups:
        if on_start is not None:
            on_start(name)
        try:
            results.append(_run_setup(name, via, seconds, streams))
        except (OSError, RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            results.append(BenchResult(name, 0.0, streams, seconds, error=f"{exc}"))
    return results


def ratios(results: list[BenchResult]) -> dict[str, dict[str, float]]:
    """Each result's ratio to ``naive`` and to ``veth`` (when those ran)."""
    by_name = {r.name: r.gbit_s for r in results}
    out: dict[str, dict[str, float]] = {}
    for r in results:
        out[r.name] = {
            base: r.gbit_s / by_name[base]
            for base in ("naive", "veth")
            if by_name.get(base)
        }
    return out

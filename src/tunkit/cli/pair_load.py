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
  and one write per packet, a thread each way;
- ``tunkit-mq``, ``tunkit-split-mq`` (asked for with *queues*): ``tunkit`` and
  ``tunkit-split`` on multi-queue devices, joined by *queues* worker processes
  (:class:`tunkit.workers.QueueWorkers`), each owning one queue of each
  device and joining them with :func:`tunkit.copy`: one core each.

iperf3 runs in the namespaces (server in B, client in A) for the given seconds
and streams; the result is the receiver's Gbit/s and the sender's retransmits,
and the CPU time each process that moves the packets used meanwhile: this
process for the tunkit setups joined here, the naive program, each worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from .._copy import copy
from .._forwarder import Forwarder, Point2Point
from .._linux.device import NativeTun, create_tun
from .._linux.netns import create_netns, delete_netns, unique_netns_name
from .._linux.queues import QueueReport, QueueWorkers, cpu_seconds
from .._pool import Pool
from . import children
from .preflight import DEVICE_TOOLS, require

__all__ = ["MQ_SETUPS", "OFFLOAD_SETUPS", "SETUPS", "VIAS", "BenchResult", "ProcessCpu",
           "all_setups", "iperf", "ratios", "run_pair_load"]

SETUPS: Final = ("tunkit", "tunkit-split", "tunkit-nooffload", "veth", "naive")
MQ_SETUPS: Final = ("tunkit-mq", "tunkit-split-mq")  # with queues: worker processes
# The setups whose devices have offload.
OFFLOAD_SETUPS: Final = ("tunkit", "tunkit-split", *MQ_SETUPS)
# aio: tunkit.aio.copy on an event loop (asyncio's own, uvloop, trio) on one thread.
VIAS: Final = ("copy", "forwarder", "p2p", "aio", "aio-uvloop", "aio-trio")

# Addresses exist only inside the namespaces made here.
_A_ADDR: Final = "10.214.0.1"
_B_ADDR: Final = "10.214.0.2"
_PREFIX_LEN: Final = 24
_PORT: Final = 5201
_NS_PREFIX: Final = "tk"


@dataclass
class ProcessCpu:
    """The CPU time one process used while iperf3 ran: *seconds*, and *share* of one core."""

    process: str  # "benchmark" (this one), "naive", "worker 0", ...
    pid: int
    seconds: float
    share: float


@dataclass
class BenchResult:
    """One setup's figures.

    *cpu* lists the processes that move the packets (none for ``veth``: the
    kernel alone). *queue_packets* is what each worker moved, both ways (the
    ``-mq`` setups).
    """

    name: str
    gbit_s: float
    streams: int
    seconds: float
    retransmits: int = 0
    via: str = ""
    queues: int = 1
    cpu: list[ProcessCpu] = field(default_factory=list)
    queue_packets: list[int] = field(default_factory=list)
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


def _tun(ns: str, addr: str, offload: bool, multi_queue: bool = False) -> NativeTun:
    tun = create_tun(f"tkb{os.getpid()}", 1500, offload=offload, netns=ns,
                     multi_queue=multi_queue)
    try:
        tun.add_address(f"{addr}/{_PREFIX_LEN}")
        tun.up()
    except BaseException:
        tun.close()
        raise
    return tun


def iperf(result: BenchResult, ns_a: str, ns_b: str,
          processes: Sequence[tuple[str, int]] = (), target: str = _B_ADDR) -> None:
    """Run iperf3 from A to *target* in B; set *result*'s figures and the CPU of *processes*.

    *processes* are (label, pid) pairs: the programs that move the packets.
    """
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
        before = [cpu_seconds(pid) for _, pid in processes]
        started = time.monotonic()
        client = children.run(
            ["ip", "netns", "exec", ns_a, "iperf3", "-c", target, "-p", str(_PORT),
             "-t", f"{result.seconds:g}", "-P", str(result.streams), "--json"],
            timeout=result.seconds + 60,
        )
        wall = time.monotonic() - started
        for (label, pid), was in zip(processes, before, strict=True):
            used = cpu_seconds(pid) - was
            result.cpu.append(ProcessCpu(label, pid, round(used, 3), round(used / wall, 3)))
        report = json.loads(client.stdout)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        end = report["end"]
        result.gbit_s = end["sum_received"]["bits_per_second"] / 1e9
        result.retransmits = int(end["sum_sent"].get("retransmits", 0))
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
    if via.startswith("aio"):
        return _join_aio(via, a, b, passthrough)
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


def _join_aio(via: str, a: NativeTun, b: NativeTun, passthrough: bool) -> Callable[[], None]:
    """``tunkit.aio.copy`` of the two devices, wrapped, on an event loop of its own thread."""
    import anyio.from_thread

    import tunkit.aio as aio

    if via == "aio-trio":
        portal_cm = anyio.from_thread.start_blocking_portal("trio")
    else:
        options = {"use_uvloop": via == "aio-uvloop"}
        portal_cm = anyio.from_thread.start_blocking_portal("asyncio", options)
    portal = portal_cm.__enter__()
    wa, wb = aio.wrap(a), aio.wrap(b)
    done = portal.start_task_soon(lambda: aio.copy(wa, wb, passthrough=passthrough))

    def stop_aio() -> None:
        try:
            portal.call(wa.aclose)
            done.result()
        finally:
            portal_cm.__exit__(None, None, None)

    return stop_aio


def _run_naive(result: BenchResult, ns_a: str, ns_b: str, a: NativeTun, b: NativeTun) -> None:
    fds = (a.fileno(), b.fileno())
    loop = children.start([sys.executable, "-c", _NAIVE, *map(str, fds)], pass_fds=fds,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert loop.stdout is not None and loop.stderr is not None
        if loop.stdout.readline().strip() != "ready":
            lines = loop.stderr.read().strip().splitlines()
            raise RuntimeError(f"the naive loop did not start: {lines[-1] if lines else '?'}")
        iperf(result, ns_a, ns_b, [("naive", loop.pid)])
    finally:
        children.end(loop)
        for fd in fds:  # the loop made the descriptions blocking; the devices expect otherwise
            os.set_blocking(fd, False)


def _sum_stats(reports: list[QueueReport]) -> dict[str, dict[str, int]]:
    """The counters of every worker's queues, added up per device."""
    out: dict[str, dict[str, int]] = {"a": {}, "b": {}}
    for report in reports:
        for side, stats in (("a", report.a), ("b", report.b)):
            for key, value in asdict(stats).items():
                out[side][key] = out[side].get(key, 0) + value
    return out


def _run_workers(result: BenchResult, ns_a: str, ns_b: str, a: NativeTun, b: NativeTun) -> None:
    """Join *a* and *b* by ``result.queues`` worker processes, one queue of each per worker."""
    with QueueWorkers(a, b, passthrough=result.name != "tunkit-split-mq") as workers:
        workers.start(result.queues)
        iperf(result, ns_a, ns_b, [(f"worker {i}", w.pid) for i, w in enumerate(workers.workers)])
        reports = workers.close()  # the last reports: every packet counted
    if len(reports) != result.queues:
        raise RuntimeError(f"{result.queues - len(reports)} of {result.queues} workers "
                           "gave no last report")
    result.stats = _sum_stats(reports)
    result.queue_packets = [r.packets for r in reports]
    errors = [f"worker {r.pid}: {r.error}" for r in reports if r.error]
    if errors:
        raise RuntimeError("; ".join(errors))


def _run_setup(name: str, via: str, seconds: float, streams: int, queues: int) -> BenchResult:
    result = BenchResult(name, 0.0, streams, seconds, via=via if name.startswith("tunkit") else "")
    with _pair(name) as (ns_a, ns_b):
        if name == "veth":
            va, vb = f"tkva{os.getpid()}", f"tkvb{os.getpid()}"
            _ip("link", "add", va, "netns", ns_a, "type", "veth", "peer", "name", vb,
                "netns", ns_b)
            for ns, dev, addr in ((ns_a, va, _A_ADDR), (ns_b, vb, _B_ADDR)):
                _ip("-n", ns, "addr", "add", f"{addr}/{_PREFIX_LEN}", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            iperf(result, ns_a, ns_b)  # the kernel alone: no process of ours to measure
            return result
        offload = name in OFFLOAD_SETUPS
        multi_queue = name in MQ_SETUPS
        with (_tun(ns_a, _A_ADDR, offload, multi_queue) as a,
              _tun(ns_b, _B_ADDR, offload, multi_queue) as b):
            if name == "naive":
                _run_naive(result, ns_a, ns_b, a, b)
                return result
            if multi_queue:
                result.via, result.queues = "copy", queues  # each worker runs copy()
                _run_workers(result, ns_a, ns_b, a, b)
                return result
            end = _join(via, a, b, passthrough=name != "tunkit-split")
            try:
                iperf(result, ns_a, ns_b, [("benchmark", os.getpid())])
            finally:
                result.stats = {"a": asdict(a.stats()), "b": asdict(b.stats())}
                end()
    return result


def all_setups(queues: int | None = None, offload: bool = True) -> tuple[str, ...]:
    """The setups one run measures: each ``-mq`` one (with *queues*) after its single twin."""
    out: list[str] = []
    for name in SETUPS:
        if offload or name not in OFFLOAD_SETUPS:
            out.append(name)
        if queues and offload and f"{name}-mq" in MQ_SETUPS:
            out.append(f"{name}-mq")
    return tuple(out)


def run_pair_load(
    seconds: float = 10.0,
    streams: int = 1,
    via: str = "copy",
    setups: tuple[str, ...] = SETUPS,
    on_start: Callable[[str], None] | None = None,
    queues: int = 2,
) -> list[BenchResult]:
    """Run each of *setups* for *seconds* with *streams* TCP streams; return the figures.

    The ``-mq`` setups (:data:`MQ_SETUPS`) run *queues* worker processes. A
    setup that fails is reported with its error and 0 Gbit/s; the others go on.

    Raises:
        UsageError: no root, no /dev/net/tun, ``ip`` or ``iperf3``.
        ValueError: an unknown setup or *via*, or *queues* below 1.
    """
    require("the benchmark", (*DEVICE_TOOLS, ("iperf3", "iperf3")))
    known = (*SETUPS, *MQ_SETUPS)
    unknown = [s for s in setups if s not in known]
    if unknown:
        raise ValueError(f"unknown setup {unknown[0]!r}; choose from {', '.join(known)}")
    if via not in VIAS:
        raise ValueError(f"unknown via {via!r}; choose from {', '.join(VIAS)}")
    if queues < 1:
        raise ValueError(f"queues {queues} must be at least 1")
    children.remove_leftovers(_NS_PREFIX)
    results = []
    for name in setups:
        if on_start is not None:
            on_start(name)
        try:
            results.append(_run_setup(name, via, seconds, streams, queues))
        except (OSError, RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            results.append(BenchResult(name, 0.0, streams, seconds, error=f"{exc}",
                                       queues=queues if name in MQ_SETUPS else 1))
    return results


def ratios(results: list[BenchResult],
           bases: tuple[str, ...] = ("naive", "veth")) -> dict[str, dict[str, float]]:
    """Each result's ratio to each of *bases* that ran (``naive`` and ``veth``)."""
    by_name = {r.name: r.gbit_s for r in results}
    return {r.name: {base: r.gbit_s / by_name[base] for base in bases if by_name.get(base)}
            for r in results}

"""Multi-queue: 4 TCP streams through one worker process, and through one per queue.

    sudo python benchmarks/multiqueue.py [--seconds 10] [--queues 2] [--streams 4] [--json FILE]

One run measures, between two fresh namespaces each time, iperf3 -P STREAMS through:

- ``tunkit``: two devices joined by ``tunkit.copy`` in one worker process
  (offload on, super-packets passed through whole);
- ``tunkit-split``: the same with ``passthrough=False`` (every super-packet
  split on read and coalesced on write: the per-packet path, where Python is
  the bottleneck and where a VPN that handles each packet lives);
- ``tunkit-mq`` / ``tunkit-split-mq``: the same two with multi-queue devices
  and QUEUES worker processes, each joining one queue of each device.

Each figure comes with the CPU each process used over the run, as a share
of one core (``/proc/PID/stat``: user + system time): the workers and the
two iperf3 processes, and "per core", the Gbit/s per core the workers used.
The machine's cores are shared by all of them (and by whatever else runs),
so a figure says what the workers got; "per core" staying the same from one
worker to N says the figure grows with the cores there are. Needs root,
/dev/net/tun, iproute2 and iperf3. The same code serves ``tunkit bench``:
``tunkit.workers.QueueWorkers``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tunkit._linux.device import NativeTun, create_tun
from tunkit._linux.netns import remove_stale_netns
from tunkit.cli.pair_load import _pair  # two fresh namespaces, lo up, deleted after
from tunkit.workers import QueueWorkers, cpu_seconds

SETUPS = ("tunkit", "tunkit-split", "tunkit-mq", "tunkit-split-mq")
A_ADDR, B_ADDR = "10.215.0.1", "10.215.0.2"
PORT = 5202
GOALS = (  # (setup, baseline, at least): from the issue
    ("tunkit-split-mq", "tunkit-split", 1.4),
    ("tunkit-mq", "tunkit", 0.95),
)


@dataclass
class Result:
    name: str
    gbit_s: float = 0.0
    streams: int = 0
    seconds: float = 0.0
    queues: int = 1
    retransmits: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> share of one core
    queue_packets: list[int] = field(default_factory=list)  # per worker
    error: str = ""

    def per_core(self) -> float:
        """Gbit/s per core the workers used: equal across setups means linear scaling."""
        used = sum(v for k, v in self.cpu.items() if k.startswith("worker"))
        return self.gbit_s / used if used else 0.0


def _device(ns: str, addr: str, multi_queue: bool) -> NativeTun:
    tun = create_tun(f"tkm{os.getpid()}", netns=ns, multi_queue=multi_queue)
    try:
        tun.add_address(f"{addr}/24")
        tun.up()
    except BaseException:
        tun.close()
        raise
    return tun


def _cpu_at_exit(proc: subprocess.Popen[str]) -> float:
    """Wait for *proc* to exit and return its CPU seconds, read before it is reaped."""
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # a zombie keeps its times
    seconds = cpu_seconds(proc.pid)
    proc.wait()
    return seconds


def _iperf(ns_a: str, ns_b: str, seconds: float, streams: int,
           workers: QueueWorkers, result: Result) -> None:
    server = subprocess.Popen(["ip", "netns", "exec", ns_b, "iperf3", "-s", "-1", "-p", str(PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    client = None
    try:
        for _ in range(50):
            probe = subprocess.run(["ip", "netns", "exec", ns_b, "ss", "-Hltn", f"sport = :{PORT}"],
                                   capture_output=True, text=True, check=False)
            if probe.stdout.strip():
                break
            time.sleep(0.1)
        before = workers.cpu_seconds()
        started = time.monotonic()
        client = subprocess.Popen(
            ["ip", "netns", "exec", ns_a, "iperf3", "-c", B_ADDR, "-p", str(PORT),
             "-t", f"{seconds:g}", "-P", str(streams), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert client.stdout is not None
        out = client.stdout.read()
        after = workers.cpu_seconds()  # before the workers are told to stop
        wall = time.monotonic() - started
        result.cpu = {f"worker {i}": (after[pid] - before[pid]) / wall
                      for i, pid in enumerate(before)}
        result.cpu["iperf3 client"] = _cpu_at_exit(client) / wall
        result.cpu["iperf3 server"] = _cpu_at_exit(server) / wall
        report = json.loads(out)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        end = report["end"]
        result.gbit_s = end["sum_received"]["bits_per_second"] / 1e9
        result.retransmits = int(end["sum_sent"].get("retransmits", 0))
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def run_setup(name: str, seconds: float, streams: int, queues: int) -> Result:
    multi_queue = name.endswith("-mq")
    result = Result(name, streams=streams, seconds=seconds, queues=queues if multi_queue else 1)
    with _pair(f"mq-{name}") as (ns_a, ns_b):
        a = _device(ns_a, A_ADDR, multi_queue)
        b = None
        try:
            b = _device(ns_b, B_ADDR, multi_queue)
            with QueueWorkers(a, b, passthrough="split" not in name) as workers:
                workers.start(result.queues)
                _iperf(ns_a, ns_b, seconds, streams, workers, result)
                result.queue_packets = [r.packets for r in workers.stats()]
        finally:
            a.close()
            if b is not None:
                b.close()
    return result


def _table(results: list[Result]) -> str:
    by_name = {r.name: r for r in results}
    lines = [f"{'setup':<16} {'queues':>6} {'Gbit/s':>7} {'per core':>8} {'retrans':>8}  "
             "CPU per process (share of one core)  packets per worker"]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<16} {r.queues:>6} {'-':>7} {'-':>8} {'-':>8}  error: {r.error}")
            continue
        cpu = ", ".join(f"{k} {v:.0%}" for k, v in r.cpu.items())
        packets = " / ".join(f"{p:,}" for p in r.queue_packets)
        lines.append(f"{r.name:<16} {r.queues:>6} {r.gbit_s:>7.2f} {r.per_core():>8.2f} "
                     f"{r.retransmits:>8}  {cpu}  [{packets}]")
    lines.append("")
    for setup, base, goal in GOALS:
        if setup in by_name and base in by_name and by_name[base].gbit_s:
            ratio = by_name[setup].gbit_s / by_name[base].gbit_s
            met = "met" if ratio >= goal else "not met"
            lines.append(f"{setup} / {base}: {ratio:.2f}x (goal >= {goal}x: {met})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated, of {', '.join(SETUPS)}")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("multiqueue.py needs root (namespaces, TUN devices)", file=sys.stderr)
        return 2
    remove_stale_netns()
    results = []
    for name in args.setups.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_setup(name, args.seconds, args.streams, args.queues))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            results.append(Result(name, streams=args.streams, seconds=args.seconds, error=str(exc)))
    print(f"multi-queue: {args.streams} TCP streams, {args.seconds:g} s each, "
          f"{os.cpu_count()} cores")
    print(_table(results))
    if args.json:
        data: dict[str, Any] = {"results": [asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

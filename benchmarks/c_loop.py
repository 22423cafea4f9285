"""tunkit against a bare C loop between the same two TUN devices, in one sitting.

    sudo python benchmarks/c_loop.py [--seconds 10] [--repeat 3] [--streams 1] [--json out.json]

Both setups make the pair-load pair of ``tunkit bench`` (two namespaces, a
NativeTun with offload in each) and run iperf3 across it:

- ``c-loop``: ``benchmarks/c_loop.c``, compiled here with gcc and run as its
  own process: one thread each way, ``read`` and ``write`` of whole
  super-packets, nothing parsed or counted. The ceiling of a user-space loop.
- ``tunkit``: ``tunkit.copy`` in this process, as ``tunkit bench`` runs it.

Rounds alternate the two, so each ratio compares figures of one sitting.
Needs root, /dev/net/tun, iproute2, iperf3 and gcc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tunkit.cli import children
from tunkit.cli.pair_load import BenchResult, _pair, _run_setup, _tun, iperf

_A_ADDR, _B_ADDR = "10.214.0.1", "10.214.0.2"
_SOURCE = Path(__file__).with_name("c_loop.c")


def build(folder: str) -> str:
    """Compile the C loop into *folder*; return the program's path."""
    program = os.path.join(folder, "c_loop")
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", program,
                    str(_SOURCE)], check=True)
    return program


def run_c_loop(program: str, seconds: float, streams: int) -> BenchResult:
    """One iperf3 run across the pair with the C loop moving the packets."""
    result = BenchResult("c-loop", 0.0, streams, seconds)
    with (_pair("cloop") as (ns_a, ns_b),
          _tun(ns_a, _A_ADDR, True) as a, _tun(ns_b, _B_ADDR, True) as b):
        fds = (a.fileno(), b.fileno())
        loop = children.start([program, *map(str, fds)], pass_fds=fds,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert loop.stdout is not None
            if loop.stdout.readline().strip() != "ready":
                raise RuntimeError("the C loop did not start")
            iperf(result, ns_a, ns_b, [("c-loop", loop.pid)])
        finally:
            children.end(loop)
            for fd in fds:  # the loop made the descriptions blocking; the devices expect otherwise
                os.set_blocking(fd, False)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        program = build(folder)
        for i in range(args.repeat):
            c = run_c_loop(program, args.seconds, args.streams)
            t = _run_setup("tunkit", "copy", args.seconds, args.streams, 1)
            rounds.append({"c-loop": c.gbit_s, "tunkit": t.gbit_s,
                           "c-loop cpu": sum(p.share for p in c.cpu),
                           "tunkit cpu": sum(p.share for p in t.cpu)})
            ratio = t.gbit_s / c.gbit_s if c.gbit_s else 0.0
            print(f"round {i + 1}: c-loop {c.gbit_s:6.2f} Gbit/s   tunkit {t.gbit_s:6.2f} Gbit/s"
                  f"   tunkit / c-loop {ratio:.2f}x", flush=True)
    ratios = [r["tunkit"] / r["c-loop"] for r in rounds if r["c-loop"]]
    if ratios:
        print(f"tunkit / c-loop: median {statistics.median(ratios):.2f}x, "
              f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds; "
              f"goal >= 0.90x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": rounds, "seconds": args.seconds, "streams": args.streams}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tunnel-load, round after round: ``tunkit bench tunnel`` with 1 and 4 TCP streams, and medians.

    sudo python benchmarks/tunnel_load.py [--seconds 10] [--repeat 3] [--json out.json]

Each round runs ``tunkit bench tunnel`` (same code: ``tunkit.cli.tunnel_load``)
with 1 and then 4 streams: tunkit-udp, tunkit-tcp, tunkit-tls, vxlan,
underlay and naive-udp in one run each. The machine is shared and noisy, so
each ratio is taken within one run, and the medians and spread over rounds
are printed at the end. Needs root, /dev/net/tun, iproute2, iperf3 and the
``cryptography`` package (for tunkit-tls's throwaway certificates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tunkit.cli import main

GOALS = (("tunkit-udp", "vxlan", 0.4), ("tunkit-udp", "naive-udp", 8.0),
         ("tunkit-tcp", "naive-udp", 5.0), ("tunkit-tls", "naive-udp", 3.0))


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", default="10")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write every run's results here")
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.repeat + 1):
            for streams in (1, 4):
                out = Path(tmp) / f"{round_}-{streams}.json"
                status |= main(["bench", "tunnel", "--seconds", args.seconds,
                                "--streams", str(streams), "--json", str(out)])
                report = json.loads(out.read_text())
                runs.append({"round": round_, "streams": streams, **report})
    for streams in (1, 4):
        mine = [r for r in runs if r["streams"] == streams]
        print(f"\n{streams} TCP stream(s), {args.seconds} s, {len(mine)} round(s), Gbit/s:")
        for name in [r["name"] for r in mine[0]["results"]]:
            values = [x["gbit_s"] for r in mine for x in r["results"] if x["name"] == name]
            print(f"  {name:11s} median {statistics.median(values):6.2f}"
                  f"  (min {min(values):.2f}, max {max(values):.2f})")
        for name, base, goal in GOALS:
            ratios = [r["ratios"][name][base] for r in mine if base in r["ratios"].get(name, {})]
            if ratios:
                print(f"  {name} / {base}: median {statistics.median(ratios):.2f}x "
                      f"(min {min(ratios):.2f}, max {max(ratios):.2f}); goal >= {goal}x")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(run())

"""Pair-load: bulk TCP between two namespaces through tunkit, a veth pair and the naive loop.

    sudo python benchmarks/pair_load.py [--seconds 10] [--via copy] [--json-prefix out]

Runs ``tunkit bench`` (same code: ``tunkit.cli.pair_load``) with 1 and then 4 TCP
streams: the five setups in one run each, with their ratios to ``naive`` and
``veth``, retransmits, and the offload counters of the tunkit devices.
Needs root, /dev/net/tun, iproute2 and iperf3 (Debian: apt-get install iperf3).
"""

from __future__ import annotations

import argparse
import sys

from tunkit.cli import main


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", default="10")
    parser.add_argument("--via", default="copy", choices=("copy", "forwarder", "p2p"))
    parser.add_argument("--json-prefix", help="write PREFIX-1.json and PREFIX-4.json")
    args = parser.parse_args(argv)
    status = 0
    for streams in (1, 4):
        extra = ["--json", f"{args.json_prefix}-{streams}.json"] if args.json_prefix else []
        status |= main(["bench", "--seconds", args.seconds, "--streams", str(streams),
                        "--via", args.via, *extra])
    return status


if __name__ == "__main__":
    sys.exit(run())

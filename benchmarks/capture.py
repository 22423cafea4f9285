"""What capture costs: packets/s of pipe -> copy -> pipe with and without capture, in one run.

    python benchmarks/capture.py [--seconds 1.0] [--repeat 3] [--file PATH] [--json out.json]

The pipeline of ``benchmarks/pipe_copy.py`` (a writer thread, ``tunkit.copy``,
a reader thread), measured twice per size and batch: as it is, and with
both Tuns that ``copy`` joins wrapped in ``tunkit.capture`` writing one
pcapng file (``--file``, default a temporary file, deleted after). Reported:
packets/s of each, their ratio, and what the captures recorded and dropped
(a full buffer drops records, never packets, so a capture that cannot keep
up shows as drops rather than as a slower pipeline). Medians of ``--repeat``
runs; the two variants alternate, so that noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipe_copy import bench_tunkit

import tunkit
from tunkit import pcap
from tunkit._capture import CapturedTun


def bench_captured(size: int, batch: int, seconds: float, path: Path) -> tuple[float, int, int]:
    """Packets/s with both middle Tuns captured; and the records kept and dropped."""
    caps: list[CapturedTun] = []
    with pcap.Writer(path) as writer:

        def wrap(tun: tunkit.Tun) -> tunkit.Tun:
            caps.append(tunkit.capture(tun, writer))
            return caps[-1]

        pps = bench_tunkit(size, batch, seconds, wrap)
    stats = [c.capture_stats() for c in caps]
    return pps, sum(s.recorded for s in stats), sum(s.dropped for s in stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--file", type=Path, help="the pcapng file (default: a temporary one)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    fd, tmp = tempfile.mkstemp(suffix=".pcapng")
    os.close(fd)
    path = args.file or Path(tmp)
    rows: list[dict[str, Any]] = []
    print(f"{'size':>5} {'batch':>5} {'plain pkt/s':>12} {'captured pkt/s':>15} "
          f"{'ratio':>6} {'recorded':>10} {'dropped':>10}")
    try:
        for size in (64, 1500):
            for batch in (1, 8, 128):
                plain, captured, recorded, dropped = [], [], 0, 0
                for _ in range(args.repeat):
                    plain.append(bench_tunkit(size, batch, args.seconds))
                    pps, kept, lost = bench_captured(size, batch, args.seconds, path)
                    captured.append(pps)
                    recorded += kept
                    dropped += lost
                p, c = statistics.median(plain), statistics.median(captured)
                rows.append({"size": size, "batch": batch, "plain_pps": p, "captured_pps": c,
                             "ratio": c / p, "recorded": recorded, "dropped": dropped})
                print(f"{size:>5} {batch:>5} {p:>12,.0f} {c:>15,.0f} {c / p:>5.2f}x "
                      f"{recorded:>10,} {dropped:>10,}", flush=True)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tunnel-load over streams: iperf3 across `tunkit tunnel` (tcp, tls), naive-udp and the underlay.

    sudo python benchmarks/tunnel_stream.py [--seconds 5] [--repeat 2] [--mtu 9000 --mtu 1500]

Two network namespaces, A and B, joined by a veth pair (the "underlay", MTU
1500, like a wire between two hosts). Across it, in turn, in one run:

- ``underlay``: iperf3 over the veth addresses themselves (the ceiling);
- ``naive-udp``: the tunnel a Python user writes today, one process per side:
  a TUN device (no offload, inner MTU 1400), one thread doing ``os.read`` and
  ``sock.sendto`` per packet, another ``recvfrom`` and ``os.write``;
- ``tunkit-udp``: a ``tunkit tunnel --transport udp`` process per side
  (UdpTun with UDP GSO/GRO, its default MTU: the underlay's less 28);
- ``tunkit-tcp``: a ``tunkit tunnel --transport tcp`` process per side
  (StreamTun over TCP, device MTU from ``--mtu``, default 9000 as
  ``tunkit tunnel``'s; the first one given is called ``tunkit-tcp``, the
  others ``tunkit-tcp@MTU``);
- ``tunkit-tls``: the same over TLS with mutual certificates (a throwaway CA
  made with the ``cryptography`` package).

Each is one iperf3 TCP stream from A to B for ``--seconds``; Gbit/s is what
the receiver got. The namespaces (fresh for each setup), the naive tunnel
and iperf3 are those of ``benchmarks/tunnel_udp.py``, so the two benchmarks
measure the same things. ``--repeat`` runs the whole set again (the machine
is shared and noisy: compare figures of the same round). Needs root,
/dev/net/tun, iproute2, iperf3 and ``cryptography`` (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tls_util import make_pki  # tests/tls_util.py: the throwaway CA
from tunnel_udp import NAIVE_SIDE, OVER, UNDER, iperf, namespaces, start_sides, stop_sides

TUNNEL_PORT = 5555
NAIVE_MTU = 1400


def wait_connected(proc: subprocess.Popen[str], timeout: float = 20) -> None:
    """Wait for the line a ``tunkit tunnel`` prints once it carries packets."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args!r} ended before it connected")
        if line.startswith(("connected:", "ready:")):
            return
    raise RuntimeError(f"{proc.args!r} did not connect")


def tunnel_procs(ns: tuple[str, str], transport: str, mtu: int,
                 pki_dir: Path) -> list[subprocess.Popen[str]]:
    """A ``tunkit tunnel`` listening in ``ns[0]`` and one connecting from ``ns[1]``."""
    tunkit = [sys.executable, "-m", "tunkit", "tunnel", "--transport", transport,
              *(["--mtu", str(mtu)] if mtu else []), "--interval", "3600"]
    procs: list[subprocess.Popen[str]] = []
    try:
        for i, (role, who) in enumerate((("--listen", "server"), ("--connect", "client"))):
            tls = ([] if transport != "tls" else
                   ["--cert", str(pki_dir / f"{who}.pem"), "--key", str(pki_dir / f"{who}.key"),
                    "--ca", str(pki_dir / "ca.pem")])
            procs.append(subprocess.Popen(
                [*tunkit, role, f"{UNDER[0]}:{TUNNEL_PORT}", "--netns", ns[i],
                 "--address", f"{OVER[i]}/24", *tls],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
            if i == 0:
                time.sleep(0.5)  # the listener first
        for proc in procs:
            wait_connected(proc)
        return procs
    except BaseException:
        stop_sides(procs)
        raise


def measure(name: str, seconds: float, mtu: int, pki_dir: Path) -> dict[str, object]:
    """One setup in two fresh namespaces: receiver Gbit/s and sender retransmits."""
    with namespaces(name) as ns:
        procs: list[subprocess.Popen[str]] = []
        try:
            if name == "underlay":
                target = UNDER[1]
            else:
                target = OVER[1]
                if name == "naive-udp":
                    procs = start_sides(NAIVE_SIDE, ns, str(NAIVE_MTU))
                else:
                    transport = name.split("@")[0].split("-")[1]
                    procs = tunnel_procs(ns, transport, mtu, pki_dir)
            gbit_s, retransmits = iperf(*ns, target, seconds, 1)
        finally:
            stop_sides(procs)
    return {"name": name, "gbit_s": gbit_s, "retransmits": retransmits, "mtu": mtu,
            "streams": 1, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--mtu", type=int, action="append",
                        help="device MTU of tunkit-tcp/-tls (repeatable; default: 9000, "
                        "tunkit tunnel's own)")
    parser.add_argument("--only", action="append", help="run only these setups")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    mtus = args.mtu or [9000]
    setups: list[tuple[str, int]] = [("underlay", 1500), ("naive-udp", NAIVE_MTU),
                                     ("tunkit-udp", 0)]
    for kind in ("tcp", "tls"):
        for i, mtu in enumerate(mtus):
            setups.append((f"tunkit-{kind}" if i == 0 else f"tunkit-{kind}@{mtu}", mtu))
    if args.only:
        setups = [s for s in setups if s[0] in args.only]
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        pki_dir = Path(tmp)
        make_pki(pki_dir, hosts=(UNDER[0],))
        for round_ in range(1, args.repeat + 1):
            print(f"round {round_}:", flush=True)
            figures: dict[str, float] = {}
            for name, mtu in setups:
                result = measure(name, args.seconds, mtu, pki_dir)
                result["round"] = round_
                results.append(result)
                figures[name] = float(result["gbit_s"])  # type: ignore[arg-type]
            naive = figures.get("naive-udp")
            for name, gbit_s in figures.items():
                ratio = f"{gbit_s / naive:6.2f}x naive-udp" if naive else ""
                print(f"  {name:18} {gbit_s:7.2f} Gbit/s  {ratio}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tunnel-load over UDP: iperf3 through a UDP tunnel between two namespaces, and its baselines.

    sudo python benchmarks/tunnel_udp.py [--seconds 10] [--repeat 3] [--streams 1] [--json out.json]

Each setup gets two fresh namespaces, A and B, joined by a veth pair (the
underlay, 10.231.0.1 and .2, MTU 1500). iperf3 runs from A to B through:

- ``underlay``: the veth alone (the ceiling of everything below);
- ``vxlan``: the kernel's own UDP tunnel (``ip link add ... type vxlan``)
  over the veth: GSO super-packets kept whole end to end;
- ``naive-udp``: a TUN device without offload in each namespace and, per
  side, its own Python process with the loop anyone writes first: one thread
  ``os.read`` + ``sendto`` per packet, one ``recvfrom`` + ``os.write``;
- ``tunkit-udp``: a NativeTun with offload and a ``tunkit.UdpTun`` in each
  namespace, joined by ``tunkit.copy`` in one process per side.

Setups run one after the other, round after round (``--repeat``), so that
each ratio compares figures of the same sitting; the spread over rounds is
printed. Needs root, /dev/net/tun, iproute2 and iperf3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

from tunkit._linux.netns import create_netns, delete_netns, unique_netns_name

SETUPS = ("underlay", "vxlan", "naive-udp", "tunkit-udp")
UNDER = ("10.231.0.1", "10.231.0.2")
OVER = ("10.232.0.1", "10.232.0.2")
PORT = 4790  # the tunnel's UDP port on each side
IPERF_PORT = 5201
INNER_MTU = 1500 - 28  # the veth's MTU less IPv4 and UDP

# One side of the naive tunnel: a TUN device without offload, two threads, one
# system call per packet each way.
NAIVE_SIDE = """
import os, socket, sys, threading, tunkit
local, peer, addr = sys.argv[1:4]
port, mtu = int(sys.argv[4]), int(sys.argv[5])
dev = tunkit.create_tun(mtu=mtu, offload=False)
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
for f in (out, back):
    threading.Thread(target=f, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# One side of the tunkit tunnel: NativeTun (offload) + UdpTun, joined by copy.
TUNKIT_SIDE = """
import dataclasses, json, signal, sys, threading, tunkit
local, peer, addr, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
udp = tunkit.UdpTun((local, port), (peer, port))
dev = tunkit.create_tun(mtu=udp.mtu(), offload=True)
dev.add_address(addr + "/24"); dev.up()
def stop(*_):
    print(json.dumps({"udp": dataclasses.asdict(udp.stats()),
                      "device": dataclasses.asdict(dev.stats())}), flush=True)
    dev.close()
signal.signal(signal.SIGTERM, stop)
t = threading.Thread(target=tunkit.copy, args=(dev, udp), name="tunkit-copy:main")
t.start()
print("ready", flush=True)
while t.is_alive():
    t.join(0.2)
"""


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def namespaces(tag: str) -> Iterator[tuple[str, str]]:
    made: list[str] = []
    try:
        for side in "ab":
            name = unique_netns_name(f"tu-{tag}-{side}")
            create_netns(name)
            made.append(name)
            ip(name, "link", "set", "lo", "up")
        va, vb = f"tkua{os.getpid()}", f"tkub{os.getpid()}"
        subprocess.run(
            ["ip", "link", "add", va, "netns", made[0], "type", "veth", "peer", "name", vb,
             "netns", made[1]],
            check=True, capture_output=True,
        )
        for ns, dev, addr in ((made[0], va, UNDER[0]), (made[1], vb, UNDER[1])):
            ip(ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip(ns, "link", "set", dev, "up")
        yield made[0], made[1]
    finally:
        for name in made:
            with contextlib.suppress(FileNotFoundError):
                delete_netns(name)


def iperf(ns_a: str, ns_b: str, target: str, seconds: float, streams: int) -> tuple[float, int]:
    """Run iperf3 from *ns_a* to *target* in *ns_b*: receiver Gbit/s and retransmits."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns_b, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            probe = subprocess.run(
                ["ip", "netns", "exec", ns_b, "ss", "-Hltn", f"sport = :{IPERF_PORT}"],
                capture_output=True, text=True, check=False,
            )
            if probe.stdout.strip():
                break
            time.sleep(0.1)
        client = subprocess.run(
            ["ip", "netns", "exec", ns_a, "iperf3", "-c", target, "-p", str(IPERF_PORT),
             "-t", f"{seconds:g}", "-P", str(streams), "--json"],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )
        report = json.loads(client.stdout)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        end = report["end"]
        return (end["sum_received"]["bits_per_second"] / 1e9,
                int(end["sum_sent"].get("retransmits", 0)))
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def start_sides(code: str, ns: tuple[str, str], *extra: str) -> list[subprocess.Popen[str]]:
    procs = []
    try:
        for i in (0, 1):
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns[i], sys.executable, "-c", textwrap.dedent(code),
                 UNDER[i], UNDER[1 - i], OVER[i], str(PORT), *extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                why = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"tunnel side failed: {why}")
        # The first packets teach nothing (the peers are fixed): wait for both links.
        subprocess.run(["ip", "netns", "exec", ns[0], "ping", "-c", "1", "-W", "2", OVER[1]],
                       capture_output=True, timeout=10, check=False)
        return procs
    except BaseException:
        stop_sides(procs)
        raise


def stop_sides(procs: list[subprocess.Popen[str]]) -> list[str]:
    outs = []
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outs.append(out)
    return outs


def run_setup(name: str, seconds: float, streams: int) -> dict[str, Any]:
    result: dict[str, Any] = {"setup": name, "streams": streams}
    with namespaces(name) as ns:
        if name == "underlay":
            result["gbit_s"], result["retransmits"] = iperf(*ns, UNDER[1], seconds, streams)
            return result
        if name == "vxlan":
            for i in (0, 1):
                dev = f"tkvx{os.getpid()}"
                ip(ns[i], "link", "add", dev, "type", "vxlan", "id", "42", "local", UNDER[i],
                   "remote", UNDER[1 - i], "dstport", str(PORT))
                ip(ns[i], "addr", "add", f"{OVER[i]}/24", "dev", dev)
                ip(ns[i], "link", "set", dev, "up")
            result["gbit_s"], result["retransmits"] = iperf(*ns, OVER[1], seconds, streams)
            return result
        if name == "naive-udp":
            procs = start_sides(NAIVE_SIDE, ns, str(INNER_MTU))
        else:
            procs = start_sides(TUNKIT_SIDE, ns)
        try:
            result["gbit_s"], result["retransmits"] = iperf(*ns, OVER[1], seconds, streams)
        finally:
            outs = stop_sides(procs)
        if name == "tunkit-udp":
            result["stats"] = [json.loads(o.strip().splitlines()[-1]) for o in outs if o.strip()]
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)
    setups = args.setups.split(",")
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.repeat):
        figures: dict[str, dict[str, Any]] = {}
        for name in setups:
            try:
                figures[name] = run_setup(name, args.seconds, args.streams)
            except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
                figures[name] = {"setup": name, "gbit_s": 0.0, "error": str(exc)}
            fig = figures[name]
            print(f"round {r + 1}  {name:11s} {fig['gbit_s']:7.2f} Gbit/s"
                  f"  retransmits {fig.get('retransmits', '-')}"
                  + (f"  error: {fig['error']}" if "error" in fig else ""), flush=True)
        rounds.append(figures)
    print()
    print(f"{args.streams} TCP stream(s), {args.seconds:g} s, {args.repeat} round(s):")
    for name in setups:
        values = [rd[name]["gbit_s"] for rd in rounds]
        spread = f"  (min {min(values):.2f}, max {max(values):.2f})" if len(values) > 1 else ""
        print(f"  {name:11s} median {statistics.median(values):7.2f} Gbit/s{spread}")
    if "tunkit-udp" in setups:
        for base in ("vxlan", "naive-udp", "underlay"):
            if base not in setups:
                continue
            ratios = [rd["tunkit-udp"]["gbit_s"] / rd[base]["gbit_s"]
                      for rd in rounds if rd[base]["gbit_s"] > 0]
            if ratios:
                spread = (f" (min {min(ratios):.2f}, max {max(ratios):.2f})"
                          if len(ratios) > 1 else "")
                print(f"  tunkit-udp / {base:9s} median {statistics.median(ratios):6.2f}x{spread}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounds, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

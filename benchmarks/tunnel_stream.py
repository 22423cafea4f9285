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
the receiver got. ``--repeat`` runs the whole set again (the machine is
shared and noisy: compare figures of the same round). Needs root,
/dev/net/tun, iproute2, iperf3 and ``cryptography`` (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tls_util import make_pki  # tests/tls_util.py: the throwaway CA

from tunkit._linux.netns import create_netns, delete_netns, unique_netns_name

UNDER_A, UNDER_B = "192.168.231.1", "192.168.231.2"
OVER_A, OVER_B = "10.231.0.1", "10.231.0.2"
TUNNEL_PORT = 5555
IPERF_PORT = 5201
NAIVE_MTU = 1400

# One side of the naive tunnel: what a Python user writes first. argv: device
# name, its address/prefix, local UDP (host, port), peer UDP (host, port), MTU.
NAIVE = """
    import fcntl, os, socket, struct, subprocess, sys, threading
    name, cidr, lhost, lport, phost, pport = sys.argv[1:7]
    TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    subprocess.run(["ip", "addr", "add", cidr, "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "mtu", sys.argv[7], "up"], check=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((lhost, int(lport)))
    peer = (phost, int(pport))

    def out():
        while True:
            sock.sendto(os.read(fd, 65536), peer)

    def back():
        while True:
            data, _ = sock.recvfrom(65536)
            try:
                os.write(fd, data)
            except OSError:
                pass

    threading.Thread(target=out, daemon=True).start()
    print("connected:", flush=True)
    back()
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def underlay() -> Iterator[tuple[str, str]]:
    """Namespaces A and B joined by a veth pair with addresses UNDER_A and UNDER_B."""
    a, b = unique_netns_name("tstream-a"), unique_netns_name("tstream-b")
    made: list[str] = []
    try:
        for ns in (a, b):
            create_netns(ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", a, "link", "add", "ua", "type", "veth", "peer", "name", "ub", "netns", b)
        ip("-n", a, "addr", "add", f"{UNDER_A}/24", "dev", "ua")
        ip("-n", b, "addr", "add", f"{UNDER_B}/24", "dev", "ub")
        ip("-n", a, "link", "set", "ua", "up")
        ip("-n", b, "link", "set", "ub", "up")
        yield a, b
    finally:
        for ns in made:
            with contextlib.suppress(FileNotFoundError):
                delete_netns(ns)


def start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_connected(proc: subprocess.Popen[str], timeout: float = 20) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args!r} ended before it connected")
        if line.startswith(("connected:", "ready:")):
            return
    raise RuntimeError(f"{proc.args!r} did not connect")


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def iperf(ns_a: str, ns_b: str, target: str, seconds: float) -> tuple[float, int]:
    """One TCP stream from *ns_a* to *target* in *ns_b*: (receiver Gbit/s, retransmits)."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns_b, "iperf3", "-s", "-1", "-B", target, "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        report: dict[str, object] = {}
        for _ in range(50):  # until the server listens
            client = subprocess.run(
                ["ip", "netns", "exec", ns_a, "iperf3", "-c", target, "-p", str(IPERF_PORT),
                 "-t", f"{seconds:g}", "--json"],
                capture_output=True, text=True, timeout=seconds + 60, check=False,
            )
            report = json.loads(client.stdout or "{}")
            if "error" not in report or "connect" not in str(report["error"]):
                break
            time.sleep(0.1)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        end = report["end"]
        assert isinstance(end, dict)
        return end["sum_received"]["bits_per_second"] / 1e9, int(
            end["sum_sent"].get("retransmits", 0)
        )
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def tunnel_procs(ns_a: str, ns_b: str, transport: str, mtu: int,
                 pki_dir: Path) -> list[subprocess.Popen[str]]:
    tunkit = [sys.executable, "-m", "tunkit", "tunnel", "--transport", transport,
              *(["--mtu", str(mtu)] if mtu else []), "--interval", "3600"]
    tls: dict[str, list[str]] = {"a": [], "b": []}
    if transport == "tls":
        for side, who in (("a", "server"), ("b", "client")):
            tls[side] = ["--cert", str(pki_dir / f"{who}.pem"), "--key",
                         str(pki_dir / f"{who}.key"), "--ca", str(pki_dir / "ca.pem")]
    a = start([*tunkit, "--listen", f"{UNDER_A}:{TUNNEL_PORT}", "--netns", ns_a,
               "--address", f"{OVER_A}/24", *tls["a"]])
    time.sleep(0.5)  # the listener first
    b = start([*tunkit, "--connect", f"{UNDER_A}:{TUNNEL_PORT}", "--netns", ns_b,
               "--address", f"{OVER_B}/24", *tls["b"]])
    return [a, b]


def naive_procs(ns_a: str, ns_b: str) -> list[subprocess.Popen[str]]:
    code = textwrap.dedent(NAIVE)

    def side(ns: str, cidr: str, local: str, peer: str) -> subprocess.Popen[str]:
        return start(["ip", "netns", "exec", ns, sys.executable, "-c", code, "naive0", cidr,
                      local, str(TUNNEL_PORT), peer, str(TUNNEL_PORT), str(NAIVE_MTU)])

    return [side(ns_a, f"{OVER_A}/24", UNDER_A, UNDER_B),
            side(ns_b, f"{OVER_B}/24", UNDER_B, UNDER_A)]


def measure(name: str, ns_a: str, ns_b: str, seconds: float, mtu: int,
            pki_dir: Path) -> dict[str, object]:
    procs: list[subprocess.Popen[str]] = []
    try:
        if name == "underlay":
            target = UNDER_B
        else:
            target = OVER_B
            if name == "naive-udp":
                procs = naive_procs(ns_a, ns_b)
            else:
                procs = tunnel_procs(ns_a, ns_b, name.split("@")[0].split("-")[1], mtu, pki_dir)
            for proc in procs:
                wait_connected(proc)
        gbit_s, retransmits = iperf(ns_a, ns_b, target, seconds)
        return {"name": name, "gbit_s": gbit_s, "retransmits": retransmits, "mtu": mtu,
                "streams": 1, "seconds": seconds}
    finally:
        stop(procs)


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
    with tempfile.TemporaryDirectory() as tmp, underlay() as (ns_a, ns_b):
        pki_dir = Path(tmp)
        make_pki(pki_dir, hosts=(UNDER_A,))
        for round_ in range(1, args.repeat + 1):
            print(f"round {round_}:", flush=True)
            figures: dict[str, float] = {}
            for name, mtu in setups:
                result = measure(name, ns_a, ns_b, args.seconds, mtu, pki_dir)
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

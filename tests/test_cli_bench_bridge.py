"""tunkit bench and tunkit bridge, run as real subprocesses (root ones in namespaces)."""

# ruff: noqa: F811  (fixtures imported from netns_util are parameters here)

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from netns_util import need_tool, netns_factory, root  # noqa: F401

TUNKIT = [sys.executable, "-m", "tunkit"]
ENV = {**os.environ, "COLUMNS": "160"}
DROP_CAPS = ["setpriv", "--inh-caps=-net_admin,-sys_admin",
             "--bounding-set=-net_admin,-sys_admin"]


def _ours(pid: int) -> list[str]:
    try:
        return [n for n in os.listdir("/var/run/netns") if n.startswith(f"tk-{pid}-")]
    except FileNotFoundError:
        return []


@pytest.mark.timeout(240)
def test_bench_measures_all_setups_writes_json_and_plot(root: None, tmp_path: Path) -> None:
    need_tool("iperf3")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.Popen(
        [*TUNKIT, "bench", "--seconds", "1", "--json", str(out_json), "--plot", str(out_png)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    out, err = proc.communicate(timeout=220)
    assert proc.returncode == 0, out + err
    results = json.loads(out_json.read_text())["results"]
    names = [r["name"] for r in results]
    assert names == ["tunkit", "tunkit-split", "tunkit-nooffload", "veth", "naive"]
    for r in results:
        assert r["gbit_s"] > 0 and r["streams"] == 1 and r["seconds"] == 1, r
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x naive" in out and "veth" in out
    assert _ours(proc.pid) == []


def test_bench_help_and_usage_errors() -> None:
    help_out = subprocess.run([*TUNKIT, "bench", "--help"], capture_output=True, text=True,
                              check=False)
    assert help_out.returncode == 0 and "example" in help_out.stdout
    bad = subprocess.run([*TUNKIT, "bench", "--via", "carrier-pigeon"], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and "usage:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("command", [["bench", "--seconds", "1"], ["bridge", "x", "y"]])
def test_without_capabilities_one_line_and_status_2(root: None, command: list[str]) -> None:
    proc = subprocess.run([*DROP_CAPS, *TUNKIT, *command], capture_output=True, text=True,
                          timeout=60, check=False, env=ENV)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], proc.stderr


def _ping(ns: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "2",
                           target], capture_output=True, text=True, timeout=30, check=False)


def _start_bridge(args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*TUNKIT, "bridge", *args, "--interval", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "bridging" in line, line + proc.stderr.read() if proc.poll() is not None else line
    return proc


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return out


@pytest.mark.timeout(60)
def test_bridge_creates_devices_carries_ping_and_removes_them(
    netns_factory: Callable[[str], str],
) -> None:
    need_tool("ping")
    ns_a, ns_b = netns_factory("bra"), netns_factory("brb")
    proc = _start_bridge(["tka", "tkb", "--create", "--netns-a", ns_a, "--netns-b", ns_b,
                          "--address", "tka=10.215.0.1/24", "--address", "tkb=10.215.0.2/24"])
    try:
        ping = _ping(ns_a, "10.215.0.2")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        time.sleep(0.5)
    finally:
        out = _stop(proc)
    assert "tka→tkb: " in out
    last = [line for line in out.splitlines() if "tka→tkb" in line][-1]
    assert "tka→tkb: 0 pkts" not in last and "drops 0" in last
    gone = subprocess.run(["ip", "-n", ns_a, "link", "show", "tka"], capture_output=True,
                          check=False)
    assert gone.returncode != 0, "the created device outlived the bridge"


@pytest.mark.timeout(60)
def test_bridge_joins_existing_persistent_devices(netns_factory: Callable[[str], str]) -> None:
    need_tool("ping")
    ns_a, ns_b = netns_factory("bpa"), netns_factory("bpb")
    for ns, dev, addr in ((ns_a, "tpa", "10.216.0.1/24"), (ns_b, "tpb", "10.216.0.2/24")):
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "mode", "tun", "name", dev], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    proc = _start_bridge(["tpa", "tpb", "--netns-a", ns_a, "--netns-b", ns_b])
    try:
        ping = _ping(ns_a, "10.216.0.2")
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        _stop(proc)
    still = subprocess.run(["ip", "-n", ns_a, "link", "show", "tpa"], capture_output=True,
                           check=False)
    assert still.returncode == 0, "a persistent device must outlive the bridge"


def test_bridge_names_a_missing_device(netns_factory: Callable[[str], str]) -> None:
    ns = netns_factory("bmiss")
    proc = subprocess.run([*TUNKIT, "bridge", "nope0", "nope1", "--netns-a", ns, "--netns-b", ns],
                          capture_output=True, text=True, timeout=30, check=False, env=ENV)
    assert proc.returncode == 2
    assert "no TUN device named 'nope0'" in proc.stderr and "--create" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_refuses_an_output_folder_that_is_missing_before_measuring(option: str) -> None:
    proc = subprocess.run([*TUNKIT, "bench", option, "/nonexistent-tunkit/out.x"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    expected = f"{option} /nonexistent-tunkit/out.x: the folder '/nonexistent-tunkit'"
    assert proc.stderr.strip() == f"tunkit: {expected} does not exist"

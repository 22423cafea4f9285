"""tunkit bench and tunkit bridge, run as real subprocesses (root ones in namespaces)."""

# ruff: noqa: F811  (fixtures imported from netns_util are parameters here)

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_util import ENV80, TUNKIT, ChildWatch, assert_readable_at_80, our_namespaces
from netns_util import need_tool, netns_factory, root  # noqa: F401

from tunkit._linux.netns import delete_netns, list_netns

DROP_CAPS = ["setpriv", "--inh-caps=-net_admin,-sys_admin",
             "--bounding-set=-net_admin,-sys_admin"]


@pytest.mark.timeout(240)
def test_bench_measures_all_setups_writes_json_and_plot(root: None, tmp_path: Path) -> None:
    need_tool("iperf3")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.Popen(
        [*TUNKIT, "bench", "--seconds", "1", "--json", str(out_json), "--plot", str(out_png)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV80,
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
    # The offload counters of the two setups with offload, and only theirs.
    offload_rows = [line.split()[1] for line in out.splitlines()
                    if re.match(r"│ tunkit(-split)? +│ +[\d,]+ │", line)]
    assert offload_rows == ["tunkit", "tunkit-split"], out
    assert_readable_at_80(out)
    assert our_namespaces(proc.pid) == []


def _is_naive_loop(cmdline: str) -> bool:
    return "os.read(src" in cmdline


def _tun_descriptors(pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    try:
        return sum(os.readlink(os.path.join(fd_dir, fd)) == "/dev/net/tun"
                   for fd in os.listdir(fd_dir))
    except OSError:
        return 0


@pytest.mark.timeout(180)
def test_bench_runs_naive_as_its_own_program_and_no_offload_shows_no_offload(
    root: None,
) -> None:
    need_tool("iperf3")
    proc = subprocess.Popen([*TUNKIT, "bench", "--no-offload", "--seconds", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV80)
    watch = ChildWatch(proc.pid)
    try:
        # The baseline is a program of its own, holding the two devices.
        watch.wait_for(_is_naive_loop, timeout=120)
        naive = [pid for pid, c in watch.look().items() if _is_naive_loop(c)]
        assert [_tun_descriptors(pid) for pid in naive] == [2]
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        watch.close()
    assert proc.returncode == 0, out + err
    assert [line.split()[1] for line in out.splitlines() if re.match(r"│ [a-z-]+ +│", line)] \
        == ["tunkit-nooffload", "veth", "naive"], out
    assert "gso" not in out and "coalesced" not in out  # no columns of zeros
    assert_readable_at_80(out)
    assert our_namespaces(proc.pid) == []


def test_bench_usage_errors() -> None:
    bad = subprocess.run([*TUNKIT, "bench", "--via", "carrier-pigeon"], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and "usage:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("command", [["bench", "--seconds", "1"], ["bridge", "x", "y"]])
def test_without_capabilities_one_line_and_status_2(root: None, command: list[str]) -> None:
    proc = subprocess.run([*DROP_CAPS, *TUNKIT, *command], capture_output=True, text=True,
                          timeout=60, check=False, env=ENV80)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], proc.stderr


def _ping(ns: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "2",
                           target], capture_output=True, text=True, timeout=30, check=False)


def _launch(argv: list[str]) -> subprocess.Popen[str]:
    """Start a bridge command line; return once it says it is bridging."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV80)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert "bridging" in line, line + proc.stderr.read() if proc.poll() is not None else line
    return proc


def _start_bridge(args: list[str]) -> subprocess.Popen[str]:
    return _launch([*TUNKIT, "bridge", *args, "--interval", "0.3"])


def _stop(proc: subprocess.Popen[str]) -> str:
    """Stop a bridge as a person does; return what it printed after its first line."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert_readable_at_80(out)
    return out


def _totals(out: str) -> list[str]:
    """The lines that a stopped bridge prints last: its totals, one per direction."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("stopped after "))
    return [line.strip() for line in lines[at + 1 :]]


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
    there, back = _totals(out)
    # At least the three echo requests and three replies (IPv6 may add a few).
    sent = int(re.fullmatch(r"tka → tkb: ([\d,]+) packets, [\d,]+ bytes, 0 dropped",
                            there)[1].replace(",", ""))  # type: ignore[index]
    received = int(re.fullmatch(r"tkb → tka: ([\d,]+) packets, [\d,]+ bytes, 0 dropped",
                                back)[1].replace(",", ""))  # type: ignore[index]
    assert sent >= 3 and received >= 3, out
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
                          capture_output=True, text=True, timeout=30, check=False, env=ENV80)
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--netns-a", "tk-nonexistent-a", "--netns-b", "tk-nonexistent-b"],
         "--netns-a 'tk-nonexistent-a': no network namespace of that name (make it with "
         "'ip netns add tk-nonexistent-a')"),
        (["--netns-a", "../etc", "--netns-b", "x"],
         "--netns-a '../etc': network namespace name '../etc' is not a valid file name"),
        (["--address", "tka=notacidr"],
         "--address 'tka=notacidr': 'notacidr' is not an address with a prefix length, "
         "like 10.9.0.1/24 or fd00::1/64"),
    ],
    ids=["missing-netns", "bad-netns-name", "bad-cidr"],
)
def test_bridge_mistakes_get_one_line_and_status_2(
    root: None, args: list[str], message: str,
) -> None:
    proc = subprocess.run([*TUNKIT, "bridge", "tka", "tkb", "--create", *args],
                          capture_output=True, text=True, timeout=30, check=False, env=ENV80)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"tunkit: {message}\n", "")


def test_bridge_refuses_an_address_the_device_has_already(
    netns_factory: Callable[[str], str],
) -> None:
    ns = netns_factory("bdup")
    proc = subprocess.run([*TUNKIT, "bridge", "tka", "tkb", "--create", "--netns-a", ns,
                           "--netns-b", ns, "--address", "tka=10.217.0.1/24",
                           "--address", "tka=10.217.0.1/24"],
                          capture_output=True, text=True, timeout=30, check=False, env=ENV80)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("tunkit: --address tka=10.217.0.1/24: ")
    assert len(proc.stderr.splitlines()) == 1


def _help_examples(help_text: str) -> list[list[str]]:
    """The groups of a --help's examples (blank-line apart): commands and comments, in order."""
    block = help_text[help_text.index("examples:") + len("examples:") :]
    block = block[: block.index("positional arguments")].replace("\\\n", " ")
    return [[line.strip() for line in group.splitlines() if line.strip()]
            for group in block.split("\n\n") if group.strip()]


@pytest.mark.timeout(120)
def test_bridge_help_examples_work_as_printed(root: None) -> None:
    need_tool("ping")
    help_text = subprocess.run([*TUNKIT, "bridge", "--help"], capture_output=True, text=True,
                               check=True, env=ENV80).stdout
    groups = _help_examples(help_text)
    assert len(groups) == 2, groups
    # The examples' names are made this test's own; the second group, which
    # works in the namespace it runs in, runs in a namespace of its own.
    pid = os.getpid()
    names = {"red": f"tk-{pid}-red", "blue": f"tk-{pid}-blue"}
    host = f"tk-{pid}-host"
    subprocess.run(["ip", "netns", "add", host], check=True)
    bridges: list[subprocess.Popen[str]] = []
    try:
        for in_host, group in zip((False, True), groups, strict=True):
            for line in group:
                if line.startswith("#"):
                    if "afterwards" in line:  # the bridge has been stopped with Ctrl-C
                        assert len(_totals(_stop(bridges[-1]))) == 2
                    continue
                sudo, *argv = (names.get(word, word) for word in shlex.split(line))
                assert sudo == "sudo", line
                if argv[0] == "tunkit":
                    argv = [*TUNKIT, *argv[1:]]
                if in_host:
                    argv = ["ip", "netns", "exec", host, *argv]
                if "bridge" in argv and TUNKIT[0] in argv:
                    bridges.append(_launch(argv))
                    continue
                done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                      check=False)
                assert done.returncode == 0, f"{line}: {done.stdout}{done.stderr}"
        assert [b.returncode for b in bridges] == [0, 0]
    finally:
        for proc in bridges:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for ns in (*names.values(), host):
            if ns in list_netns():
                delete_netns(ns)

"""tunkit bench and tunkit bridge, run as real subprocesses (root ones in namespaces)."""

# ruff: noqa: F811  (fixtures imported from netns_util are parameters here)

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_util import ENV80, TUNKIT, ChildWatch, assert_readable_at_80, our_namespaces
from netns_util import disable_ipv6, need_tool, netns_factory, root  # noqa: F401

import tunkit
from tunkit._linux import netlink
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


@contextlib.contextmanager
def _watching(proc: subprocess.Popen[str]) -> Iterator[ChildWatch]:
    """Watch *proc*'s children; on the way out, *proc* is ended (if need be) and reaped."""
    watch = ChildWatch(proc.pid)
    try:
        yield watch
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        watch.close()


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
    with _watching(proc) as watch:
        # The baseline is a program of its own, holding the two devices.
        watch.wait_for(_is_naive_loop, timeout=120)
        naive = [pid for pid, c in watch.look().items() if _is_naive_loop(c)]
        assert [_tun_descriptors(pid) for pid in naive] == [2]
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert [line.split()[1] for line in out.splitlines() if re.match(r"│ [a-z-]+ +│", line)] \
        == ["tunkit-nooffload", "veth", "naive"], out
    assert "gso" not in out and "coalesced" not in out  # no columns of zeros
    assert_readable_at_80(out)
    assert our_namespaces(proc.pid) == []


@pytest.mark.timeout(240)
def test_bench_queues_runs_worker_setups_with_cpu_and_leaves_nothing(
    root: None, tmp_path: Path,
) -> None:
    need_tool("iperf3")
    out_json = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [*TUNKIT, "bench", "--seconds", "1", "--streams", "4", "--queues", "2",
         "--json", str(out_json)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV80,
    )
    with _watching(proc) as watch:
        deadline = time.monotonic() + 220
        while proc.poll() is None and time.monotonic() < deadline:
            watch.look()  # every child, the workers among them, while it runs
            time.sleep(0.02)
        out, err = proc.communicate(timeout=10)
        left = watch.running(timeout=5)
    assert proc.returncode == 0, out + err
    assert left == {}, left
    results = {r["name"]: r for r in json.loads(out_json.read_text())["results"]}
    assert list(results) == ["tunkit", "tunkit-mq", "tunkit-split", "tunkit-split-mq",
                             "tunkit-nooffload", "veth", "naive"]
    for r in results.values():
        assert r["gbit_s"] > 0 and r["streams"] == 4 and r["error"] == "", r
    # The CPU of the processes that move the packets: this one, the naive
    # program, or each worker; all but this one its children, now gone.
    # (Children are known by pid: one seen before its exec shows the parent's command line.)
    children = set(watch.cmdlines)
    others: list[int] = []
    for name, r in results.items():
        labels = [c["process"] for c in r["cpu"]]
        pids = [c["pid"] for c in r["cpu"]]
        if name.endswith("-mq"):
            assert r["queues"] == 2 and labels == ["worker 0", "worker 1"], r
            assert len(r["queue_packets"]) == 2 and sum(r["queue_packets"]) > 0, r
            assert r["stats"]["a"]["packets_read"] > 0 and r["stats"]["b"]["packets_read"] > 0
            others += pids
        elif name == "veth":
            assert labels == []
        elif name == "naive":
            assert labels == ["naive"], r
            others += pids
        else:
            assert (labels, pids) == (["benchmark"], [proc.pid]), r
        # A worker whose queue the kernel's flow hash gave no stream really
        # spends no CPU; the one with the most packets spent some.
        for c in r["cpu"]:
            assert c["seconds"] >= 0 and c["share"] >= 0, r
        busiest = r["queue_packets"].index(max(r["queue_packets"])) if r["queue_packets"] else 0
        if r["cpu"]:
            assert r["cpu"][busiest]["seconds"] > 0 and r["cpu"][busiest]["share"] > 0, r
    assert len(set(others)) == 5 and set(others) <= children, (others, watch.cmdlines)
    # The figures table: a "% core" column, one figure per worker.
    rows = {line.split()[1]: line for line in out.splitlines()
            if re.match(r"│ [a-z-]+ +│ +\d+\.\d\d │", line)}
    assert list(rows) == list(results), out
    assert re.search(r"│ +\d+ \d+ │$", rows["tunkit-split-mq"]), out
    assert re.search(r"│ +\d+ │$", rows["tunkit"]) and rows["veth"].endswith("- │"), out
    assert "% core" in out
    assert_readable_at_80(out)
    assert our_namespaces(proc.pid) == []


@pytest.mark.timeout(240)
def test_bench_tunnel_measures_every_setup_with_its_processes_and_leaves_nothing(
    root: None, tmp_path: Path,
) -> None:
    need_tool("iperf3")
    out_json = tmp_path / "tunnel.json"
    seconds = 2
    proc = subprocess.Popen(
        [*TUNKIT, "bench", "tunnel", "--seconds", str(seconds), "--json", str(out_json)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV80,
    )
    with _watching(proc) as watch:
        deadline = time.monotonic() + 220
        while proc.poll() is None and time.monotonic() < deadline:
            watch.look()
            time.sleep(0.02)
        out, err = proc.communicate(timeout=10)
        left = watch.running(timeout=5)
    assert proc.returncode == 0, out + err
    assert left == {}, left
    report = json.loads(out_json.read_text())
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["tunkit-udp", "tunkit-tcp", "tunkit-tls", "vxlan", "underlay",
                             "naive-udp"]
    for name, r in results.items():
        assert r["gbit_s"] > 0 and r["streams"] == 1 and r["error"] == "", r
        assert report["ratios"][name]["naive-udp"] == pytest.approx(
            r["gbit_s"] / results["naive-udp"]["gbit_s"])
        labels = [c["process"] for c in r["cpu"]]
        if name in ("vxlan", "underlay"):
            assert labels == [], r  # the kernel alone
            continue
        # Two processes of their own (one per host), children of the benchmark.
        prefix = "naive" if name == "naive-udp" else "tunnel"
        assert labels == [f"{prefix} A", f"{prefix} B"], r
        assert {c["pid"] for c in r["cpu"]} <= set(watch.cmdlines), r
        assert all(c["seconds"] > 0 for c in r["cpu"]), r
        if prefix == "tunnel":
            # Their own counters (the totals each printed on SIGTERM): A sent the
            # overlay's packets, at least the bytes iperf3's receiver counted.
            got = r["gbit_s"] * 1e9 / 8 * seconds * 0.9
            assert r["stats"]["A"]["sent_bytes"] >= got, r
            assert r["stats"]["B"]["received_bytes"] >= got, r
            assert r["stats"]["A"]["dropped"] == r["stats"]["B"]["dropped"] == 0, r
    rows = [line.split()[1] for line in out.splitlines() if re.match(r"│ [a-z-]+ +│ +\d", line)]
    assert rows == list(results), out
    assert "x naive-udp" in out and "x vxlan" in out
    assert_readable_at_80(out)
    assert our_namespaces(proc.pid) == []


@pytest.mark.timeout(120)
def test_bench_ended_by_sigterm_while_workers_run_ends_and_reaps_them(root: None) -> None:
    need_tool("iperf3")
    proc = subprocess.Popen([*TUNKIT, "bench", "--seconds", "3", "--streams", "4",
                             "--queues", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV80)
    with _watching(proc) as watch:
        watch.wait_for(lambda cmdline: "tunkit._linux.queues" in cmdline, timeout=90)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        left = watch.running(timeout=5)
    assert proc.returncode == 143, out + err
    assert err.strip().endswith("tunkit: interrupted (SIGTERM)"), err
    assert left == {}, left
    assert our_namespaces(proc.pid) == []


def test_bench_queues_needs_offload() -> None:
    proc = subprocess.run([*TUNKIT, "bench", "--queues", "2", "--no-offload"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tunkit: --queues runs tunkit-mq and tunkit-split-mq")


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


def _tshark_records(tshark: str, path: Path) -> list[tuple[str, str, str, int, int]]:
    """(interface, source, destination, direction flag, ICMP sequence) of each echo in *path*."""
    fields = ["frame.interface_name", "ip.src", "ip.dst", "frame.packet_flags_direction",
              "icmp.seq"]
    proc = subprocess.run([tshark, "-r", str(path), "-Y", "icmp", "-T", "fields",
                           *(a for f in fields for a in ("-e", f))],
                          capture_output=True, text=True, timeout=60, check=True)
    out = []
    for line in proc.stdout.splitlines():
        name, src, dst, flags, seq = line.split("\t")
        out.append((name, src, dst, int(flags, 16), int(seq)))
    return out


@pytest.mark.timeout(90)
def test_bridge_pcap_records_both_devices_and_verbose_prints_each_packet(
    netns_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    need_tool("ping")
    tshark = need_tool("tshark")
    ns_a, ns_b = netns_factory("bca"), netns_factory("bcb")
    for ns in (ns_a, ns_b):
        disable_ipv6(ns)  # the pings are all that crosses
    pcap = tmp_path / "bridge.pcapng"
    a, b = "10.218.0.1", "10.218.0.2"
    proc = _start_bridge(["tka", "tkb", "--create", "--netns-a", ns_a, "--netns-b", ns_b,
                          "--address", f"tka={a}/24", "--address", f"tkb={b}/24",
                          "--pcap", str(pcap), "--verbose"])
    try:
        ping = _ping(ns_a, b)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        out = _stop(proc)
    # Each echo request read ("in", 1) from tka and written ("out", 2) to tkb; each reply
    # the other way round. The file's order between the two devices is the capture threads'.
    inbound, outbound = 1, 2
    expected = [rec for seq in (1, 2, 3) for rec in (
        ("tka", a, b, inbound, seq), ("tkb", a, b, outbound, seq),
        ("tkb", b, a, inbound, seq), ("tka", b, a, outbound, seq),
    )]
    assert sorted(_tshark_records(tshark, pcap)) == sorted(expected)
    lines = [line for line in out.splitlines() if re.match(r" *\d+\.\d{6} ", line)]
    summaries = [line.split(maxsplit=1)[1] for line in lines]
    assert summaries == [
        f"tka → tkb IP {a} > {b}: icmp echo request, len 64",
        f"tkb → tka IP {b} > {a}: icmp echo reply, len 64",
    ] * 3, out
    assert "  --pcap: 12 packets recorded" in out.splitlines(), out
    assert "  --verbose: 6 lines, 0 packets not shown" in out.splitlines(), out


def test_bridge_refuses_a_pcap_file_it_cannot_write_before_making_anything(root: None) -> None:
    proc = subprocess.run([*TUNKIT, "bridge", "tka", "tkb", "--create",
                           "--pcap", "/nonexistent-tunkit/b.pcapng"],
                          capture_output=True, text=True, timeout=30, check=False, env=ENV80)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("tunkit: --pcap /nonexistent-tunkit/b.pcapng: "
                           "No such file or directory\n")


@pytest.mark.timeout(60)
def test_bridge_joins_existing_persistent_devices(netns_factory: Callable[[str], str]) -> None:
    need_tool("ping")
    ns_a, ns_b = netns_factory("bpa"), netns_factory("bpb")
    for ns, dev, addr in ((ns_a, "tpa", "10.216.0.1/24"), (ns_b, "tpb", "10.216.0.2/24")):
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "mode", "tun", "name", dev], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    assert [_tun(ns, dev).vnet_hdr for ns, dev in ((ns_a, "tpa"), (ns_b, "tpb"))] == [False] * 2
    proc = _start_bridge(["tpa", "tpb", "--netns-a", ns_a, "--netns-b", ns_b])
    try:
        # Attached with offload: the virtio header is on while the bridge holds them.
        assert [_tun(ns, d).vnet_hdr for ns, d in ((ns_a, "tpa"), (ns_b, "tpb"))] == [True] * 2
        ping = _ping(ns_a, "10.216.0.2")
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        _stop(proc)
    still = subprocess.run(["ip", "-n", ns_a, "link", "show", "tpa"], capture_output=True,
                           check=False)
    assert still.returncode == 0, "a persistent device must outlive the bridge"


def _tun(ns: str, name: str) -> netlink.TunInfo:
    info = netlink.tun_info(ns, name)
    assert info is not None, name
    return info


@pytest.mark.timeout(60)
def test_bridge_attaches_to_a_multi_queue_device_whose_other_queue_has_no_offload(
    netns_factory: Callable[[str], str],
) -> None:
    ns_a, ns_b = netns_factory("bqa"), netns_factory("bqb")
    subprocess.run(["ip", "-n", ns_a, "tuntap", "add", "mode", "tun", "multi_queue",
                    "name", "tqa"], check=True)
    subprocess.run(["ip", "-n", ns_b, "tuntap", "add", "mode", "tun", "name", "tqb"], check=True)
    # Another program's queue, without the virtio header: every queue of tqa has it off.
    held = tunkit.attach_tun("tqa", netns=ns_a, offload=False)
    try:
        proc = _start_bridge(["tqa", "tqb", "--netns-a", ns_a, "--netns-b", ns_b])
        try:
            assert _tun(ns_a, "tqa").queues == 2  # the bridge's queue beside the other one
        finally:
            _stop(proc)
    finally:
        held.close()


@pytest.mark.parametrize(("kind", "what"), [
    (["link", "add", "tkd0", "type", "veth", "peer", "name", "tkd9"], "it is a veth link"),
    (["tuntap", "add", "mode", "tap", "name", "tkd0"], "it is a TAP device"),
], ids=["veth", "tap"])
def test_bridge_attaches_only_to_a_tun_device(
    netns_factory: Callable[[str], str], kind: list[str], what: str,
) -> None:
    ns = netns_factory("bkind")
    subprocess.run(["ip", "-n", ns, *kind], check=True)
    proc = subprocess.run([*TUNKIT, "bridge", "tkd0", "tkd1", "--netns-a", ns, "--netns-b", ns],
                          capture_output=True, text=True, timeout=30, check=False, env=ENV80)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"tunkit: no TUN device 'tkd0' in network namespace {ns!r}: {what} "
                           "(make one with 'ip tuntap add mode tun tkd0', or pass --create)\n")


def test_bridge_names_a_missing_device(netns_factory: Callable[[str], str]) -> None:
    ns = netns_factory("bmiss")
    proc = subprocess.run([*TUNKIT, "bridge", "nope0", "nope1", "--netns-a", ns, "--netns-b", ns],
                          capture_output=True, text=True, timeout=30, check=False, env=ENV80)
    assert proc.returncode == 2
    assert proc.stderr == (f"tunkit: no TUN device 'nope0' in network namespace {ns!r}: there is "
                           "no such link (make one with 'ip tuntap add mode tun nope0', or pass "
                           "--create)\n")
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

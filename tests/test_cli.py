"""The tunkit command line, run as a real subprocess; ``tunkit demo`` and how commands end."""

# ruff: noqa: F811  (fixtures imported from netns_util are parameters here)

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import pytest
from cli_util import (
    ENV80,
    TUNKIT,
    ChildWatch,
    assert_readable_at_80,
    our_namespaces,
    run_tunkit,
)
from netns_util import root  # noqa: F401 - fixture

from tunkit._linux.netns import create_netns, delete_netns, list_netns
from tunkit.cli import children, demo_memory


def test_memory_demo_prints_its_table_with_zero_errors_in_80_columns() -> None:
    proc = run_tunkit("demo", "--memory", "--packets", "3000")
    assert proc.returncode == 0, proc.stderr
    assert "in-memory demo" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if "3,000" in line]
    assert len(lines) == 2, proc.stdout  # both directions moved every packet
    assert all(line.rstrip(" │").endswith("0") for line in lines)
    assert "Traceback" not in proc.stderr
    assert_readable_at_80(proc.stdout)


def test_memory_demo_times_each_direction_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # B → A starts only once A → B has delivered everything: the two run one
    # after the other, so their own times add up to no more than the whole.
    a2b_done = threading.Event()
    receive_batched, send_batched = demo_memory._receive_batched, demo_memory._send_batched

    def receive_then_tell(*args: object) -> None:
        receive_batched(*args)  # type: ignore[arg-type]
        a2b_done.set()

    def send_after_a2b(*args: object) -> None:
        a2b_done.wait(60)
        send_batched(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(demo_memory, "_receive_batched", receive_then_tell)
    monkeypatch.setattr(demo_memory, "_send_batched", send_after_a2b)
    start = time.perf_counter()
    a2b, b2a = demo_memory.run_memory_demo(2000, 32)
    whole = time.perf_counter() - start
    assert (a2b.received, b2a.received, a2b.errors, b2a.errors) == (2000, 2000, 0, 0)
    assert a2b.seconds > 0 and b2a.seconds > 0
    assert a2b.seconds + b2a.seconds <= whole
    assert a2b.packets_per_second == 2000 / a2b.seconds


@pytest.mark.parametrize(
    ("command", "default"),
    [("demo", "(default: 3)"), ("bench", "(default: 10.0)"), ("bridge", "(default: 5.0)"),
     ("create", "(default 1500)"), ("delete", "")],
)
def test_every_help_explains_with_an_example_and_shows_defaults(
    command: str, default: str,
) -> None:
    proc = run_tunkit(command, "--help")
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and f"tunkit {command}" in proc.stdout
    assert default in proc.stdout
    assert "(default: [])" not in proc.stdout
    assert "(default: None)" not in proc.stdout and "(default: False)" not in proc.stdout
    assert_readable_at_80(proc.stdout)


@pytest.mark.parametrize("args", [("demo", "--packets", "0"), ("demo", "--bogus"), ("nope",), ()])
def test_bad_arguments_exit_2_with_usage_and_no_traceback(args: tuple[str, ...]) -> None:
    proc = run_tunkit(*args)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_without_root_falls_back_to_memory_in_one_line(root: None) -> None:
    # setpriv drops the capabilities an ordinary user lacks.
    drop = "-net_admin,-sys_admin"
    proc = subprocess.run(
        ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *TUNKIT, "demo",
         "--packets", "500"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN missing)" in proc.stdout
    assert "sudo tunkit demo" in proc.stdout
    assert "in-memory demo" in proc.stdout


@pytest.mark.timeout(180)
def test_real_demo_runs_reads_in_80_columns_and_leaves_nothing_behind(root: None) -> None:
    proc = subprocess.Popen([*TUNKIT, "demo", "--seconds", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV80)
    watch = ChildWatch(proc.pid)
    try:
        while proc.poll() is None:
            watch.look()  # the tunnel processes among the children, while they run
            time.sleep(0.02)
        out, err = proc.communicate(timeout=150)
        left = watch.running(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        watch.close()
    assert proc.returncode == 0, out + err
    assert "IPv4" in out and "IPv6" in out and "Gbit/s" in out and "errors: 0" in out
    # A `tunkit tunnel` process per host, each in its namespace, ended with the demo.
    tunnels = [c for c in watch.cmdlines.values() if " tunkit tunnel " in f" {c} "]
    assert len(tunnels) == 2 and sum("--listen" in c for c in tunnels) == 1, watch.cmdlines
    assert left == {}, left
    # Its figures are the tunnel ends' own totals: what A sent, B received (a
    # datagram may be lost on the underlay, as on a real wire: TCP sends it
    # again), at least the TCP bytes the receiver counted.
    row = next(line for line in out.splitlines() if line.startswith("│ A → B"))
    sent, received, sent_bytes, dropped = (int(x.replace(",", "")) for x in row.split("│")[2:6])
    tcp_mb = float(re.search(r"TCP A → B: ([\d,.]+) MB", out)[1].replace(",", ""))  # type: ignore[index]
    assert 0.99 * sent <= received <= sent and dropped == 0, row
    assert sent_bytes >= tcp_mb * 1e6 * 0.999, (row, tcp_mb)
    assert "tunnel demo (udp" in out
    assert_readable_at_80(out)
    assert our_namespaces(proc.pid) == []


@pytest.mark.timeout(180)
def test_local_demo_joins_the_devices_in_its_own_process(root: None) -> None:
    proc = subprocess.run([*TUNKIT, "demo", "--local", "--seconds", "1"], capture_output=True,
                          text=True, env=ENV80, timeout=150, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "real-device demo (offload on)" in proc.stdout and "errors: 0" in proc.stdout
    assert_readable_at_80(proc.stdout)


def _is_ping(cmdline: str) -> bool:
    return " ping " in f" {cmdline} "


def _is_tcp_end(cmdline: str) -> bool:
    return "create_server" in cmdline or "create_connection" in cmdline


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("sig", "phase", "status"),
    [(signal.SIGTERM, _is_ping, 143), (signal.SIGINT, _is_tcp_end, 130)],
    ids=["sigterm-during-ping", "ctrl-c-during-tcp"],
)
def test_demo_ended_by_a_signal_exits_128_plus_it_and_ends_every_child(
    root: None, sig: signal.Signals, phase: object, status: int,
) -> None:
    proc = subprocess.Popen([*TUNKIT, "demo", "--seconds", "20"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    watch = ChildWatch(proc.pid)
    try:
        watch.wait_for(phase)  # type: ignore[arg-type]
        time.sleep(0.3)
        watch.look()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == status, err
        assert err.strip().splitlines() == [f"tunkit: interrupted ({sig.name})"]
        # Every child ended before it did: none was left running on its own.
        assert watch.running() == {}
        assert our_namespaces(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        watch.close()


@pytest.mark.timeout(240)
def test_demo_killed_its_children_die_with_it_and_the_next_run_cleans_up(root: None) -> None:
    proc = subprocess.Popen([*TUNKIT, "demo", "--seconds", "20"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    watch = ChildWatch(proc.pid)
    try:
        watch.wait_for(lambda c: "create_server" in c)  # the TCP receiver, in namespace B
        watch.wait_for(lambda c: "create_connection" in c)
        proc.kill()
        proc.wait()
        assert our_namespaces(proc.pid), "SIGKILL left nothing to clean up"
        # The kernel ends them (PR_SET_PDEATHSIG): no receiver left waiting forever.
        assert watch.running(timeout=10) == {}
    finally:
        watch.close()
    again = run_tunkit("demo", "--seconds", "1", timeout=150)
    assert again.returncode == 0, again.stdout + again.stderr
    assert our_namespaces(proc.pid) == []


@pytest.mark.timeout(60)
def test_leftovers_of_a_dead_run_are_ended_and_nothing_else(root: None) -> None:
    gone = subprocess.Popen(["true"])  # stands for a tunkit run that has died
    gone.wait()
    ns = f"tk-{gone.pid}-demo-b"
    create_netns(ns)
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], maker: int | None) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if maker is not None:
            env[children.MARK] = str(maker)
        procs.append(subprocess.Popen(argv, env=env))
        return procs[-1]

    try:
        left = start(["ip", "netns", "exec", ns, "sleep", "60"], gone.pid)
        unmarked = start(["ip", "netns", "exec", ns, "sleep", "60"], None)
        live_maker = start(["sleep", "60"], None)
        of_live_run = start(["sleep", "60"], live_maker.pid)
        deadline = time.monotonic() + 10
        while not all(_execed(p.pid, "sleep") for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        ended, removed = children.remove_leftovers("tk")
        assert left.pid in ended and left.wait(5) == -signal.SIGKILL
        assert not {unmarked.pid, live_maker.pid, of_live_run.pid} & set(ended)
        assert [p.poll() for p in (unmarked, live_maker, of_live_run)] == [None, None, None]
        assert ns in removed and ns not in list_netns()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if ns in list_netns():
            delete_netns(ns)


def _execed(pid: int, program: str) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == program
    except OSError:
        return False


def test_top_level_help_names_every_command_in_80_columns() -> None:
    proc = run_tunkit("--help")
    assert proc.returncode == 0 and re.search(r"demo.*bench.*bridge", proc.stdout, re.S)
    assert_readable_at_80(proc.stdout)


def test_native_demo_exits_1_and_says_what_a_forwarder_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The "errors" column and the exit status come from the forwarders' counters."""
    import argparse
    import functools
    import io

    from rich.console import Console
    from rich.progress import Progress

    from tunkit import ForwarderStats, TunStats
    from tunkit.cli import demo, demo_native

    def measured(**_: object) -> demo_native.NativeDemoResult:
        ping = demo_native.PingResult("IPv4", sent=5, received=5)
        return demo_native.NativeDemoResult(
            pings=[ping], tcp_bytes=1000, tcp_seconds=1.0,
            a_stats=TunStats(packets_read=10), b_stats=TunStats(packets_read=4),
            a2b=ForwarderStats(write_errors=2, dropped=3, last_error="OSError: [Errno 105] full"),
        )

    monkeypatch.setattr(demo_native, "run_native_demo", measured)
    # No live display: its refresh thread is not joined by rich (nor needed here).
    monkeypatch.setattr(demo, "Progress", functools.partial(Progress, auto_refresh=False))
    out = io.StringIO()
    args = argparse.Namespace(seconds=1.0, no_offload=False)
    status = demo._native_demo(args, Console(file=out, width=120))
    text = out.getvalue()
    assert status == 1, text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│ " in line}
    a2b = [c.strip() for c in rows["A → B"].split("│")[1:-1]]
    b2a = [c.strip() for c in rows["B → A"].split("│")[1:-1]]
    assert (a2b[-2], a2b[-1]) == ("3", "2")  # dropped, errors
    assert (b2a[-2], b2a[-1]) == ("0", "0")
    assert (
        "error: forwarder A → B: read errors 0, write errors 2, packets dropped 3; "
        "last: OSError: [Errno 105] full"
    ) in text

"""The tunkit command line, run as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from netns_util import root  # noqa: F401 - fixture

TUNKIT = [sys.executable, "-m", "tunkit"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([*TUNKIT, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def _our_namespaces(pid: int) -> list[str]:
    try:
        names = os.listdir("/var/run/netns")
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(f"tk-{pid}-")]


def test_memory_demo_prints_its_table_with_zero_errors() -> None:
    proc = _run("demo", "--memory", "--packets", "3000")
    assert proc.returncode == 0, proc.stderr
    assert "in-memory demo" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if "3,000" in line]
    assert len(lines) == 2, proc.stdout  # both directions moved every packet
    assert all(line.rstrip(" │").endswith("0") for line in lines)
    assert "Traceback" not in proc.stderr


def test_demo_help_explains_with_an_example() -> None:
    proc = _run("demo", "--help")
    assert proc.returncode == 0
    assert "example" in proc.stdout and "tunkit demo" in proc.stdout


@pytest.mark.parametrize("args", [("demo", "--packets", "0"), ("demo", "--bogus"), ("nope",), ()])
def test_bad_arguments_exit_2_with_usage_and_no_traceback(args: tuple[str, ...]) -> None:
    proc = _run(*args)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_without_root_falls_back_to_memory_in_one_line(root: None) -> None:  # noqa: F811
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
def test_real_demo_runs_and_leaves_nothing_behind(root: None) -> None:  # noqa: F811
    proc = subprocess.Popen([*TUNKIT, "demo", "--seconds", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "160"})
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, out + err
    assert "IPv4" in out and "IPv6" in out and "Gbit/s" in out and "errors: 0" in out
    assert _our_namespaces(proc.pid) == []


@pytest.mark.timeout(180)
def test_demo_killed_mid_run_cleans_up_and_the_next_run_leaves_nothing(
    root: None,  # noqa: F811
) -> None:
    proc = subprocess.Popen([*TUNKIT, "demo", "--seconds", "20"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not _our_namespaces(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _our_namespaces(proc.pid), "the demo made no namespace"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert _our_namespaces(proc.pid) == []
    # A SIGKILL leaves leftovers that the next run removes.
    proc = subprocess.Popen([*TUNKIT, "demo", "--seconds", "20"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(_our_namespaces(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert _our_namespaces(proc.pid), "SIGKILL left nothing to clean up"
    again = _run("demo", "--seconds", "1", timeout=150)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _our_namespaces(proc.pid) == []


def test_native_demo_exits_1_and_says_what_a_forwarder_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The "errors" column and the exit status come from the forwarders' counters."""
    import argparse
    import io

    from rich.console import Console

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

"""``tunkit doctor``: as root, as nobody, with /dev/net/tun hidden; and what it leaves behind."""

from __future__ import annotations

import json
import os
import platform
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from netns_util import need_tool, root  # noqa: F401 - fixture

import tunkit
from tunkit._linux import netns as tk_netns
from tunkit.cli import doctor

TUNKIT = [sys.executable, "-m", "tunkit"]
# setpriv as the brief of an unprivileged user: uid/gid nobody, no groups, no capabilities.
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "--inh-caps=-all", "--bounding-set=-all"]

# Every row, in the table's order: written out here, not taken from the code under test.
DEVICE_KEYS = [
    "vnet_hdr", "tun_f_csum", "tun_f_tso4", "tun_f_tso6", "tun_f_uso4", "tun_f_uso6",
    "write_tcp4", "write_tcp6", "write_udp4", "write_udp6",
]
KEYS = ["kernel", "dev_net_tun", "capabilities", "speedups", *DEVICE_KEYS,
        "udp_segment", "udp_gro", "ip", "iperf3"]


class Run(subprocess.CompletedProcess[str]):
    """A finished ``tunkit doctor`` and its process id (its namespaces carry it)."""

    pid: int


def _doctor(*args: str, prefix: tuple[str, ...] = (), timeout: float = 60) -> Run:
    # COLUMNS wider than 80: the table must keep to 80 all the same.
    with subprocess.Popen([*prefix, *TUNKIT, "doctor", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "COLUMNS": "200"}) as proc:
        out, err = proc.communicate(timeout=timeout)
    run = Run(proc.args, proc.returncode, out, err)
    run.pid = proc.pid
    return run


def _rows(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert "Traceback" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] == (proc.returncode == 0)
    rows = out["rows"]
    assert [r["key"] for r in rows] == KEYS
    for r in rows:
        assert r["state"] in ("yes", "no", "needs root"), r
        assert r["ok"] == (r["state"] == "yes")
        assert r["found"], r
        assert r["errno"] is None or r["errno"].startswith("E"), r  # a refusal by name
        if not r["ok"]:
            assert r["advice"], f"a {r['state']!r} without what to do: {r}"
    return {r["key"]: r for r in rows}


def _our_namespaces(pid: int) -> list[str]:
    return [n for n in tk_netns.list_netns() if n.startswith(f"tk-{pid}-")]


def _tun_open_to_others() -> bool:
    return stat.S_IMODE(os.stat("/dev/net/tun").st_mode) & 0o006 == 0o006


def test_as_root_every_row_says_yes_and_the_exit_status_is_0(root: None) -> None:  # noqa: F811
    need_tool("iperf3")
    proc = _doctor("--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(proc)
    assert [k for k, r in rows.items() if r["state"] != "yes"] == []
    assert platform.release() in rows["kernel"]["found"]
    st = os.stat("/dev/net/tun")
    assert stat.filemode(st.st_mode) in rows["dev_net_tun"]["found"]
    # A mode that shuts other users out is a "yes" for root, with how to open it.
    if not _tun_open_to_others():
        assert "chmod 0666 /dev/net/tun" in rows["dev_net_tun"]["advice"]
    assert "3 datagrams" in rows["write_udp4"]["found"]
    assert _our_namespaces(proc.pid) == []


def test_the_table_fits_80_columns_and_names_every_check(root: None) -> None:  # noqa: F811
    proc = _doctor()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    cells = [line.split("│") for line in lines if line.startswith("│")]
    states = {c[1].strip(): c[2].strip() for c in cells if c[1].strip()}
    for check in ("kernel", "/dev/net/tun", "capabilities", "C extension", "IFF_VNET_HDR",
                  "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_USO4", "TUN_F_USO6",
                  "coalesced TCPv4", "coalesced TCPv6", "coalesced UDPv4", "coalesced UDPv6",
                  "UDP_SEGMENT", "UDP_GRO", "ip", "iperf3"):
        assert states.get(check) == "yes", (check, proc.stdout)
    assert lines[-1].startswith("tunkit runs here at full speed")
    assert _our_namespaces(proc.pid) == []


def test_without_the_c_extension_its_row_says_no_and_the_speed_is_lower(
    root: None,  # noqa: F811
) -> None:
    proc = subprocess.run([*TUNKIT, "doctor", "--json"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TUNKIT_PURE_PYTHON": "1"}, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = _rows(proc)
    assert rows["speedups"]["state"] == "no"
    assert "TUNKIT_PURE_PYTHON is set" in rows["speedups"]["found"]
    assert rows["speedups"]["advice"] == "unset TUNKIT_PURE_PYTHON"
    assert [k for k, r in rows.items() if not r["ok"]] == ["speedups"]
    assert json.loads(proc.stdout)["summary"] == "tunkit runs here, slower: pure Python"


def test_as_nobody_the_privileged_rows_say_needs_root_and_the_status_is_1(
    root: None,  # noqa: F811
) -> None:
    need_tool("setpriv")
    probe = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import tunkit"],
                           capture_output=True, text=True, timeout=30, check=False)
    assert probe.returncode == 0, f"nobody cannot import tunkit from here: {probe.stderr}"
    proc = _doctor("--json", prefix=tuple(AS_NOBODY))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = _rows(proc)
    caps = rows["capabilities"]
    assert caps["state"] == "no"
    assert "CAP_NET_ADMIN" in caps["found"] and "CAP_SYS_ADMIN" in caps["found"]
    assert "sudo tunkit doctor" in caps["advice"]
    assert rows["kernel"]["state"] == "needs root"
    assert {rows[k]["state"] for k in DEVICE_KEYS} == {"needs root"}
    # What needs no privilege is still probed.
    assert rows["udp_segment"]["state"] == rows["udp_gro"]["state"] == "yes"
    assert rows["speedups"]["state"] == ("yes" if tunkit.speedups_enabled() else "no")
    if _tun_open_to_others():
        assert rows["dev_net_tun"]["state"] == "yes"
    else:
        assert rows["dev_net_tun"]["state"] == "no"
        assert "may not open it" in rows["dev_net_tun"]["found"]
        assert "chmod 0666 /dev/net/tun" in rows["dev_net_tun"]["advice"]
    table = _doctor(prefix=tuple(AS_NOBODY))
    assert table.returncode == 1 and "Traceback" not in table.stderr, table.stderr
    assert "needs root" in table.stdout and "cannot make devices here" in table.stdout


# unshare --mount gives the doctor a private mount namespace: what is mounted
# over /dev/net there is gone with it, and the host's /dev/net/tun untouched.
_HIDE = {
    "tmpfs": "mount -t tmpfs tmpfs /dev/net",
    "empty-file": "touch /tmp/tk-doctor-$$ && mount --bind /tmp/tk-doctor-$$ /dev/net/tun"
                  " && rm /tmp/tk-doctor-$$",
}


@pytest.mark.parametrize("how", list(_HIDE))
def test_with_dev_net_tun_hidden_its_row_says_what_to_do_and_the_status_is_1(
    root: None, how: str,  # noqa: F811
) -> None:
    need_tool("unshare")
    script = f'{_HIDE[how]} && exec "$0" -m tunkit doctor --json'
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script, sys.executable],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = _rows(proc)
    tun = rows["dev_net_tun"]
    assert tun["state"] == "no"
    if how == "tmpfs":
        assert "missing" in tun["found"]
        assert "modprobe tun" in tun["advice"]
    else:
        assert "not a character device" in tun["found"]
        assert "mknod /dev/net/tun c 10 200" in tun["advice"]
    assert rows["capabilities"]["state"] == "yes"
    assert {rows[k]["state"] for k in DEVICE_KEYS} == {"no"}
    assert all("not probed" in rows[k]["found"] for k in DEVICE_KEYS)
    assert os.path.exists("/dev/net/tun")  # the host's is still there


def test_the_scratch_namespace_is_removed_when_the_probe_fails(root: None) -> None:  # noqa: F811
    with pytest.raises(RuntimeError, match="inside"), doctor.scratch_netns() as ns:
        assert ns == f"tk-{os.getpid()}-doctor"
        assert ns in tk_netns.list_netns()
        raise RuntimeError("failed inside the probe")
    assert _our_namespaces(os.getpid()) == []


def test_sigterm_mid_probe_removes_the_namespace_and_sigkill_leftovers_go_next_run(
    root: None,  # noqa: F811
) -> None:
    # The probe holds its namespace for a fraction of a second: watch closely,
    # and try again if a run slipped by between two looks.
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for _attempt in range(20):
            proc = subprocess.Popen([*TUNKIT, "doctor"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            while proc.poll() is None and not _our_namespaces(proc.pid):
                time.sleep(0.001)
            if proc.poll() is None:
                proc.send_signal(signum)
                _, err = proc.communicate(timeout=30)
                break
            proc.communicate()
        else:
            pytest.fail("never caught a doctor inside its scratch namespace")
        if signum == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM, err
            assert "Traceback" not in err
            assert _our_namespaces(proc.pid) == []
        else:
            assert _our_namespaces(proc.pid), "SIGKILL left nothing to clean up"
            again = _doctor()
            assert again.returncode == 0, again.stdout + again.stderr
            assert _our_namespaces(proc.pid) == []


def _probe_with(monkeypatch: pytest.MonkeyPatch,
                change: Callable[[Any, bytearray, int], None]) -> dict[str, doctor.Row]:
    """Run the device probe with *change*(kind, buffer, headroom) applied to each
    super-packet before it is written: a seam for faults, the kernel stays real."""
    build = doctor._super_packet

    def changed(kind: Any, payload: bytes, headroom: int) -> bytearray:
        buf = build(kind, payload, headroom)
        change(kind, buf, headroom)
        return buf

    monkeypatch.setattr(doctor, "_super_packet", changed)
    return {r.key: r for r in doctor.device_rows()}


def test_a_coalesced_write_the_kernel_refuses_is_a_no_in_its_row_and_the_kernels(
    root: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    # A UDP super-packet without VIRTIO_NET_HDR_F_NEEDS_CSUM: Linux refuses it
    # (EINVAL), as a quirky kernel refuses good ones; TCP stays as it is.
    def without_partial_checksum(kind: Any, buf: bytearray, headroom: int) -> None:
        if kind.proto == 17:
            buf[headroom - 10] = 0  # virtio_net_hdr.flags

    rows = _probe_with(monkeypatch, without_partial_checksum)
    assert rows["write_tcp4"].state == rows["write_tcp6"].state == "yes"
    assert rows["write_udp4"].state == "no"
    assert rows["write_udp4"].found.startswith("refused: EINVAL (Invalid argument); ")
    assert rows["write_udp4"].errno == "EINVAL"
    assert rows["write_tcp4"].errno is None
    assert "update the kernel" in rows["write_udp4"].advice
    # The device then splits UDP super-packets: the second was never offered whole.
    assert rows["write_udp6"].state == "no"
    assert "not written whole" in rows["write_udp6"].found
    kernel = doctor.kernel_row(list(rows.values()))
    assert kernel.state == "no" and "UDPv4, UDPv6" in kernel.found
    assert _our_namespaces(os.getpid()) == []


def test_a_coalesced_write_that_arrives_damaged_is_a_no(
    root: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    # The kernel takes the write (the checksum is its to complete) and
    # delivers it, but not the bytes sent: the receiving check must notice.
    def damaged(kind: Any, buf: bytearray, headroom: int) -> None:
        buf[-1] ^= 0xFF

    rows = _probe_with(monkeypatch, damaged)
    for key in ("write_tcp4", "write_tcp6", "write_udp4", "write_udp6"):
        assert rows[key].state == "no", rows[key]
        assert "never arrived intact" in rows[key].found

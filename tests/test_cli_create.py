"""``tunkit create`` / ``tunkit delete``, run as real subprocesses, in namespaces."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from netns_util import netns_factory, root  # noqa: F401

import tunkit
from tunkit._linux import netlink

pytestmark = pytest.mark.timeout(60)

MakeNs = Callable[[str], str]
NAME = f"tkc{os.getpid()}"


def _tunkit(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "tunkit", *args], capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, "COLUMNS": "200"})


def _one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunkit: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_create_makes_a_configured_persistent_device_and_delete_removes_it(
    netns_factory: MakeNs,
) -> None:
    ns = netns_factory("create")
    proc = _tunkit("create", NAME, "--owner", "nobody", "--group", "nogroup", "--multi-queue",
                   "--mtu", "1400", "--address", "10.84.0.1/24", "--address", "fd00:84::1/64",
                   "--up", "--netns", ns)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == (
        f"created persistent TUN device {NAME} in namespace {ns}: owner uid 65534 (nobody), "
        "group gid 65534 (nogroup), mtu 1400, offload, multi-queue, up, 10.84.0.1/24, "
        "fd00:84::1/64"
    )
    info = netlink.tun_info(ns, NAME)
    assert info is not None
    assert (info.persist, info.owner, info.group, info.multi_queue, info.mtu, info.up) == (
        True, 65534, 65534, True, 1400, True)
    assert info.queues == 0  # nobody holds it: the device stayed on its own
    with tunkit.attach_tun(NAME, netns=ns) as tun:
        assert {ipaddress.ip_interface("10.84.0.1/24"),
                ipaddress.ip_interface("fd00:84::1/64")} <= set(tun.addresses())

    _one_line_error(_tunkit("create", NAME, "--netns", ns), "exists already", NAME)
    proc = _tunkit("delete", NAME, "--netns", ns)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"deleted TUN device {NAME} in namespace {ns}"
    assert netlink.tun_info(ns, NAME) is None
    _one_line_error(_tunkit("delete", NAME, "--netns", ns), f"no TUN device {NAME!r}")


def test_create_with_no_offload(netns_factory: MakeNs) -> None:
    ns = netns_factory("nooff")
    proc = _tunkit("create", NAME, "--no-offload", "--netns", ns)
    assert proc.returncode == 0, proc.stderr
    assert "owner uid 0 (root), group none, mtu 1500, no offload, down" in proc.stdout
    info = netlink.tun_info(ns, NAME)
    assert info is not None and not info.vnet_hdr and info.owner == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--owner", "no-such-user"), ("no-such-user", "no such user")),
        (("--group", "no-such-group"), ("no such group",)),
        (("--address", "10.1"), ("10.1",)),
        (("--netns", "tk-no-such-ns"), ("network namespace 'tk-no-such-ns' does not exist",)),
    ],
    ids=["owner", "group", "address", "netns"],
)
def test_create_mistakes_are_one_line_and_exit_2(
    root: None, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    _one_line_error(_tunkit("create", NAME, *args), *words)


def test_bad_names_are_one_line_and_exit_2(root: None) -> None:
    _one_line_error(_tunkit("create", "a" * 16), "at most 15")
    _one_line_error(_tunkit("delete", "a/b"), "'/'")


def test_delete_refuses_what_is_not_a_persistent_tun_device(netns_factory: MakeNs) -> None:
    ns = netns_factory("nodel")
    _one_line_error(_tunkit("delete", "lo", "--netns", ns), "no TUN device 'lo'",
                    "not a TUN device")
    with tunkit.create_tun(NAME, netns=ns):
        _one_line_error(_tunkit("delete", NAME, "--netns", ns), "is not persistent")


def test_without_root_one_line_and_exit_2(root: None) -> None:
    drop = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")
    _one_line_error(_tunkit("create", NAME, prefix=drop), "needs root", "CAP_NET_ADMIN")
    _one_line_error(_tunkit("delete", NAME, prefix=drop), "needs root", "CAP_NET_ADMIN")


@pytest.mark.parametrize("command", ["create", "delete"])
def test_help_explains_with_an_example(command: str) -> None:
    proc = _tunkit(command, "--help")
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and f"sudo tunkit {command} tk0" in proc.stdout

"""Persistent devices as root in namespaces: create_tun(persist=...), attach_tun, delete_tun,
and processes without any privilege (uid 65534, no capabilities) that attach to them."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from collections.abc import Callable, MutableSequence, Sequence
from typing import Any

import pytest
from netns_util import disable_ipv6, netns_factory, ns_run, root, tcp_transfer  # noqa: F401
from priv_util import (
    NOBODY,
    Lines,
    dev_tun_node,  # noqa: F401
    end,
    nobody_python,  # noqa: F401
    run_unprivileged,
    start_unprivileged,
)

import tunkit
from tunkit import NativeTun
from tunkit._linux import device as tk_device
from tunkit._linux import netlink
from tunkit._linux.constants import TUN_F_TSO4

pytestmark = pytest.mark.timeout(120)

MakeNs = Callable[[str], str]
Python = tuple[str, str]
A4, B4 = "10.81.0.1", "10.81.0.2"
NAME = f"tkp{os.getpid()}"


def _tunkit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunkit", *args], capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, "COLUMNS": "200"})


def _ping(ns: str, target: str, count: int = 3) -> int:
    """How many of *count* pings from *ns* to *target* were answered."""
    proc = ns_run(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", target, check=False)
    for line in proc.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(proc.stdout + proc.stderr)


# -- the main story: a device made by `tunkit create --owner nobody`, used by nobody ---------

_SENDER = """
    import json, socket, sys, tunkit
    sock = socket.socket(fileno=int(sys.argv[2]))
    tun = tunkit.attach_tun(sys.argv[1])        # no CAP_NET_ADMIN: the device's owner
    tunkit.send_tun(sock, tun)
    print(json.dumps({"uid": __import__("os").geteuid(), "offload": tun.offload}), flush=True)
    tun.close()
"""

_MOVER = """
    import dataclasses, json, os, socket, sys, threading, tunkit
    sock = socket.socket(fileno=int(sys.argv[2]))
    b = tunkit.attach_tun(sys.argv[1])          # the device in this namespace
    a = tunkit.recv_tun(sock)                   # the one from the other namespace
    refused = {}
    for label, tun in (("a", a), ("b", b)):
        try:
            tun.set_mtu(1300)
        except PermissionError as exc:
            refused[label] = str(exc)
    caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
    print(json.dumps({"uid": os.geteuid(), "caps": caps, "refused": refused}), flush=True)
    def events():
        for event in a.events():
            print(json.dumps({"event": event.name, "mtu": a.mtu()}), flush=True)
    watcher = threading.Thread(target=events)
    watcher.start()
    copier = threading.Thread(target=tunkit.copy, args=(a, b))
    copier.start()
    sys.stdin.read()                            # until the test closes our stdin
    a.close()
    copier.join()
    watcher.join()
    print(json.dumps({"a": dataclasses.asdict(a.stats()), "b": dataclasses.asdict(b.stats())}),
          flush=True)
"""


def test_nobody_moves_ping_and_tcp_on_devices_made_by_tunkit_create(
    netns_factory: MakeNs, nobody_python: Python, dev_tun_node: str
) -> None:
    ns_a, ns_b = netns_factory("pa"), netns_factory("pb")
    for ns, addr in ((ns_a, A4), (ns_b, B4)):
        disable_ipv6(ns)
        made = _tunkit("create", NAME, "--owner", "nobody", "--address", f"{addr}/24", "--up",
                       "--netns", ns)
        assert made.returncode == 0, made.stderr
        assert "owner uid 65534 (nobody)" in made.stdout
    import socket

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mover = sender = None
    lines: Lines | None = None
    try:
        mover = start_unprivileged(nobody_python, ns_b, _MOVER, NAME, str(right.fileno()),
                                   dev_tun=dev_tun_node, pass_fds=[right.fileno()],
                                   stdin=subprocess.PIPE)
        sender = start_unprivileged(nobody_python, ns_a, _SENDER, NAME, str(left.fileno()),
                                    dev_tun=dev_tun_node, pass_fds=[left.fileno()])
        left.close()
        right.close()
        out, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err
        assert json.loads(out) == {"uid": NOBODY, "offload": True}
        assert mover.stdin is not None
        lines = Lines(mover)
        ready = json.loads(lines.next())
        assert ready["uid"] == NOBODY and int(ready["caps"], 16) == 0
        # Configuration is not the worker's to do: the device in another
        # namespace (no CAP_SYS_ADMIN to enter it), and its own (no CAP_NET_ADMIN).
        assert "CAP_SYS_ADMIN" in ready["refused"]["a"]
        assert "CAP_NET_ADMIN" in ready["refused"]["b"]

        assert _ping(ns_a, B4) == 3
        tcp_transfer(types.SimpleNamespace(ns_a=ns_a, ns_b=ns_b, B4=B4), 4 << 20)
        # Events reach the receiver from the other namespace, over the socket passed with it.
        ns_run(ns_a, "ip", "link", "set", NAME, "mtu", "1400")
        events = [json.loads(lines.next()) for _ in range(2)]
        assert events == [{"event": "UP", "mtu": 1500}, {"event": "MTU_UPDATE", "mtu": 1400}]

        mover.stdin.close()
        stats = json.loads(lines.next())
        assert mover.wait(30) == 0, mover.stderr.read()  # type: ignore[union-attr]
        assert stats["a"]["bytes_read"] >= 4 << 20  # the TCP payload left ns A through it
        assert stats["a"]["dropped_too_big"] == stats["b"]["dropped_too_big"] == 0
    finally:
        left.close()
        right.close()
        for proc in (sender, mover):
            if proc is not None:
                end(proc, lines if proc is mover else None)
    for ns in (ns_a, ns_b):
        tunkit.delete_tun(NAME, netns=ns)
        assert netlink.tun_info(ns, NAME) is None


# -- refusals, with the SPEC's messages ------------------------------------------------

_TRY = """
    import json, sys, tunkit
    out = {}
    def attempt(label, fn, *args, **kw):
        try:
            fn(*args, **kw).close()
            out[label] = ["ok", ""]
        except Exception as exc:
            out[label] = [type(exc).__name__, str(exc)]
    for name in sys.argv[1:]:
        attempt(name, tunkit.attach_tun, name)
    attempt("create", tunkit.create_tun, "tkx")
    try:
        tunkit.delete_tun(sys.argv[1])
    except Exception as exc:
        out["delete"] = [type(exc).__name__, str(exc)]
    print(json.dumps(out))
"""


def test_nobody_is_refused_what_it_does_not_own_with_the_reason(
    netns_factory: MakeNs, nobody_python: Python, dev_tun_node: str
) -> None:
    ns = netns_factory("refuse")
    root_owned, group_only, both = f"tk{os.getpid()}r", f"tk{os.getpid()}g", f"tk{os.getpid()}b"
    tap = f"tk{os.getpid()}t"
    for name, kw in ((root_owned, {}), (group_only, {"group": 0}),
                     (both, {"owner": "nobody", "group": "root"})):
        tunkit.create_tun(name, netns=ns, persist=True, **kw).close()
    ns_run(ns, "ip", "tuntap", "add", "mode", "tap", "name", tap, "user", str(NOBODY))
    out = json.loads(run_unprivileged(nobody_python, ns, _TRY, root_owned, group_only, both,
                                      tap, "lo", "tknothere", dev_tun=dev_tun_node))
    assert out[root_owned] == [
        "PermissionError",
        f"[Errno 1] TUN device {root_owned!r} has owner uid 0 (root) and group none; this "
        f"process (uid 65534 (nobody), groups gid 65534 (nogroup)) is not allowed to attach "
        f"to it without CAP_NET_ADMIN: {root_owned!r}",
    ]
    assert out[group_only][0] == "PermissionError"
    assert "has owner none and group gid 0 (root)" in out[group_only][1]
    # The kernel asks for both when a device has both: the owner is not enough.
    assert out[both][0] == "PermissionError"
    assert "has owner uid 65534 (nobody) and group gid 0 (root)" in out[both][1]
    for name, why in ((tap, "it is a TAP device"), ("lo", "it is not a TUN device"),
                      ("tknothere", "there is no such link")):
        assert out[name][0] == "FileNotFoundError"
        assert f"no TUN device {name!r}: {why}" in out[name][1]
    assert out["create"][0] == "PermissionError" and "CAP_NET_ADMIN" in out["create"][1]
    assert out["delete"][0] == "PermissionError" and "CAP_NET_ADMIN" in out["delete"][1]


def test_the_mode_of_dev_net_tun_is_named_when_it_is_what_stops_the_user(
    netns_factory: MakeNs, nobody_python: Python, dev_tun_node: str
) -> None:
    ns = netns_factory("mode")
    tunkit.create_tun(NAME, netns=ns, persist=True, owner=NOBODY).close()
    os.chmod(dev_tun_node, 0o600)  # our private node: as the machine's is here
    out = json.loads(run_unprivileged(nobody_python, ns, _TRY, NAME, dev_tun=dev_tun_node))
    kind, message = out[NAME]
    assert kind == "PermissionError"
    assert "cannot open /dev/net/tun (mode 0600, owner root, group root)" in message
    assert "needs the file open to this user: mode 0666, as distributions ship it" in message
    # The same process, once the file is open to it, attaches.
    os.chmod(dev_tun_node, 0o666)
    out = json.loads(run_unprivileged(nobody_python, ns, _TRY, NAME, dev_tun=dev_tun_node))
    assert out[NAME] == ["ok", ""]


def test_tunkit_create_says_when_dev_net_tun_keeps_the_owner_out(root: None,
                                                                 dev_tun_node: str) -> None:
    from tunkit.cli.create import dev_tun_note

    os.chmod(dev_tun_node, 0o600)
    note = dev_tun_note(NOBODY, None, dev_tun_node)
    assert note is not None
    assert note.startswith(f"note: {dev_tun_node} is mode 0600, owner root")
    assert "uid 65534 (nobody) cannot open it to attach" in note
    assert dev_tun_note(0, None, dev_tun_node) is None  # root may
    os.chmod(dev_tun_node, 0o660)
    os.chown(dev_tun_node, 0, NOBODY)
    assert dev_tun_note(None, NOBODY, dev_tun_node) is None  # the group may
    assert dev_tun_note(1, 1, dev_tun_node) is not None
    os.chmod(dev_tun_node, 0o666)
    assert dev_tun_note(NOBODY, None, dev_tun_node) is None


# -- offload flags left by an earlier owner --------------------------------------------


class _Recording:
    """A Tun that delegates to *tun* and records the largest packet any read returned."""

    def __init__(self, tun: NativeTun) -> None:
        self.tun = tun
        self.largest = 0
        self.packets = 0

    def read(self, bufs: Sequence[Any], sizes: MutableSequence[int], offset: int = 16) -> int:
        n = self.tun.read(bufs, sizes, offset)
        if n:
            self.largest = max(self.largest, *sizes[:n])
            self.packets += n
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tun, name)


def test_a_device_left_with_offloads_is_attached_without_and_yields_no_super_packet(
    netns_factory: MakeNs,
) -> None:
    ns_a, ns_b = netns_factory("offa"), netns_factory("offb")
    first = tunkit.create_tun(NAME, netns=ns_a, persist=True, offload=True)
    assert first.offload_flags & TUN_F_TSO4  # the kernel may now build TCP super-packets
    first.close()
    info = netlink.tun_info(ns_a, NAME)
    assert info is not None and info.vnet_hdr and info.persist

    a = tunkit.attach_tun(NAME, netns=ns_a, offload=False)
    try:
        assert type(a) is NativeTun and not a.offload and a.batch_size() == 1
        assert not netlink.tun_info(ns_a, NAME).vnet_hdr  # type: ignore[union-attr]
        b = tunkit.create_tun(netns=ns_b, offload=True)
        for tun, addr, ns in ((a, A4, ns_a), (b, B4, ns_b)):
            disable_ipv6(ns)
            tun.add_address(f"{addr}/24")
            tun.up()
        recording = _Recording(a)
        copier = threading.Thread(target=tunkit.copy, args=(recording, b), name="test-copy")
        copier.start()
        try:
            tcp_transfer(types.SimpleNamespace(ns_a=ns_a, ns_b=ns_b, B4=B4), 8 << 20)
        finally:
            b.close()
            copier.join(10)
        stats = a.stats()
        assert recording.packets > (8 << 20) // 1500
        assert recording.largest <= a.mtu()  # never a super-packet
        assert stats.dropped_too_big == stats.gso_split == stats.gso_read == 0
    finally:
        a.close()
        tunkit.delete_tun(NAME, netns=ns_a)


def test_attach_follows_the_device_virtio_header_unless_told(netns_factory: MakeNs) -> None:
    ns = netns_factory("follow")
    tunkit.create_tun(NAME, netns=ns, persist=True, offload=True).close()
    with tunkit.attach_tun(NAME, netns=ns) as kept:
        assert kept.offload and isinstance(kept, tunkit.GsoTun)
    with tunkit.attach_tun(NAME, netns=ns, offload=False) as cleared:
        assert not cleared.offload
    with tunkit.attach_tun(NAME, netns=ns) as again:  # what the last owner left
        assert not again.offload
    with tunkit.attach_tun(NAME, netns=ns, offload=True) as set_again:
        assert set_again.offload and set_again.offload_flags & TUN_F_TSO4
    tunkit.delete_tun(NAME, netns=ns)


def test_queues_of_a_multi_queue_device_share_its_virtio_header(netns_factory: MakeNs) -> None:
    ns = netns_factory("mqhdr")
    with tunkit.create_tun(NAME, netns=ns, multi_queue=True, offload=True) as first:
        with pytest.raises(ValueError, match="other queues have the virtio header on"):
            tunkit.attach_tun(NAME, netns=ns, offload=False)
        with tunkit.attach_tun(NAME, netns=ns) as second:
            assert second.offload and second.index() == first.index()
            info = netlink.tun_info(ns, NAME)
            assert info is not None and info.multi_queue and info.queues == 2
            second.set_mtu(1400)  # configuration on any queue acts on the device
            assert netlink.tun_info(ns, NAME).mtu == 1400  # type: ignore[union-attr]
    assert netlink.tun_info(ns, NAME) is None  # not persistent: gone with its last queue


# -- create_tun's new arguments, delete_tun ----------------------------------------------


def test_create_tun_sets_persistence_owner_and_group(netns_factory: MakeNs) -> None:
    ns = netns_factory("owner")
    cases = [
        ({}, 0, None),  # persistent with neither: the creator's user owns it
        ({"owner": "nobody"}, NOBODY, None),
        ({"owner": 1234, "group": "nogroup"}, 1234, NOBODY),
        ({"group": "65534"}, None, NOBODY),
    ]
    for i, (kw, owner, group) in enumerate(cases):
        name = f"{NAME}{i}"
        tunkit.create_tun(name, netns=ns, persist=True, **kw).close()
        info = netlink.tun_info(ns, name)
        assert info is not None and info.persist
        assert (info.owner, info.group) == (owner, group), kw
        tunkit.delete_tun(name, netns=ns)
        assert netlink.tun_info(ns, name) is None


@pytest.mark.parametrize("kw", [{"owner": "no-such-user"}, {"group": "no-such-group"},
                                {"owner": -5}, {"owner": True}], ids=str)
def test_bad_owner_or_group_raises_before_any_system_call(kw: dict[str, Any]) -> None:
    # The namespace does not exist: a system call would raise FileNotFoundError.
    with pytest.raises((ValueError, TypeError)):
        tunkit.create_tun(NAME, netns="tk-no-such-namespace", persist=True, **kw)


def test_a_persistent_device_half_made_is_not_left_behind(
    netns_factory: MakeNs, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = netns_factory("half")

    def fail(*args: object, **kw: object) -> NativeTun:
        raise OSError(5, "injected failure")

    monkeypatch.setattr(tk_device, "_make", fail)
    with pytest.raises(OSError, match="injected"):
        tunkit.create_tun(NAME, netns=ns, persist=True)
    assert netlink.tun_info(ns, NAME) is None


def test_delete_tun_removes_the_device_and_cuts_off_its_queues(netns_factory: MakeNs) -> None:
    ns = netns_factory("delete")
    tunkit.create_tun(NAME, netns=ns, persist=True, multi_queue=True, offload=False).close()
    queues = [tunkit.attach_tun(NAME, netns=ns) for _ in range(2)]
    try:
        tunkit.delete_tun(NAME, netns=ns)
        assert netlink.tun_info(ns, NAME) is None
        assert ns_run(ns, "ip", "-o", "link").stdout.count(":") >= 1  # lo is still there
        assert NAME not in ns_run(ns, "ip", "-o", "link").stdout
        for q in queues:  # a queue of a deleted device fails at once, it does not hang
            with pytest.raises(OSError):
                q.write([bytes(16) + bytes.fromhex("4500001c") + bytes(24)])
    finally:
        for q in queues:
            q.close()


def test_delete_tun_refuses_what_is_not_a_persistent_tun_device(netns_factory: MakeNs) -> None:
    ns = netns_factory("nodelete")
    with tunkit.create_tun(NAME, netns=ns) as live:
        with pytest.raises(ValueError, match="is not persistent"):
            tunkit.delete_tun(NAME, netns=ns)
        assert netlink.tun_info(ns, NAME) is not None and not live.closed
    with pytest.raises(FileNotFoundError, match="no TUN device 'lo'"):
        tunkit.delete_tun("lo", netns=ns)
    with pytest.raises(FileNotFoundError, match=f"no TUN device {NAME!r}"):
        tunkit.delete_tun(NAME, netns=ns)
    with pytest.raises(FileNotFoundError, match="tk-no-such"):
        tunkit.delete_tun(NAME, netns="tk-no-such")


def test_attach_tun_errors_without_namespace_or_name(root: None) -> None:
    with pytest.raises(ValueError):
        tunkit.attach_tun("")
    with pytest.raises(FileNotFoundError, match="tk-no-such"):
        tunkit.attach_tun(NAME, netns="tk-no-such")

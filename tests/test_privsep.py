"""The privilege-separated worker: root makes and configures, a worker without any privilege
moves the packets, and a compromised worker can do nothing else."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
from netns_util import disable_ipv6, netns_factory, ns_run, root  # noqa: F401
from priv_util import NOBODY, dev_tun_node, end  # noqa: F401

import tunkit
from tunkit._linux import netlink

pytestmark = pytest.mark.timeout(120)

MakeNs = Callable[[str], str]
A4, B4 = "10.83.0.1", "10.83.0.2"

# What a compromised worker would try, after it dropped its privileges and
# received its two devices: a (in its own namespace, A) and b (in B).
_WORKER = """
    import errno, json, os, socket, struct, sys, threading
    import tunkit
    from tunkit._linux import netns
    from tunkit.workers import capabilities, drop_privileges

    control = socket.socket(fileno=int(sys.argv[1]))
    other, parent_pid = sys.argv[2], int(sys.argv[3])
    drop_privileges("nobody")
    a, b = tunkit.recv_tun(control), tunkit.recv_tun(control)
    tried = {}
    def attempt(label, fn):
        try:
            result = fn()
            if hasattr(result, "close"):
                result.close()
            tried[label] = ["ok", ""]
        except Exception as exc:
            tried[label] = [type(exc).__name__, str(exc)]

    def raw_set_mtu():
        # RTM_NEWLINK, ifinfomsg for a's index, IFLA_MTU: what any netlink library sends.
        body = struct.pack("=BBHiII", 0, 0, 0, a.index(), 0, 0) + struct.pack("=HHI", 8, 4, 1300)
        msg = struct.pack("=IHHII", 16 + len(body), 16, 0x1 | 0x4, 1, 0) + body
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:
            s.send(msg)
            reply = s.recv(4096)
        code = -struct.unpack_from("=i", reply, 16)[0]
        if code:
            raise OSError(code, os.strerror(code))

    attempt("set_mtu_own", lambda: a.set_mtu(1300))
    attempt("set_mtu_other_ns", lambda: b.set_mtu(1300))
    attempt("netlink_set_mtu", raw_set_mtu)
    attempt("add_address", lambda: a.add_address("10.83.9.1/24"))
    attempt("create_tun", lambda: tunkit.create_tun("tkevil"))
    attempt("attach_other", lambda: tunkit.attach_tun(other))
    attempt("attach_own_again", lambda: tunkit.attach_tun(a.name()))
    attempt("enter_netns", lambda: netns.inside(b._ns_fd).__enter__())
    attempt("signal_parent", lambda: os.kill(parent_pid, 0))
    attempt("become_root", lambda: os.setuid(0))
    copier = threading.Thread(target=tunkit.copy, args=(a, b))
    copier.start()
    control.send(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                             "caps": capabilities(), "tried": tried}).encode())
    control.recv(1)
    a.close()
    copier.join()
    control.send(json.dumps({"a": a.stats().packets_read, "b": b.stats().packets_read}).encode())
"""


def test_a_worker_without_privilege_moves_the_traffic_and_nothing_else(
    netns_factory: MakeNs, dev_tun_node: str
) -> None:
    ns_a, ns_b = netns_factory("wa"), netns_factory("wb")
    other = f"tkw{os.getpid()}o"
    tunkit.create_tun(other, netns=ns_a, persist=True).close()  # root's, owned by root
    devices = []
    for ns, addr in ((ns_a, A4), (ns_b, B4)):
        disable_ipv6(ns)
        tun = tunkit.create_tun(netns=ns)
        devices.append(tun)
        tun.add_address(f"{addr}/24")
        tun.up()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Started as root in namespace A, with /dev/net/tun open to everyone as
    # distributions ship it (its own mount namespace only); it drops at once.
    worker = subprocess.Popen(
        ["ip", "netns", "exec", ns_a, "sh", "-c", 'mount --bind "$0" /dev/net/tun && exec "$@"',
         dev_tun_node, sys.executable, "-c", textwrap.dedent(_WORKER), str(child.fileno()),
         other, str(os.getpid())],
        pass_fds=[child.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    child.close()
    try:
        for tun in devices:
            tunkit.send_tun(parent, tun)
            tun.close()  # the worker holds them now
        parent.settimeout(60)
        report = json.loads(parent.recv(65536) or b'"no report"')
        assert isinstance(report, dict), worker.communicate(timeout=10)
        assert (report["uid"], report["gid"], report["groups"]) == (NOBODY, NOBODY, [])
        assert not any(report["caps"].values()), report["caps"]
        tried = report["tried"]
        # Configuration: refused, in its namespace and in the other.
        for label in ("set_mtu_own", "add_address"):
            assert tried[label][0] == "PermissionError" and "CAP_NET_ADMIN" in tried[label][1]
        assert tried["set_mtu_other_ns"][0] == "PermissionError"
        assert "CAP_SYS_ADMIN" in tried["set_mtu_other_ns"][1]
        assert tried["netlink_set_mtu"] == ["PermissionError", "[Errno 1] Operation not permitted"]
        # No other device: neither a new one, nor root's, nor a second hold on its own.
        assert tried["create_tun"][0] == "PermissionError" and "CAP_NET_ADMIN" in tried[
            "create_tun"][1]
        assert tried["attach_other"][0] == "PermissionError"
        assert "has owner uid 0 (root)" in tried["attach_other"][1]
        assert tried["attach_own_again"][0] == "OSError" and "is in use" in tried[
            "attach_own_again"][1]
        # Nor the namespaces, the parent, or root.
        assert tried["enter_netns"][0] == "PermissionError"
        assert tried["signal_parent"][0] == "PermissionError"
        assert tried["become_root"][0] == "PermissionError"

        ping = ns_run(ns_a, "ping", "-c", "3", "-i", "0.2", "-W", "2", B4, check=False)
        assert " 3 received" in ping.stdout, ping.stdout
        parent.send(b"x")
        counts = json.loads(parent.recv(4096))
        assert counts["a"] >= 3 and counts["b"] >= 3  # the echo requests and the replies
        assert worker.wait(30) == 0, worker.stderr.read()  # type: ignore[union-attr]
    finally:
        parent.close()
        end(worker)
    assert netlink.tun_info(ns_a, other) is not None  # root's device untouched
    tunkit.delete_tun(other, netns=ns_a)

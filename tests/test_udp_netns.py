"""A real UDP tunnel, as root: two namespaces joined by a veth underlay, a NativeTun and a
UdpTun in each, ``tunkit.copy(device, udp)`` per side; ping and TCP across the overlay.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netns_util import netns_factory, ns_run, ns_socket, root, tcp_transfer  # noqa: F401

import tunkit
from tunkit.transport import udp as udp_mod
from tunkit.transport.udp import UdpTun

UNDER_A, UNDER_B = "10.79.0.1", "10.79.0.2"  # the veth underlay
UNDER6_A, UNDER6_B = "fd00:79::1", "fd00:79::2"  # and in IPv6
OVER_A4, OVER_B4 = "10.77.0.1", "10.77.0.2"  # the tunnel's overlay
OVER_A6, OVER_B6 = "fd00:77::1", "fd00:77::2"


@dataclasses.dataclass
class Side:
    ns: str
    device: tunkit.NativeTun
    udp: UdpTun
    thread: threading.Thread
    errors: list[BaseException]


@dataclasses.dataclass
class Tunnel:
    """What tcp_transfer needs: the namespaces and B's overlay address."""

    ns_a: str
    ns_b: str
    a: Side
    b: Side
    B4: str = OVER_B4


def _veth(ns_a: str, ns_b: str) -> None:
    va, vb = f"tkua{os.getpid()}", f"tkub{os.getpid()}"
    subprocess.run(
        ["ip", "link", "add", va, "netns", ns_a, "type", "veth", "peer", "name", vb,
         "netns", ns_b],
        check=True, capture_output=True,
    )
    for ns, dev, addr, addr6 in ((ns_a, va, UNDER_A, UNDER6_A), (ns_b, vb, UNDER_B, UNDER6_B)):
        ns_run(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
        ns_run(ns, "ip", "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
        ns_run(ns, "ip", "link", "set", dev, "up")
        ns_run(ns, "ip", "link", "set", "lo", "up")


def _side(
    ns: str, sock: socket.socket, peer: tuple[str, int], over4: str, over6: str, offload: bool
) -> Side:
    try:
        udp = UdpTun(sock, peer)
    except BaseException:
        sock.close()  # on an error the socket stays ours
        raise
    try:
        device = tunkit.create_tun(netns=ns, mtu=udp.mtu(), offload=offload)
    except BaseException:
        udp.close()
        raise
    try:
        device.add_address(f"{over4}/24")
        device.add_address(f"{over6}/64")
        device.up()
    except BaseException:
        device.close()
        udp.close()
        raise
    errors: list[BaseException] = []

    def run() -> None:
        try:
            tunkit.copy(device, udp)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"test-tunnel:{ns}")
    thread.start()
    return Side(ns, device, udp, thread, errors)


@pytest.fixture(params=["offload", "offload-pure", "nooffload", "offload-ipv6-underlay"])
def tunnel(
    request: pytest.FixtureRequest,
    netns_factory: Callable[[str], str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Tunnel]:
    """Two namespaces joined by a veth, a tunnel across: NativeTuns with offload and UdpTuns
    on the C calls (UdpIo) or on the pure path, or NativeTuns without offload; the UDP over
    IPv4, or IPv6."""
    if request.param == "offload-pure":
        monkeypatch.setattr(udp_mod, "_udp_io", None)
    ns_a, ns_b = netns_factory("udpa"), netns_factory("udpb")
    _veth(ns_a, ns_b)
    v6 = request.param.endswith("ipv6-underlay")
    under_a, under_b = (UNDER6_A, UNDER6_B) if v6 else (UNDER_A, UNDER_B)
    socks = []
    for ns, addr in ((ns_a, under_a), (ns_b, under_b)):
        s = ns_socket(ns, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, 0))
        socks.append(s)
    port_a, port_b = socks[0].getsockname()[1], socks[1].getsockname()[1]
    offload = request.param.startswith("offload")
    try:
        a = _side(ns_a, socks[0], (under_b, port_b), OVER_A4, OVER_A6, offload)
    except BaseException:
        socks[1].close()
        raise
    try:
        b = _side(ns_b, socks[1], (under_a, port_a), OVER_B4, OVER_B6, offload)
    except BaseException:
        a.device.close()
        a.thread.join(10)
        raise
    try:
        yield Tunnel(ns_a, ns_b, a, b)
    finally:
        for side in (a, b):
            side.device.close()  # copy closes the UdpTun too, and ends
        for side in (a, b):
            side.thread.join(10)
            assert not side.thread.is_alive(), "copy did not end after close()"
            assert side.udp.closed
            assert not side.errors, f"copy failed: {side.errors[0]!r}"


def test_ping_crosses_the_tunnel_both_families(tunnel: Tunnel) -> None:
    # the veth's MTU less IPv4 (or IPv6) and UDP
    v6 = tunnel.a.udp.local_address[0].startswith("fd00")
    assert tunnel.a.udp.mtu() == 1500 - (48 if v6 else 28)
    for target in (OVER_B4, OVER_B6):
        out = ns_run(tunnel.ns_a, "ping", "-c", "3", "-i", "0.2", "-W", "3", target, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        assert " 0% packet loss" in out.stdout
    sa, sb = tunnel.a.udp.stats(), tunnel.b.udp.stats()
    assert sa.packets_written >= 6 and sb.packets_read >= 6
    assert sa.dropped_stranger == sb.dropped_stranger == 0


def test_tcp_across_the_tunnel_arrives_intact_in_64k_system_calls(tunnel: Tunnel) -> None:
    tcp_transfer(tunnel, 20 << 20)  # type: ignore[arg-type]
    sa, sb = tunnel.a.udp.stats(), tunnel.b.udp.stats()
    assert sb.packets_read > 20 << 20 >> 11  # at least one datagram per 2 KB
    if tunnel.a.device.offload:
        # super-packets went whole: one UDP_SEGMENT send and one GRO read for many datagrams
        assert sa.gso_written > 0 and sa.gso_sends > 0
        assert sb.gro_reads > 0 and sb.gso_read > 0
        assert sb.gro_coalesced > sb.gso_read
        assert sa.packets_written > 10 * sa.gso_sends
    assert sa.dropped_malformed == sb.dropped_malformed == 0


def _readme_script(name: str) -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        if block.startswith(f"# {name}: "):
            return str(block)
    raise AssertionError(f"README.md has no {name} block")


def test_the_readme_tunnel_script_carries_ping(
    netns_factory: Callable[[str], str], tmp_path: Path  # noqa: F811
) -> None:
    """README's tunnel.py, one process per end in two namespaces joined by a veth."""
    script = tmp_path / "tunnel.py"
    script.write_text(_readme_script("tunnel.py"))
    ns = (netns_factory("rma"), netns_factory("rmb"))
    _veth(*ns)
    ends = []
    try:
        for i, (under, over) in enumerate(((UNDER_B, OVER_A4), (UNDER_A, OVER_B4))):
            ends.append(subprocess.Popen(
                ["ip", "netns", "exec", ns[i], sys.executable, str(script), "4790",
                 f"{under}:4790", f"{over}/24"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        for end, over in zip(ends, (OVER_A4, OVER_B4), strict=True):
            assert end.stdout is not None
            line = end.stdout.readline()
            why = end.stderr.read() if end.stderr and not line else ""
            assert line.startswith(f"tunnel0 {over}/24 <-> "), line + why
            assert line.rstrip().endswith("MTU 1472")
        out = ns_run(ns[0], "ping", "-c", "3", "-i", "0.2", "-W", "3", OVER_B4, check=False)
        assert " 0% packet loss" in out.stdout, out.stdout + out.stderr
    finally:
        for end in ends:
            if end.poll() is None:
                end.send_signal(signal.SIGINT)  # Ctrl-C: the script ends cleanly
        for end in ends:
            try:
                end.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                end.kill()
                end.communicate()
    assert [end.returncode for end in ends] == [0, 0]

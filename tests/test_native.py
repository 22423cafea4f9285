"""NativeTun as root, inside namespaces the tests make: API, events, errors, conformance."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conformance import Harness, TunConformance
from netns_util import NativeHarness, io_path, netns_factory, ns_run, root  # noqa: F401

from tunkit import ClosedError, Event, GsoTun, OffsetError, Tun
from tunkit._linux import device as tk_device
from tunkit._linux import netns as tk_netns
from tunkit._linux.constants import (
    IFF_NO_PI,
    IFF_TUN,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUNSETIFF,
)
from tunkit._linux.device import NativeTun, TunStats, check_name, create_tun, open_tun

pytestmark = pytest.mark.timeout(60)

MakeNs = Callable[[str], str]


class TestNativeConformance(TunConformance):
    """The Tun conformance suite on a device in a namespace (raw socket in, AF_PACKET out)."""

    @pytest.fixture
    def harness(self, netns_factory: MakeNs, io_path: str) -> Iterator[Harness]:
        h = NativeHarness(netns_factory("conf"))
        try:
            yield h
        finally:
            h.close()


def test_harness_round_trip(netns_factory: MakeNs, io_path: str) -> None:
    """The harness itself: injected bytes are read unchanged, written bytes are seen."""
    h = NativeHarness(netns_factory("harness"))
    try:
        pkt = h.packet(7, 300)
        h.inject([pkt])
        buf, sizes = bytearray(16 + 1500), [0]
        assert h.tun.read([buf], sizes) == 1
        assert bytes(buf[16 : 16 + sizes[0]]) == pkt
        assert h.tun.write([bytes(16) + pkt]) == 1
        assert h.collect(1, timeout=5) == [pkt]
        assert h.tun.stats() == TunStats(
            packets_read=1, bytes_read=300, packets_written=1, bytes_written=300
        )
    finally:
        h.close()


# -- names and arguments, checked before any system call --------------------------

BAD_NAMES = ["a" * 16, "ab/c", "a:b", "a b", "tab\t", "new\nline", ".", "..", "é" * 8]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n))
def test_bad_names_raise_value_error_before_any_system_call(name: str) -> None:
    # A namespace that does not exist would raise FileNotFoundError if a
    # system call came first; no root needed.
    with pytest.raises(ValueError, match="device name"):
        create_tun(name, netns="tk-no-such-namespace")


@pytest.mark.parametrize("name", ["", "a" * 15, "tk0", "tun%d", "x-y_z.1", "é" * 7])
def test_good_names_pass_the_check(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("mtu", [0, 67, 65536, -1])
def test_bad_mtu_raises_value_error(mtu: int) -> None:
    with pytest.raises(ValueError, match="mtu"):
        create_tun("tk0", mtu, netns="tk-no-such-namespace")


# -- the device ------------------------------------------------------------------


def test_create_in_namespace(netns_factory: MakeNs) -> None:
    ns = netns_factory("create")
    own_before = os.readlink("/proc/thread-self/ns/net")
    with create_tun("tkdev0", mtu=1400, netns=ns) as tun:
        assert os.readlink("/proc/thread-self/ns/net") == own_before
        assert isinstance(tun, Tun) and isinstance(tun, NativeTun)
        assert isinstance(tun, GsoTun)  # offload is the default
        assert tun.offload and tun.batch_size() == 128
        assert tun.offload_flags & (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) == (
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        )
        assert tun.name() == "tkdev0"
        assert tun.mtu() == 1400
        assert tun.mwo() == tun.mro() == 16
        assert tun.fileno() >= 0
        out = ns_run(ns, "ip", "-o", "link", "show", "tkdev0").stdout
        assert "mtu 1400" in out and "state DOWN" in out
        assert tun.index() == int(out.split(":", 1)[0])
        assert "tkdev0" not in socket.if_nameindex().__repr__()  # not in our namespace
        assert repr(tun).startswith("<NativeTun tkdev0") and "[closed]" not in repr(tun)
    assert "[closed]" in repr(tun)
    assert "tkdev0" not in ns_run(ns, "ip", "-o", "link").stdout  # gone with the descriptor


def test_without_offload_the_device_is_no_gso_tun(netns_factory: MakeNs) -> None:
    with create_tun(netns=netns_factory("plain"), offload=False) as tun:
        assert isinstance(tun, Tun) and isinstance(tun, NativeTun)
        assert not isinstance(tun, GsoTun)
        assert not hasattr(tun, "read_gso") and not hasattr(tun, "write_gso")
        assert not tun.offload and tun.offload_flags == 0 and tun.batch_size() == 1
        assert tun.mwo() == tun.mro() == 16


def test_kernel_chooses_the_name(netns_factory: MakeNs) -> None:
    ns = netns_factory("kname")
    with create_tun(netns=ns) as a, create_tun(netns=ns) as b:
        assert a.name().startswith("tun") and b.name().startswith("tun")
        assert a.name() != b.name()


def test_configuration_over_netlink(netns_factory: MakeNs) -> None:
    ns = netns_factory("config")
    with create_tun("tkcfg0", netns=ns) as tun:
        tun.add_address("10.80.0.1/24")
        tun.add_address("fd00:80::1/64")
        tun.up()
        addrs = tun.addresses()
        assert ipaddress.ip_interface("10.80.0.1/24") in addrs
        assert ipaddress.ip_interface("fd00:80::1/64") in addrs
        assert addrs[0].version == 4
        shown = ns_run(ns, "ip", "-o", "addr", "show", "dev", "tkcfg0").stdout
        assert "10.80.0.1/24" in shown and "fd00:80::1/64" in shown
        # Usable at once: no DAD, so never "tentative".
        assert "tentative" not in shown
        # The kernel's link-local address (random on a TUN device) is listed too.
        assert any(a.ip.is_link_local for a in addrs if a.version == 6)
        tun.remove_address("fd00:80::1/64")
        tun.remove_address("10.80.0.1/24")
        assert not [a for a in tun.addresses() if not a.ip.is_link_local]
        with pytest.raises(OSError) as info:
            tun.remove_address("10.80.0.9/24")
        assert info.value.errno == errno.EADDRNOTAVAIL
        tun.set_mtu(1280)
        assert tun.mtu() == 1280
        assert "mtu 1280" in ns_run(ns, "ip", "-o", "link", "show", "tkcfg0").stdout
        tun.down()
        assert "state DOWN" in ns_run(ns, "ip", "-o", "link", "show", "tkcfg0").stdout
    with pytest.raises(ClosedError):
        tun.up()


def test_read_and_write_argument_checks(netns_factory: MakeNs, io_path: str) -> None:
    with create_tun(netns=netns_factory("args"), offload=False) as tun:
        with pytest.raises(OffsetError, match="below mro"):
            tun.read([bytearray(2000)], [0], 15)
        with pytest.raises(OffsetError, match="below mwo"):
            tun.write([bytes(2000)], 0)
        with pytest.raises(ValueError, match="batch_size"):
            tun.read([], [], 16)
        with pytest.raises(ValueError, match="sizes"):
            tun.read([bytearray(2000)], [], 16)


def test_written_packets_are_dropped_and_counted_while_down(
    netns_factory: MakeNs, io_path: str
) -> None:
    h = NativeHarness(netns_factory("down"))
    try:
        h.tun.down()
        pkt = h.packet(1, 100)
        assert h.tun.write([bytes(16) + pkt, bytes(16) + b"\x00" * 40]) == 2
        assert h.tun.stats().dropped_write == 2
        h.tun.up()
        assert h.tun.write([bytes(16) + b"\x00" * 40, bytes(16) + pkt]) == 2  # not IP: dropped
        assert h.collect(1, timeout=5) == [pkt]
        assert h.tun.stats().dropped_write == 3
        assert h.tun.stats().packets_written == 1
    finally:
        h.close()


def test_write_closed_midway_returns_what_went_out(
    netns_factory: MakeNs, io_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while a batch is being written: the packets sent are returned, the retry raises."""
    h = NativeHarness(netns_factory("midway"))
    try:
        pkts = [h.packet(i, 100) for i in range(3)]
        if io_path == "pure":
            # The kernel is full after the first packet, and close() comes while waiting.
            real_write = tk_device._write
            calls = [0]

            def full_after_one(fd: int, data: Any) -> int:
                calls[0] += 1
                if calls[0] > 1:
                    raise BlockingIOError(errno.EAGAIN, "full")
                return real_write(fd, data)

            def closed(self: Any) -> None:
                raise self.closed_error("write")

            monkeypatch.setattr(tk_device, "_write", full_after_one)
            monkeypatch.setattr(tk_device._Descriptor, "wait_writable", closed)
            assert h.tun.write([bytes(16) + p for p in pkts]) == 1
            with pytest.raises(ClosedError):
                h.tun.write([bytes(16) + p for p in pkts[1:]])
        else:
            # close() between two packets (here from the writing thread itself, which
            # the C write allows: it holds no lock); PacketIo refuses the rest.
            io = h.tun._io
            assert io is not None

            class CloseAfterOne:
                calls = 0

                def write(self, buf: Any, offset: int) -> int:
                    self.calls += 1
                    if self.calls == 2:
                        h.tun.close()  # takes no lock the C write holds: returns at once
                    return io.write(buf, offset)

            h.tun._io = CloseAfterOne()  # type: ignore[assignment]
            assert h.tun.write([bytes(16) + p for p in pkts]) == 1
            with pytest.raises(ClosedError):
                h.tun.write([bytes(16) + p for p in pkts[1:]])
            assert io.counts()["packets_written"] == 1
            return
        assert h.collect(1, timeout=5) == pkts[:1]
    finally:
        h.close()


# -- events -------------------------------------------------------------------------


def test_events_follow_ip_link(netns_factory: MakeNs) -> None:
    ns = netns_factory("events")
    with create_tun("tkev0", netns=ns) as tun:
        events = tun.events()
        ns_run(ns, "ip", "link", "set", "tkev0", "up")
        assert events.get(timeout=5) == Event.UP
        ns_run(ns, "ip", "link", "set", "tkev0", "mtu", "1400")
        assert events.get(timeout=5) == Event.MTU_UPDATE
        assert tun.mtu() == 1400
        ns_run(ns, "ip", "link", "set", "tkev0", "down")
        assert events.get(timeout=5) == Event.DOWN
        tun.set_mtu(9000)  # our own change is an event too
        assert tun.mtu() == 9000
        assert events.get(timeout=5) == Event.MTU_UPDATE
        tun.up()
        assert events.get(timeout=5) == Event.UP
        with pytest.raises(TimeoutError):
            events.get(timeout=0.3)
    assert events.get(timeout=1) is None


def test_a_device_that_is_up_starts_with_up(netns_factory: MakeNs) -> None:
    ns = netns_factory("upfirst")
    with create_tun("tkup0", netns=ns) as tun:
        tun.up()
        fd = os.dup(tun.fileno())
        # A second object on the same device (TUNSETIFF made it; a dup shares it).
        other = open_tun(fd, netns=ns)
        try:
            assert other.events().get(timeout=1) == Event.UP
            assert other.name() == "tkup0" and other.index() == tun.index()
        finally:
            other.close()
        assert tun.events().get(timeout=5) == Event.UP


def test_creation_mtu_is_no_event(netns_factory: MakeNs) -> None:
    with create_tun(mtu=1280, netns=netns_factory("mtuev")) as tun, pytest.raises(TimeoutError):
        tun.events().get(timeout=0.3)


# -- errors a person understands --------------------------------------------------


def test_missing_namespace_is_named(root: None) -> None:
    with pytest.raises(FileNotFoundError, match="tk-no-such-ns"):
        create_tun(netns="tk-no-such-ns")


def test_name_in_use(netns_factory: MakeNs) -> None:
    ns = netns_factory("busy")
    with create_tun("tkbusy0", netns=ns), pytest.raises(FileExistsError, match=r"tkbusy0.*in use"):
        create_tun("tkbusy0", netns=ns)
    with pytest.raises(FileExistsError, match="not TUN"):
        create_tun("lo", netns=ns)


def _python(code: str, *prefix: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


_REPORT = """
    from tunkit._linux.device import create_tun
    try:
        create_tun({args})
    except Exception as exc:
        print(type(exc).__name__, exc)
    else:
        print("created")
"""


def test_without_cap_net_admin_permission_error_names_it(netns_factory: MakeNs) -> None:
    ns = netns_factory("nocap")
    drop = ("setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin")
    for args in ("", f"netns={ns!r}"):
        result = _python(_REPORT.format(args=args), *drop)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("PermissionError"), result.stdout
        assert "CAP_NET_ADMIN" in result.stdout


def test_missing_dev_net_tun_says_modprobe(root: None) -> None:
    # A private mount namespace where /dev/net is an empty tmpfs.
    script = 'mount -t tmpfs none /dev/net && exec "$0" "$@"'
    result = _python(
        _REPORT.format(args=""),
        *("unshare", "--mount", "--propagation", "private", "sh", "-c", script),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("FileNotFoundError"), result.stdout
    assert "/dev/net/tun" in result.stdout and "modprobe tun" in result.stdout


# -- open_tun --------------------------------------------------------------------


def _tunsetiff(ns: str, name: str, flags: int) -> int:
    with tk_netns.inside(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    return fd


def test_open_tun_wraps_a_descriptor_made_elsewhere(netns_factory: MakeNs, io_path: str) -> None:
    ns = netns_factory("open")
    fd = _tunsetiff(ns, "tkopen0", IFF_TUN | IFF_NO_PI)
    tun = open_tun(fd, netns=ns)
    try:
        assert tun.name() == "tkopen0" and tun.fileno() == fd
        assert tun.batch_size() == 1 and not tun.offload
        tun.add_address("10.81.0.1/24")
        tun.up()
        assert tun.events().get(timeout=5) == Event.UP
        ns_run(ns, "ping", "-c", "1", "-W", "0.2", "10.81.0.2", check=False)
        buf, sizes = bytearray(1516), [0]
        for _ in range(20):  # skip IPv6 noise (router solicitations, MLD)
            assert tun.read([buf], sizes, 16) == 1
            if buf[16] >> 4 == 4:
                break
        assert buf[16 + 9] == socket.IPPROTO_ICMP
        assert bytes(buf[16 + 16 : 16 + 20]) == socket.inet_aton("10.81.0.2")
    finally:
        tun.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # taken over and closed


def test_open_tun_reads_the_virtio_flag(netns_factory: MakeNs) -> None:
    ns = netns_factory("openvnet")
    fd = _tunsetiff(ns, "tkvnet0", IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    try:
        with pytest.raises(ValueError, match="virtio header"):
            open_tun(fd, offload=False, netns=ns)
    except BaseException:
        os.close(fd)
        raise
    with open_tun(fd, netns=ns) as tun:
        assert tun.offload and tun.batch_size() == 128


def test_open_tun_refuses_what_is_not_tun(root: None) -> None:
    # (A device made without IFF_NO_PI cannot be told apart: TUNGETIFF reports
    # IFF_NO_PI for it too on Linux 6.18, so that case is not tested.)
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="not an attached TUN"):
            open_tun(r)
    finally:
        os.close(r)
        os.close(w)


def test_offload_device_carries_whole_packets(netns_factory: MakeNs) -> None:
    """offload=True today: the virtio header on, GSO_NONE packets only, batch 128."""
    h = NativeHarness(netns_factory("vnet"), offload=True)
    try:
        assert h.tun.batch_size() == 128
        packets = [h.packet(i, 100 + 50 * i) for i in range(5)]
        h.inject(packets)
        bufs = [bytearray(16 + 1500) for _ in range(128)]
        sizes = [0] * 128
        got = []
        while len(got) < 5:
            n = h.tun.read(bufs, sizes)
            got += [bytes(bufs[i][16 : 16 + sizes[i]]) for i in range(n)]
        assert got == packets
        assert h.tun.write([bytes(16) + p for p in packets]) == 5
        assert h.collect(5, timeout=5) == packets
    finally:
        h.close()


def test_threads_are_named_after_the_device(netns_factory: MakeNs) -> None:
    with create_tun("tkthr0", netns=netns_factory("thr")):
        names = [t.name for t in threading.enumerate()]
        assert "tunkit-events:tkthr0" in names
    assert "tunkit-events:tkthr0" not in [t.name for t in threading.enumerate()]

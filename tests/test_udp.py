"""UdpTun on loopback, no root: real sockets, the kernel's UDP GSO/GRO as the oracle.

Super-packets come from ``tests/packets.py`` (built byte by byte, apart from
the offload engine); what ``write_gso`` puts on the wire is read back by a
plain socket, for which the kernel segments a ``UDP_SEGMENT`` send itself, and
what ``read_gso`` returns is compared with the super-packet that the
segments came from.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blocking import wait_in_poll
from conformance import Harness, TunConformance, in_thread, read_packets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns_util import need_tool
from packets import TCP, UDP, Flow, payload_bytes

import tunkit
from tunkit import ClosedError, GsoTun, OffsetError, Tun
from tunkit._linux.constants import UDP_SEGMENT
from tunkit._offload._impl import REASON
from tunkit.transport import udp as udp_mod
from tunkit.transport.udp import UdpTun

LOOP4, LOOP6 = "127.0.0.1", "::1"
HDR = 10  # virtio-net header
GSO_OFFSET = 16
SO_NO_CHECK = 11  # <asm-generic/socket.h>: send UDP without checksums

FLOWS = {
    "tcp4": Flow(),
    "tcp6": Flow.v6(),
    "udp4": Flow(proto=UDP, dport=4789),
    "udp6": Flow.v6(UDP, dport=4789),
}


@pytest.fixture(autouse=True, params=["c", "pure"])
def udp_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test on the C calls (UdpIo: recvmmsg, sendmmsg) and on the pure path.

    Without the extension the C run is skipped, saying why; on CI (CI=true) it fails.
    """
    if request.param == "c" and udp_mod._UDP_IO is None:
        reason = f"no C extension (tunkit._speedups.UdpIo): {REASON}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    if request.param == "pure":
        monkeypatch.setattr(udp_mod, "_udp_io", None)
    path: str = request.param
    return path


def plain_socket(host: str = LOOP4) -> socket.socket:
    """A UDP socket on loopback without GRO: the kernel hands it one datagram per receive."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(5)
    # room for a burst of a few hundred KB (loopback drops what does not fit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


def recv_all(sock: socket.socket, count: int, timeout: float = 5) -> list[bytes]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            out.append(sock.recv(70000))
        except TimeoutError:
            break
    return out


def gso_bufs(count: int = 16) -> tuple[list[bytearray], list[int]]:
    return [bytearray(GSO_OFFSET + 65535) for _ in range(count)], [0] * count


def read_gso_all(tun: UdpTun, count: int, timeout: float = 5) -> list[bytes]:
    """Read with read_gso until *count* (super-)packets came: header + packet each."""
    bufs, sizes = gso_bufs()
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        n = tun.read_gso(bufs, sizes, GSO_OFFSET)
        out.extend(bytes(bufs[i][GSO_OFFSET - HDR : GSO_OFFSET + sizes[i]]) for i in range(n))
    return out


def send_segmented(sock: socket.socket, segments: list[bytes], to: Any) -> None:
    """Send *segments* as one UDP_SEGMENT send: the kernel makes them datagrams."""
    cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(segments[0])))]
    sock.sendmsg([b"".join(segments)], cmsg, 0, to)


@pytest.fixture
def pair() -> Iterator[tuple[UdpTun, UdpTun]]:
    """Two UdpTuns on IPv4 loopback, each the other's peer."""
    sa, sb = plain_socket(), plain_socket()
    a = UdpTun(sa, sb.getsockname())
    b = UdpTun(sb, sa.getsockname())
    try:
        yield a, b
    finally:
        a.close()
        b.close()


# -- the Tun protocol -------------------------------------------------------------


class UdpHarness:
    """A UdpTun on loopback and the plain socket that is its peer."""

    def __init__(self) -> None:
        self.peer = plain_socket()
        self.tun = UdpTun((LOOP4, 0), self.peer.getsockname(), mtu=1500)

    def inject(self, packets: list[bytes]) -> None:
        for pkt in packets:
            self.peer.sendto(pkt, self.tun.local_address)

    def collect(self, count: int, timeout: float) -> list[bytes]:
        return recv_all(self.peer, count, timeout)

    def wait_blocked(self, thread: threading.Thread) -> None:
        wait_in_poll(thread)

    def packet(self, i: int, size: int) -> bytes:
        flow = Flow(proto=UDP, sport=40000 + i)
        return flow.packet(payload_bytes(size - 28, i), ip_id=i + 1)

    def close(self) -> None:
        self.tun.close()
        self.peer.close()


class TestUdpConformance(TunConformance):
    @pytest.fixture
    def harness(self) -> Iterator[Harness]:
        h = UdpHarness()
        try:
            yield h
        finally:
            h.close()


# -- construction -------------------------------------------------------------------


def test_is_a_gso_tun_with_the_spec_numbers() -> None:
    with UdpTun((LOOP4, 0), (LOOP4, 9)) as tun:
        assert isinstance(tun, Tun) and isinstance(tun, GsoTun)
        assert tun.batch_size() == 128
        assert tun.mwo() == tun.mro() == 0
        # loopback's MTU is 65536: less IPv4 and UDP, capped at the largest UDP payload
        assert tun.mtu() == udp_mod.MAX_PAYLOAD == 65507
        host, port = tun.local_address[:2]
        assert tun.name() == f"udp:{host}:{port}"
        assert tun.peer == (LOOP4, 9)
        assert "peer=('127.0.0.1', 9)" in repr(tun)
    assert "[closed]" in repr(tun)
    with pytest.raises(ClosedError):
        tun.fileno()


def test_default_mtu_follows_the_route_and_the_family() -> None:
    with UdpTun(("", 0)) as tun:  # no peer: an Ethernet path is assumed
        assert tun.mtu() == 1500 - 20 - 8
    with UdpTun((LOOP6, 0), (LOOP6, 9)) as tun:
        assert tun.mtu() == 65536 - 40 - 8
        assert tun.name() == f"udp:[::1]:{tun.local_address[1]}"
    with UdpTun((LOOP4, 0), (LOOP4, 9), mtu=1400) as tun:
        assert tun.mtu() == 1400


def test_takes_over_a_bound_socket_and_closes_it() -> None:
    sock = plain_socket()
    fd = sock.fileno()
    tun = UdpTun(sock)
    assert tun.fileno() == fd
    tun.close()
    assert sock.fileno() == -1  # detached: the UdpTun closed the descriptor
    with pytest.raises(OSError) as info:
        socket.socket(fileno=fd)
    assert info.value.errno == errno.EBADF


def test_bad_arguments_raise_and_leave_the_callers_socket_open() -> None:
    unbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(ValueError, match="not bound"):
            UdpTun(unbound)
        with pytest.raises(ValueError, match="UDP socket"):
            UdpTun(tcp)
        assert unbound.fileno() >= 0 and tcp.fileno() >= 0
    finally:
        unbound.close()
        tcp.close()
    with pytest.raises(ValueError, match="mtu"):
        UdpTun((LOOP4, 0), mtu=67)
    with pytest.raises(ValueError, match="mtu"):
        UdpTun((LOOP4, 0), mtu=65508)
    with pytest.raises(TypeError, match="peer"):
        UdpTun((LOOP4, 0), "127.0.0.1:9")  # type: ignore[arg-type]
    with UdpTun((LOOP4, 0)) as tun, pytest.raises(OSError) as info:
        UdpTun((LOOP4, tun.local_address[1]))
    assert info.value.errno == errno.EADDRINUSE


def test_gso_offsets_need_room_for_the_virtio_header() -> None:
    with UdpTun((LOOP4, 0), (LOOP4, 9)) as tun:
        bufs, sizes = gso_bufs(1)
        with pytest.raises(OffsetError, match="virtio"):
            tun.read_gso(bufs, sizes, HDR - 1)
        with pytest.raises(OffsetError, match="virtio"):
            tun.write_gso([bytes(100)], HDR - 1)
        with pytest.raises(ValueError, match="sizes"):
            tun.read(bufs, [], 0)


def test_socket_buffers_are_sized_for_bursts() -> None:
    with UdpTun((LOOP4, 0)) as tun:
        sock = socket.socket(fileno=tun.fileno())
        try:
            rcv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            snd = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        finally:
            sock.detach()
    with open("/proc/sys/net/core/rmem_max") as f:
        cap = int(f.read())
    # FORCE (root) gets the whole size; otherwise up to the sysctl's cap. Doubled by the kernel.
    with open("/proc/sys/net/core/wmem_max") as f:
        wcap = int(f.read())
    assert rcv >= 2 * min(udp_mod.SOCKET_BUFFER, cap)
    assert snd >= 2 * min(udp_mod.SOCKET_BUFFER, wcap)


# -- batches --------------------------------------------------------------------------


def mixed_packets(count: int) -> list[bytes]:
    out = []
    for i in range(count):
        flow = FLOWS[("tcp4", "tcp6", "udp4", "udp6")[i % 4]].with_(sport=30000 + i % 7)
        size = (60, 576, 1200, 1400, 1400, 1400, 1000)[i % 7]
        out.append(flow.packet(payload_bytes(size, i), seq=i * 100, ip_id=i))
    return out


def test_a_batch_of_128_crosses_whole_and_in_order(pair: tuple[UdpTun, UdpTun]) -> None:
    a, b = pair
    packets = mixed_packets(128)
    assert b.write(packets) == 128
    assert read_packets(a, 128) == packets
    sa, sb = a.stats(), b.stats()
    assert sb.packets_written == sa.packets_read == 128
    assert sb.bytes_written == sa.bytes_read == sum(map(len, packets))
    # the runs of equal length (the three 1400s, ...) went as UDP_SEGMENT sends
    assert sb.gso_sends > 0 and sb.udp_gso == 1


def test_equal_packets_go_in_one_send_and_come_in_one_gro_read(
    pair: tuple[UdpTun, UdpTun],
) -> None:
    a, b = pair
    flow = FLOWS["udp4"]
    packets = [flow.packet(payload_bytes(1000, i), ip_id=i) for i in range(64)]
    assert b.write(packets) == 64
    assert b.stats().gso_sends == 1  # 64 datagrams, one system call
    bufs = [bytearray(2000) for _ in range(128)]
    sizes = [0] * 128
    assert a.read(bufs, sizes) == 64  # one GRO read brings them all
    assert [bytes(bufs[i][: sizes[i]]) for i in range(64)] == packets
    assert a.stats().gro_reads == 1


def test_a_short_read_keeps_the_rest_for_the_next(pair: tuple[UdpTun, UdpTun]) -> None:
    a, b = pair
    packets = [FLOWS["udp4"].packet(payload_bytes(500, i), ip_id=i) for i in range(20)]
    b.write(packets)
    got = []
    bufs, sizes = [bytearray(600) for _ in range(3)], [0] * 3
    while len(got) < 20:
        n = a.read(bufs, sizes)
        assert 1 <= n <= 3
        got.extend(bytes(bufs[i][: sizes[i]]) for i in range(n))
    assert got == packets


def test_a_kernel_without_the_options_still_carries_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probed off (an old kernel), or gso=False: one datagram per send and per read."""
    monkeypatch.setattr(udp_mod, "_probe_offloads", lambda sock, gso: (False, False))
    a = UdpTun((LOOP4, 0))
    b = UdpTun((LOOP4, 0), a.local_address, gso=False)
    try:
        for tun in (a, b):
            assert tun.stats().udp_gso == tun.stats().udp_gro == 0
        packets = [FLOWS["tcp4"].packet(payload_bytes(1400, i), seq=i * 1400) for i in range(40)]
        assert b.write(packets) == 40
        assert read_packets(a, 40) == packets
        sp = FLOWS["tcp4"].super_packet(payload_bytes(20000, 1), 1400, seq=7)
        assert b.write_gso([bytes(6) + sp]) == 1
        # read_gso still coalesces what one batch brings
        got = read_gso_all(a, 1)
        assert got[0] == sp
        assert b.stats().gso_sends == 0 and a.stats().gro_reads == 0
    finally:
        a.close()
        b.close()


# -- super-packets: GSO out, GRO in -----------------------------------------------------


@pytest.mark.parametrize("kind", FLOWS)
@pytest.mark.parametrize("payload_len", [1, 1400, 1401, 9000, 60000])
def test_write_gso_sends_the_segments_the_kernel_would_make(kind: str, payload_len: int) -> None:
    flow = FLOWS[kind]
    host = LOOP6 if flow.version == 6 else LOOP4  # the outer family: either works
    receiver = plain_socket(host)
    gso_size = 1400 if flow.proto == TCP else 1200
    try:
        with UdpTun((host, 0), receiver.getsockname()[:2]) as tun:
            payload = payload_bytes(payload_len, 5)
            sp = flow.super_packet(payload, gso_size, seq=1000, ip_id=77)
            assert tun.write_gso([bytes(6) + sp]) == 1
            expected = flow.segments(payload, gso_size, seq=1000, ip_id=77)
            assert recv_all(receiver, len(expected)) == expected
            stats = tun.stats()
            assert stats.packets_written == len(expected)
            assert stats.bytes_written == sum(map(len, expected))
            assert stats.gso_written == 1
            # as few sends as the kernel's limits allow: segments and bytes per send
            step = min(udp_mod.MAX_SEGMENTS, udp_mod.MAX_PAYLOAD // (flow.hdr_len + gso_size))
            assert stats.gso_sends == (0 if len(expected) == 1 else -(-len(expected) // step))
    finally:
        receiver.close()


@pytest.mark.parametrize("kind", FLOWS)
@pytest.mark.parametrize("payload_len", [1401, 9000, 60000])
def test_read_gso_gives_back_the_super_packet_byte_for_byte(kind: str, payload_len: int) -> None:
    """The kernel segments (UDP_SEGMENT) and coalesces (UDP_GRO); read_gso rebuilds the original."""
    flow = FLOWS[kind]
    sender = plain_socket()
    gso_size = 1400 if flow.proto == TCP else 1200
    try:
        with UdpTun((LOOP4, 0), sender.getsockname()) as tun:
            payload = payload_bytes(payload_len, 9)
            segments = flow.segments(payload, gso_size, seq=5, ip_id=300)
            send_segmented(sender, segments, tun.local_address)
            got = read_gso_all(tun, 1)
            assert got == [flow.super_packet(payload, gso_size, seq=5, ip_id=300)]
            stats = tun.stats()
            assert stats.gro_reads == 1 and stats.gso_read == 1
            assert stats.packets_read == stats.gro_coalesced == len(segments)
            assert stats.bytes_read == sum(map(len, segments))
    finally:
        sender.close()


def assert_coalesced(flow: Flow, got: list[bytes], segments: list[bytes], gso_size: int) -> None:
    """Check that *got* (read_gso's packets, header first) are *segments*, in order, each
    run of them the super-packet it makes (or a lone segment behind an all-zero header)."""
    at = 0
    for g in got:
        if g[:HDR] == bytes(HDR):
            assert g[HDR:] == segments[at]
            at += 1
            continue
        payload_len = len(g) - HDR - flow.hdr_len
        count = -(-payload_len // gso_size)
        assert g == _super_of(flow, segments[at : at + count], gso_size)
        at += count
    assert at == len(segments)


def _super_of(flow: Flow, segments: list[bytes], gso_size: int) -> bytes:
    """The super-packet that *segments* (consecutive, of one flow) coalesce into."""
    h = flow.hdr_len
    first = segments[0]
    payload = b"".join(seg[h:] for seg in segments)
    seq = struct.unpack_from("!I", first, flow.iph_len + 4)[0] if flow.proto == TCP else 0
    ip_id = struct.unpack_from("!H", first, 4)[0] if flow.version == 4 else 0
    return flow.super_packet(payload, gso_size, seq=seq, ip_id=ip_id)


@pytest.mark.parametrize("kind", FLOWS)
def test_super_packets_round_trip_between_two_udp_tuns(
    pair: tuple[UdpTun, UdpTun], kind: str
) -> None:
    """write_gso -> the kernel's GSO and GRO -> read_gso: the same segments, coalesced again."""
    a, b = pair
    flow = FLOWS[kind]
    lens = (64000, 2600, 13000, 1000)
    sps = [
        flow.super_packet(payload_bytes(n, n), 1300, seq=i * 100000, ip_id=i * 100)
        for i, n in enumerate(lens)
    ]
    segments = [
        seg
        for i, n in enumerate(lens)
        for seg in flow.segments(payload_bytes(n, n), 1300, seq=i * 100000, ip_id=i * 100)
    ]
    assert b.write_gso([bytes(6) + sp for sp in sps]) == len(sps)
    # The first needs two sends (one carries at most 65507 bytes), so two GRO reads; read_gso
    # may coalesce them again if they come in one call.
    got: list[bytes] = []
    bufs, sizes = gso_bufs()
    while sum(max(1, -(-(len(g) - HDR - flow.hdr_len) // 1300)) for g in got) < len(segments):
        n = a.read_gso(bufs, sizes, GSO_OFFSET)
        got.extend(bytes(bufs[i][GSO_OFFSET - HDR : GSO_OFFSET + sizes[i]]) for i in range(n))
    assert_coalesced(flow, got, segments, 1300)
    if flow.proto == TCP:  # not contiguous in sequence: never merged (UDP ones may be)
        assert sps[1] in got and sps[2] in got
    assert b.stats().packets_written == a.stats().packets_read == len(segments)


def test_a_batch_of_super_packets_arrives_as_the_kernel_would_segment_it(udp_path: str) -> None:
    """Several super-packets in one write_gso (the C path packs their segments into shared
    UDP_SEGMENT sends): every segment arrives, in order, as a plain socket receives it."""
    items: list[tuple[bytes, list[bytes]]] = []  # (buffer for write_gso, what must arrive)
    for i in range(12):
        flow = FLOWS[("tcp4", "udp4")[i % 2]].with_(sport=1000 + i % 3)
        gso = 1400 if flow.proto == TCP else 1200
        payload = payload_bytes((20 * 1400, 7 * 1400, 1, 40000)[i % 4], i)
        items.append((
            bytes(6) + flow.super_packet(payload, gso, seq=i * 70000, ip_id=i),
            flow.segments(payload, gso, seq=i * 70000, ip_id=i),
        ))
    plain = FLOWS["udp4"].packet(b"plain")
    items.insert(5, (bytes(6 + HDR) + plain, [plain]))  # a GSO_NONE packet among them
    receiver = plain_socket()
    try:
        with UdpTun((LOOP4, 0), receiver.getsockname()[:2], mtu=1472) as tun:
            assert tun.write_gso([buf for buf, _ in items]) == len(items)
            expected = [seg for _, segs in items for seg in segs]
            assert recv_all(receiver, len(expected)) == expected
            stats = tun.stats()
            assert stats.packets_written == len(expected)
            assert stats.gso_written == 12
            if udp_path == "c":  # segments of consecutive super-packets share sends
                assert stats.gso_sends < 12
    finally:
        receiver.close()


def test_one_gro_read_of_two_inner_flows_gives_one_super_packet_each() -> None:
    sender = plain_socket()
    x, y = FLOWS["tcp4"], FLOWS["tcp4"].with_(sport=40001)
    try:
        with UdpTun((LOOP4, 0), sender.getsockname()) as tun:
            px = [x.packet(payload_bytes(1000, i), seq=i * 1000, ip_id=i) for i in range(10)]
            py = [y.packet(payload_bytes(1000, i + 50), seq=i * 1000, ip_id=i) for i in range(10)]
            interleaved = [p for pair in zip(px, py, strict=True) for p in pair]
            send_segmented(sender, interleaved, tun.local_address)  # one GRO read
            got = read_gso_all(tun, 2)
            assert got == [_super_of(x, px, 1000), _super_of(y, py, 1000)]
            assert tun.stats().gro_reads == 1
    finally:
        sender.close()


def test_read_gso_with_few_buffers_loses_nothing(pair: tuple[UdpTun, UdpTun]) -> None:
    a, b = pair
    flows = [FLOWS["udp4"].with_(sport=20000 + i) for i in range(6)]
    packets = [f.packet(payload_bytes(900, i), ip_id=i) for i, f in enumerate(flows * 3)]
    b.write(packets)
    bufs, sizes = gso_bufs(2)
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got) < len(packets) and time.monotonic() < deadline:
        n = a.read_gso(bufs, sizes)
        got.extend(bytes(bufs[i][GSO_OFFSET : GSO_OFFSET + sizes[i]]) for i in range(n))
    # Every packet of the 18 came, each alone (no two of a flow were adjacent... or merged).
    assert sorted(got) == sorted(packets)


# -- the fallback: the kernel refuses UDP_SEGMENT --------------------------------------------


class RefusingSocket(socket.socket):
    """A UDP socket whose UDP_SEGMENT sends fail with ``refuse`` (EIO: as through a device
    that cannot checksum UDP, udp_send_skb); its other sends are real. The seam: a socket
    of a subclass is used through its own methods."""

    refuse = errno.EIO

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        if any(level == socket.SOL_UDP and kind == UDP_SEGMENT for level, kind, _ in ancdata):
            raise OSError(self.refuse, os.strerror(self.refuse))
        return super().sendmsg(buffers, ancdata, flags, address)


def test_eio_turns_gso_off_for_good_and_loses_nothing() -> None:
    receiver = plain_socket()
    sock = RefusingSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOP4, 0))
    flow = FLOWS["tcp4"]
    try:
        with UdpTun(sock, receiver.getsockname()) as tun:
            assert tun.stats().udp_gso == 1
            payload = payload_bytes(30000, 2)
            sp = flow.super_packet(payload, 1400)
            assert tun.write_gso([bytes(6) + sp, bytes(6) + sp]) == 2
            expected = flow.segments(payload, 1400)
            assert recv_all(receiver, 2 * len(expected)) == expected * 2
            stats = tun.stats()
            assert stats.gso_fallback == 1 and stats.udp_gso == 0
            assert stats.gso_sends == 0  # the first failed; the rest were not tried
            assert stats.packets_written == 2 * len(expected)
            plain = [flow.packet(payload_bytes(500, i)) for i in range(5)]
            assert tun.write(plain) == 5
            assert recv_all(receiver, 5) == plain
    finally:
        receiver.close()


# The kernel's side of the seam: a preloaded shim whose sendmsg and sendmmsg answer EIO
# for a message with UDP_SEGMENT, as udp_send_skb does for a route that cannot take it
# (xfrm), and pass every other message to the real call. Both paths meet it.
_EIO_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/udp.h>
#include <sys/socket.h>

static int segmented(const struct msghdr *h) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR((struct msghdr *)h, c))
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_SEGMENT) return 1;
    return 0;
}
ssize_t sendmsg(int fd, const struct msghdr *h, int flags) {
    ssize_t (*real)(int, const struct msghdr *, int) = dlsym(RTLD_NEXT, "sendmsg");
    if (segmented(h)) { errno = EIO; return -1; }
    return real(fd, h, flags);
}
int sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags) {
    int (*real)(int, struct mmsghdr *, unsigned int, int) = dlsym(RTLD_NEXT, "sendmmsg");
    unsigned int k = 0;
    while (k < n && !segmented(&v[k].msg_hdr)) k++;
    if (n && !k) { errno = EIO; return -1; }
    return real(fd, v, k, flags);
}
"""

_EIO_RUN = """
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from packets import Flow, payload_bytes
from tunkit.transport import udp
if sys.argv[1] == "pure":
    udp._udp_io = None
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(("127.0.0.1", 0))
rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
rx.settimeout(5)
tun = udp.UdpTun(("127.0.0.1", 0), rx.getsockname())
flow = Flow()
sps = [flow.super_packet(payload_bytes(30000, i), 1400, seq=i * 30000) for i in range(3)]
payloads = [payload_bytes(30000, i) for i in range(3)]
expected = [s for i, p in enumerate(payloads) for s in flow.segments(p, 1400, seq=i * 30000)]
plain = [flow.packet(payload_bytes(700, i)) for i in range(6)]
n = tun.write_gso([bytes(6) + sp for sp in sps]) + tun.write(plain)
got = [rx.recv(70000) for _ in range(len(expected) + len(plain))]
st = tun.stats()
print(json.dumps({"written": n, "same": got == expected + plain, "c": tun._io is not None,
                  "gso_fallback": st.gso_fallback, "udp_gso": st.udp_gso,
                  "gso_sends": st.gso_sends, "packets_written": st.packets_written,
                  "expected": len(expected) + len(plain)}))
tun.close()
"""


def test_eio_from_the_kernel_turns_gso_off_and_loses_nothing(
    udp_path: str, tmp_path: Path
) -> None:
    """The kernel refuses UDP_SEGMENT with EIO (a preloaded shim stands in for it): the
    first super-packet goes datagram by datagram, GSO is off from there on, all arrives."""
    gcc = need_tool("gcc")
    shim_c = tmp_path / "eio.c"
    shim_c.write_text(_EIO_SHIM)
    shim = tmp_path / "eio.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(shim), str(shim_c), "-ldl"], check=True)
    # after what is preloaded already (the sanitizers' runtime must stay first)
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD", ""), str(shim)]))
    env = {**os.environ, "LD_PRELOAD": preload}
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", _EIO_RUN, udp_path, here],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["c"] == (udp_path == "c")
    assert out["written"] == 9
    assert out["same"], "the datagrams that arrived differ from the segments sent"
    assert out["gso_fallback"] == 1 and out["udp_gso"] == 0
    assert out["gso_sends"] == 0
    assert out["packets_written"] == out["expected"]


def test_refused_segments_go_apart_and_enough_refusals_turn_gso_off() -> None:
    """SO_NO_CHECK (UDP checksums off): the kernel refuses every UDP_SEGMENT send (EINVAL)."""
    receiver = plain_socket()
    sock = plain_socket()
    sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    flow = FLOWS["udp4"]
    try:
        with UdpTun(sock, receiver.getsockname()) as tun:
            packets = [flow.packet(payload_bytes(1000, i), ip_id=i) for i in range(10)]
            assert tun.write(packets) == 10
            assert recv_all(receiver, 10) == packets
            stats = tun.stats()
            assert stats.gso_refused == 1 and stats.udp_gso == 1  # one refusal: tried again
            for _ in range(udp_mod._REFUSALS_BEFORE_OFF):
                assert tun.write(packets) == 10
            assert recv_all(receiver, 10 * udp_mod._REFUSALS_BEFORE_OFF) == packets * 8
            stats = tun.stats()
            assert stats.gso_refused == udp_mod._REFUSALS_BEFORE_OFF
            assert stats.gso_fallback == 1 and stats.udp_gso == 0
            assert stats.gso_sends == 0
            assert stats.packets_written == 90
    finally:
        receiver.close()


# -- who may send -----------------------------------------------------------------------------


def test_a_strangers_datagrams_are_dropped_and_counted(pair: tuple[UdpTun, UdpTun]) -> None:
    a, b = pair
    stranger = plain_socket()
    try:
        mine = [FLOWS["udp4"].packet(payload_bytes(100, i), ip_id=i) for i in range(5)]
        theirs = FLOWS["udp4"].with_(sport=666).packet(b"evil")
        for i in range(5):
            stranger.sendto(theirs, a.local_address)
            b.write([mine[i]])
        send_segmented(stranger, [theirs] * 10, a.local_address)  # one GRO read of 10
        b.write([mine[0]])
        assert read_packets(a, 6) == [*mine, mine[0]]
        assert a.stats().dropped_stranger == 15  # datagrams, 10 of them in one GRO read
        assert a.stats().packets_read == 6
    finally:
        stranger.close()


def test_the_first_source_heard_becomes_the_peer_and_stays() -> None:
    first, second = plain_socket(), plain_socket()
    try:
        with UdpTun((LOOP4, 0)) as tun:
            pkt = FLOWS["udp4"].packet(b"hello")
            assert tun.write([pkt]) == 1  # nobody to send to yet
            assert tun.stats().dropped_no_peer == 1
            first.sendto(pkt, tun.local_address)
            assert read_packets(tun, 1) == [pkt]
            assert tun.peer == first.getsockname()
            second.sendto(pkt, tun.local_address)
            first.sendto(pkt[:-1] + b"!", tun.local_address)
            assert read_packets(tun, 1)[0].endswith(b"!")  # not the second's
            assert tun.stats().dropped_stranger == 1
            tun.write([pkt])
            assert recv_all(first, 1) == [pkt]
    finally:
        first.close()
        second.close()


# -- what a peer sends cannot hurt -----------------------------------------------------------


def test_malformed_truncated_and_oversized_datagrams_are_dropped_and_counted() -> None:
    peer = plain_socket()
    good = FLOWS["udp4"].packet(payload_bytes(200, 1))
    v6 = FLOWS["udp6"].packet(payload_bytes(200, 2))
    try:
        with UdpTun((LOOP4, 0), peer.getsockname(), mtu=1400) as tun:
            bad = [
                b"",  # empty
                b"\x45" + bytes(10),  # shorter than an IPv4 header
                good[:-1],  # truncated: the length field says more
                good + b"x",  # trailing bytes
                b"\x75" + good[1:],  # IP version 7
                b"\x44" + good[1:],  # IHL 4
                b"\x4f\x00\x00\x28" + bytes(36),  # IHL 15: a 60-byte header in 40 bytes
                v6[:-3],
                bytes(1400),  # version 0
            ]
            for d in bad:
                peer.sendto(d, tun.local_address)
            big = FLOWS["udp4"].packet(payload_bytes(1500, 3))  # above mtu() 1400
            peer.sendto(big, tun.local_address)
            peer.sendto(good, tun.local_address)
            peer.sendto(v6, tun.local_address)
            assert read_packets(tun, 2) == [good, v6]
            stats = tun.stats()
            assert stats.dropped_malformed == len(bad)
            assert stats.dropped_too_big == 1
            assert stats.packets_read == 2
    finally:
        peer.close()


def looks_like_ip(d: bytes) -> bool:
    """The oracle of the datagram check: an IPv4 (header of 20-60 bytes, within the
    datagram) or IPv6 packet whose length field gives the datagram's length."""
    if len(d) < 20:
        return False
    if d[0] >> 4 == 4:
        return 20 <= (d[0] & 15) * 4 <= len(d) and int.from_bytes(d[2:4], "big") == len(d)
    if d[0] >> 4 == 6:
        return len(d) >= 40 and int.from_bytes(d[4:6], "big") + 40 == len(d)
    return False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    datagrams=st.lists(
        st.one_of(
            st.binary(max_size=200),
            # IPv4 headers whose lengths agree or not: IHL 0-15, total length 20-80
            st.builds(
                lambda ihl, n, off: bytes([0x40 | ihl, 0]) + (n + off).to_bytes(2, "big")
                + bytes(n - 4),
                st.integers(0, 15),
                st.integers(20, 80),
                st.sampled_from([0, 0, 0, -1, 1]),  # mostly a total length that matches
            ),
            st.builds(
                lambda p, i, b: p[:i] + bytes([b]) + p[i + 1 :],
                st.just(FLOWS["tcp4"].packet(payload_bytes(100))),
                st.integers(0, 139),
                st.integers(0, 255),
            ),
        ),
        min_size=1,
        max_size=20,
    ),
    gso=st.booleans(),
)
def test_any_datagrams_are_delivered_or_counted_never_raised(
    datagrams: list[bytes], gso: bool
) -> None:
    peer = plain_socket()
    try:
        with UdpTun((LOOP4, 0), peer.getsockname(), mtu=1400) as tun:
            for d in datagrams:
                peer.sendto(d, tun.local_address)
            marker = FLOWS["udp4"].packet(b"end")
            peer.sendto(marker, tun.local_address)
            got: list[bytes] = []
            while marker not in got:
                if gso:
                    for p in read_gso_all(tun, 1):
                        assert p[:HDR] == bytes(HDR)  # nothing here can merge
                        got.append(p[HDR:])
                else:
                    got.extend(read_packets(tun, 1))
            assert got == [d for d in datagrams if looks_like_ip(d)] + [marker]
            stats = tun.stats()
            assert stats.packets_read == len(got)
            assert stats.dropped_malformed == len(datagrams) + 1 - len(got)
    finally:
        peer.close()


# -- closing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["read", "read_gso"])
def test_close_from_another_thread_wakes_a_blocked_read_at_once(call: str) -> None:
    tun = UdpTun((LOOP4, 0), (LOOP4, 9))
    bufs, sizes = gso_bufs(4)
    fn = tun.read if call == "read" else tun.read_gso
    thread, errors = in_thread(lambda: fn(bufs, sizes, GSO_OFFSET))
    time.sleep(0.2)
    assert thread.is_alive(), "read returned with nothing sent"
    started = time.monotonic()
    tun.close()  # returns once the reader has left its system call
    woken = time.monotonic() - started
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ClosedError)
    assert woken < 0.1, f"close() took {woken:.3f} s to wake the reader"


def test_copy_joins_two_udp_tuns_to_pipes_and_ends_on_close() -> None:
    """A tunnel in memory: pipe <-> UdpTun ~ UdpTun <-> pipe; copy ends cleanly on close."""
    p1, q1 = tunkit.pipe(batch_size=16, mtu=1400)
    p2, q2 = tunkit.pipe(batch_size=16, mtu=1400)
    a = UdpTun((LOOP4, 0), mtu=1400)
    b = UdpTun((LOOP4, 0), a.local_address, mtu=1400)
    threads = [
        threading.Thread(target=tunkit.copy, args=(q1, b), name="test-copy-b"),
        threading.Thread(target=tunkit.copy, args=(q2, a), name="test-copy-a"),
    ]
    for t in threads:
        t.start()
    try:
        packets = [FLOWS["udp4"].packet(payload_bytes(300, i), ip_id=i) for i in range(30)]
        for pkt in packets:
            p1.write([pkt])
        assert read_packets(p2, 30) == packets
        # and back: a learnt its peer from the first datagram
        p2.write([packets[0]])
        assert read_packets(p1, 1) == [packets[0]]
    finally:
        p1.close()
        p2.close()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
    assert a.closed and b.closed

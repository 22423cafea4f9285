"""StreamTun over real sockets: a socketpair, TCP on loopback and TLS with mutual certificates.

The peer of the Tun under test is usually a raw socket of the test's own,
which writes and reads frames built here (two bytes of length, then the
packet), so the framing is checked against an independent encoder.
"""

from __future__ import annotations

import fcntl
import itertools
import socket
import ssl
import struct
import termios
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from blocking import wait_in_poll
from conformance import Harness, TunConformance, in_thread, read_packets, write_packets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pipe import ipv4_packet
from tls_util import Pki, make_pki

import tunkit
from tunkit import ClosedError, StreamTun, TunError

KINDS = ["unix", "tcp", "tls"]


def frame(packet: bytes) -> bytes:
    """The frame of *packet*, built as the format says (independent of StreamTun)."""
    return len(packet).to_bytes(2, "big") + packet


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def socket_pair(kind: str, pki: Pki | None = None) -> tuple[socket.socket, socket.socket]:
    """Two connected blocking sockets of *kind* (``unix``, ``tcp``, ``tls``; TLS handshaken)."""
    if kind == "unix":
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
    if kind == "tcp":
        return server, client
    assert pki is not None
    box: list[ssl.SSLSocket] = []
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            box.append(pki.client_context().wrap_socket(client, server_hostname="127.0.0.1"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        tls_server = pki.server_context().wrap_socket(server, server_side=True)
    finally:
        thread.join(10)
    assert not errors, errors
    return tls_server, box[0]


class StreamHarness:
    """Conformance harness: a StreamTun on one socket, the test's raw socket on the other."""

    def __init__(self, kind: str, pki: Pki) -> None:
        mine, self.peer = socket_pair(kind, pki)
        self.tun = StreamTun(mine)
        self._threads: list[threading.Thread] = []
        self._pending = b""

    def inject(self, packets: Sequence[bytes]) -> None:
        data = b"".join(frame(p) for p in packets)
        thread, _ = in_thread(lambda: self.peer.sendall(data))
        self._threads.append(thread)

    def collect(self, count: int, timeout: float) -> list[bytes]:
        out: list[bytes] = []
        self.peer.settimeout(timeout)
        while len(out) < count:
            while len(self._pending) >= 2:
                length = int.from_bytes(self._pending[:2], "big")
                if len(self._pending) < 2 + length:
                    break
                out.append(self._pending[2 : 2 + length])
                self._pending = self._pending[2 + length :]
            if len(out) >= count:
                break
            chunk = self.peer.recv(1 << 16)
            assert chunk, "the stream ended"
            self._pending += chunk
        return out

    def packet(self, i: int, size: int) -> bytes:
        return ipv4_packet(i, size)

    def wait_blocked(self, thread: threading.Thread) -> None:
        wait_in_poll(thread)

    def close(self) -> None:
        self.tun.close()
        self.peer.close()
        for thread in self._threads:
            thread.join(5)


class TestStreamConformance(TunConformance):
    @pytest.fixture(params=KINDS)
    def harness(self, request: pytest.FixtureRequest, pki: Pki) -> Iterator[Harness]:
        h = StreamHarness(request.param, pki)
        yield h
        h.close()


@pytest.fixture(params=KINDS)
def tun_pair(request: pytest.FixtureRequest, pki: Pki) -> Iterator[tuple[StreamTun, StreamTun]]:
    """Two StreamTuns on the two ends of one stream of each kind."""
    a, b = socket_pair(request.param, pki)
    ta, tb = StreamTun(a, mtu=9000), StreamTun(b, mtu=9000)
    yield ta, tb
    ta.close()
    tb.close()


def test_batches_cross_both_ways_whole_and_in_order(tun_pair: tuple[StreamTun, StreamTun]) -> None:
    a, b = tun_pair
    sizes = [1, 20, 28, 576, 1400, 1500, 4000, 9000]
    ab = [ipv4_packet(i, sizes[i % len(sizes)]) for i in range(700)]
    ba = [ipv4_packet(10_000 + i, sizes[-1 - i % len(sizes)]) for i in range(500)]
    ta, ea = in_thread(lambda: write_packets(a, ab, offset=5))
    tb, eb = in_thread(lambda: write_packets(b, ba))
    got_b = read_packets(b, len(ab), offset=3)
    got_a = read_packets(a, len(ba))
    ta.join(10)
    tb.join(10)
    assert not ea and not eb
    assert got_b == ab
    assert got_a == ba
    sa, sb = a.stats(), b.stats()
    assert (sa.packets_written, sa.bytes_written) == (len(ab), sum(map(len, ab)))
    assert (sb.packets_read, sb.bytes_read) == (len(ab), sum(map(len, ab)))
    assert (sb.packets_written, sa.packets_read) == (len(ba), len(ba))
    assert sa.dropped_malformed == sb.dropped_malformed == 0


def test_one_receive_is_one_batch() -> None:
    a, peer = socket.socketpair()
    with StreamTun(a) as tun, peer:
        packets = [ipv4_packet(i, 100) for i in range(50)]
        peer.sendall(b"".join(frame(p) for p in packets))
        _wait_consumed_or_queued(tun, 50 * 102)
        bufs = [bytearray(1500) for _ in range(tun.batch_size())]
        sizes = [0] * len(bufs)
        assert tun.read(bufs, sizes) == 50
        assert [bytes(bufs[i][: sizes[i]]) for i in range(50)] == packets
        # A batch smaller than what is buffered: the rest comes next, in order.
        peer.sendall(b"".join(frame(p) for p in packets))
        _wait_consumed_or_queued(tun, 50 * 102)
        assert tun.read(bufs[:7], sizes) == 7
        assert tun.read(bufs, sizes) == 43
        assert bytes(bufs[0][: sizes[0]]) == packets[7]


def test_a_write_is_one_send_of_all_its_frames() -> None:
    a, peer = socket.socketpair()
    with StreamTun(a) as tun, peer:
        packets = [ipv4_packet(i, 60 + i) for i in range(128)]
        assert tun.write([bytes(4) + p for p in packets], 4) == 128
        expected = b"".join(frame(p) for p in packets)
        got = b""
        peer.settimeout(5)
        while len(got) < len(expected):
            got += peer.recv(1 << 20)
        assert got == expected


def _unread(sock_fd: int) -> int:
    """Bytes in the kernel's receive queue of *sock_fd* (FIONREAD): what no recv took yet."""
    buf = fcntl.ioctl(sock_fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _wait_consumed(fd: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _unread(fd):
        assert time.monotonic() < deadline, "the reader did not receive the chunk"
        time.sleep(0.0005)


def _wait_consumed_or_queued(tun: StreamTun, nbytes: int, timeout: float = 5.0) -> None:
    """Wait until *nbytes* sent to *tun* are all in its socket's receive queue."""
    deadline = time.monotonic() + timeout
    while _unread(tun.fileno()) < nbytes:
        assert time.monotonic() < deadline
        time.sleep(0.001)


class _Reader:
    """A thread that reads *tun* until *count* packets came or a call raises."""

    def __init__(self, tun: StreamTun, count: int) -> None:
        self.packets: list[bytes] = []
        self.error: BaseException | None = None
        self.calls = 0
        self._tun, self._count = tun, count
        self.thread = threading.Thread(target=self._run, name="test-reader")
        self.thread.start()

    def _run(self) -> None:
        tun = self._tun
        bufs = [bytearray(tun.mtu()) for _ in range(tun.batch_size())]
        sizes = [0] * len(bufs)
        try:
            while len(self.packets) < self._count:
                n = tun.read(bufs, sizes)
                self.calls += 1
                self.packets.extend(bytes(bufs[i][: sizes[i]]) for i in range(n))
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the reader is still blocked"


def _feed_in_chunks(peer: socket.socket, tun: StreamTun, data: bytes, cuts: Sequence[int]) -> None:
    """Send *data* cut at *cuts*, each chunk only once the reader has received the last one.

    So every chunk is what one ``recv`` of the Tun sees: frames split exactly there.
    """
    edges = [0, *sorted(set(cuts)), len(data)]
    for lo, hi in itertools.pairwise(edges):
        if lo == hi:
            continue
        peer.sendall(data[lo:hi])
        _wait_consumed(tun.fileno())


packet_lists = st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets=packet_lists, data=st.data())
def test_frames_split_at_any_byte_boundaries_arrive_whole(
    packets: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(frame(p) for p in packets)
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=20), label="cuts")
    a, peer = socket.socketpair()
    with StreamTun(a, mtu=300) as tun, peer:
        reader = _Reader(tun, len(packets))
        try:
            _feed_in_chunks(peer, tun, stream, cuts)
        finally:
            reader.join()
        assert reader.error is None
        assert reader.packets == packets


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_every_single_split_point_over_tcp_and_tls(kind: str, pki: Pki) -> None:
    # One stream, cut in two at each byte in turn, on one connection: the
    # sender waits for the receiver's socket to be drained between the halves.
    packets = [ipv4_packet(1, 28), b"\x60" + bytes(3), ipv4_packet(2, 61)]
    stream = b"".join(frame(p) for p in packets)
    mine, peer = socket_pair(kind, pki)
    with StreamTun(mine) as tun, peer:
        reader = _Reader(tun, len(packets) * (len(stream) - 1))
        try:
            for cut in range(1, len(stream)):
                peer.sendall(stream[:cut])
                _wait_consumed(tun.fileno())
                peer.sendall(stream[cut:])
            deadline = time.monotonic() + 10
            while len(reader.packets) < len(packets) * (len(stream) - 1):
                assert time.monotonic() < deadline and reader.error is None, reader.error
                time.sleep(0.01)
        finally:
            if reader.thread.is_alive():  # a failure above: end the reader
                tun.close()
            reader.join()
        assert reader.packets == packets * (len(stream) - 1)


@settings(max_examples=60, deadline=None)
@given(packets=packet_lists, data=st.data())
def test_a_stream_cut_inside_a_frame_is_a_protocol_error_after_the_whole_frames(
    packets: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(frame(p) for p in packets)
    # Keep every frame but the last whole, and 1 .. len-1 bytes of the last one.
    last = len(frame(packets[-1]))
    kept = data.draw(st.integers(1, last - 1), label="kept of the last frame")
    cut = len(stream) - last + kept
    a, peer = socket.socketpair()
    with StreamTun(a, mtu=300) as tun:
        reader = _Reader(tun, len(packets))
        peer.sendall(stream[:cut])
        peer.close()
        reader.join()
        assert reader.packets == packets[:-1]
        assert isinstance(reader.error, TunError) and not isinstance(reader.error, ClosedError)
        message = str(reader.error)
        assert "ended inside a frame" in message
        if kept >= 2:
            assert f"{kept} of the {last} bytes of a frame" in message
        else:
            assert "1 of the 2 bytes of a frame header" in message
        assert stream[cut - kept : cut][:16].hex(" ") in message  # the bytes seen
        assert tun.closed
        with pytest.raises(ClosedError):
            tun.read([bytearray(300)], [0])
        assert tun.stats().dropped_malformed == 1


def _oracle(stream: bytes, mtu: int) -> tuple[list[bytes], str]:
    """The packets a reader must return from *stream*, and how it must end (obvious loop)."""
    packets, pos = [], 0
    while pos < len(stream):
        if len(stream) - pos < 2:
            return packets, "cut"
        length = stream[pos] * 256 + stream[pos + 1]
        if length > mtu:
            return packets, "too long"
        if len(stream) - pos - 2 < length:
            return packets, "cut"
        if length:
            packets.append(stream[pos + 2 : pos + 2 + length])
        pos += 2 + length
    return packets, "closed"


@settings(max_examples=150, deadline=None)
@given(stream=st.binary(max_size=3000)
       | st.lists(st.binary(max_size=300), max_size=12).map(lambda ps: b"".join(map(frame, ps)))
       | st.tuples(packet_lists, st.binary(max_size=40)).map(
           lambda t: b"".join(map(frame, t[0])) + t[1]),
       mtu=st.sampled_from([1, 64, 300, 1500]))
def test_any_byte_stream_gives_the_frames_then_a_tun_error(stream: bytes, mtu: int) -> None:
    expected, end = _oracle(stream, mtu)
    a, peer = socket.socketpair()
    with StreamTun(a, mtu=mtu) as tun:
        reader = _Reader(tun, 10**6)
        peer.sendall(stream)
        peer.close()
        reader.join()
    assert reader.packets == expected
    assert isinstance(reader.error, TunError)  # ClosedError is one too
    if end == "closed":
        assert type(reader.error) is ClosedError
    else:
        assert not isinstance(reader.error, ClosedError)
        assert ("longer than mtu()" if end == "too long" else "ended inside a frame") in str(
            reader.error
        )


def test_a_stream_that_ends_between_frames_is_the_peer_closing() -> None:
    a, peer = socket.socketpair()
    with StreamTun(a) as tun:
        packets = [ipv4_packet(i, 40 + i) for i in range(5)]
        peer.sendall(b"".join(frame(p) for p in packets))
        peer.close()
        reader = _Reader(tun, 10**6)
        reader.join()
        assert reader.packets == packets
        assert type(reader.error) is ClosedError
        assert "peer ended the stream" in str(reader.error)
        assert tun.closed
        assert tun.fileno() == -1


def test_copy_ends_normally_when_the_peer_closes() -> None:
    a, peer = socket.socketpair()
    user, inner = tunkit.pipe(batch_size=8)
    tun = StreamTun(a)
    copier, errors = in_thread(lambda: tunkit.copy(inner, tun))
    try:
        peer.sendall(frame(ipv4_packet(1, 100)))
        assert read_packets(user, 1) == [ipv4_packet(1, 100)]
        peer.close()
        copier.join(5)
        assert not copier.is_alive()
        assert errors == []  # copy returned None: a close is a normal end
    finally:
        user.close()
        tun.close()
        copier.join(5)


@pytest.mark.parametrize("length", [1501, 9000, 0xFFFF])
def test_a_frame_longer_than_the_mtu_ends_the_stream_after_the_frames_before(
    length: int,
) -> None:
    a, peer = socket.socketpair()
    with StreamTun(a, mtu=1500) as tun, peer:
        good = [ipv4_packet(i, 1500 - i) for i in range(3)]
        bad = length.to_bytes(2, "big") + b"GET / HTTP/1.1\r\n"
        peer.sendall(b"".join(frame(p) for p in good) + bad)
        reader = _Reader(tun, 10**6)
        reader.join()
        assert reader.packets == good
        assert isinstance(reader.error, TunError) and not isinstance(reader.error, ClosedError)
        message = str(reader.error)
        assert f"frame of {length} bytes is longer than mtu() 1500" in message
        assert bad[:16].hex(" ") in message
        assert f"at stream byte {sum(len(p) + 2 for p in good)}" in message
        assert tun.closed


def test_a_huge_claim_allocates_nothing() -> None:
    # The receive buffer is made once; a header claiming 65535 bytes (above
    # mtu()) ends the stream before anything grows.
    a, peer = socket.socketpair()
    with StreamTun(a, mtu=1500) as tun, peer:
        peer.sendall(b"\xff\xff" + bytes(20_000))
        _wait_consumed_or_queued(tun, 20_002)
        bufs, sizes = [bytearray(1500) for _ in range(128)], [0] * 128
        tracemalloc.start()
        try:
            with pytest.raises(TunError):
                tun.read(bufs, sizes)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1500 + 2, f"a read allocated {peak} bytes"


def test_empty_frames_are_dropped_and_counted() -> None:
    a, peer = socket.socketpair()
    with StreamTun(a) as tun, peer:
        peer.sendall(b"\0\0" + frame(b"\x45abc") + b"\0\0")
        peer.sendall(frame(b"\x45def"))
        assert read_packets(tun, 2) == [b"\x45abc", b"\x45def"]
        assert tun.stats().dropped_malformed == 2


def test_packets_longer_than_the_mtu_are_not_sent_but_counted() -> None:
    a, peer = socket.socketpair()
    with StreamTun(a, mtu=1280) as tun, peer:
        packets = [ipv4_packet(1, 1280), ipv4_packet(2, 1281), ipv4_packet(3, 100)]
        assert tun.write(packets) == 3
        expected = frame(packets[0]) + frame(packets[2])
        peer.settimeout(5)
        got = b""
        while len(got) < len(expected):
            got += peer.recv(1 << 16)
        assert got == expected
        stats = tun.stats()
        assert (stats.packets_written, stats.dropped_too_big) == (2, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_close_wakes_a_write_blocked_on_a_full_socket(kind: str, pki: Pki) -> None:
    mine, peer = socket_pair(kind, pki)
    tun = StreamTun(mine)
    results: list[int] = []
    batch = [bytes(1500)] * 128

    def flood() -> None:
        while True:  # the peer never reads: the socket fills and a write blocks
            results.append(tun.write(batch))

    thread, errors = in_thread(flood)
    try:
        # The peer never reads: a write waits in poll() only once the socket is full.
        wait_in_poll(thread)
        started = time.monotonic()
        tun.close()
        thread.join(5)
        assert not thread.is_alive()
        assert time.monotonic() - started < 1.0
        assert len(errors) == 1 and isinstance(errors[0], ClosedError)
    finally:
        tun.close()
        peer.close()
        thread.join(5)


def test_close_from_another_thread_wakes_a_blocked_read_within_100ms() -> None:
    a, peer = socket.socketpair()
    tun = StreamTun(a)
    reader = _Reader(tun, 1)
    try:
        wait_in_poll(reader.thread)  # blocked in poll(), the kernel says
        started = time.monotonic()
        tun.close()
        reader.join()
        assert time.monotonic() - started < 0.1
        assert isinstance(reader.error, ClosedError)
    finally:
        tun.close()
        peer.close()


def _tls_pair_not_handshaken(pki: Pki, *, stranger: bool = False) -> tuple[StreamTun, StreamTun]:
    """StreamTuns on a server and a client SSLSocket whose handshake is left to their calls."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        raw_client = socket.create_connection(srv.getsockname())
        raw_server, _ = srv.accept()
    server = pki.server_context().wrap_socket(
        raw_server, server_side=True, do_handshake_on_connect=False
    )
    client = pki.client_context(stranger=stranger).wrap_socket(
        raw_client, server_hostname="127.0.0.1", do_handshake_on_connect=False
    )
    return StreamTun(server), StreamTun(client)


def test_tls_handshake_left_to_the_first_calls(pki: Pki) -> None:
    ts, tc = _tls_pair_not_handshaken(pki)
    with ts, tc:
        assert ts.name().startswith("tls:127.0.0.1:")
        writer, errors = in_thread(lambda: write_packets(tc, [ipv4_packet(1, 500)]))
        assert read_packets(ts, 1) == [ipv4_packet(1, 500)]
        writer.join(5)
        assert not errors
        write_packets(ts, [ipv4_packet(2, 600)])
        assert read_packets(tc, 1) == [ipv4_packet(2, 600)]


def test_tls_server_refuses_a_stranger_certificate(pki: Pki) -> None:
    ts, tc = _tls_pair_not_handshaken(pki, stranger=True)
    with ts, tc:
        writer, _ = in_thread(lambda: write_packets(tc, [ipv4_packet(1, 100)]))
        with pytest.raises(ssl.SSLError, match="certificate"):
            read_packets(ts, 1)
        ts.close()
        tc.close()
        writer.join(5)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="mtu"):
        StreamTun(socket.socket(), mtu=0)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp, pytest.raises(ValueError, match="stream socket"):
        StreamTun(udp)
    unconnected = socket.socket()
    with unconnected, pytest.raises(ValueError, match="connected"):
        StreamTun(unconnected)


def test_names_fileno_events_and_close(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen()
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        server, _ = srv.accept()
    fd = client.fileno()
    with StreamTun(client) as tun, server:
        assert tun.name() == f"unix:{path}"
        assert tun.fileno() == fd
        assert (tun.mwo(), tun.mro(), tun.mtu(), tun.batch_size()) == (0, 0, 1500, 128)
        events = tun.events()
        assert events.get(timeout=1) == tunkit.Event.UP
        assert isinstance(tun, tunkit.Tun)
    assert events.get(timeout=1) is None
    assert "[closed]" in repr(tun)
    assert client.fileno() == -1  # the socket object let go of the descriptor
    with pytest.raises(ClosedError):
        tun.write([b"\x45"])

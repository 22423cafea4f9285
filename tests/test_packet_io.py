"""tunkit._speedups.PacketIo: one packet per call, the counters, and the way close() ends it.

A SOCK_SEQPACKET socket pair stands in for a TUN descriptor (one record per
read or write, as a TUN device gives one packet), so these run without root;
the device tests (test_native*.py, io_path) run the same class on real
devices. Expected values come from the socket on the other side.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from blocking import signal_when_polling, wait_in_poll
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import UDP, Flow, payload_bytes, vnet
from reuse import occupy

from tunkit._linux.fd import PACKET_IO
from tunkit._offload._impl import REASON
from tunkit._offload.vnet import gso_segments

if PACKET_IO is None:
    pytest.skip(f"no C extension: {REASON}", allow_module_level=True)

from tunkit._speedups import PacketIo

pytestmark = pytest.mark.timeout(30)

OFFSET = 16
AT = OFFSET - 10  # read_gso/write_gso: where the virtio-net header goes, before the packet
COUNTERS = (
    "packets_read",
    "bytes_read",
    "dropped_too_big",
    "dropped_malformed",
    "gso_read",
    "packets_written",
    "bytes_written",
    "dropped_write",
    "gso_written",
)


def counts(**nonzero: int) -> dict[str, int]:
    """PacketIo.counts() with these counters set and every other one 0."""
    assert set(nonzero) <= set(COUNTERS)
    return {name: nonzero.get(name, 0) for name in COUNTERS}


class Ends:
    """``io`` on one end of a socket pair (non-blocking, as a device's descriptor is)."""

    def __init__(self) -> None:
        self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.io = PacketIo(self.ours.fileno(), self.wake)

    def close(self) -> None:
        """What _Descriptor.close does: wake, drain, then close the numbers."""
        os.eventfd_write(self.wake, 1)
        self.io.drain()
        self.ours.close()
        self.peer.close()
        os.close(self.wake)


@pytest.fixture
def ends() -> Iterator[Ends]:
    e = Ends()
    try:
        yield e
    finally:
        e.close()


def test_read_and_write_one_packet_each_and_count(ends: Ends) -> None:
    buf, over = bytearray(OFFSET + 100), bytearray(200)
    ends.peer.send(b"x" * 60)
    assert ends.io.read(buf, OFFSET, over) == 60
    assert bytes(buf[OFFSET : OFFSET + 60]) == b"x" * 60
    assert buf[:OFFSET] == bytes(OFFSET)  # nothing before the offset is touched
    out = bytes(range(OFFSET)) + b"packet"
    assert ends.io.write(out, OFFSET) == 6
    assert ends.peer.recv(100) == b"packet"  # only what follows the offset
    assert ends.io.write(memoryview(out)[: OFFSET + 3], OFFSET) == 3
    assert ends.peer.recv(100) == b"pac"
    assert ends.io.counts() == counts(
        packets_read=1, bytes_read=60, packets_written=2, bytes_written=9
    )


def test_a_packet_longer_than_the_room_is_dropped_and_counted(ends: Ends) -> None:
    buf, over = bytearray(OFFSET + 100), bytearray(4000)
    ends.peer.send(b"L" * 3000)
    ends.peer.send(b"s" * 100)  # exactly the room: kept
    assert ends.io.read(buf, OFFSET, over) == 100
    assert bytes(buf[OFFSET:]) == b"s" * 100
    assert ends.io.counts() == counts(packets_read=1, bytes_read=100, dropped_too_big=1)


def test_read_waits_for_a_packet_and_releases_the_gil(ends: Ends) -> None:
    buf, over = bytearray(OFFSET + 100), bytearray(200)
    ticks = 0
    result: list[int] = []
    reader = threading.Thread(target=lambda: result.append(ends.io.read(buf, OFFSET, over)))
    reader.start()
    wait_in_poll(reader)
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:  # runs only while the reader waits without the GIL
        ticks += 1
    assert reader.is_alive() and ticks > 1000
    ends.peer.send(b"late")
    reader.join(5)
    assert result == [4] and bytes(buf[OFFSET : OFFSET + 4]) == b"late"


def test_write_waits_while_the_peer_is_full(ends: Ends) -> None:
    sent = _fill(ends)
    result: list[int] = []
    writer = threading.Thread(target=lambda: result.append(ends.io.write(b"w" * 520, 20)))
    writer.start()
    wait_in_poll(writer)
    writer.join(0.1)  # and it stays blocked
    assert writer.is_alive(), "write returned while the peer was full"
    got = [ends.peer.recv(1000) for _ in range(sent)]  # make room
    writer.join(5)
    assert result == [500] and got == [b"f" * 500] * sent
    assert ends.peer.recv(1000) == b"w" * 500


def _waiting_read(ends: Ends) -> tuple[threading.Thread, list[int]]:
    """A thread whose read waits (nothing was sent), and the list its result goes to."""
    buf, over = bytearray(OFFSET + 100), bytearray(200)
    result: list[int] = []
    reader = threading.Thread(target=lambda: result.append(ends.io.read(buf, OFFSET, over)))
    reader.start()
    wait_in_poll(reader)
    reader.join(0.05)  # and it stays blocked
    assert reader.is_alive(), "read returned with nothing to read"
    return reader, result


def _fill(ends: Ends) -> int:
    """Fill our end's socket buffer until a send would block; return how many were sent."""
    ends.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = 0
    while True:
        try:
            ends.ours.send(b"f" * 500)
            sent += 1
        except BlockingIOError:
            return sent


def test_the_eventfd_ends_a_waiting_read(ends: Ends) -> None:
    reader, result = _waiting_read(ends)
    started = time.monotonic()
    os.eventfd_write(ends.wake, 1)
    reader.join(5)
    assert result == [-errno.EBADF] and time.monotonic() - started < 0.1
    assert ends.io.counts() == counts()


def test_after_drain_no_call_reaches_the_number(ends: Ends) -> None:
    os.eventfd_write(ends.wake, 1)
    ends.io.drain()
    ends.io.drain()  # idempotent
    fd = ends.ours.fileno()
    ends.ours.close()
    # Whatever takes the number now must see nothing from the drained object.
    with occupy(fd) as nobody_used_it:
        buf, over = bytearray(OFFSET + 100), bytearray(200)
        assert ends.io.write(b"x" * 40, OFFSET) == -errno.EBADF
        assert ends.io.read(buf, OFFSET, over) == -errno.EBADF
        assert ends.io.read_gso([buf], [0], AT, over) == (0, -errno.EBADF)
        assert ends.io.write_gso([bytes(AT) + vnet() + Flow().packet(b"x")], AT, 0) == (
            0,
            -errno.EBADF,
        )
        nobody_used_it()


def test_drain_waits_for_a_call_in_progress(ends: Ends) -> None:
    reader, result = _waiting_read(ends)
    os.eventfd_write(ends.wake, 1)
    ends.io.drain()
    assert result == [-errno.EBADF]  # drain returned only after the read did
    reader.join(5)


def test_kernel_errors_come_back_as_negative_errno() -> None:
    r, w = os.pipe()
    wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        io = PacketIo(r, wake)
        assert io.write(b"x" * 20, OFFSET) == -errno.EBADF  # the pipe's read end
        io = PacketIo(w, wake)
        assert io.read(bytearray(100), OFFSET, bytearray(10)) == -errno.EBADF
        assert io.counts() == counts()
    finally:
        for fd in (r, w, wake):
            os.close(fd)


def test_bad_arguments_raise(ends: Ends) -> None:
    over = bytearray(10)
    with pytest.raises(ValueError, match="no room after offset"):
        ends.io.read(bytearray(OFFSET), OFFSET, over)
    with pytest.raises(ValueError, match="no room after offset"):
        ends.io.read(bytearray(OFFSET + 10), -1, over)
    with pytest.raises(BufferError):
        ends.io.read(b"read-only buffer", 0, over)
    with pytest.raises(TypeError):
        ends.io.read(bytearray(100), 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ends.io.read(bytearray(100), "16", over)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative offset"):
        ends.io.write(b"abc", -1)
    with pytest.raises(TypeError):
        ends.io.write(object(), 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative descriptor"):
        PacketIo(-1, 3)
    # Initialised once: a second __init__ could reset the count of calls in progress.
    with pytest.raises(TypeError, match="already initialised"):
        ends.io.__init__(ends.ours.fileno(), ends.wake)  # type: ignore[misc]
    # Never initialised: no descriptor to touch, every call refused.
    bare = PacketIo.__new__(PacketIo)
    assert bare.write(b"x" * 40, OFFSET) == -errno.EBADF
    assert bare.read_gso([bytearray(100)], [0], AT, bytearray(10)) == (0, -errno.EBADF)
    with pytest.raises(TypeError, match="sequence of buffers"):
        ends.io.write_gso(42, AT, 0)  # type: ignore[arg-type]
    # An offset past the end writes an empty record, as buf[offset:] is empty.
    assert ends.io.write(b"abc", 10) == 0
    assert ends.peer.recv(10) == b""


def test_a_signal_handler_may_close_while_the_read_waits(ends: Ends) -> None:
    """The handler runs outside the call's count: its drain() does not wait for itself."""
    assert threading.current_thread() is threading.main_thread()
    buf, over = bytearray(OFFSET + 100), bytearray(200)

    def close_from_handler(signum: int, frame: object) -> None:
        os.eventfd_write(ends.wake, 1)
        ends.io.drain()

    with signal_when_polling(close_from_handler):
        assert ends.io.read(buf, OFFSET, over) == -errno.EBADF


def test_an_exception_from_a_signal_handler_ends_the_read(ends: Ends) -> None:
    buf, over = bytearray(OFFSET + 100), bytearray(200)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with signal_when_polling(interrupt), pytest.raises(KeyboardInterrupt):
        ends.io.read(buf, OFFSET, over)
    # The call counted itself out: the read works again, and drain returns.
    ends.peer.send(b"after")
    assert ends.io.read(buf, OFFSET, over) == 5
    drained = threading.Thread(target=ends.io.drain)
    drained.start()
    drained.join(2)
    assert not drained.is_alive(), "a call was left counted in"


# --- whole kernel packets: read_gso / write_gso ----------------------------------


def test_read_gso_takes_what_is_waiting_and_drops_what_is_bad(ends: Ends) -> None:
    tcp = Flow().super_packet(payload_bytes(3000), 1000)  # 3050 bytes
    udp = Flow.v6(UDP).super_packet(payload_bytes(2500), 1000)  # 2558 bytes
    single = vnet() + Flow().packet(b"single")
    for data in (tcp, b"garbage that is no packet", single, bytes(10) + bytes(3000), udp):
        ends.peer.send(data)
    # Room for 2006 bytes from AT: the three long ones are too big, garbage is malformed.
    bufs = [bytearray(OFFSET + 2000) for _ in range(4)]
    sizes = [-1] * 4
    assert ends.io.read_gso(bufs, sizes, AT, bytearray(70000)) == (1, 0)
    assert sizes == [len(single) - 10, -1, -1, -1]
    assert bytes(bufs[0][AT : AT + len(single)]) == single
    assert ends.io.counts() == counts(
        packets_read=1, bytes_read=len(single) - 10, dropped_too_big=3, dropped_malformed=1
    )


def test_read_gso_stores_super_packets_whole_and_counts_their_segments(ends: Ends) -> None:
    tcp = Flow().super_packet(payload_bytes(3000), 1000)
    udp = Flow.v6(UDP).super_packet(payload_bytes(2500), 1000)
    for data in (tcp, udp):
        ends.peer.send(data)
    bufs = [bytearray(OFFSET + 65535) for _ in range(3)]
    sizes = [0] * 3
    assert ends.io.read_gso(bufs, sizes, AT, bytearray(10)) == (2, 0)
    assert [bytes(bufs[i][AT : AT + 10 + sizes[i]]) for i in range(2)] == [tcp, udp]
    hdr_tcp, hdr_udp = 40, 48
    assert ends.io.counts() == counts(
        packets_read=6,
        bytes_read=3000 + 3 * hdr_tcp + 2500 + 3 * hdr_udp,
        gso_read=2,
    )


def test_read_gso_refuses_too_few_sizes_before_reading(ends: Ends) -> None:
    ends.peer.send(vnet() + Flow().packet(b"kept"))
    bufs = [bytearray(OFFSET + 100) for _ in range(2)]
    with pytest.raises(ValueError, match="1 sizes for 2 buffers"):
        ends.io.read_gso(bufs, [0], AT, bytearray(10))
    assert ends.io.read_gso(bufs, [0, 0], AT, bytearray(10)) == (1, 0)  # still there


def test_read_gso_after_drain_and_on_a_bad_descriptor(ends: Ends) -> None:
    bufs, sizes = [bytearray(100)], [0]
    r, w = os.pipe()
    try:
        io = PacketIo(w, ends.wake)  # the write end of a pipe: reading it fails
        assert io.read_gso(bufs, sizes, AT, bytearray(10)) == (0, -errno.EBADF)
    finally:
        os.close(r)
        os.close(w)
    os.eventfd_write(ends.wake, 1)
    ends.io.drain()
    assert ends.io.read_gso(bufs, sizes, AT, bytearray(10)) == (0, -errno.EBADF)
    assert ends.io.write_gso([bytes(100)], AT, 0) == (0, -errno.EBADF)


def test_write_gso_writes_whole_and_hands_back_a_refused_kind(ends: Ends) -> None:
    tcp = Flow().super_packet(payload_bytes(3000), 1000)
    udp = Flow(proto=UDP).super_packet(payload_bytes(1500), 1000)
    single = vnet() + Flow().packet(b"single")
    bufs = [bytes(AT) + p for p in (single, tcp, udp)]
    assert ends.io.write_gso(bufs, AT, 0) == (3, 0)
    assert [ends.peer.recv(70000) for _ in range(3)] == [single, tcp, udp]
    assert ends.io.counts() == counts(
        packets_written=1 + 3 + 2,
        bytes_written=len(single) - 10 + 3000 + 3 * 40 + 1500 + 2 * 28,
        gso_written=2,
    )
    # TCP refused before (bit 1): the TCP super-packet is the caller's to split.
    assert ends.io.write_gso(bufs, AT, 1) == (1, 1)
    assert ends.peer.recv(70000) == single
    # UDP refused (bit 2): TCP goes, UDP comes back.
    assert ends.io.write_gso(bufs[1:], AT, 2) == (1, 1)
    assert ends.peer.recv(70000) == tcp


def test_write_gso_waits_while_the_peer_is_full(ends: Ends) -> None:
    sent = _fill(ends)
    pkt = bytes(AT) + vnet() + Flow().packet(b"late")
    result: list[tuple[int, int]] = []
    writer = threading.Thread(target=lambda: result.append(ends.io.write_gso([pkt], AT, 0)))
    writer.start()
    wait_in_poll(writer)
    writer.join(0.1)  # and it stays blocked
    assert writer.is_alive(), "write_gso returned while the peer was full"
    for _ in range(sent):
        ends.peer.recv(1000)
    writer.join(5)
    assert result == [(1, 0)]
    assert ends.peer.recv(1000) == pkt[AT:]


@st.composite
def _datagrams(draw: st.DrawFn) -> list[bytes]:
    """What reads of a device with the virtio header might return: valid, damaged, noise."""
    out = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["super", "single", "damaged", "noise"]))
        if kind == "noise":
            out.append(draw(st.binary(max_size=120)))
            continue
        flow = draw(st.sampled_from([Flow(), Flow.v6(), Flow(proto=UDP), Flow.v6(UDP)]))
        if kind == "single":
            data = bytearray(vnet() + flow.packet(payload_bytes(draw(st.integers(0, 1400)))))
        else:
            payload = payload_bytes(draw(st.integers(1, 6000)))
            data = bytearray(flow.super_packet(payload, draw(st.integers(1, 1500))))
        if kind == "damaged":
            for _ in range(draw(st.integers(1, 3))):
                data[draw(st.integers(0, min(len(data) - 1, 80)))] = draw(st.integers(0, 255))
            del data[draw(st.integers(0, len(data))) :]
        out.append(bytes(data))
    return out


@settings(max_examples=300, deadline=None)
@given(
    datagrams=_datagrams(), room=st.sampled_from([60, 1500, 4000, 9000]), batch=st.integers(1, 5)
)
def test_read_gso_keeps_exactly_what_the_python_check_accepts(
    datagrams: list[bytes], room: int, batch: int
) -> None:
    """Any kernel reads through PacketIo.read_gso: stored, dropped and counted as vnet.py says."""
    ends = Ends()
    try:
        sentinel = vnet() + Flow().packet(b"end")  # stored last: the final call returns
        for data in [*datagrams, sentinel]:
            ends.peer.send(data)
        bufs = [bytearray(AT + room) for _ in range(batch)]
        sizes = [0] * batch
        got: list[bytes] = []
        while not got or got[-1] != sentinel:
            stored, err = ends.io.read_gso(bufs, sizes, AT, bytearray(70000))
            assert err == 0 and 1 <= stored <= batch
            got += [bytes(bufs[i][AT : AT + 10 + sizes[i]]) for i in range(stored)]
        kept = [
            d for d in [*datagrams, sentinel] if len(d) <= room and gso_segments(memoryview(d))[0]
        ]
        assert got == kept
        verdicts = [gso_segments(memoryview(d)) for d in kept]
        assert ends.io.counts() == counts(
            packets_read=sum(seg for seg, _ in verdicts),
            bytes_read=sum(
                len(d) - 10 + (seg - 1) * hdr for d, (seg, hdr) in zip(kept, verdicts, strict=True)
            ),
            dropped_too_big=sum(len(d) > room for d in datagrams),
            dropped_malformed=sum(
                len(d) <= room and not gso_segments(memoryview(d))[0] for d in datagrams
            ),
            gso_read=sum(hdr > 0 for _, hdr in verdicts),
        )
    finally:
        ends.close()


# --- one rule each: drops counted as they happen, EINTR, drain's wait ------------------


def _until(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.parametrize("call", ["read", "read_gso"])
def test_a_drop_is_counted_while_the_read_still_waits(ends: Ends, call: str) -> None:
    """stats() must be current: a dropped packet counts at once, not after the next one."""
    buf, over = bytearray(OFFSET + 100), bytearray(70000)
    result: list[object] = []

    def read() -> None:
        if call == "read":
            result.append(ends.io.read(buf, OFFSET, over))
        else:
            result.append(ends.io.read_gso([buf], [0], AT, over))

    reader = threading.Thread(target=read, name="test-reader")
    reader.start()
    try:
        ends.peer.send(b"L" * 3000)  # too big for the room: dropped, and the read goes on
        if call == "read_gso":
            ends.peer.send(b"not a packet")  # malformed: dropped too
        want = counts(dropped_too_big=1, dropped_malformed=int(call == "read_gso"))
        assert _until(lambda: ends.io.counts() == want), ends.io.counts()
        assert reader.is_alive(), "the read returned with nothing to return"
    finally:
        ends.peer.send(vnet() + Flow().packet(b"end"))
        reader.join(5)
    assert not reader.is_alive() and result


def _voluntary_switches(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/self/task/*/status")


def test_drain_sleeps_until_the_last_call_leaves(ends: Ends) -> None:
    """drain() waits asleep for a call in progress (a futex the last call out wakes),
    rather than waking up every few microseconds to look."""
    reader, result = _waiting_read(ends)  # no eventfd: the read goes on waiting
    tid: list[int] = []
    drained = threading.Thread(
        target=lambda: (tid.append(threading.get_native_id()), ends.io.drain()),
        name="test-drain",
    )
    drained.start()
    try:
        assert _until(lambda: bool(tid))
        time.sleep(0.05)
        before = _voluntary_switches(tid[0])
        time.sleep(0.3)
        assert drained.is_alive(), "drain returned while a call was in progress"
        assert _voluntary_switches(tid[0]) - before <= 3
    finally:
        ends.peer.send(b"done")  # the read returns; the last call out wakes drain
        reader.join(5)
        drained.join(5)
    assert result == [4] and not drained.is_alive()


def test_eintr_after_progress_is_no_error(ends: Ends) -> None:
    """write_gso as read_gso: a signal that interrupts its wait after progress returns the
    progress with err 0 (the handler runs when Python goes on); before any, it goes on."""
    assert threading.current_thread() is threading.main_thread()
    sent = _fill(ends)
    assert ends.peer.recv(1000) == b"f" * 500  # room for one more record
    pkt = bytes(AT) + vnet() + Flow().packet(b"p" * 400)
    handled: list[int] = []
    with signal_when_polling(lambda *_: handled.append(1)):
        n, err = ends.io.write_gso([pkt, pkt], AT, 0)  # the second waits for room
    assert (n, err) == (1, 0)
    assert handled == [1]
    got = [ends.peer.recv(1000) for _ in range(sent)]
    assert got[-1] == pkt[AT:]

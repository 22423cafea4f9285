"""pipe(): the conformance suite, the seed's offset matrix, names and closing."""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Iterator, Sequence

import pytest
from blocking import wait_channel, wait_inside
from conformance import Harness, TunConformance, in_thread, read_packets, write_packets

import tunkit
from tunkit import Channel, Event, ReadOnClosedPipeError, WriteOnClosedPipeError
from tunkit._pipe import PipeTun


def ipv4_packet(i: int, size: int) -> bytes:
    """A plain IPv4/UDP-shaped packet of *size* bytes whose payload encodes *i*."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, i & 0xFFFF, 0, 64, 17, 0,
                         bytes((192, 0, 2, 1)), bytes((192, 0, 2, 2)))
    body = struct.pack("!I", i) * (size // 4 + 1)
    return (header + body)[:size]


class PipeHarness:
    """Conformance harness for one end of a pipe; the other end plays the world."""

    def __init__(self, batch_size: int, mwo: int, mro: int) -> None:
        self.tun, self.peer = tunkit.pipe(batch_size, 1500, mwo, mro)
        self.end: PipeTun = self.tun  # the pipe end itself, should tun wrap it
        self._threads: list[threading.Thread] = []

    def inject(self, packets: Sequence[bytes]) -> None:
        thread, _ = in_thread(lambda: write_packets(self.peer, packets))
        self._threads.append(thread)

    def collect(self, count: int, timeout: float) -> list[bytes]:
        return read_packets(self.peer, count, timeout=timeout)

    def wait_blocked(self, thread: threading.Thread) -> None:
        wait_channel(self.end._rx, writers=0, readers=1)
        wait_inside(thread, PipeTun.read, Channel.read)

    def packet(self, i: int, size: int) -> bytes:
        return ipv4_packet(i, size)

    def close(self) -> None:
        self.tun.close()
        self.peer.close()
        for thread in self._threads:
            thread.join(5)


class TestPipeConformance(TunConformance):
    @pytest.fixture(params=[(1, 0, 0), (4, 0, 0), (8, 16, 16), (128, 3, 7)],
                    ids=["batch1", "batch4", "batch8-off16", "batch128-off3-7"])
    def harness(self, request: pytest.FixtureRequest) -> Iterator[Harness]:
        h = PipeHarness(*request.param)
        yield h
        h.close()


def test_names_events_and_fileno() -> None:
    a, b = tunkit.pipe(3, mtu=1400, mwo=2, mro=5)
    with a, b:
        assert (a.name(), b.name()) == ("pipe-tun-0", "pipe-tun-1")
        assert (a.batch_size(), a.mtu(), a.mwo(), a.mro()) == (3, 1400, 2, 5)
        assert a.events().get(timeout=1) is Event.UP
        assert b.events().get(timeout=1) is Event.UP
        with pytest.raises(io.UnsupportedOperation):
            a.fileno()


@pytest.mark.parametrize("batch", [0, -1])
def test_batch_size_below_one_is_rejected(batch: int) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        tunkit.pipe(batch)


@pytest.mark.parametrize("mwo", [0, 1, 5, 13, 29])
@pytest.mark.parametrize("mro", [0, 2, 9, 16, 30])
def test_offset_matrix_both_ways(mwo: int, mro: int) -> None:
    """The seed's pipe test: packets cross both ways for every read/write offset pair."""
    a, b = tunkit.pipe(4, 1500, mwo, mro)
    with a, b:
        for src, dst in ((a, b), (b, a)):
            packets = [ipv4_packet(i, 40 + 97 * i) for i in range(10)]
            thread, errors = in_thread(lambda s=src, p=packets: write_packets(s, p))
            assert read_packets(dst, len(packets)) == packets
            thread.join(5)
            assert not errors


def test_closing_either_end_closes_both_directions() -> None:
    a, b = tunkit.pipe()
    a.close()
    buf = [bytearray(100)]
    with pytest.raises(ReadOnClosedPipeError, match="tun: read on closed Tun"):
        b.read(buf, [0])
    with pytest.raises(WriteOnClosedPipeError, match="tun: write on closed Tun"):
        b.write([b"x"])
    assert b.events().get(timeout=1) is Event.UP
    assert b.events().get(timeout=1) is None


def test_close_unblocks_a_blocked_writer_on_the_other_end() -> None:
    a, b = tunkit.pipe()
    thread, errors = in_thread(lambda: b.write([b"never read"]))
    with a:
        wait_channel(b._tx, writers=1, readers=0)
        wait_inside(thread, PipeTun.write, Channel.write)
        thread.join(0.2)  # and it stays blocked
        assert thread.is_alive()
        a.close()
    thread.join(2)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], WriteOnClosedPipeError)


def test_mtu_is_not_enforced() -> None:
    a, b = tunkit.pipe(mtu=100)
    with a, b:
        big = ipv4_packet(1, 1000)
        thread, _ = in_thread(lambda: write_packets(a, [big]))
        assert read_packets(b, 1, room=2000) == [big]
        thread.join(2)

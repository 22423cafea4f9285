"""copy, Forwarder and Point2Point pass super-packets whole between GsoTuns, split otherwise."""

from __future__ import annotations

import time
from collections.abc import MutableSequence, Sequence
from typing import Any

import pytest
from conformance import in_thread, read_packets, write_packets
from packets import Flow, payload_bytes

import tunkit
from tunkit import CallbackTun, DebugPool, Forwarder

HDR = 10  # virtio-net header length


class FakeGsoTun(CallbackTun):
    """A pipe end that is also a GsoTun: its peer sees ``header + super-packet`` as one packet.

    Plain ``read``/``write`` pass packets as they are. Counts which calls were used.
    """

    def __init__(self, tun: Any, mtu: int = 1500) -> None:
        super().__init__(tun)
        self._mtu = mtu
        self.calls: dict[str, int] = {"read": 0, "write": 0, "read_gso": 0, "write_gso": 0}

    def mtu(self) -> int:
        return self._mtu

    def read(self, bufs: Sequence[Any], sizes: MutableSequence[int], offset: int = 0) -> int:
        self.calls["read"] += 1
        return super().read(bufs, sizes, offset)

    def write(self, bufs: Sequence[Any], offset: int = 0) -> int:
        self.calls["write"] += 1
        return super().write(bufs, offset)

    def read_gso(self, bufs: Sequence[Any], sizes: MutableSequence[int], offset: int = 16) -> int:
        self.calls["read_gso"] += 1
        n = self.tun.read(bufs, sizes, offset - HDR)
        for i in range(n):
            sizes[i] -= HDR
        return n

    def write_gso(self, bufs: Sequence[Any], offset: int = 16) -> int:
        self.calls["write_gso"] += 1
        return self.tun.write(bufs, offset - HDR)


def _super_packets(count: int) -> list[tuple[bytes, list[bytes]]]:
    """(header + super-packet, the segments it splits into) for *count* TCP super-packets."""
    flow = Flow()
    out = []
    for i in range(count):
        payload = payload_bytes(1448 * 10 + 100 * i, seed=i)
        seq = 1000 + i * 100000
        out.append((flow.super_packet(payload, 1448, seq=seq),
                    flow.segments(payload, 1448, seq=seq)))
    return out


def test_copy_moves_super_packets_whole_between_gso_tuns() -> None:
    src_user, src_raw = tunkit.pipe(4)
    dst_raw, dst_user = tunkit.pipe(4)
    src, dst = FakeGsoTun(src_raw), FakeGsoTun(dst_raw)
    assert isinstance(src, tunkit.GsoTun)
    copier, errors = in_thread(lambda: tunkit.copy(src, dst))
    supers = [s for s, _ in _super_packets(5)]
    writer, _ = in_thread(lambda: write_packets(src_user, supers))
    assert read_packets(dst_user, 5, room=70000) == supers
    writer.join(5)
    src_user.close()
    copier.join(5)
    assert not errors
    assert src.calls["read_gso"] >= 1 and dst.calls["write_gso"] >= 1
    assert src.calls["read"] == 0 and dst.calls["write"] == 0


@pytest.mark.parametrize(
    ("passthrough", "dst_mtu"),
    [(False, 1500), (True, 1400)],
    ids=["passthrough-off", "mtu-smaller"],
)
def test_copy_uses_plain_read_write_when_it_must(passthrough: bool, dst_mtu: int) -> None:
    src_user, src_raw = tunkit.pipe(4)
    dst_raw, dst_user = tunkit.pipe(4)
    src, dst = FakeGsoTun(src_raw), FakeGsoTun(dst_raw, mtu=dst_mtu)
    copier, _ = in_thread(lambda: tunkit.copy(src, dst, passthrough=passthrough))
    writer, _ = in_thread(lambda: write_packets(src_user, [b"\x45plain"]))
    assert read_packets(dst_user, 1) == [b"\x45plain"]
    writer.join(5)
    src_user.close()
    copier.join(5)
    assert src.calls["read_gso"] == 0 and dst.calls["write_gso"] == 0


def test_forwarder_splits_super_packets_for_a_plain_write_tun() -> None:
    """A batch read whole goes to a Tun that can't take super-packets: split, nothing lost."""
    pool = DebugPool()
    src_user, src_raw = tunkit.pipe(4)
    src = FakeGsoTun(src_raw)
    gso_dst_raw, gso_dst_user = tunkit.pipe(4)
    plain_dst, plain_user = tunkit.pipe(8, mwo=4)
    cases = _super_packets(3)
    with Forwarder(pool) as fwd:
        fwd.set_write_tun(FakeGsoTun(gso_dst_raw))
        fwd.set_read_tun(src)
        # Whole, while the write Tun is a GsoTun:
        writer, _ = in_thread(lambda: write_packets(src_user, [cases[0][0]]))
        assert read_packets(gso_dst_user, 1, room=70000) == [cases[0][0]]
        writer.join(5)
        # The reader is back in read_gso (in passthrough mode) when the write
        # Tun becomes a plain one: what it reads next must arrive as segments.
        deadline = time.monotonic() + 5
        while src.calls["read_gso"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        fwd.set_write_tun(plain_dst)
        expected = [seg for _, segs in cases[1:] for seg in segs]
        writer, _ = in_thread(lambda: write_packets(src_user, [s for s, _ in cases[1:]]))
        got = read_packets(plain_user, len(expected), room=1500)
        writer.join(5)
    assert got == expected
    assert pool.outstanding == 0
    for t in (src_user, gso_dst_user, plain_user):
        t.close()


def test_point_to_point_passes_super_packets_both_ways() -> None:
    a_user, a_raw = tunkit.pipe(4)
    b_raw, b_user = tunkit.pipe(4)
    a, b = FakeGsoTun(a_raw), FakeGsoTun(b_raw)
    supers = [s for s, _ in _super_packets(4)]
    with tunkit.Point2Point(tunkit.Pool()) as p2p:
        p2p.set_a(a)
        p2p.set_b(b)
        # One write each: a read begun before both sides were set is plain; the
        # ones after it are in passthrough mode.
        w1, _ = in_thread(lambda: [write_packets(a_user, [p]) for p in supers[:2]])
        w2, _ = in_thread(lambda: [write_packets(b_user, [p]) for p in supers[2:]])
        assert read_packets(b_user, 2, room=70000) == supers[:2]
        assert read_packets(a_user, 2, room=70000) == supers[2:]
        w1.join(5)
        w2.join(5)
    assert b.calls["write_gso"] >= 1 and a.calls["write_gso"] >= 1

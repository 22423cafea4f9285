"""TunIO (the io adapter) and CallbackTun."""

from __future__ import annotations

import io
from collections.abc import MutableSequence, Sequence
from typing import Any

import pytest
from conformance import in_thread, read_packets
from test_copy_forward import ScriptedTun

import tunkit
from tunkit import CallbackTun, DebugPool, TooManySegmentsError, TunIO


def test_tunio_is_raw_io_and_keeps_the_rest_of_a_batch_in_order() -> None:
    tun, peer = tunkit.pipe(batch_size=8)
    counted = ScriptedTun(tun)
    reads: list[int] = []
    counted.on_read = lambda n, err: reads.append(n)
    f = TunIO(counted)
    assert isinstance(f, io.RawIOBase) and f.readable() and f.writable()
    packets = [bytes([i]) * (10 * i + 5) for i in range(5)]
    writer, _ = in_thread(lambda: peer.write(packets))
    buf = bytearray(2000)
    got = []
    for _ in range(5):
        n = f.readinto(buf)
        got.append(bytes(buf[:n]))
    writer.join(5)
    assert got == packets
    assert reads == [5], "the batch was read once from the Tun"
    f.close()


def test_tunio_truncates_only_to_the_buffer_of_each_call() -> None:
    tun, peer = tunkit.pipe(batch_size=4)
    f = TunIO(tun)
    writer, _ = in_thread(lambda: peer.write([b"A" * 50, b"B" * 50]))
    small = bytearray(10)
    assert f.readinto(small) == 10 and small == b"A" * 10
    assert f.read(100) == b"B" * 50  # kept whole for the next call
    writer.join(5)
    assert f.readinto(bytearray()) == 0
    f.close()


def test_tunio_write_leaves_headroom_and_sends_one_packet() -> None:
    tun, peer = tunkit.pipe(mwo=16, mro=0)
    pool = DebugPool()
    with TunIO(tun, pool) as f:
        assert f.mwo() == 16 and f.name() == "pipe-tun-0" and f.batch_size() == 1
        got: list[bytes] = []
        reader, _ = in_thread(lambda: got.extend(read_packets(peer, 1)))
        assert f.write(b"payload") == 7
        reader.join(5)
        assert got == [b"payload"]
        assert f.write(b"") == 0
    assert pool.outstanding == 0
    assert f.closed
    with pytest.raises(tunkit.ClosedError):
        peer.write([bytes(16) + b"x"], 16)
    with pytest.raises(ValueError):
        f.write(b"x")


def test_tunio_retries_retryable_reads_and_empty_reads() -> None:
    class EmptyFirst(ScriptedTun):
        calls = 0

        def read(self, bufs: Sequence[Any], sizes: MutableSequence[int], offset: int = 0) -> int:
            self.calls += 1
            if self.calls == 1:
                return 0
            return super().read(bufs, sizes, offset)

    tun, peer = tunkit.pipe()
    flaky = EmptyFirst(tun)
    flaky.read_errors = [TooManySegmentsError("need more buffers")]
    f = TunIO(flaky)
    writer, _ = in_thread(lambda: peer.write([b"hello"]))
    assert f.read(100) == b"hello"
    writer.join(5)
    f.close()


def test_tunio_errors_propagate() -> None:
    tun, peer = tunkit.pipe()
    f = TunIO(tun)
    peer.close()
    with pytest.raises(tunkit.ReadOnClosedPipeError):
        f.read(10)
    with pytest.raises(tunkit.WriteOnClosedPipeError):
        f.write(b"x")
    f.close()
    with pytest.raises(io.UnsupportedOperation):
        f.fileno()


def test_callback_tun_reports_counts_and_errors_then_reraises() -> None:
    tun, peer = tunkit.pipe(batch_size=4)
    seen: list[tuple[str, int, type | None]] = []
    cb = CallbackTun(
        tun,
        on_read=lambda n, e: seen.append(("r", n, type(e) if e else None)),
        on_write=lambda n, e: seen.append(("w", n, type(e) if e else None)),
    )
    assert isinstance(cb, tunkit.Tun) and not isinstance(cb, tunkit.GsoTun)
    reader, _ = in_thread(lambda: read_packets(peer, 2))
    assert cb.write([b"1", b"2"]) == 2
    reader.join(5)
    writer, _ = in_thread(lambda: peer.write([b"3"]))
    assert read_packets(cb, 1) == [b"3"]
    writer.join(5)
    peer.close()
    with pytest.raises(tunkit.ReadOnClosedPipeError):
        cb.read([bytearray(10)] * 4, [0] * 4)
    assert seen == [("w", 2, None), ("r", 1, None), ("r", 0, tunkit.ReadOnClosedPipeError)]
    assert (cb.name(), cb.mtu(), cb.batch_size()) == ("pipe-tun-0", 1500, 4)

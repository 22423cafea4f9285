"""Channel: batches, reader/writer batch sizes and offsets, arrival order, closing."""

from __future__ import annotations

import threading

import pytest
from blocking import wait_channel, wait_inside
from conformance import in_thread

from tunkit import Channel, ClosedError, ReadOnClosedChannelError, WriteOnClosedChannelError


def _read(ch: Channel, n_bufs: int, room: int, offset: int = 0) -> list[bytes]:
    bufs = [bytearray(offset + room) for _ in range(n_bufs)]
    sizes = [0] * n_bufs
    n = ch.read(bufs, sizes, offset)
    return [bytes(bufs[i][offset : offset + sizes[i]]) for i in range(n)]


@pytest.mark.parametrize(
    ("writer_batch", "reader_batch"),
    [(1, 1), (1, 4), (4, 1), (4, 4), (5, 2), (2, 5), (128, 7)],
    ids=lambda v: str(v),
)
def test_reader_takes_min_of_its_buffers_and_what_remains(
    writer_batch: int, reader_batch: int
) -> None:
    ch = Channel()
    packets = [bytes([i]) * (10 + i) for i in range(writer_batch)]
    result: list[int] = []
    thread, errors = in_thread(lambda: result.append(ch.write(packets)))
    got: list[bytes] = []
    calls = 0
    while len(got) < writer_batch:
        chunk = _read(ch, reader_batch, 200)
        assert len(chunk) == min(reader_batch, writer_batch - len(got))
        got.extend(chunk)
        calls += 1
    thread.join(2)
    assert not errors and result == [writer_batch]
    assert got == packets
    assert calls == -(-writer_batch // reader_batch)


@pytest.mark.parametrize(("w_off", "r_off"), [(0, 0), (3, 0), (0, 5), (7, 2), (16, 16)])
def test_each_side_has_its_own_offset(w_off: int, r_off: int) -> None:
    ch = Channel()
    payload = b"0123456789abcdef"
    thread, _ = in_thread(lambda: ch.write([b"\xee" * w_off + payload], w_off))
    assert _read(ch, 1, 100, r_off) == [payload]
    thread.join(2)


def test_short_reader_truncates() -> None:
    ch = Channel()
    thread, _ = in_thread(lambda: ch.write([b"A" * 100, b"B" * 5]))
    assert _read(ch, 2, 10) == [b"A" * 10, b"B" * 5]
    thread.join(2)


def test_sizes_shorter_than_bufs_limits_the_count() -> None:
    ch = Channel()
    thread, _ = in_thread(lambda: ch.write([b"a", b"b", b"c"]))
    bufs = [bytearray(10) for _ in range(3)]
    sizes = [0]
    assert ch.read(bufs, sizes) == 1
    assert _read(ch, 3, 10) == [b"b", b"c"]
    thread.join(2)


def test_write_blocks_until_every_packet_was_taken() -> None:
    ch = Channel()
    done = threading.Event()
    thread, _ = in_thread(lambda: (ch.write([b"1", b"2"]), done.set()))
    assert _read(ch, 1, 10) == [b"1"]
    assert not done.wait(0.1)
    assert _read(ch, 1, 10) == [b"2"]
    assert done.wait(2)
    thread.join(2)


def test_concurrent_writers_are_served_whole_batch_by_whole_batch_in_order() -> None:
    ch = Channel()
    threads = []
    with ch:  # closed on the way out, should a wait fail: no writer is left blocked
        for w in range(5):
            thread, _ = in_thread(lambda w=w: ch.write([bytes([w, k]) for k in range(4)]))
            threads.append(thread)
            # Arrival order: writer w is queued and asleep before writer w + 1 starts.
            wait_channel(ch, writers=w + 1, readers=0)
            wait_inside(thread, Channel.write)
        got = []
        for _ in range(20):
            got.extend(_read(ch, 1, 10))
    for thread in threads:
        thread.join(2)
    assert got == [bytes([w, k]) for w in range(5) for k in range(4)]


def test_close_unblocks_reader_and_writer_and_later_calls_raise() -> None:
    ch = Channel()
    reader, r_err = in_thread(lambda: _read(ch, 1, 10))
    with ch:
        wait_channel(ch, writers=0, readers=1)
        wait_inside(reader, Channel.read)
        ch.close()
    reader.join(2)
    assert len(r_err) == 1 and isinstance(r_err[0], ReadOnClosedChannelError)
    assert "tun: read on closed Tun channel" in str(r_err[0])
    with pytest.raises(WriteOnClosedChannelError, match="tun: write on closed Tun channel"):
        ch.write([b"x"])
    ch.close()  # idempotent

    ch2 = Channel()
    writer, w_err = in_thread(lambda: ch2.write([b"x"]))
    with ch2:
        wait_channel(ch2, writers=1, readers=0)
        wait_inside(writer, Channel.write)
        ch2.close()
    writer.join(2)
    assert len(w_err) == 1 and isinstance(w_err[0], WriteOnClosedChannelError)
    assert isinstance(w_err[0], ClosedError) and isinstance(w_err[0], OSError)


def test_partial_progress_is_returned_then_the_error_comes_next() -> None:
    ch = Channel()
    result: list[int] = []
    writer, errors = in_thread(lambda: result.append(ch.write([b"1", b"2", b"3"])))
    assert _read(ch, 1, 10) == [b"1"]
    ch.close()
    writer.join(2)
    assert result == [1] and not errors
    with pytest.raises(WriteOnClosedChannelError):
        ch.write([b"2", b"3"])

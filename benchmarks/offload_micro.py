"""Micro-benchmark of the offload engine: checksum, split and coalesce of 64 KB.

Run: ``PYTHONPATH=src python benchmarks/offload_micro.py``. Prints microseconds
per operation and the ratio to baselines measured in the same run: a plain
``bytes()`` copy of the same 64 KB (what one copy of the data costs here) and,
for the checksum, the textbook word-by-word loop. No timing is asserted.
"""

from __future__ import annotations

import struct
import sys
import timeit
from collections.abc import Callable

from tunkit._offload.checksum import checksum, ones_sum
from tunkit._offload.coalesce import Coalescer
from tunkit._offload.split import split

MTU = 1500
MSS = MTU - 40  # IPv4 + TCP without options
SUPER_LEN = 65535  # one IPv4 super-packet at the size limit


def _naive_ones_sum(data: bytes) -> int:
    """The textbook RFC 1071 loop, for scale."""
    total = 0
    for i in range(0, len(data) - 1, 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _tcp4_super_packet(total_len: int, mss: int) -> bytes:
    """A virtio header + IPv4/TCP GSO super-packet as the kernel hands it out."""
    payload = bytes(i & 0xFF for i in range(total_len - 40))
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total_len, 1, 0x4000, 64, 6, 0, b"\n\0\0\1", b"\n\0\0\2"
    )
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x18, 502, 0, 0)
    # VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start, csum_offset
    vnet = struct.pack("=BBHHHH", 1, 1, 40, mss, 20, 16)
    return vnet + ip + tcp + payload


def _per_op_us(fn: Callable[[], object]) -> float:
    """Best of 5 runs of autorange, in microseconds per call."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    best = min(timer.repeat(repeat=5, number=number))
    return best / number * 1e6


def main() -> int:
    data = bytes(range(256)) * 256  # 64 KB
    view = memoryview(data)
    raw = _tcp4_super_packet(SUPER_LEN, MSS)
    raw_view = memoryview(raw)
    out_bufs = [bytearray(16 + MTU) for _ in range(64)]
    sizes = [0] * 64
    n = split(raw_view, out_bufs, sizes, 16)
    segments = [bytearray(out_bufs[i][: 16 + sizes[i]]) for i in range(n)]
    coalescer = Coalescer()
    writes = coalescer.coalesce(segments, 16)
    assert len(writes) == 1 and len(writes[0].packets) == n, "the segments did not merge"

    copy_us = _per_op_us(lambda: bytes(view))
    naive_us = _per_op_us(lambda: _naive_ones_sum(data))
    rows = [
        ("baseline: bytes() copy of 64 KB", copy_us, None),
        ("baseline: textbook checksum loop, 64 KB", naive_us, None),
        ("ones_sum of 64 KB", _per_op_us(lambda: ones_sum(view)), naive_us),
        (
            f"split 64 KB TCPv4 super-packet -> {n} x {MTU}",
            _per_op_us(lambda: split(raw_view, out_bufs, sizes, 16)),
            None,
        ),
        (
            f"coalesce {n} segments -> 1 write",
            _per_op_us(lambda: coalescer.coalesce(segments, 16)),
            None,
        ),
    ]
    print(f"python {sys.version.split()[0]}; 64 KB = {len(data)} bytes; {n} segments of MTU {MTU}")
    print(f"{'operation':<52} {'us/op':>10} {'x copy':>8} {'x loop':>8}")
    for name, us, loop in rows:
        vs_loop = f"{us / loop:8.4f}" if loop else f"{'':>8}"
        print(f"{name:<52} {us:10.1f} {us / copy_us:8.1f} {vs_loop}")
    split_us, coalesce_us = rows[3][1], rows[4][1]
    print(f"per segment: split {split_us / n:.2f} us, coalesce {coalesce_us / n:.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

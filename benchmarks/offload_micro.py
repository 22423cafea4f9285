"""Micro-benchmark of the offload engine: checksum, split and coalesce of 64 KB, pure beside native.

Run: ``PYTHONPATH=src python benchmarks/offload_micro.py`` (or, installed,
``python benchmarks/offload_micro.py``). For each operation it prints the
microseconds per call of the pure-Python engine and of the C extension
``tunkit._speedups`` measured in the same run, and their ratio, beside
baselines of the same run: a plain ``bytes()`` copy of the same 64 KB (what
one copy of the data costs here) and, for the checksum, the textbook
word-by-word loop. Without the extension (not built, or
``TUNKIT_PURE_PYTHON=1``) only the pure column is filled. No timing is asserted.
"""

from __future__ import annotations

import struct
import sys
import timeit
from collections.abc import Callable

from tunkit._offload._impl import NATIVE, PURE, Engine
from tunkit._offload.checksum import checksum

MTU = 1500
MSS = MTU - 40  # IPv4 + TCP without options
SUPER_LEN = 65535  # one IPv4 super-packet at the size limit

# Goals of the native-speedups issue: how many times faster than pure.
GOALS = {"ones_sum": 20.0, "split": 10.0, "coalesce": 10.0}


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


def _measure(engine: Engine, data: bytes, raw: bytes) -> tuple[dict[str, float], int, bytes]:
    """Time the three kernels of *engine*.

    Returns µs per call by name, the segment count, and the bytes of the one
    write (so that the engines' outputs can be compared).
    """
    view = memoryview(data)
    raw_view = memoryview(raw)
    out_bufs = [bytearray(16 + MTU) for _ in range(64)]
    sizes = [0] * 64
    n = engine.split(raw_view, out_bufs, sizes, 16)
    segments = [bytearray(out_bufs[i][: 16 + sizes[i]]) for i in range(n)]
    coalescer = engine.Coalescer()
    writes = coalescer.coalesce(segments, 16)
    assert len(writes) == 1 and len(writes[0].packets) == n, "the segments did not merge"
    times = {
        "ones_sum": _per_op_us(lambda: engine.ones_sum(view)),
        "split": _per_op_us(lambda: engine.split(raw_view, out_bufs, sizes, 16)),
        "coalesce": _per_op_us(lambda: coalescer.coalesce(segments, 16)),
    }
    return times, n, b"".join(bytes(p) for p in writes[0].iov)


def main() -> int:
    data = bytes(range(256)) * 256  # 64 KB
    raw = _tcp4_super_packet(SUPER_LEN, MSS)
    engines = [PURE] if NATIVE is None else [PURE, NATIVE]
    results = {e.name: _measure(e, data, raw) for e in engines}
    n = results["pure"][1]
    if "native" in results:
        assert results["native"][1:] == results["pure"][1:], "the engines disagree"
    copy_us = _per_op_us(lambda: bytes(memoryview(data)))
    naive_us = _per_op_us(lambda: _naive_ones_sum(data))

    print(
        f"python {sys.version.split()[0]}; 64 KB = {len(data)} bytes; "
        f"{n} segments of MTU {MTU}; native: {'yes' if NATIVE else 'no (pure only)'}"
    )
    print(f"baseline: bytes() copy of 64 KB          {copy_us:10.2f} us")
    print(f"baseline: textbook checksum loop, 64 KB  {naive_us:10.2f} us")
    print()
    labels = {
        "ones_sum": "ones_sum of 64 KB",
        "split": f"split 64 KB TCPv4 super-packet -> {n} x {MTU}",
        "coalesce": f"coalesce {n} segments -> 1 write",
    }
    print(
        f"{'operation':<46} {'pure us':>9} {'native us':>10} {'native x':>9} {'goal':>6}"
        f" {'native/copy':>12}"
    )
    for key, label in labels.items():
        pure_us = results["pure"][0][key]
        if "native" in results:
            native_us = results["native"][0][key]
            speedup = pure_us / native_us
            mark = "ok" if speedup >= GOALS[key] else "MISSED"
            print(
                f"{label:<46} {pure_us:9.2f} {native_us:10.2f} {speedup:8.1f}x"
                f" {GOALS[key]:5.0f}x {native_us / copy_us:11.1f}x  {mark}"
            )
        else:
            print(f"{label:<46} {pure_us:9.2f} {'-':>10} {'-':>9} {GOALS[key]:5.0f}x {'-':>12}")
    for name, (times, _, _) in results.items():
        print(
            f"per segment ({name}): split {times['split'] / n:.3f} us,"
            f" coalesce {times['coalesce'] / n:.3f} us"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

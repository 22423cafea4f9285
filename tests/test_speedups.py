"""The C extension tunkit._speedups against the pure engine: byte for byte, errors included.

The offload test modules run every behaviour test on both engines; this one
compares the two directly on generated and malformed input (same packets,
same sizes, same bytes in every buffer, same exception class and message),
checks the dispatch (``TUNKIT_PURE_PYTHON``, ``speedups_enabled``) and that
the kernels release the GIL.
"""

from __future__ import annotations

import array
import contextlib
import copy
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from oracles import fix_checksums, slow_ones_sum
from packets import ACK, CWR, ECE, FIN, PSH, RST, SYN, TIMESTAMPS, UDP, Flow, payload_bytes, vnet

import tunkit
import tunkit._offload as offload
from tunkit._errors import TooManySegmentsError
from tunkit._offload import Write, _Malformed, _TooBig
from tunkit._offload._impl import ACTIVE, NATIVE, PURE, REASON, Engine

needs_native = pytest.mark.skipif(NATIVE is None, reason=f"no C extension: {REASON}")


def _native() -> Engine:
    assert NATIVE is not None
    return NATIVE


# --- dispatch -------------------------------------------------------------------


def test_ci_builds_the_extension() -> None:
    # On CI the extension must be built and loaded: a silent fallback to pure
    # Python would leave the native half of the suite skipped.
    if os.environ.get("CI") != "true" or os.environ.get("TUNKIT_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("only checked on CI (CI=true)")
    assert NATIVE is not None, REASON


def _engine_in_subprocess(pure: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TUNKIT_PURE_PYTHON"}
    if pure is not None:
        env["TUNKIT_PURE_PYTHON"] = pure
    code = (
        "import tunkit._offload as o, tunkit._offload._impl as i;"
        "print(o.speedups_enabled(), i.ACTIVE.name, o.Coalescer.__name__, o.split.__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_tunkit_pure_python_forces_the_pure_engine() -> None:
    assert _engine_in_subprocess("1") == "False pure Coalescer tunkit._offload.split"


@needs_native
@pytest.mark.parametrize("value", [None, "", "0"], ids=["unset", "empty", "zero"])
def test_the_extension_is_used_when_it_loads(value: str | None) -> None:
    assert _engine_in_subprocess(value) == "True native NativeCoalescer tunkit._speedups"


def test_a_source_checkout_without_a_build_falls_back_to_pure(tmp_path: Path) -> None:
    # The C sources' folder, src/tunkit/_speedups/, imports as an empty
    # namespace package when no extension was built beside it.
    src = Path(tunkit.__file__).parent
    shutil.copytree(src, tmp_path / "tunkit", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "TUNKIT_PURE_PYTHON"}
    env["PYTHONPATH"] = str(tmp_path)
    code = "import tunkit, tunkit._offload._impl as i; print(tunkit.speedups_enabled(), i.REASON)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
        cwd=tmp_path,
    )
    enabled, _, reason = done.stdout.strip().partition(" ")
    assert enabled == "False"
    assert reason == "tunkit._speedups is not built (only its C sources are here)"


def test_speedups_enabled_says_which_engine_runs() -> None:
    assert offload.speedups_enabled() is (ACTIVE is NATIVE) is (NATIVE is not None)
    assert offload.split is ACTIVE.split
    assert offload.Coalescer is ACTIVE.Coalescer


@needs_native
def test_native_coalescer_is_a_coalescer() -> None:
    c = _native().Coalescer(tcp=False, udp=True)
    assert isinstance(c, PURE.Coalescer)
    assert (c.tcp, c.udp) == (False, True)
    assert repr(c) == "Coalescer(tcp=False, udp=True)"


@needs_native
def test_bind_checks_its_arguments() -> None:
    from tunkit import _speedups

    with pytest.raises(TypeError):
        _speedups.bind(ValueError, ValueError, ValueError, tuple, memoryview(b""))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _speedups.bind(1, ValueError, ValueError, Write, memoryview(b""))  # type: ignore[arg-type]


# --- the checksum ----------------------------------------------------------------


@needs_native
@settings(max_examples=500)
@given(
    data=st.binary(max_size=5000),
    skip=st.integers(0, 7),
    initial=st.one_of(st.integers(0, 0xFFFF), st.integers(0, 2**200)),
)
def test_ones_sum_and_checksum_agree(data: bytes, skip: int, initial: int) -> None:
    # Unaligned starts and every tail length; initial sums far beyond 64 bits.
    view = memoryview(data)[min(skip, len(data)) :]
    native = _native()
    assert native.ones_sum(view, initial) == PURE.ones_sum(view, initial)
    assert native.checksum(view, initial=initial) == PURE.checksum(view, initial=initial)


@needs_native
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 8191, 8192, 65535, 1 << 20])
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x5A], ids=["zeros", "ones", "pattern"])
def test_ones_sum_edges(size: int, fill: int) -> None:
    # All-zero data sums to 0, all-ones to 0xFFFF ("negative zero"), as the loop.
    data = bytes([fill]) * size
    expected = slow_ones_sum(data) if size < 70000 else PURE.ones_sum(data)
    assert _native().ones_sum(data) == expected == PURE.ones_sum(data)
    assert _native().ones_sum(data, 0xFFFF) == PURE.ones_sum(data, 0xFFFF)


@needs_native
def test_checksum_of_any_buffer_kind() -> None:
    data = payload_bytes(1001)
    for buf in (data, bytearray(data), memoryview(data), array.array("B", data)):
        assert _native().ones_sum(buf) == PURE.ones_sum(data)
    assert _native().ones_sum(array.array("H", data[:1000])) == PURE.ones_sum(data[:1000])


@needs_native
@pytest.mark.parametrize("engine", [PURE, NATIVE], ids=["pure", "native"])
def test_negative_initial_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        engine.ones_sum(b"ab", -1)


@needs_native
@settings(max_examples=300)
@given(
    addrs=st.one_of(st.binary(min_size=8, max_size=8), st.binary(min_size=32, max_size=32)),
    proto=st.integers(0, 255),
    l4_len=st.integers(0, 0xFFFF),
    csum=st.integers(0, 0xFFFF),
    old=st.integers(0, 0xFFFF),
    new=st.integers(0, 0xFFFF),
)
def test_pseudo_sum_and_update16_agree(
    addrs: bytes, proto: int, l4_len: int, csum: int, old: int, new: int
) -> None:
    native = _native()
    assert native.pseudo_sum(addrs, proto, l4_len) == PURE.pseudo_sum(addrs, proto, l4_len)
    assert native.update16(csum, old, new) == PURE.update16(csum, old, new)


# --- split -----------------------------------------------------------------------

_FLOWS = [
    Flow(),
    Flow.v6(),
    Flow(proto=UDP),
    Flow.v6(UDP),
    Flow().with_(tcp_options=TIMESTAMPS),
    Flow(df=False, ip_options=b"\x01\x01\x01\x00"),
]

_BUF_KINDS: list[Callable[[int], Any]] = [
    bytearray,
    lambda n: memoryview(bytearray(n)),
    lambda n: array.array("B", bytes(n)),
    lambda n: array.array("H", [0] * (n // 2 + 1)),
]


def _split_outcome(engine: Engine, raw: bytes, bufs: list[Any], n_sizes: int, offset: int) -> Any:
    """Run *engine*'s split on fresh copies; return what it stored or what it raised."""
    mine = [memoryview(bytearray(b)) if isinstance(b, memoryview) else copy.copy(b) for b in bufs]
    sizes = [-1] * n_sizes
    try:
        n = engine.split(memoryview(raw), mine, sizes, offset)
    except (_Malformed, _TooBig, TooManySegmentsError, TypeError, ValueError) as exc:
        result: Any = ("raised", type(exc), str(exc))
    else:
        result = ("stored", n)
    return result, sizes, [bytes(b) for b in mine]


def _assert_split_agrees(raw: bytes, bufs: list[Any], n_sizes: int, offset: int) -> Any:
    pure = _split_outcome(PURE, raw, bufs, n_sizes, offset)
    native = _split_outcome(_native(), raw, bufs, n_sizes, offset)
    assert native == pure
    return pure


@st.composite
def kernel_reads(draw: st.DrawFn) -> bytes:
    """A super-packet or GSO_NONE packet as the kernel hands it out, maybe damaged."""
    flow = draw(st.sampled_from(_FLOWS))
    payload = payload_bytes(draw(st.integers(0, 9000)), seed=draw(st.integers(0, 9)))
    flags = draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | CWR, ACK | ECE | PSH | CWR]))
    seq, ip_id = draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 0xFFFF))
    if draw(st.integers(0, 4)) == 0:
        partial = draw(st.booleans())
        pkt = flow.packet(payload[:1400], seq=seq, ip_id=ip_id, flags=flags, partial=partial)
        header = vnet(1, 0, 0, 0, flow.iph_len, 16 if flow.proto != UDP else 6)
        raw = bytearray((header if partial else vnet()) + pkt)
    else:
        gso_size = draw(st.one_of(st.integers(1, 1500), st.sampled_from([536, 1000, 1448])))
        raw = bytearray(flow.super_packet(payload, gso_size, seq=seq, ip_id=ip_id, flags=flags))
    edits = st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=4)
    for at, value in draw(edits) if draw(st.booleans()) else []:
        if at < len(raw):
            raw[at] = value
    cut = draw(st.integers(0, len(raw)))
    if draw(st.integers(0, 3)) == 0:
        del raw[cut:]
    return bytes(raw)


@needs_native
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=kernel_reads(),
    n_bufs=st.sampled_from([0, 1, 3, 8, 64, 64, 64]),
    n_sizes=st.sampled_from([0, 3, 64, 64, 64]),
    room=st.sampled_from([0, 60, 700, 1500, 1600, 9100, 9100]),
    offset=st.sampled_from([0, 3, 10, 16, 40, -5, 5000]),
    kind=st.sampled_from(range(len(_BUF_KINDS))),
)
def test_split_agrees_on_generated_reads(
    raw: bytes, n_bufs: int, n_sizes: int, room: int, offset: int, kind: int
) -> None:
    bufs = [_BUF_KINDS[kind](max(offset, 0) + room + i * 37) for i in range(n_bufs)]
    outcome = _assert_split_agrees(raw, bufs, n_sizes, offset)
    event(outcome[0][0] if outcome[0][0] == "stored" else outcome[0][1].__name__)


@needs_native
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.tuples(
        st.integers(0, 255),
        st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x85, 7, 0xFF]),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, 80),
        st.integers(0, 20),
    ),
    body=st.binary(max_size=3000),
    n_bufs=st.integers(0, 8),
)
def test_split_agrees_on_random_reads(
    header: tuple[int, int, int, int, int, int], body: bytes, n_bufs: int
) -> None:
    bufs = [bytearray(16 + 1500) for _ in range(n_bufs)]
    _assert_split_agrees(vnet(*header) + body, bufs, n_bufs, 16)


@needs_native
@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), n_bufs=st.integers(0, 3))
def test_split_agrees_on_garbage(raw: bytes, n_bufs: int) -> None:
    _assert_split_agrees(raw, [bytearray(300) for _ in range(n_bufs)], n_bufs, 0)


@needs_native
def test_split_of_a_full_64k_super_packet_agrees() -> None:
    for flow in _FLOWS[:4]:
        payload = payload_bytes(65535 - flow.hdr_len)
        raw = flow.super_packet(payload, 1448 if flow.proto != UDP else 1400, flags=ACK | PSH)
        outcome = _assert_split_agrees(raw, [bytearray(1600) for _ in range(64)], 64, 16)
        assert outcome[0][0] == "stored"


@needs_native
@pytest.mark.parametrize("engine", [PURE, NATIVE], ids=["pure", "native"])
def test_split_refuses_bad_arguments_without_crashing(engine: Engine) -> None:
    raw = memoryview(Flow().super_packet(payload_bytes(3000), 1000))
    with pytest.raises(TypeError):
        engine.split(42, [bytearray(2000)] * 3, [0] * 3, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine.split(raw, [None] * 3, [0] * 3, 0)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        engine.split(raw, [bytes(2000)] * 3, [0] * 3, 0)  # read-only buffers
    with pytest.raises(TypeError):
        engine.split(raw, [bytearray(2000)] * 3, (0, 0, 0), 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine.split(raw, [bytearray(2000)] * 3, [0] * 3, 1.5)  # type: ignore[arg-type]


# --- coalesce --------------------------------------------------------------------


def _describe(writes: list[Write], bufs: list[Any]) -> list[Any]:
    """The writes as comparable values: bytes of every piece, and whose buffer each view is."""
    ids = {id(b): i for i, b in enumerate(bufs)}
    ids.update({id(b.obj): i for i, b in enumerate(bufs) if isinstance(b, memoryview)})
    out = []
    for w in writes:
        assert isinstance(w, Write)
        assert all(isinstance(p, memoryview) for p in [*w.iov, *w.packets])
        out.append(
            (
                [bytes(p) for p in w.iov],
                [ids.get(id(p.obj), "scratch") for p in w.iov[1:]],
                [bytes(p) for p in w.packets],
                [ids[id(p.obj)] for p in w.packets],
                w.first,
                w.gso,
                w.indices,
            )
        )
    return out


def _assert_coalesce_agrees(
    bufs: list[Any], offset: int, tcp: bool = True, udp: bool = True
) -> Any:
    before = [bytes(b) for b in bufs]
    pure = _describe(PURE.Coalescer(tcp=tcp, udp=udp).coalesce(bufs, offset), bufs)
    native = _describe(_native().Coalescer(tcp=tcp, udp=udp).coalesce(bufs, offset), bufs)
    assert native == pure
    assert [bytes(b) for b in bufs] == before, "coalesce modified its input"
    return pure


@st.composite
def batches(draw: st.DrawFn) -> list[bytes]:
    """Interleaved trains of several flows, some packets damaged, some re-checksummed."""
    flows = draw(st.lists(st.sampled_from(_FLOWS), min_size=1, max_size=4, unique=True))
    trains: list[list[bytes]] = []
    for f_i, flow in enumerate(flows):
        mss = draw(st.integers(1, 1400))
        seq, ip_id = draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 0xFFFF))
        id_step = draw(st.sampled_from([1, 1, 0]))
        pkts = []
        for i in range(draw(st.integers(1, 14))):
            size = mss if draw(st.integers(0, 4)) else draw(st.integers(0, mss))
            flags = ACK | draw(st.sampled_from([0, 0, 0, PSH, FIN, CWR, SYN, RST]))
            pkts.append(
                flow.packet(
                    payload_bytes(size, seed=f_i * 31 + i),
                    seq=seq,
                    ip_id=(ip_id + i * id_step) & 0xFFFF,
                    flags=flags,
                )
            )
            seq = (seq + size + draw(st.sampled_from([0, 0, 0, 0, 1]))) & 0xFFFFFFFF
        trains.append(pkts)
    order = draw(st.permutations([f for f, t in enumerate(trains) for _ in t]))
    cursors = [0] * len(trains)
    batch = []
    for f in order:
        batch.append(bytearray(trains[f][cursors[f]]))
        cursors[f] += 1
    for i, at, value in draw(
        st.lists(st.tuples(st.integers(0, 99), st.integers(0, 80), st.integers(0, 255)), max_size=5)
    ):
        pkt = batch[i % len(batch)]
        if at < len(pkt):
            pkt[at] = value
    for i, cut in draw(st.lists(st.tuples(st.integers(0, 99), st.integers(0, 100)), max_size=2)):
        del batch[i % len(batch)][cut:]
    refix = draw(st.booleans())
    out = []
    for pkt in batch:
        raw = bytes(pkt)
        if refix:
            with contextlib.suppress(Exception):  # too short or not IP: left as it is
                raw = fix_checksums(raw)
        out.append(raw)
    return out


@needs_native
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=batches(),
    offset=st.sampled_from([0, 1, 16]),
    tcp=st.booleans(),
    udp=st.booleans(),
    as_views=st.booleans(),
)
def test_coalesce_agrees_on_generated_batches(
    batch: list[bytes], offset: int, tcp: bool, udp: bool, as_views: bool
) -> None:
    bufs: list[Any] = [bytearray(b"\xaa" * offset + p) for p in batch]
    if as_views:
        bufs = [memoryview(b) for b in bufs]
    writes = _assert_coalesce_agrees(bufs, offset, tcp, udp)
    event("merged" if any(w[5] for w in writes) else "nothing merged")


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    pkts=st.lists(st.binary(max_size=120), max_size=12),
    offset=st.integers(-30, 30),
)
def test_coalesce_agrees_on_garbage(pkts: list[bytes], offset: int) -> None:
    _assert_coalesce_agrees([bytearray(b"\x00" * max(offset, 0) + p) for p in pkts], offset)


@needs_native
@pytest.mark.parametrize(
    ("flow", "size", "count"),
    [
        (Flow(), 1448, 60),  # more than 64 KB: two super-packets
        (Flow.v6(), 1428, 50),
        (Flow(proto=UDP), 100, 70),  # more than UDP_MAX_SEGMENTS datagrams
        (Flow.v6(UDP), 1, 130),
        (Flow(), 1, 1100),  # more than IOV_MAX pieces
    ],
    ids=["tcp4-over-64k", "tcp6-over-64k", "udp4-over-64-segments", "udp6-tiny", "tcp4-iov-max"],
)
def test_coalesce_limits_agree(flow: Flow, size: int, count: int) -> None:
    pkts = [
        flow.packet(payload_bytes(size, seed=i), seq=i * size, ip_id=i & 0xFFFF)
        for i in range(count)
    ]
    writes = _assert_coalesce_agrees([bytearray(16) + p for p in pkts], 16)
    assert len(writes) >= 2


@needs_native
def test_many_flows_in_one_batch_agree() -> None:
    flows = [Flow(sport=1000 + i % 300, dport=i // 300) for i in range(600)]
    pkts = [f.packet(b"x" * 100, seq=s * 100, ip_id=s) for s in range(3) for f in flows]
    writes = _assert_coalesce_agrees([bytearray(p) for p in pkts], 0)
    assert len(writes) == 600


@needs_native
@pytest.mark.parametrize("engine", [PURE, NATIVE], ids=["pure", "native"])
def test_coalesce_refuses_non_buffers_without_crashing(engine: Engine) -> None:
    with pytest.raises(TypeError):
        engine.Coalescer().coalesce([bytearray(60), 42], 0)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        engine.Coalescer().coalesce([bytearray(60)], "x")  # type: ignore[arg-type]


# --- the GIL ---------------------------------------------------------------------


def _gil_work() -> dict[str, Callable[[], object]]:
    native = _native()
    big = payload_bytes(1 << 16) * 16
    raw = memoryview(Flow().super_packet(payload_bytes(65535 - 40), 1448))
    bufs = [bytearray(1600) for _ in range(64)]
    sizes = [0] * 64
    n = native.split(raw, bufs, sizes, 16)
    segments = [bytes(bufs[i][: 16 + sizes[i]]) for i in range(n)]
    coalescer = native.Coalescer()
    return {
        "ones_sum": lambda: native.ones_sum(big),
        "split": lambda: native.split(raw, bufs, sizes, 16),
        "coalesce": lambda: coalescer.coalesce(segments, 16),
    }


@needs_native
@pytest.mark.parametrize("kernel", ["ones_sum", "split", "coalesce"])
def test_kernels_release_the_gil(kernel: str) -> None:
    # With a switch interval of an hour the interpreter never takes the GIL
    # from a running thread: the ticker, waking every 0.2 ms, can only tick
    # while the worker is inside a kernel that released the GIL.
    work = _gil_work()[kernel]
    done = [False]
    ticks = [0]
    seen: list[int] = []

    def ticker() -> None:
        while not done[0]:
            ticks[0] += 1
            time.sleep(0.0002)

    def worker() -> None:
        before = ticks[0]
        deadline = time.perf_counter() + 0.05
        while time.perf_counter() < deadline:
            work()
        seen.append(ticks[0] - before)
        done[0] = True

    old = sys.getswitchinterval()
    sys.setswitchinterval(3600)
    try:
        threads = [threading.Thread(target=f, name=f"gil-{f.__name__}") for f in (ticker, worker)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert seen[0] > 0, f"{kernel} held the GIL while it worked"

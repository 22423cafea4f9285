"""tunkit.pcap: files tshark and scapy read as written; a reader that raises only ValueError."""

from __future__ import annotations

import io
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pcap_readers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import Flow
from pcap_readers import Seen
from scapy.all import IP, UDP, IPv6, raw  # type: ignore[attr-defined]
from scapy.utils import PcapNgWriter, PcapWriter

from tunkit import pcap
from tunkit.pcap import Record, Writer

# What the tests send: packets built by scapy and by tests/packets.py, not by tunkit.
PACKETS = [
    raw(IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=4000, dport=53) / b"query"),
    Flow().packet(b"x" * 100, seq=7),
    Flow.v6().packet(b"y" * 1000),
    raw(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2) / (b"z" * 3)),
]
ADDRESSES = [("10.1.0.1", "10.1.0.2"), ("10.0.0.1", "10.0.0.2"),
             ("fd00::1", "fd00::2"), ("fd00::1", "fd00::2")]
T0 = 1_700_000_000_123_456_789


def write_sample(file: Path | io.BytesIO, pcap_format: pcap.PcapFormat) -> list[Record]:
    """Write PACKETS on two interfaces (pcapng) or one (pcap); return what was written."""
    expected = []
    with Writer(file, pcap_format=pcap_format) as w:
        names = ["tun-a", "tun-b"] if pcap_format == "pcapng" else ["tun-a"]
        ids = [w.add_interface(name) for name in names]
        for i, pkt in enumerate(PACKETS):
            direction: pcap.Direction | None = ("in", "out", None)[i % 3]
            iface = ids[i % len(ids)]
            ts = T0 + i * 1001
            w.write(iface, [pkt], direction, ts)
            if pcap_format == "pcapng":
                expected.append(Record(ts, direction, names[iface], pkt))
            else:
                expected.append(Record(ts, None, None, pkt))
    return expected


@pytest.mark.parametrize("pcap_format", ["pcapng", "pcap"])
def test_tunkit_reads_back_what_it_wrote(tmp_path: Path, pcap_format: pcap.PcapFormat) -> None:
    path = tmp_path / f"t.{pcap_format}"
    expected = write_sample(path, pcap_format)
    assert list(pcap.read(path)) == expected
    with path.open("rb") as f:  # a file object is read from where it stands, and left open
        assert list(pcap.read(f)) == expected
        assert not f.closed


@pytest.mark.parametrize("pcap_format", ["pcapng", "pcap"])
@pytest.mark.parametrize("reader", [pcap_readers.tshark, pcap_readers.scapy],
                         ids=["tshark", "scapy"])
def test_independent_readers_see_packets_directions_interfaces(
    tmp_path: Path, pcap_format: pcap.PcapFormat, reader: Callable[[Path], list[Seen]]
) -> None:
    path = tmp_path / f"t.{pcap_format}"
    expected = write_sample(path, pcap_format)
    seen = reader(path)
    assert [s.data for s in seen] == PACKETS
    assert [(s.src, s.dst) for s in seen] == ADDRESSES  # decoded as IP/IPv6: link type 101
    assert [s.direction for s in seen] == [r.direction for r in expected]
    if pcap_format == "pcapng" or reader is pcap_readers.tshark:
        assert [s.interface for s in seen] == [r.interface for r in expected]


@pytest.mark.parametrize("pcap_format", ["pcapng", "pcap"])
def test_tshark_sees_raw_ip_and_exact_nanoseconds(
    tmp_path: Path, pcap_format: pcap.PcapFormat
) -> None:
    path = tmp_path / f"t.{pcap_format}"
    expected = write_sample(path, pcap_format)
    # Raw IP (wiretap's encapsulation 7, LINKTYPE_RAW 101) and nanoseconds, exact.
    fields = pcap_readers.tshark_fields(path, "frame.encap_type", "frame.time_epoch")
    assert {f[0] for f in fields} == {"7"}
    assert [f[1] for f in fields] == [
        f"{r.timestamp_ns // 10**9}.{r.timestamp_ns % 10**9:09d}" for r in expected
    ]


def test_the_headers_say_linktype_101_and_nanoseconds(tmp_path: Path) -> None:
    pcap_path, ng_path = tmp_path / "t.pcap", tmp_path / "t.pcapng"
    write_sample(pcap_path, "pcap")
    write_sample(ng_path, "pcapng")
    magic, major, minor, _, _, _, linktype = struct.unpack_from("<IHHiIII", pcap_path.read_bytes())
    assert (magic, major, minor, linktype) == (0xA1B23C4D, 2, 4, 101)
    fields = pcap_readers.tshark_fields(ng_path, "frame.interface_id")
    assert {f[0] for f in fields} == {"0", "1"}  # one interface block per name


def test_scapy_written_files_read_as_scapy_wrote_them(tmp_path: Path) -> None:
    """Files from another writer: classic pcap in microseconds, and scapy's pcapng."""
    pkts = [IP(raw(PACKETS[0])), IPv6(raw(PACKETS[2]))]
    for i, p in enumerate(pkts):
        p.time = 1_700_000_000 + i + 0.25
    classic = tmp_path / "scapy.pcap"
    with PcapWriter(str(classic), linktype=101, sync=True) as w:
        for p in pkts:
            w.write(p)
    got = list(pcap.read(classic))
    assert [r.data for r in got] == [PACKETS[0], PACKETS[2]]
    assert [r.timestamp_ns for r in got] == [1_700_000_000_250_000_000, 1_700_000_001_250_000_000]
    ng = tmp_path / "scapy.pcapng"
    with PcapNgWriter(str(ng)) as w:
        for p in pkts:
            w.write(p)
    assert [r.data for r in pcap.read(ng)] == [PACKETS[0], PACKETS[2]]


def _block(kind: int, body: bytes, order: str = "<") -> bytes:
    """One pcapng block, laid out by hand from the format's draft (no tunkit code)."""
    body += b"\0" * (-len(body) % 4)
    return (struct.pack(order + "II", kind, len(body) + 12) + body
            + struct.pack(order + "I", len(body) + 12))


def _be_pcapng(packets: list[bytes]) -> bytes:
    """A big-endian pcapng file: packets out of interface "be0", timestamps in milliseconds."""

    def block(kind: int, body: bytes) -> bytes:
        return _block(kind, body, ">")

    out = block(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))
    name = b"be0\0"
    out += block(1, struct.pack(">HHI", 101, 0, 0) + struct.pack(">HH", 2, 3) + name
                 + struct.pack(">HHBxxx", 9, 1, 3) + struct.pack(">HH", 0, 0))  # milliseconds
    for i, pkt in enumerate(packets):
        pad = b"\0" * (-len(pkt) % 4)
        opts = struct.pack(">HHI", 2, 4, 2) + struct.pack(">HH", 0, 0)
        out += block(6, struct.pack(">IIIII", 0, 0, 5000 + i, len(pkt), len(pkt)) + pkt + pad
                     + opts)
    return out


def test_big_endian_pcapng_is_read() -> None:
    got = list(pcap.read(io.BytesIO(_be_pcapng(PACKETS[:2]))))
    assert got == [Record(5_000_000_000, "out", "be0", PACKETS[0]),
                   Record(5_001_000_000, "out", "be0", PACKETS[1])]


def test_writer_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    with Writer(tmp_path / "one.pcap", pcap_format="pcap") as w:
        w.add_interface("a")
        with pytest.raises(ValueError, match="one interface"):
            w.add_interface("b")
        with pytest.raises(ValueError, match="direction"):
            w.write(0, [PACKETS[0]], "sideways")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="interface 3"):
            w.write(3, [PACKETS[0]])
    with pytest.raises(ValueError, match="closed"):
        w.write(0, [PACKETS[0]])
    with pytest.raises(ValueError, match="pcap_format"):
        Writer(io.BytesIO(), pcap_format="erf")  # type: ignore[arg-type]


def test_a_file_object_is_flushed_and_left_open() -> None:
    buf = io.BytesIO()
    w = Writer(buf)
    w.add_interface("x")
    w.write(0, PACKETS)
    w.close()
    w.close()  # idempotent
    assert not buf.closed
    assert [r.data for r in pcap.read(io.BytesIO(buf.getvalue()))] == PACKETS


# -- garbage in, ValueError out -------------------------------------------------------


def _valid_files() -> list[bytes]:
    files = []
    for fmt in ("pcapng", "pcap"):
        buf = io.BytesIO()
        write_sample(buf, fmt)  # type: ignore[arg-type]
        files.append(buf.getvalue())
    files.append(_be_pcapng(PACKETS[:1]))
    return files


VALID = _valid_files()


def _read_all(data: bytes) -> list[Record]:
    try:
        return list(pcap.read(io.BytesIO(data)))
    except ValueError:
        return []


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_value_error(data: bytes) -> None:
    _read_all(data)


@settings(max_examples=500, deadline=None)
@given(
    which=st.sampled_from(range(len(VALID))),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 2000),
    tail=st.binary(max_size=40),
)
def test_damaged_files_raise_only_value_error(
    which: int, edits: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    """A valid file with bytes changed, cut short or garbage appended: records or ValueError."""
    data = bytearray(VALID[which])
    for at, value in edits:
        data[at % len(data)] = value
    _read_all(bytes(data[: max(cut, 4)]) + tail)


@settings(max_examples=1000, deadline=None)
@given(
    order=st.sampled_from("<>"),
    blocks=st.lists(
        st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 0x0A0D0D0A, 0xDEAD]), st.binary(max_size=60)),
        max_size=6,
    ),
    idb_first=st.booleans(),
)
def test_well_framed_blocks_of_garbage_raise_only_value_error(
    order: str, blocks: list[tuple[int, bytes]], idb_first: bool
) -> None:
    """Lengths and trailers right, bodies made up: each block's own checks are what run."""
    data = _block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)
    if idb_first:
        data += _block(1, struct.pack(order + "HHI", 101, 0, 0), order)
    for kind, body in blocks:
        data += _block(kind, body, order)
    _read_all(data)


@pytest.mark.parametrize("pcap_format", ["pcapng", "pcap"])
def test_every_truncation_gives_whole_records_then_value_error(
    pcap_format: pcap.PcapFormat,
) -> None:
    buf = io.BytesIO()
    expected = write_sample(buf, pcap_format)
    data = buf.getvalue()
    whole = 0  # cuts that end a block: a shorter file, but a valid one
    for cut in range(1, len(data)):
        got: list[Record] = []
        try:
            got.extend(pcap.read(io.BytesIO(data[:cut])))
            whole += 1
        except ValueError:
            pass
        assert got == expected[: len(got)]
    # After the file header (and the two interface blocks), after each record but the last.
    assert whole == len(expected) + (2 if pcap_format == "pcapng" else 0)


def _claim(pcap_format: str, length: int) -> bytes:
    """A file whose first packet claims *length* bytes and has 16."""
    buf = io.BytesIO()
    with Writer(buf, pcap_format=pcap_format) as w:  # type: ignore[arg-type]
        w.add_interface("x")
    head = buf.getvalue()
    if pcap_format == "pcap":
        return head + struct.pack("<IIII", 0, 0, length, length) + bytes(16)
    return head + struct.pack("<II", 6, length) + bytes(16)


@pytest.mark.parametrize("pcap_format", ["pcapng", "pcap"])
@pytest.mark.parametrize("length", [pcap.MAX_BLOCK_LEN - 4, 0xFFFFFFFC])
def test_a_length_claim_is_not_an_allocation(
    pcap_format: str, length: int, tmp_path: Path
) -> None:
    path = tmp_path / "claim"
    path.write_bytes(_claim(pcap_format, length))
    tracemalloc.start()
    try:
        # a real file: its read(n) makes room for n bytes before it reads
        with pytest.raises(ValueError, match=r"truncated|MAX_BLOCK_LEN"):
            list(pcap.read(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"reading a {length}-byte claim allocated {peak} bytes"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"\x0a\x0d", "truncated file"),
        (b"GIF89a" + bytes(30), "not a pcap or pcapng file"),
        (struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1), "link type 1"),
        (struct.pack("<IHHiIII", 0xA1B23C4D, 3, 0, 0, 0, 65535, 101), "version 3"),
        (struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x11223344, 1, 0, -1), "byte-order magic"),
        (_claim("pcapng", 13), "multiple of 4"),
    ],
    ids=["empty", "short", "gif", "ethernet", "version", "magic", "unaligned"],
)
def test_garbage_is_refused_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        list(pcap.read(io.BytesIO(data)))


def test_a_path_is_closed_when_the_iterator_is_closed(tmp_path: Path) -> None:
    path = tmp_path / "t.pcapng"
    write_sample(path, "pcapng")
    records = pcap.read(path)
    assert next(records).data == PACKETS[0]
    records.close()  # the autouse fixture checks the descriptor is gone

"""pcapng and classic pcap files of raw IP packets: a :class:`Writer` and :func:`read`.

What Wireshark, tshark, tcpdump and scapy open. A pcapng file (the default)
has a section header, one interface description block per interface (its
``if_name``, link type ``LINKTYPE_RAW``, nanosecond timestamps:
``if_tsresol`` = 9) and an enhanced packet block per packet whose
``epb_flags`` carry the direction (inbound = 1, outbound = 2). A classic pcap
file (``pcap_format="pcap"``) has the nanosecond magic ``0xa1b23c4d``, link
type ``LINKTYPE_RAW``, one interface and no directions.

``LINKTYPE_RAW`` is 101 in files, pcap and pcapng alike: the link-layer type
registry's value for "raw IP, the version in the first nibble" (IPv4 and
IPv6). The ``DLT_RAW`` of libpcap's API is 12 or 14 depending on the
platform; libpcap maps it to 101 when it writes a file, and tshark shows 101
as "Raw IP". Only 101 is written; the reader also takes 228 and 229
(``LINKTYPE_IPV4``/``LINKTYPE_IPV6``), which are raw IP too.

Written on the standard library (``struct``), not on a package: both formats
are a handful of fixed layouts, the reader must meet hostile input on terms
tunkit sets (only ``ValueError``, bounded memory), and the in-memory core
depends on nothing. The candidates were python-pcapng (no release since
2022, reader only), dpkt (no release since 2022, a whole packet library)
and scapy (large, and slow to import; tunkit's tests use it as the
independent reader instead).

Directions are tunkit's: ``"in"`` is a packet that came to this program
(read from the Tun), ``"out"`` one this program sent (written to it). That
is the reverse of what ``tcpdump -i tun0`` on the device itself calls them:
the kernel's outbound packets are the ones a TUN program reads.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Final, Literal, NamedTuple

from ._offload.headers import byte_view

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, StrOrBytesPath

__all__ = [
    "LINKTYPE_RAW",
    "MAX_BLOCK_LEN",
    "Direction",
    "PcapFormat",
    "Record",
    "Writer",
    "read",
]

Direction = Literal["in", "out"]
PcapFormat = Literal["pcapng", "pcap"]

# The link-layer type registry (tcpdump.org/linktypes.html), values in files.
LINKTYPE_RAW: Final = 101  # raw IPv4 or IPv6, the version in the first nibble
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
_RAW_LINKTYPES: Final = frozenset({LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6})

# Longest packet a writer records whole (tcpdump's default snapshot length);
# a Tun packet is at most 64 KB, a segment of a super-packet less.
SNAPLEN: Final = 262144

# The reader refuses a block or record longer than this, and reads what it
# accepts in chunks: a length field claims, the bytes that follow prove.
MAX_BLOCK_LEN: Final = 1 << 24
_CHUNK: Final = 1 << 16

# --- pcapng, draft-ietf-opsawg-pcapng ----------------------------------------
# Written little-endian; the section header's byte-order magic tells readers.
_SHB_TYPE: Final = 0x0A0D0D0A  # a palindrome: the same bytes in either order
_IDB_TYPE: Final = 1
_PB_TYPE: Final = 2  # obsolete packet block: read, never written
_SPB_TYPE: Final = 3  # simple packet block: read, never written
_EPB_TYPE: Final = 6
_BYTE_ORDER_MAGIC: Final = 0x1A2B3C4D
_MAGIC_LE: Final = b"\x4d\x3c\x2b\x1a"
_MAGIC_BE: Final = b"\x1a\x2b\x3c\x4d"
_OPT_ENDOFOPT: Final = 0
_SHB_USERAPPL: Final = 4
_IF_NAME: Final = 2
_IF_TSRESOL: Final = 9
_IF_TSOFFSET: Final = 14
_EPB_FLAGS: Final = 2
_TSRESOL_NS: Final = 9  # 10**-9 s
_TSRESOL_DEFAULT: Final = 6  # microseconds, when an interface has no if_tsresol
_FLAG_INBOUND: Final = 1  # epb_flags bits 0-1: the direction
_FLAG_OUTBOUND: Final = 2
_DIRECTION_FLAGS: Final = {"in": _FLAG_INBOUND, "out": _FLAG_OUTBOUND}
_FLAG_DIRECTIONS: Final[dict[int, Direction]] = {_FLAG_INBOUND: "in", _FLAG_OUTBOUND: "out"}

_BLOCK_HEAD_LEN: Final = 8  # block type, total length
_BLOCK_TRAILER_LEN: Final = 4  # total length again
_SHB_MIN_LEN: Final = 28
# block type, total length, interface id, timestamp (high, low), captured, original length
_EPB_HEAD: Final = struct.Struct("<IIIIIII")
# What follows a packet's data: padding to 32 bits, then the epb_flags option
# and the end of options (when there is a direction), then the total length.
# One Struct per padding length (the data's length % 4).
_EPB_TAILS_FLAGS: Final = tuple(struct.Struct(f"<{-n % 4}xHHIHHI") for n in range(4))
_EPB_TAILS: Final = tuple(struct.Struct(f"<{-n % 4}xI") for n in range(4))
_BYTES_TYPES: Final = (bytes, bytearray)  # taken as they are: no view needed
_EPB_FIXED_LEN: Final = 20  # interface id .. original length, in the block body
_U32_LE: Final = struct.Struct("<I")
_PADDING: Final = (b"", b"\0\0\0", b"\0\0", b"\0")  # by length % 4

# --- classic pcap, draft-ietf-opsawg-pcap -------------------------------------
_PCAP_MAGIC_US: Final = 0xA1B2C3D4
_PCAP_MAGIC_NS: Final = 0xA1B23C4D
# magic, version major, minor, thiszone, sigfigs, snaplen, link type
_PCAP_HDR: Final = struct.Struct("<IHHiIII")
# seconds, nanoseconds (microseconds with the other magic), captured, original length
_PCAP_REC: Final = struct.Struct("<IIII")

_NS_PER_S: Final = 1_000_000_000


class Record(NamedTuple):
    """One packet of a capture file.

    ``timestamp_ns`` is nanoseconds since the Unix epoch (0 for a pcapng
    simple packet block, which has none); ``direction`` is ``"in"``,
    ``"out"`` or ``None`` (classic pcap, or no ``epb_flags``);
    ``interface`` is the pcapng interface's ``if_name`` (its index in the
    section, as a decimal string, when it has none) or ``None`` in classic
    pcap; ``data`` is the packet, from its IP header on.
    """

    timestamp_ns: int
    direction: Direction | None
    interface: str | None
    data: bytes


def _padding(length: int) -> bytes:
    return _PADDING[length % 4]


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + _padding(len(value))


def _block(block_type: int, body: bytes) -> bytes:
    total = _BLOCK_HEAD_LEN + len(body) + _BLOCK_TRAILER_LEN
    return struct.pack("<II", block_type, total) + body + _U32_LE.pack(total)


class Writer:
    """Write packets to a pcapng (default) or classic pcap file; safe from any thread.

    *file* is a path (opened here, closed by :meth:`close`) or a binary file
    object (written from where it stands, flushed by :meth:`flush` and
    :meth:`close`, left open). The file header is written at once. Each Tun
    or other source calls :meth:`add_interface` once and passes the number it
    gets to :meth:`write`; one Writer can serve several
    :func:`tunkit.capture` calls, so that two Tuns share one file. A classic
    pcap file holds a single interface.

    Raises:
        ValueError: *pcap_format* is neither ``"pcapng"`` nor ``"pcap"``.
        OSError: the path cannot be opened, or writing the header failed.
    """

    def __init__(
        self, file: StrOrBytesPath | IO[bytes], *, pcap_format: PcapFormat = "pcapng"
    ) -> None:
        if pcap_format not in ("pcapng", "pcap"):
            raise ValueError(f"pcap_format {pcap_format!r} is neither 'pcapng' nor 'pcap'")
        self._format: PcapFormat = pcap_format
        self._lock = threading.Lock()  # guards the file and _interfaces
        self._interfaces: list[str] = []
        self._closed = False
        if isinstance(file, (str, bytes, os.PathLike)):
            self._file: IO[bytes] = open(file, "wb")  # noqa: SIM115 - closed by close()
            self._owns_file = True
        else:
            self._file = file
            self._owns_file = False
        try:
            self._file.write(self._file_header())
        except BaseException:
            if self._owns_file:
                self._file.close()
            raise

    def _file_header(self) -> bytes:
        if self._format == "pcap":
            return _PCAP_HDR.pack(_PCAP_MAGIC_NS, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW)
        options = _option(_SHB_USERAPPL, b"tunkit") + _option(_OPT_ENDOFOPT, b"")
        # byte-order magic, version 1.0, section length -1: not given
        return _block(_SHB_TYPE, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + options)

    @property
    def pcap_format(self) -> PcapFormat:
        """``"pcapng"`` or ``"pcap"``."""
        return self._format

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def add_interface(self, name: str) -> int:
        """Describe one more interface (a Tun) named *name*; return its number for :meth:`write`.

        In pcapng this writes an interface description block (``if_name``,
        ``LINKTYPE_RAW``, ``if_tsresol`` = 9).

        Raises:
            ValueError: the Writer is closed, or a classic pcap file already has its interface.
        """
        with self._lock:
            self._check_open()
            if self._format == "pcap":
                if self._interfaces:
                    raise ValueError(
                        "a classic pcap file holds one interface: use pcapng to share a file"
                    )
            else:
                options = (
                    _option(_IF_NAME, name.encode())
                    + _option(_IF_TSRESOL, bytes((_TSRESOL_NS,)))
                    + _option(_OPT_ENDOFOPT, b"")
                )
                head = struct.pack("<HHI", LINKTYPE_RAW, 0, SNAPLEN)
                self._file.write(_block(_IDB_TYPE, head + options))
            self._interfaces.append(name)
            return len(self._interfaces) - 1

    def write(
        self,
        interface: int,
        packets: Iterable[ReadableBuffer],
        direction: Direction | None = None,
        timestamp_ns: int | None = None,
    ) -> None:
        """Append *packets* (each from its IP header on), seen on *interface* at one moment.

        *timestamp_ns* defaults to now (``time.time_ns()``); *direction*
        (``"in"``, ``"out"`` or ``None``) goes into ``epb_flags`` in pcapng and
        is not stored in classic pcap. Packets longer than ``SNAPLEN`` are cut
        to it (their original length is kept). One ``write`` call on the file.

        Raises:
            ValueError: the Writer is closed, *interface* was not added, or
                *direction* is not one of the three.
        """
        if timestamp_ns is None:
            timestamp_ns = time.time_ns()
        flags = 0 if direction is None else _DIRECTION_FLAGS.get(direction)
        if flags is None:
            raise ValueError(f"direction {direction!r} is not 'in', 'out' or None")
        parts: list[ReadableBuffer] = []
        append = parts.append
        if self._format == "pcap":
            sec, nsec = divmod(timestamp_ns, _NS_PER_S)
            for pkt in packets:
                data = pkt if isinstance(pkt, _BYTES_TYPES) else byte_view(pkt)
                length = len(data)
                kept = min(length, SNAPLEN)
                append(_PCAP_REC.pack(sec, nsec, kept, length))
                append(data if kept == length else memoryview(data)[:kept])
        else:
            hi, lo = timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF
            tails = _EPB_TAILS_FLAGS if flags else _EPB_TAILS
            head_pack = _EPB_HEAD.pack
            for pkt in packets:
                data = pkt if isinstance(pkt, _BYTES_TYPES) else byte_view(pkt)
                length = len(data)
                kept = min(length, SNAPLEN)
                tail = tails[kept % 4]
                total = _EPB_HEAD.size + kept + tail.size
                append(head_pack(_EPB_TYPE, total, interface, hi, lo, kept, length))
                append(data if kept == length else memoryview(data)[:kept])
                if flags:
                    append(tail.pack(_EPB_FLAGS, 4, flags, _OPT_ENDOFOPT, 0, total))
                else:
                    append(tail.pack(total))
        with self._lock:
            self._check_open()
            if not 0 <= interface < len(self._interfaces):
                raise ValueError(f"interface {interface} was not added to this Writer")
            self._file.write(b"".join(parts))

    def flush(self) -> None:
        """Flush the file (a no-op once closed)."""
        with self._lock:
            if not self._closed:
                self._file.flush()

    def close(self) -> None:
        """Flush, and close the file if the Writer opened it; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._file.flush()
            finally:
                if self._owns_file:
                    self._file.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("pcap.Writer is closed")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " [closed]" if self._closed else ""
        return f"<pcap.Writer {self._format} interfaces={self._interfaces}{state}>"


# --- reading --------------------------------------------------------------------


def read(file: StrOrBytesPath | IO[bytes]) -> Iterator[Record]:
    """Yield the packets of a pcapng or classic pcap file of raw IP packets, in file order.

    *file* is a path (opened, and closed when the iterator ends or is
    closed) or a binary file object read from where it stands (left open).
    The format is told by the first four bytes. In pcapng, several sections
    and interfaces are read; blocks without packets are skipped. Nothing is
    read ahead of the record yielded, and no length field is trusted: a
    block is read in chunks and refused beyond :data:`MAX_BLOCK_LEN`.

    Raises:
        ValueError: not a capture file, an unsupported version or link
            type (only raw IP), an inconsistent or truncated block. Raised
            when the iterator reaches it; records before it were yielded.
        OSError: reading the file failed.
    """
    if isinstance(file, (str, bytes, os.PathLike)):
        with open(file, "rb") as f:
            yield from _read_file(f)
    else:
        yield from _read_file(file)


def _read_file(f: IO[bytes]) -> Iterator[Record]:
    head = _read_up_to(f, 4)
    if not head:
        raise ValueError("empty file: not a pcap or pcapng file")
    if len(head) < 4:
        raise ValueError(f"truncated file: {len(head)} bytes")
    if head == struct.pack("<I", _SHB_TYPE):
        yield from _read_pcapng(f)
        return
    for order in ("<", ">"):
        (magic,) = struct.unpack(order + "I", head)
        if magic in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
            yield from _read_pcap(f, order, nanoseconds=magic == _PCAP_MAGIC_NS)
            return
    raise ValueError(f"not a pcap or pcapng file: magic {head.hex()}")


def _read_up_to(f: IO[bytes], n: int) -> bytes:
    """Read up to *n* bytes, fewer only at the end of the file, in chunks of ``_CHUNK``.

    Memory grows with the bytes that are there, not with *n*.
    """
    chunks: list[bytes] = []
    have = 0
    while have < n:
        chunk = f.read(min(n - have, _CHUNK))
        if not chunk:
            break
        if not isinstance(chunk, bytes):
            raise ValueError("file must be opened in binary mode")
        chunks.append(chunk)
        have += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    data = _read_up_to(f, n)
    if len(data) != n:
        raise ValueError(f"truncated {what}: {len(data)} of {n} bytes")
    return data


def _check_len(length: int, what: str) -> None:
    if length > MAX_BLOCK_LEN:
        raise ValueError(f"{what} of {length} bytes is longer than MAX_BLOCK_LEN {MAX_BLOCK_LEN}")


def _read_pcap(f: IO[bytes], order: str, *, nanoseconds: bool) -> Iterator[Record]:
    hdr_rest = struct.Struct(order + "HHiIII")
    rec = struct.Struct(order + "IIII")
    major, minor, _zone, _sigfigs, _snaplen, linktype = hdr_rest.unpack(
        _read_exact(f, hdr_rest.size, "pcap file header")
    )
    if major != 2:
        raise ValueError(f"pcap version {major}.{minor} is not 2.x")
    _check_linktype(linktype & 0xFFFF)  # the high bits may describe an FCS
    scale = 1 if nanoseconds else 1000
    while True:
        head = _read_up_to(f, rec.size)
        if not head:
            return
        if len(head) < rec.size:
            raise ValueError(f"truncated pcap record header: {len(head)} of {rec.size} bytes")
        sec, frac, kept, _length = rec.unpack(head)
        _check_len(kept, "pcap record")
        data = _read_exact(f, kept, "pcap record")
        yield Record(sec * _NS_PER_S + frac * scale, None, None, data)


def _check_linktype(linktype: int) -> None:
    if linktype not in _RAW_LINKTYPES:
        raise ValueError(f"link type {linktype} is not raw IP ({LINKTYPE_RAW})")


class _Interface(NamedTuple):
    name: str
    resol: int  # if_tsresol as stored: 10**-n seconds, or 2**-n with the high bit
    offset_s: int  # if_tsoffset
    snaplen: int


def _read_pcapng(f: IO[bytes]) -> Iterator[Record]:
    """Read blocks; the file's first four bytes (an SHB's type) are already consumed."""
    order = "<"
    interfaces: list[_Interface] = []
    block_type: int | None = _SHB_TYPE
    while True:
        if block_type is None:
            head = _read_up_to(f, 4)
            if not head:
                return
            if len(head) < 4:
                raise ValueError(f"truncated pcapng block type: {len(head)} bytes")
            (block_type,) = struct.unpack(order + "I", head)
        if block_type == _SHB_TYPE:
            # The length field is in the new section's byte order, told by the magic after it.
            length_and_magic = _read_exact(f, 8, "pcapng section header")
            magic = length_and_magic[4:]
            if magic == _MAGIC_LE:
                order = "<"
            elif magic == _MAGIC_BE:
                order = ">"
            else:
                raise ValueError(f"bad pcapng byte-order magic {magic.hex()}")
            (length,) = struct.unpack(order + "I", length_and_magic[:4])
            if length < _SHB_MIN_LEN:
                raise ValueError(f"pcapng section header of {length} bytes is below 28")
            body = magic + _read_block_rest(f, order, length, 12)
            major, minor = struct.unpack_from(order + "HH", body, 4)
            if major != 1:
                raise ValueError(f"pcapng version {major}.{minor} is not 1.x")
            interfaces = []  # interface numbers count from 0 in each section
        else:
            length = _u32(order, _read_exact(f, 4, "pcapng block length"))
            body = _read_block_rest(f, order, length, _BLOCK_HEAD_LEN)
            if block_type == _IDB_TYPE:
                interfaces.append(_interface(body, order, len(interfaces)))
            elif block_type in (_EPB_TYPE, _PB_TYPE):
                yield _packet(body, order, interfaces, obsolete=block_type == _PB_TYPE)
            elif block_type == _SPB_TYPE:
                yield _simple_packet(body, order, interfaces)
            # other blocks (name resolution, statistics, custom, ...) hold no packets
        block_type = None


def _u32(order: str, data: bytes) -> int:
    value: int = struct.unpack(order + "I", data)[0]
    return value


def _read_block_rest(f: IO[bytes], order: str, length: int, consumed: int) -> bytes:
    """Read a block of *length* bytes of which *consumed* were read; return its body.

    Checks the length (a multiple of 4, within bounds) and the trailing copy of it.
    """
    if length % 4 or length < _BLOCK_HEAD_LEN + _BLOCK_TRAILER_LEN:
        raise ValueError(f"pcapng block length {length} is not a multiple of 4 of 12 or more")
    _check_len(length, "pcapng block")
    rest = _read_exact(f, length - consumed, "pcapng block")
    if _u32(order, rest[-4:]) != length:
        raise ValueError(f"pcapng block length {length} does not match its trailer")
    return rest[: -_BLOCK_TRAILER_LEN]


def _options(body: bytes, start: int, order: str) -> dict[int, bytes]:
    """The options at ``body[start:]``: code -> value of its first occurrence."""
    found: dict[int, bytes] = {}
    pos = start
    end = len(body)
    while pos + 4 <= end:
        code, length = struct.unpack_from(order + "HH", body, pos)
        pos += 4
        if code == _OPT_ENDOFOPT:
            break
        if pos + length > end:
            raise ValueError(f"pcapng option {code} of {length} bytes overruns its block")
        found.setdefault(code, body[pos : pos + length])
        pos += length + len(_padding(length))
    return found


def _interface(body: bytes, order: str, index: int) -> _Interface:
    if len(body) < 8:
        raise ValueError(f"pcapng interface block body of {len(body)} bytes is below 8")
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
    _check_linktype(linktype)
    opts = _options(body, 8, order)
    name = opts.get(_IF_NAME)
    resol = opts.get(_IF_TSRESOL, bytes((_TSRESOL_DEFAULT,)))
    if len(resol) != 1:
        raise ValueError(f"pcapng if_tsresol of {len(resol)} bytes is not 1")
    offset = opts.get(_IF_TSOFFSET, bytes(8))
    if len(offset) != 8:
        raise ValueError(f"pcapng if_tsoffset of {len(offset)} bytes is not 8")
    (offset_s,) = struct.unpack(order + "q", offset)
    label = str(index) if name is None else name.decode(errors="replace")
    return _Interface(label, resol[0], offset_s, snaplen)


def _timestamp_ns(iface: _Interface, ticks: int) -> int:
    exponent = iface.resol & 0x7F
    if iface.resol & 0x80:  # 2**-n seconds
        ns = (ticks * _NS_PER_S) >> exponent
    elif exponent <= 9:
        ns = ticks * 10 ** (9 - exponent)
    else:
        ns = ticks // 10 ** (exponent - 9)
    return ns + iface.offset_s * _NS_PER_S


def _lookup(interfaces: list[_Interface], index: int) -> _Interface:
    if index >= len(interfaces):
        raise ValueError(f"pcapng packet of interface {index}, but {len(interfaces)} described")
    return interfaces[index]


def _packet(body: bytes, order: str, interfaces: list[_Interface], *, obsolete: bool) -> Record:
    """An enhanced packet block (or the obsolete packet block, laid out alike)."""
    if len(body) < _EPB_FIXED_LEN:
        raise ValueError(f"pcapng packet block body of {len(body)} bytes is below 20")
    if obsolete:  # interface id and drops count are 16 bits each
        index, _drops, hi, lo, kept, _length = struct.unpack_from(order + "HHIIII", body)
    else:
        index, hi, lo, kept, _length = struct.unpack_from(order + "IIIII", body)
    iface = _lookup(interfaces, index)
    if kept > len(body) - _EPB_FIXED_LEN:
        raise ValueError(f"pcapng packet of {kept} bytes overruns its block")
    data_end = _EPB_FIXED_LEN + kept
    opts = _options(body, data_end + len(_padding(kept)), order)
    direction: Direction | None = None
    flags = opts.get(_EPB_FLAGS)
    if flags is not None:
        if len(flags) != 4:
            raise ValueError(f"pcapng epb_flags of {len(flags)} bytes is not 4")
        direction = _FLAG_DIRECTIONS.get(_u32(order, flags) & 3)
    ts = _timestamp_ns(iface, (hi << 32) | lo)
    return Record(ts, direction, iface.name, body[_EPB_FIXED_LEN:data_end])


def _simple_packet(body: bytes, order: str, interfaces: list[_Interface]) -> Record:
    """A simple packet block: interface 0, no timestamp, no options."""
    if len(body) < 4:
        raise ValueError(f"pcapng simple packet block body of {len(body)} bytes is below 4")
    iface = _lookup(interfaces, 0)
    length = _u32(order, body[:4])
    kept = min(length, iface.snaplen or length, len(body) - 4)
    return Record(0, None, iface.name, body[4 : 4 + kept])

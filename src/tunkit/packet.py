"""One IP packet in one line: :func:`parse` reads its headers, ``str()`` says it as tcpdump would.

``str(parse(pkt))`` is a line such as ``IP 10.0.0.1.5201 > 10.0.0.2.40112:
tcp [S.] len 0`` or ``IP6 fd00::1 > fd00::2: icmp6 echo request, len 64``;
:func:`describe` gives that line or, for malformed bytes, one saying why.

IPv4 (with options) and IPv6 (walking the hop-by-hop, routing, fragment,
destination options and authentication headers) carrying TCP, UDP, ICMP or
ICMPv6; anything else is named by its protocol number. Every length the
packet claims (IHL, total or payload length, extension header lengths, TCP
data offset, UDP length) is checked against the bytes there; malformed
bytes raise ``ValueError`` saying what was wrong. Checksums are not checked:
a summary describes a packet, it does not judge it.

The layouts are those of the offload engine (``tunkit._offload.headers``):
one copy of each offset and ``struct.Struct``. Pure code, no I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ._offload.headers import (
    IP4_FLAG_MF,
    IP4_FRAG_OFFSET_MASK,
    IP4_HDR,
    IP4_MIN_HDR_LEN,
    IP6_HDR,
    IP6_HDR_LEN,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_FLAG_ACK,
    TCP_FLAG_CWR,
    TCP_FLAG_ECE,
    TCP_FLAG_FIN,
    TCP_FLAG_PSH,
    TCP_FLAG_RST,
    TCP_FLAG_SYN,
    TCP_FLAG_URG,
    TCP_HDR,
    TCP_MIN_HDR_LEN,
    UDP_HDR,
    UDP_HDR_LEN,
    byte_view,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["Summary", "describe", "parse"]

# IP protocol numbers (IANA) that only summaries need.
IPPROTO_HOPOPTS: Final = 0
IPPROTO_ICMP: Final = 1
IPPROTO_ROUTING: Final = 43
IPPROTO_FRAGMENT: Final = 44
IPPROTO_AH: Final = 51
IPPROTO_ICMPV6: Final = 58
IPPROTO_DSTOPTS: Final = 60

# --- ICMP (RFC 792) and ICMPv6 (RFC 4443) message header: type, code, checksum ---
ICMP_HDR: Final = struct.Struct("!BBH")
ICMP_HDR_LEN: Final = ICMP_HDR.size  # 4

# --- IPv6 extension headers, RFC 8200 section 4 -------------------------------
# Each starts with the next header; hop-by-hop, routing and destination options
# then give their length in 8-octet units not counting the first 8 (4.3, 4.4, 4.6).
IP6_EXT_HDR: Final = struct.Struct("!BB")
IP6_EXT_MIN_LEN: Final = 8
# Fragment header (4.5): next header, reserved, offset (13 bits) + flags, identification
IP6_FRAG_HDR: Final = struct.Struct("!BBHI")
IP6_FRAG_OFFSET_MASK: Final = 0xFFF8  # the offset in 8-octet units, already times 8
IP6_FRAG_MORE: Final = 0x0001
# The authentication header (RFC 4302 section 2.2) counts 4-octet units, not counting 2.
_IP6_LENGTH_RULES: Final = {
    IPPROTO_HOPOPTS: (8, 8),  # (unit, units not counted)
    IPPROTO_ROUTING: (8, 8),
    IPPROTO_DSTOPTS: (8, 8),
    IPPROTO_AH: (4, 8),
}

# tcpdump's letters, in its order (print-tcp.c): "[S.]" is SYN + ACK.
_TCP_FLAG_LETTERS: Final = (
    (TCP_FLAG_FIN, "F"),
    (TCP_FLAG_SYN, "S"),
    (TCP_FLAG_RST, "R"),
    (TCP_FLAG_PSH, "P"),
    (TCP_FLAG_ACK, "."),
    (TCP_FLAG_URG, "U"),
    (TCP_FLAG_ECE, "E"),
    (TCP_FLAG_CWR, "W"),
)

_ICMP_TYPES: Final = {
    0: "echo reply",
    3: "unreachable",
    5: "redirect",
    8: "echo request",
    11: "time exceeded",
    12: "parameter problem",
    13: "timestamp request",
    14: "timestamp reply",
}
_ICMP6_TYPES: Final = {
    1: "unreachable",
    2: "packet too big",
    3: "time exceeded",
    4: "parameter problem",
    128: "echo request",
    129: "echo reply",
    130: "multicast listener query",
    131: "multicast listener report",
    133: "router solicitation",
    134: "router advertisement",
    135: "neighbor solicitation",
    136: "neighbor advertisement",
    137: "redirect",
    143: "multicast listener report v2",
}
_PROTOCOL_NAMES: Final = {
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    IPPROTO_ICMP: "icmp",
    IPPROTO_ICMPV6: "icmp6",
}


@dataclass(frozen=True, slots=True)
class Summary:
    """What :func:`parse` found in one IP packet; ``str()`` gives one tcpdump-like line.

    ``length`` is the IP packet's length as its header states it (bytes
    beyond it are ignored); ``payload_len`` the bytes the transport carries:
    TCP or UDP data after their header, for anything else (ICMP included,
    as tcpdump's ``length``) everything after the IP headers. ``protocol``
    is the transport's number, after IPv6 extension headers. The port,
    flag and ICMP fields are ``None`` where the packet has none, also in a
    fragment other than the first (``fragment_offset`` > 0), whose bytes
    hold no transport header; ``fragment_offset`` is ``None`` unless the
    packet is a fragment.
    """

    version: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    protocol: int
    length: int
    payload_len: int
    sport: int | None = None
    dport: int | None = None
    tcp_flags: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    fragment_offset: int | None = None

    def __str__(self) -> str:
        family = "IP" if self.version == 4 else "IP6"
        if self.sport is not None:
            ends = f"{self.src}.{self.sport} > {self.dst}.{self.dport}"
        else:
            ends = f"{self.src} > {self.dst}"
        name = _PROTOCOL_NAMES.get(self.protocol, f"proto {self.protocol}")
        if self.fragment_offset:
            what = f"{name} fragment at {self.fragment_offset}, len {self.payload_len}"
        elif self.tcp_flags is not None:
            what = f"tcp [{tcp_flags_text(self.tcp_flags)}] len {self.payload_len}"
        elif self.protocol == IPPROTO_UDP and self.sport is not None:
            what = f"udp len {self.payload_len}"
        elif self.icmp_type is not None:
            names = _ICMP_TYPES if self.protocol == IPPROTO_ICMP else _ICMP6_TYPES
            kind = names.get(self.icmp_type, f"type {self.icmp_type}")
            code = f" code {self.icmp_code}" if self.icmp_code else ""
            what = f"{name} {kind}{code}, len {self.payload_len}"
        else:
            what = f"{name}, len {self.payload_len}"
        if self.fragment_offset == 0:
            what += " (first fragment)"
        return f"{family} {ends}: {what}"


def tcp_flags_text(flags: int) -> str:
    """tcpdump's letters for a TCP flags byte: ``"S."`` for SYN + ACK, ``"none"`` for 0."""
    return "".join(letter for bit, letter in _TCP_FLAG_LETTERS if flags & bit) or "none"


def parse(pkt: ReadableBuffer) -> Summary:
    """Read the IP and transport headers of *pkt* (from its IP header on) into a :class:`Summary`.

    Raises:
        ValueError: the bytes are not a well-formed IPv4 or IPv6 packet
            (empty, another version, a length claim beyond the bytes there,
            a truncated transport header); the message says which.
    """
    view = byte_view(pkt)
    if not len(view):
        raise ValueError("empty packet")
    version = view[0] >> 4
    if version == 4:
        return _parse4(view)
    if version == 6:
        return _parse6(view)
    raise ValueError(f"IP version {version} is neither 4 nor 6")


def describe(pkt: ReadableBuffer) -> str:
    """``str(parse(pkt))``, or a line saying why *pkt* is malformed: for logs, never raises."""
    try:
        return str(parse(pkt))
    except ValueError as exc:
        return f"malformed packet of {len(byte_view(pkt))} bytes: {exc}"


def _parse4(view: memoryview) -> Summary:
    have = len(view)
    if have < IP4_MIN_HDR_LEN:
        raise ValueError(f"IPv4 header truncated: {have} of {IP4_MIN_HDR_LEN} bytes")
    ver_ihl, _tos, total_len, _id, flags_frag, _ttl, proto, _csum, src, dst = (
        IP4_HDR.unpack_from(view)
    )
    hdr_len = (ver_ihl & 0x0F) * 4
    if hdr_len < IP4_MIN_HDR_LEN:
        raise ValueError(f"IPv4 header length {hdr_len} is below {IP4_MIN_HDR_LEN}")
    if total_len < hdr_len:
        raise ValueError(f"IPv4 total length {total_len} is below its header length {hdr_len}")
    if total_len > have:
        raise ValueError(f"IPv4 packet truncated: total length {total_len} but {have} bytes")
    fragment: int | None = None
    offset = (flags_frag & IP4_FRAG_OFFSET_MASK) * 8
    if offset or flags_frag & IP4_FLAG_MF:
        fragment = offset
    return _transport(
        4,
        ipaddress.IPv4Address(src),
        ipaddress.IPv4Address(dst),
        proto,
        view[hdr_len:total_len],
        total_len,
        fragment,
    )


def _parse6(view: memoryview) -> Summary:
    have = len(view)
    if have < IP6_HDR_LEN:
        raise ValueError(f"IPv6 header truncated: {have} of {IP6_HDR_LEN} bytes")
    _ver_tc_flow, payload_len, proto, _hops, src, dst = IP6_HDR.unpack_from(view)
    total_len = IP6_HDR_LEN + payload_len
    if total_len > have:
        raise ValueError(f"IPv6 packet truncated: payload length {payload_len} but "
                         f"{have - IP6_HDR_LEN} bytes")
    pos = IP6_HDR_LEN
    fragment: int | None = None
    # Each extension header is 8 bytes or more, so the walk ends within the payload.
    while proto in _IP6_LENGTH_RULES or proto == IPPROTO_FRAGMENT:
        if total_len - pos < IP6_EXT_MIN_LEN:
            raise ValueError(f"IPv6 extension header {proto} truncated: "
                             f"{total_len - pos} of {IP6_EXT_MIN_LEN} bytes")
        if proto == IPPROTO_FRAGMENT:
            proto, _reserved, offset_flags, _ident = IP6_FRAG_HDR.unpack_from(view, pos)
            fragment = offset_flags & IP6_FRAG_OFFSET_MASK
            pos += IP6_FRAG_HDR.size
            if fragment:
                break  # the next header's bytes are in the first fragment
            continue
        unit, uncounted = _IP6_LENGTH_RULES[proto]
        next_proto, units = IP6_EXT_HDR.unpack_from(view, pos)
        ext_len = uncounted + units * unit
        if ext_len > total_len - pos:
            raise ValueError(f"IPv6 extension header {proto} of {ext_len} bytes overruns "
                             f"the {total_len - pos} left")
        proto = next_proto
        pos += ext_len
    return _transport(
        6,
        ipaddress.IPv6Address(src),
        ipaddress.IPv6Address(dst),
        proto,
        view[pos:total_len],
        total_len,
        fragment,
    )


def _transport(
    version: int,
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    proto: int,
    l4: memoryview,
    length: int,
    fragment: int | None,
) -> Summary:
    """Fill in the transport fields from *l4*, the bytes after the IP headers."""
    have = len(l4)
    if fragment:  # not the first fragment: no transport header here
        return Summary(version, src, dst, proto, length, have, fragment_offset=fragment)
    if proto == IPPROTO_TCP:
        if have < TCP_MIN_HDR_LEN:
            raise ValueError(f"TCP header truncated: {have} of {TCP_MIN_HDR_LEN} bytes")
        sport, dport, _seq, _ack, data_off, flags, _win, _csum, _urg = TCP_HDR.unpack_from(l4)
        hdr_len = (data_off >> 4) * 4
        if hdr_len < TCP_MIN_HDR_LEN:
            raise ValueError(f"TCP data offset {hdr_len} is below {TCP_MIN_HDR_LEN}")
        if hdr_len > have:
            raise ValueError(f"TCP header of {hdr_len} bytes overruns the {have} there")
        return Summary(version, src, dst, proto, length, have - hdr_len, sport, dport, flags,
                       fragment_offset=fragment)
    if proto == IPPROTO_UDP:
        if have < UDP_HDR_LEN:
            raise ValueError(f"UDP header truncated: {have} of {UDP_HDR_LEN} bytes")
        sport, dport, udp_len, _csum = UDP_HDR.unpack_from(l4)
        if udp_len < UDP_HDR_LEN:
            raise ValueError(f"UDP length {udp_len} is below {UDP_HDR_LEN}")
        if fragment is None and udp_len > have:
            # (a first fragment holds only the start of what the UDP length counts)
            raise ValueError(f"UDP length {udp_len} overruns the {have} bytes there")
        payload = have - UDP_HDR_LEN if fragment is not None else udp_len - UDP_HDR_LEN
        return Summary(version, src, dst, proto, length, payload, sport, dport,
                       fragment_offset=fragment)
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if have < ICMP_HDR_LEN:
            raise ValueError(f"ICMP header truncated: {have} of {ICMP_HDR_LEN} bytes")
        icmp_type, code, _csum = ICMP_HDR.unpack_from(l4)
        return Summary(version, src, dst, proto, length, have, icmp_type=icmp_type,
                       icmp_code=code, fragment_offset=fragment)
    return Summary(version, src, dst, proto, length, have, fragment_offset=fragment)

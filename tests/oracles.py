"""Slow, obvious reference implementations: what the fast code is checked against.

Nothing clever lives here: the Internet checksum is the textbook loop of
RFC 1071 section 4.1, word by word with an end-around carry after every add.
"""

from __future__ import annotations

import struct

_IPPROTO_TCP = 6
_IPPROTO_UDP = 17


def slow_ones_sum(data: bytes, initial: int = 0) -> int:
    """Return the 16-bit one's-complement sum of *data* plus *initial* (<= 0xFFFF)."""
    if len(data) % 2:
        data = data + b"\x00"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def slow_checksum(data: bytes, initial: int = 0) -> int:
    """Return the Internet checksum: the complement of the one's-complement sum."""
    return ~slow_ones_sum(data, initial) & 0xFFFF


def slow_pseudo_header(src: bytes, dst: bytes, proto: int, l4_len: int) -> bytes:
    """Return the pseudo-header bytes of RFC 768 / RFC 9293 (IPv4) or RFC 8200 (IPv6)."""
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, l4_len)
    return src + dst + struct.pack("!I3xB", l4_len, proto)


def slow_l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    """Return the TCP/UDP checksum of *segment* (its checksum field must be zero)."""
    value = slow_checksum(slow_pseudo_header(src, dst, proto, len(segment)) + segment)
    if proto == _IPPROTO_UDP and value == 0:
        return 0xFFFF  # RFC 768: a computed zero is sent as all ones
    return value


def _l4_offsets(pkt: bytes) -> tuple[bytes, bytes, int, int]:
    """Return (src, dst, protocol, transport header offset) of an IPv4/IPv6 packet."""
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0x0F) * 4
        return pkt[12:16], pkt[16:20], pkt[9], ihl
    return pkt[8:24], pkt[24:40], pkt[6], 40


def ip4_header_ok(pkt: bytes) -> bool:
    """Return whether the IPv4 header checksum of *pkt* verifies."""
    ihl = (pkt[0] & 0x0F) * 4
    return slow_ones_sum(pkt[:ihl]) == 0xFFFF


def l4_checksum_ok(pkt: bytes) -> bool:
    """Return whether the TCP or UDP checksum of the IP packet *pkt* verifies."""
    src, dst, proto, at = _l4_offsets(pkt)
    segment = pkt[at:]
    pseudo = slow_pseudo_header(src, dst, proto, len(segment))
    return slow_ones_sum(pseudo + segment) == 0xFFFF


def fix_checksums(pkt: bytes) -> bytes:
    """Return *pkt* with its IPv4 header and TCP/UDP checksums recomputed the slow way."""
    out = bytearray(pkt)
    src, dst, proto, at = _l4_offsets(pkt)
    if pkt[0] >> 4 == 4:
        out[10:12] = b"\x00\x00"
        out[10:12] = struct.pack("!H", slow_checksum(bytes(out[:at])))
    field = at + (16 if proto == _IPPROTO_TCP else 6)
    out[field : field + 2] = b"\x00\x00"
    value = slow_l4_checksum(src, dst, proto, bytes(out[at:]))
    out[field : field + 2] = struct.pack("!H", value)
    return bytes(out)

"""Header layouts of the offload engine: IPv4, IPv6, TCP, UDP (the virtio-net header: vnet.py).

Every name here is shared by ``split`` and ``coalesce`` (the package is
private, so the constants drop the leading underscore that a module-private
name would carry). Offsets are relative to the start of their own header and
follow the RFC section named above each group; multi-byte fields are
big-endian on the wire, except the virtio-net header, which is in host order.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "IP4_CHECKSUM",
    "IP4_DST",
    "IP4_FLAGS_FRAG",
    "IP4_FLAG_DF",
    "IP4_FLAG_MF",
    "IP4_FRAG_OFFSET_MASK",
    "IP4_HDR",
    "IP4_ID",
    "IP4_LEN_ID",
    "IP4_MAX_HDR_LEN",
    "IP4_MIN_HDR_LEN",
    "IP4_PROTOCOL",
    "IP4_SRC",
    "IP4_TOS",
    "IP4_TOTAL_LEN",
    "IP4_TTL",
    "IP4_VER_IHL",
    "IP6_DST",
    "IP6_HDR",
    "IP6_HDR_LEN",
    "IP6_HOP_LIMIT",
    "IP6_NEXT_HEADER",
    "IP6_PAYLOAD_LEN",
    "IP6_SRC",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "IP_MAX_PACKET_LEN",
    "TCP_ACK",
    "TCP_CHECKSUM",
    "TCP_DATA_OFFSET",
    "TCP_DST_PORT",
    "TCP_FLAGS",
    "TCP_FLAG_ACK",
    "TCP_FLAG_CWR",
    "TCP_FLAG_ECE",
    "TCP_FLAG_FIN",
    "TCP_FLAG_PSH",
    "TCP_FLAG_RST",
    "TCP_FLAG_SYN",
    "TCP_FLAG_URG",
    "TCP_HDR",
    "TCP_MAX_HDR_LEN",
    "TCP_MIN_HDR_LEN",
    "TCP_SEQ",
    "TCP_SRC_PORT",
    "TCP_URGENT",
    "TCP_WINDOW",
    "U16",
    "U32",
    "UDP_CHECKSUM",
    "UDP_DST_PORT",
    "UDP_HDR",
    "UDP_HDR_LEN",
    "UDP_LEN",
    "UDP_SRC_PORT",
    "_Malformed",
    "_TooBig",
    "byte_view",
]


class _Malformed(Exception):
    """A packet from the kernel (or a caller) that the offload engine cannot use.

    Private: the device catches it, drops the packet and counts it in
    ``dropped_malformed``; it never reaches a user of tunkit.
    """


class _TooBig(Exception):
    """A packet (or one segment of a super-packet) longer than the room in its buffer.

    Private, a sibling of :class:`_Malformed` rather than a subclass, so that
    the device can count it apart, in ``dropped_too_big``.
    """


# --- Big-endian integers, for single fields ---------------------------------
U16: Final = struct.Struct("!H")
U32: Final = struct.Struct("!I")

# IP protocol numbers (IANA; <netinet/in.h>).
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17

# Longest IP packet that GRO builds or a segment may have: the 16-bit total
# length of IPv4 (the kernel's GRO_LEGACY_MAX_SIZE bounds IPv6 the same way).
IP_MAX_PACKET_LEN: Final = 0xFFFF

# --- IPv4 header, RFC 791 section 3.1 ---------------------------------------
IP4_VER_IHL: Final = 0  # version (high nibble), header length in 32-bit words
IP4_TOS: Final = 1  # type of service / DSCP + ECN (RFC 2474, RFC 3168)
IP4_TOTAL_LEN: Final = 2
IP4_ID: Final = 4
IP4_FLAGS_FRAG: Final = 6  # flags (3 bits) + fragment offset (13 bits)
IP4_TTL: Final = 8
IP4_PROTOCOL: Final = 9
IP4_CHECKSUM: Final = 10
IP4_SRC: Final = 12
IP4_DST: Final = 16
IP4_MIN_HDR_LEN: Final = 20
IP4_MAX_HDR_LEN: Final = 60
IP4_FLAG_DF: Final = 0x4000  # in the 16-bit flags/fragment field
IP4_FLAG_MF: Final = 0x2000
IP4_FRAG_OFFSET_MASK: Final = 0x1FFF
# ver_ihl, tos, total_len, id, flags_frag, ttl, protocol, checksum, src, dst
IP4_HDR: Final = struct.Struct("!BBHHHBBH4s4s")
# total_len and id are adjacent: one call patches both per segment.
IP4_LEN_ID: Final = struct.Struct("!HH")

# --- IPv6 header, RFC 8200 section 3 ----------------------------------------
IP6_PAYLOAD_LEN: Final = 4  # after version (4 bits), traffic class (8), flow label (20)
IP6_NEXT_HEADER: Final = 6
IP6_HOP_LIMIT: Final = 7
IP6_SRC: Final = 8
IP6_DST: Final = 24
IP6_HDR_LEN: Final = 40
# ver_tc_flow, payload_len, next_header, hop_limit, src, dst
IP6_HDR: Final = struct.Struct("!IHBB16s16s")

# --- TCP header, RFC 9293 section 3.1 ---------------------------------------
TCP_SRC_PORT: Final = 0
TCP_DST_PORT: Final = 2
TCP_SEQ: Final = 4
TCP_ACK: Final = 8
TCP_DATA_OFFSET: Final = 12  # data offset in 32-bit words (high nibble)
TCP_FLAGS: Final = 13
TCP_WINDOW: Final = 14
TCP_CHECKSUM: Final = 16
TCP_URGENT: Final = 18
TCP_MIN_HDR_LEN: Final = 20
TCP_MAX_HDR_LEN: Final = 60
# src_port, dst_port, seq, ack, data_offset, flags, window, checksum, urgent
TCP_HDR: Final = struct.Struct("!HHIIBBHHH")
# Flag bits of the TCP_FLAGS byte (RFC 9293 section 3.1; CWR/ECE: RFC 3168).
TCP_FLAG_FIN: Final = 0x01
TCP_FLAG_SYN: Final = 0x02
TCP_FLAG_RST: Final = 0x04
TCP_FLAG_PSH: Final = 0x08
TCP_FLAG_ACK: Final = 0x10
TCP_FLAG_URG: Final = 0x20
TCP_FLAG_ECE: Final = 0x40
TCP_FLAG_CWR: Final = 0x80

# --- UDP header, RFC 768 ----------------------------------------------------
UDP_SRC_PORT: Final = 0
UDP_DST_PORT: Final = 2
UDP_LEN: Final = 4
UDP_CHECKSUM: Final = 6
UDP_HDR_LEN: Final = 8
# src_port, dst_port, length, checksum
UDP_HDR: Final = struct.Struct("!HHHH")


def byte_view(buf: ReadableBuffer | WriteableBuffer, offset: int = 0) -> memoryview:
    """A view of *buf*'s bytes from *offset* on, whatever its item format or shape."""
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view[offset:] if offset else view

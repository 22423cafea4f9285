"""The virtio-net header that leads every packet on a TUN device with ``IFF_VNET_HDR``.

Its layout (``struct virtio_net_hdr``), its constants, and the check of a
kernel (super-)packet before it is handed on whole (``read_gso``/``write_gso``).

``split`` checks every claim of a virtio-net header because it uses them as
offsets. A super-packet passed on whole is not cut here, but whoever gets it
(the other device's kernel, a user) trusts its header as much: this module
checks the same claims without touching the payload, so that garbage is
dropped and counted on the way in instead of handed on.

Pure code (no system calls), like the rest of the offload engine.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final, NamedTuple

from .headers import (
    IP4_MIN_HDR_LEN,
    IP4_PROTOCOL,
    IP4_TOTAL_LEN,
    IP4_VER_IHL,
    IP6_HDR_LEN,
    IP6_NEXT_HEADER,
    IP6_PAYLOAD_LEN,
    IP_MAX_PACKET_LEN,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_CHECKSUM,
    TCP_DATA_OFFSET,
    TCP_MIN_HDR_LEN,
    U16,
    UDP_CHECKSUM,
    UDP_HDR_LEN,
    _Malformed,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "VIRTIO_NET_HDR_F_DATA_VALID",
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_F_RSC_INFO",
    "VIRTIO_NET_HDR_GSO_ECN",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VIRTIO_NET_HDR_GSO_TCPV6",
    "VIRTIO_NET_HDR_GSO_UDP",
    "VIRTIO_NET_HDR_GSO_UDP_L4",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "VnetHdr",
    "gso_segments",
]


# --- struct virtio_net_hdr, <linux/virtio_net.h> ---------------------------
# A TUN device with IFF_VNET_HDR puts this header in front of every packet. On
# TUN it is in host byte order (the legacy, non-"v1" layout; TUNSETVNETLE is
# not used), hence "=" (native order, standard sizes, no padding).
VNET_HDR: Final = struct.Struct("=BBHHHH")
VNET_HDR_LEN: Final = VNET_HDR.size  # 10

# Values of virtio_net_hdr.flags, <linux/virtio_net.h>.
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1  # use csum_start, csum_offset (CHECKSUM_PARTIAL)
VIRTIO_NET_HDR_F_DATA_VALID: Final = 2  # checksum is valid (CHECKSUM_UNNECESSARY)
VIRTIO_NET_HDR_F_RSC_INFO: Final = 4  # rsc info in the csum_ fields (not used on TUN)

# Values of virtio_net_hdr.gso_type, <linux/virtio_net.h>.
VIRTIO_NET_HDR_GSO_NONE: Final = 0  # not a GSO frame
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1  # GSO frame, IPv4 TCP (TSO)
VIRTIO_NET_HDR_GSO_UDP: Final = 3  # GSO frame, IPv4 UDP fragmentation (UFO; unsupported)
VIRTIO_NET_HDR_GSO_TCPV6: Final = 4  # GSO frame, IPv6 TCP
VIRTIO_NET_HDR_GSO_UDP_L4: Final = 5  # GSO frame, IPv4 or IPv6 UDP segmentation (USO)
VIRTIO_NET_HDR_GSO_ECN: Final = 0x80  # bit or-ed into gso_type: the TCP stream uses ECN


class VnetHdr(NamedTuple):
    """One ``struct virtio_net_hdr``: the kernel's description of a (super-)packet.

    ``hdr_len``, ``csum_start`` and ``csum_offset`` are claims of the kernel
    (or of whoever wrote the packet); check them against the packet's length
    before using them as offsets.
    """

    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, offset: int = 0) -> VnetHdr:
        """Read the header stored at ``buf[offset:offset + VNET_HDR_LEN]``.

        Raises:
            _Malformed: fewer than ``VNET_HDR_LEN`` bytes from *offset* on.
        """
        have = len(memoryview(buf)) - offset
        if have < VNET_HDR_LEN:
            raise _Malformed(f"short virtio header: {have} bytes")
        return cls._make(VNET_HDR.unpack_from(buf, offset))

    def pack_into(self, buf: WriteableBuffer, offset: int = 0) -> None:
        """Store the header at ``buf[offset:offset + VNET_HDR_LEN]``."""
        VNET_HDR.pack_into(buf, offset, *self)





# gso_type (ECN bit off) -> (IP version it needs, 0 for either; transport protocol)
_GSO_KINDS: Final = {
    VIRTIO_NET_HDR_GSO_TCPV4: (4, IPPROTO_TCP),
    VIRTIO_NET_HDR_GSO_TCPV6: (6, IPPROTO_TCP),
    VIRTIO_NET_HDR_GSO_UDP_L4: (0, IPPROTO_UDP),
}


def gso_segments(data: memoryview) -> tuple[int, int]:
    """Return (segments, header length) of one kernel packet, or (0, 0) when it is malformed.

    *data* is the 10-byte virtio-net header followed by the IP packet, as one
    read of the device returns it. A ``GSO_NONE`` packet is 1 segment (its
    header length is 0: unknown, not needed); a GSO super-packet is
    ``ceil(payload / gso_size)`` segments (at least 1), each with the
    returned IP + TCP/UDP header length. Checked: the IP version and its
    length field against the packet, the GSO type against the IP version
    and protocol (no IPv6 extension headers, as ``split``), the transport
    header inside the packet, ``gso_size`` non-zero, and a partial checksum's
    ``csum_start``/``csum_offset`` inside the packet (and for GSO, on the
    transport checksum field, as the kernel sets them).
    """
    ip_len = len(data) - VNET_HDR_LEN
    if ip_len < IP4_MIN_HDR_LEN:
        return 0, 0
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(data)
    version = data[VNET_HDR_LEN + IP4_VER_IHL] >> 4
    if version == 4:
        iph_len = (data[VNET_HDR_LEN + IP4_VER_IHL] & 0x0F) * 4
        if iph_len < IP4_MIN_HDR_LEN or iph_len > ip_len:
            return 0, 0
        if U16.unpack_from(data, VNET_HDR_LEN + IP4_TOTAL_LEN)[0] != ip_len:
            return 0, 0
        proto = data[VNET_HDR_LEN + IP4_PROTOCOL]
    elif version == 6:
        iph_len = IP6_HDR_LEN
        if ip_len < IP6_HDR_LEN:
            return 0, 0
        if U16.unpack_from(data, VNET_HDR_LEN + IP6_PAYLOAD_LEN)[0] + IP6_HDR_LEN != ip_len:
            return 0, 0  # a jumbogram (payload length 0) included: not supported
        proto = data[VNET_HDR_LEN + IP6_NEXT_HEADER]
    else:
        return 0, 0
    needs_csum = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
    if needs_csum and csum_start + csum_offset + 2 > ip_len:
        return 0, 0
    kind = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if kind == VIRTIO_NET_HDR_GSO_NONE:
        return 1, 0
    need = _GSO_KINDS.get(kind)
    if need is None or gso_size == 0:
        return 0, 0
    need_version, need_proto = need
    if proto != need_proto or (need_version and need_version != version):
        return 0, 0
    if proto == IPPROTO_TCP:
        if ip_len < iph_len + TCP_MIN_HDR_LEN:
            return 0, 0
        l4_hdr_len = (data[VNET_HDR_LEN + iph_len + TCP_DATA_OFFSET] >> 4) * 4
        if l4_hdr_len < TCP_MIN_HDR_LEN:
            return 0, 0
        csum_field = TCP_CHECKSUM
    else:
        l4_hdr_len = UDP_HDR_LEN
        csum_field = UDP_CHECKSUM
    hdr_len = iph_len + l4_hdr_len
    if hdr_len > ip_len or hdr_len + gso_size > IP_MAX_PACKET_LEN:
        return 0, 0
    if needs_csum and (csum_start != iph_len or csum_offset != csum_field):
        return 0, 0
    payload_len = ip_len - hdr_len
    return max(1, -(-payload_len // gso_size)), hdr_len

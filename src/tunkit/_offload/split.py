"""Read side of the offloads: one kernel (super-)packet in, finished IP packets out.

With ``IFF_VNET_HDR`` every read from a TUN descriptor starts with a
``struct virtio_net_hdr``. A ``GSO_NONE`` packet may still need its transport
checksum completed (``VIRTIO_NET_HDR_F_NEEDS_CSUM``, the skb's
CHECKSUM_PARTIAL); a TCP or UDP GSO super-packet (up to 64 KB of one flow)
is cut into segments of ``gso_size`` payload bytes, each with the headers
that the kernel's own software GSO (``tcp_gso_segment``,
``__udp_gso_segment``, ``inet_gso_segment``) would give it.

Nothing the kernel says is trusted: ``hdr_len``, ``csum_start``,
``csum_offset``, the IPv4 IHL and the TCP data offset are checked against the
packet's length. ``hdr_len`` is not used at all: on the forwarding path the
kernel may set it to the whole first segment. The header length comes from
the packet itself: the IP header's (IHL, or 40 for IPv6, which may carry no
extension header) plus the transport header's (the TCP data offset, or 8 for
UDP). With ``VIRTIO_NET_HDR_F_NEEDS_CSUM``, ``csum_start`` must equal that IP
header length and ``csum_offset`` name the transport checksum field; a
packet whose header says otherwise is malformed.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, Final

from .._errors import TooManySegmentsError
from .checksum import fold, ones_sum, pseudo_sum
from .headers import (
    IP4_CHECKSUM,
    IP4_DST,
    IP4_ID,
    IP4_LEN_ID,
    IP4_MIN_HDR_LEN,
    IP4_PROTOCOL,
    IP4_SRC,
    IP4_TOTAL_LEN,
    IP4_VER_IHL,
    IP6_DST,
    IP6_HDR_LEN,
    IP6_NEXT_HEADER,
    IP6_PAYLOAD_LEN,
    IP6_SRC,
    IP_MAX_PACKET_LEN,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_CHECKSUM,
    TCP_DATA_OFFSET,
    TCP_FLAG_CWR,
    TCP_FLAG_FIN,
    TCP_FLAG_PSH,
    TCP_FLAGS,
    TCP_MIN_HDR_LEN,
    TCP_SEQ,
    U16,
    U32,
    UDP_CHECKSUM,
    UDP_HDR_LEN,
    UDP_LEN,
    _Malformed,
    _TooBig,
    byte_view,
)
from .vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR_LEN,
    VnetHdr,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["split"]

# Flags that tcp_gso_segment keeps on the last segment only, and the first only.
_TCP_LAST_ONLY: Final = TCP_FLAG_FIN | TCP_FLAG_PSH
_TCP_FIRST_ONLY: Final = TCP_FLAG_CWR


def split(
    pkt: memoryview,
    out_bufs: Sequence[WriteableBuffer],
    sizes: MutableSequence[int],
    offset: int,
) -> int:
    """Turn one kernel read into finished IP packets; return how many were stored.

    *pkt* is what one ``read``/``readv`` of the TUN descriptor returned: the
    10-byte virtio-net header, then the IP packet. Packet ``i`` is stored at
    ``out_bufs[i][offset:offset + sizes[i]]``. A ``GSO_NONE`` packet is copied
    through (1 packet), its checksum completed if the header asks for it; a
    TCP or UDP GSO super-packet becomes one packet per ``gso_size`` bytes of
    payload (the last may be shorter). *pkt* itself is never modified.

    Nothing is stored unless everything fits: the checks all run before the
    first byte is copied, so on an exception ``out_bufs`` and ``sizes`` are
    as they were.

    Raises:
        _Malformed: the header or the packet is inconsistent (bad lengths,
            unknown GSO type, IP version not matching it, ...). Drop the
            packet and count it in ``dropped_malformed``.
        _TooBig: a packet or segment is longer than the room
            ``len(out_bufs[i]) - offset``. Drop it, count ``dropped_too_big``.
        TooManySegmentsError: the super-packet has more segments than
            ``min(len(out_bufs), len(sizes))``; retryable with more buffers.
    """
    hdr = VnetHdr.unpack_from(pkt)
    ip = pkt[VNET_HDR_LEN:]
    gso_type = hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        return _copy_through(hdr, ip, out_bufs, sizes, offset)
    if gso_type in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6):
        return _split_gso(hdr, gso_type, IPPROTO_TCP, ip, out_bufs, sizes, offset)
    if gso_type == VIRTIO_NET_HDR_GSO_UDP_L4:
        return _split_gso(hdr, gso_type, IPPROTO_UDP, ip, out_bufs, sizes, offset)
    raise _Malformed(f"unsupported virtio gso_type {hdr.gso_type:#x}")


def _copy_through(
    hdr: VnetHdr,
    ip: memoryview,
    out_bufs: Sequence[WriteableBuffer],
    sizes: MutableSequence[int],
    offset: int,
) -> int:
    """Store a GSO_NONE packet, completing a partial checksum (skb_checksum_help)."""
    ip_len = len(ip)
    if ip_len == 0:
        raise _Malformed("empty packet after the virtio header")
    if not out_bufs or not sizes:
        raise TooManySegmentsError("a packet needs 1 buffer, 0 given")
    out = byte_view(out_bufs[0], offset)
    if ip_len > len(out):
        raise _TooBig(f"packet of {ip_len} bytes does not fit a buffer of {len(out)} bytes")
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        start = hdr.csum_start
        at = start + hdr.csum_offset
        if start >= ip_len or at + 2 > ip_len:
            raise _Malformed(
                f"csum_start {start} + csum_offset {hdr.csum_offset} is beyond "
                f"the packet of {ip_len} bytes"
            )
        out[:ip_len] = ip
        # The field holds the pseudo-header sum (CHECKSUM_PARTIAL); summing the
        # region with the field in it adds that in, as skb_checksum_help does,
        # and like it a result of 0 is sent as 0xFFFF (CSUM_MANGLED_0).
        value = ~ones_sum(out[start:ip_len]) & 0xFFFF
        U16.pack_into(out, at, value or 0xFFFF)
    else:
        out[:ip_len] = ip
    sizes[0] = ip_len
    return 1


def _split_gso(
    hdr: VnetHdr,
    gso_type: int,
    proto: int,
    ip: memoryview,
    out_bufs: Sequence[WriteableBuffer],
    sizes: MutableSequence[int],
    offset: int,
) -> int:
    """Cut a TCP (TSO) or UDP (USO) super-packet into segments; see :func:`split`."""
    ip_len = len(ip)
    if ip_len < IP4_MIN_HDR_LEN:
        raise _Malformed(f"super-packet of {ip_len} bytes is shorter than an IP header")
    version = ip[IP4_VER_IHL] >> 4
    # --- IP header length, from the packet; csum_start must agree with it ---
    if version == 4:
        if gso_type == VIRTIO_NET_HDR_GSO_TCPV6:
            raise _Malformed(f"gso_type {hdr.gso_type:#x} (TCPv6) on an IPv4 packet")
        iph_len = (ip[IP4_VER_IHL] & 0x0F) * 4
        if iph_len < IP4_MIN_HDR_LEN:
            raise _Malformed(f"IPv4 header length {iph_len} is below {IP4_MIN_HDR_LEN}")
        if ip[IP4_PROTOCOL] != proto:
            raise _Malformed(
                f"IPv4 protocol {ip[IP4_PROTOCOL]} in a GSO packet of protocol {proto}"
            )
        addrs_at, addrs_end = IP4_SRC, IP4_DST + 4
    elif version == 6:
        if gso_type == VIRTIO_NET_HDR_GSO_TCPV4:
            raise _Malformed(f"gso_type {hdr.gso_type:#x} (TCPv4) on an IPv6 packet")
        if ip_len < IP6_HDR_LEN:
            raise _Malformed(f"IPv6 super-packet of {ip_len} bytes is shorter than its header")
        # Extension headers would move the transport header (and a routing
        # header the pseudo-header's destination): not supported, dropped.
        if ip[IP6_NEXT_HEADER] != proto:
            raise _Malformed(
                f"IPv6 next header {ip[IP6_NEXT_HEADER]} in a GSO packet of protocol {proto}"
            )
        iph_len = IP6_HDR_LEN
        addrs_at, addrs_end = IP6_SRC, IP6_DST + 16
    else:
        raise _Malformed(f"IP version {version} in a GSO packet")
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        csum_field = TCP_CHECKSUM if proto == IPPROTO_TCP else UDP_CHECKSUM
        if hdr.csum_start != iph_len or hdr.csum_offset != csum_field:
            raise _Malformed(
                f"csum_start {hdr.csum_start}/csum_offset {hdr.csum_offset} do not match "
                f"the IP header length {iph_len} and checksum field {csum_field}"
            )
    # --- transport header length ---
    if proto == IPPROTO_TCP:
        if ip_len < iph_len + TCP_MIN_HDR_LEN:
            raise _Malformed(f"super-packet of {ip_len} bytes is shorter than its TCP header")
        l4_hdr_len = (ip[iph_len + TCP_DATA_OFFSET] >> 4) * 4
        if l4_hdr_len < TCP_MIN_HDR_LEN:
            raise _Malformed(f"TCP data offset {l4_hdr_len} is below {TCP_MIN_HDR_LEN}")
        csum_at = iph_len + TCP_CHECKSUM
    else:
        l4_hdr_len = UDP_HDR_LEN
        csum_at = iph_len + UDP_CHECKSUM
    hdr_len = iph_len + l4_hdr_len
    if ip_len < hdr_len:
        raise _Malformed(f"super-packet of {ip_len} bytes is shorter than its headers ({hdr_len})")
    gso_size = hdr.gso_size
    if gso_size == 0:
        raise _Malformed("gso_size 0 in a GSO packet")
    if hdr_len + gso_size > IP_MAX_PACKET_LEN:
        raise _Malformed(f"segments of {hdr_len} + {gso_size} bytes exceed {IP_MAX_PACKET_LEN}")
    payload_len = ip_len - hdr_len
    # A GSO packet without payload is passed on as one (header-only) segment.
    count = max(1, -(-payload_len // gso_size))
    have = min(len(out_bufs), len(sizes))
    if count > have:
        raise TooManySegmentsError(f"super-packet of {count} segments does not fit {have} buffers")
    outs = [byte_view(out_bufs[i], offset) for i in range(count)]
    last_len = hdr_len + payload_len - (count - 1) * gso_size
    for i, out in enumerate(outs):
        seg_len = hdr_len + gso_size if i < count - 1 else last_len
        if seg_len > len(out):
            raise _TooBig(
                f"segment {i} of {seg_len} bytes does not fit a buffer of {len(out)} bytes"
            )

    # --- the template: headers of every segment, with the varying fields zero ---
    template = bytearray(ip[:hdr_len])
    U16.pack_into(template, csum_at, 0)
    addr_sum = pseudo_sum(ip[addrs_at:addrs_end], proto, 0)
    first_id = ip_base_sum = first_seq = flags = middle_flags = 0
    if version == 4:
        first_id = U16.unpack_from(template, IP4_ID)[0]
        IP4_LEN_ID.pack_into(template, IP4_TOTAL_LEN, 0, 0)
        U16.pack_into(template, IP4_CHECKSUM, 0)
        # total length and id are added per segment (RFC 1071 partial sums)
        ip_base_sum = ones_sum(memoryview(template)[:iph_len])
    if proto == IPPROTO_TCP:
        first_seq = U32.unpack_from(template, iph_len + TCP_SEQ)[0]
        flags = template[iph_len + TCP_FLAGS]
        middle_flags = flags & ~(_TCP_LAST_ONLY | _TCP_FIRST_ONLY)

    data_at = hdr_len
    for i, out in enumerate(outs):
        seg_len = hdr_len + gso_size if i < count - 1 else last_len
        out[:hdr_len] = template
        out[hdr_len:seg_len] = ip[data_at : data_at + seg_len - hdr_len]
        data_at += gso_size
        if version == 4:
            seg_id = (first_id + i) & 0xFFFF
            IP4_LEN_ID.pack_into(out, IP4_TOTAL_LEN, seg_len, seg_id)
            U16.pack_into(out, IP4_CHECKSUM, ~fold(ip_base_sum + seg_len + seg_id) & 0xFFFF)
        else:
            U16.pack_into(out, IP6_PAYLOAD_LEN, seg_len - IP6_HDR_LEN)
        l4_len = seg_len - iph_len
        if proto == IPPROTO_TCP:
            U32.pack_into(out, iph_len + TCP_SEQ, (first_seq + i * gso_size) & 0xFFFFFFFF)
            seg_flags = middle_flags
            if i == 0:
                seg_flags |= flags & _TCP_FIRST_ONLY
            if i == count - 1:
                seg_flags |= flags & _TCP_LAST_ONLY
            out[iph_len + TCP_FLAGS] = seg_flags
            value = ~ones_sum(out[iph_len:seg_len], addr_sum + l4_len) & 0xFFFF
        else:
            U16.pack_into(out, iph_len + UDP_LEN, l4_len)
            # RFC 768: a computed 0 is sent as 0xFFFF; 0 would mean "no
            # checksum" (forbidden for IPv6, RFC 8200 section 8.1).
            value = (~ones_sum(out[iph_len:seg_len], addr_sum + l4_len) & 0xFFFF) or 0xFFFF
        U16.pack_into(out, csum_at, value)
        sizes[i] = seg_len
    return count

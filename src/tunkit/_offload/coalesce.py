"""Write side of the offloads (GRO): a batch of IP packets in, kernel writes out.

The TCP segments of one flow that follow each other in sequence, and the UDP
datagrams of one flow of equal size, become one GSO super-packet each: a
virtio-net header with ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` and a GSO type, the
first packet's headers patched for the whole (lengths, IPv4 header checksum,
the transport checksum field holding the pseudo-header sum, as a
CHECKSUM_PARTIAL skb has it), then the payload of every packet. The kernel
segments it again where it must, exactly as it would its own GRO packet.

Few copies: a write is a list of ``memoryview`` pieces for ``os.writev``. Only
the virtio header and the patched headers (at most 110 bytes) live in the
:class:`Coalescer`'s scratch buffer; every payload is a view of the caller's
buffer. A packet that is not coalesced is written whole behind an all-zero
virtio header (``GSO_NONE``, no checksum work asked of the kernel).

What merges is what Linux GRO merges (``tcp_gro_receive``,
``udp_gro_receive_segment``, ``inet_gro_receive``, ``ipv6_gro_receive``),
checked here packet by packet:

- one flow: same IP version, addresses, protocol and ports;
- IP headers equal except length, id and checksum: IPv4 without options
  (IHL 5), same TOS, TTL and DF, not a fragment, valid header checksum, ids
  counting up by one (or all equal with DF set); IPv6 with no extension
  header, same traffic class, flow label and hop limit;
- TCP: same ACK number, data offset, window, urgent pointer (stricter than
  Linux, so that splitting gives every segment back), option bytes and flags, except
  that CWR may be set on the first segment only and PSH or FIN on the last
  only; never SYN, RST or URG; sequence numbers contiguous; payload not empty;
- UDP: length field right, checksum non-zero, payload not empty;
- every packet's transport checksum valid (the kernel will recompute it, so
  a corrupt segment must not be merged and so "repaired");
- all payloads ``gso_size`` long (that of the first) except the last, which
  may be shorter; at most 65535 bytes of IP packet; at most 64 UDP
  datagrams (the kernel's ``UDP_MAX_SEGMENTS``).

Order: writes come out in the order of their first packet in the batch. A
write holds packets that are consecutive within their flow (a flow's packet
that cannot join its open super-packet closes it), so the order of the
packets of every flow is kept; packets of different flows may interleave
differently than in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NamedTuple, final

from .checksum import fold, ones_sum, pseudo_sum, update16
from .headers import (
    IP4_CHECKSUM,
    IP4_FLAG_DF,
    IP4_FLAG_MF,
    IP4_FRAG_OFFSET_MASK,
    IP4_HDR,
    IP4_MIN_HDR_LEN,
    IP4_SRC,
    IP4_TOTAL_LEN,
    IP6_HDR,
    IP6_HDR_LEN,
    IP6_PAYLOAD_LEN,
    IP6_SRC,
    IP_MAX_PACKET_LEN,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_CHECKSUM,
    TCP_FLAG_CWR,
    TCP_FLAG_FIN,
    TCP_FLAG_PSH,
    TCP_FLAG_RST,
    TCP_FLAG_SYN,
    TCP_FLAG_URG,
    TCP_FLAGS,
    TCP_HDR,
    TCP_MIN_HDR_LEN,
    U16,
    UDP_CHECKSUM,
    UDP_HDR,
    UDP_HDR_LEN,
    UDP_LEN,
    byte_view,
)
from .vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR_LEN,
    VnetHdr,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["ZERO_VNET_HDR", "Coalescer", "Write"]

# The header of a packet written as it is: GSO_NONE, no checksum to complete.
ZERO_VNET_HDR: Final = memoryview(bytes(VNET_HDR_LEN))

# Scratch room per super-packet: virtio header + IPv4 (no options) or IPv6
# header + the longest TCP header.
_SLOT_LEN: Final = VNET_HDR_LEN + IP6_HDR_LEN + 60
# UDP_MAX_SEGMENTS of <net/udp.h> (64 before Linux 6.9): virtio_net_hdr_to_skb
# refuses a USO packet of more datagrams.
_MAX_UDP_SEGMENTS: Final = 64
# IOV_MAX is 1024: two pieces of header, then one per packet.
_MAX_TCP_SEGMENTS: Final = 1024 - 2

# Flags that end a TCP super-packet (allowed on its last segment only) and
# that start one (first segment only); SYN, RST and URG never merge.
_TCP_LAST_ONLY: Final = TCP_FLAG_FIN | TCP_FLAG_PSH
_TCP_FIRST_ONLY: Final = TCP_FLAG_CWR
_TCP_NEVER: Final = TCP_FLAG_SYN | TCP_FLAG_RST | TCP_FLAG_URG
_IP4_FRAGMENT: Final = IP4_FLAG_MF | IP4_FRAG_OFFSET_MASK


class Write(NamedTuple):
    """One kernel write: the pieces to hand to ``os.writev`` and what they carry.

    Attributes:
        iov: the pieces, in order; ``iov[0]`` is the 10-byte virtio-net
            header. Views of the caller's buffers and of the coalescer's
            scratch buffer: valid until the next ``coalesce`` call.
        packets: the input packets this write carries (views, offset
            applied), in order; to write them one by one instead, send
            ``[ZERO_VNET_HDR, packet]`` for each (see :meth:`one_by_one`).
        first: index in the batch of ``packets[0]``.
        gso: whether this is a coalesced super-packet (``len(packets) > 1``);
            a kernel may refuse one with ``EINVAL`` (no USO, say).
        indices: the index in the batch of each packet of :attr:`packets`,
            in order (ascending): what a device's ``write`` needs to say
            which packets of the batch went out when it stops after a write.
    """

    iov: list[memoryview]
    packets: list[memoryview]
    first: int
    gso: bool
    indices: tuple[int, ...]

    def one_by_one(self) -> list[list[memoryview]]:
        """Return the iovecs that send this write's packets one by one (GSO_NONE)."""
        return [[ZERO_VNET_HDR, pkt] for pkt in self.packets]


class _Candidate(NamedTuple):
    """What a packet that may merge needs to be compared with a super-packet."""

    iph_len: int
    hdr_len: int  # IP + TCP/UDP header
    sig: tuple[object, ...]  # fields that must be equal all along the flow
    seq: int  # TCP sequence number (0 for UDP)
    ip_id: int  # IPv4 id (0 for IPv6)
    flags: int  # TCP flags (0 for UDP)
    payload_len: int


# A flow: protocol, source and destination address (4 or 16 bytes, so the
# versions cannot collide), source and destination port.
_FlowKey = tuple[int, bytes, bytes, int, int]


@final
class _Group:
    """A super-packet being built: its first packet and the payloads after it."""

    __slots__ = (
        "addrs_at",
        "closed",
        "first",
        "first_id",
        "gso_size",
        "head",
        "head_cand",
        "id_step",
        "indices",
        "is_v6",
        "last_flags",
        "max_segments",
        "next_seq",
        "packets",
        "payloads",
        "proto",
        "total_len",
        "validated",
    )

    def __init__(
        self, index: int, pkt: memoryview, cand: _Candidate, proto: int, is_v6: bool
    ) -> None:
        self.first = index
        self.head = pkt
        self.head_cand = cand
        self.proto = proto
        self.is_v6 = is_v6
        self.addrs_at = IP6_SRC if is_v6 else IP4_SRC
        self.indices = [index]
        self.packets = [pkt]
        self.payloads: list[memoryview] = []
        self.gso_size = cand.payload_len
        self.total_len = len(pkt)
        self.next_seq = (cand.seq + cand.payload_len) & 0xFFFFFFFF
        self.first_id = cand.ip_id
        self.id_step: int | None = None  # IPv4 ids: 1 counting up, 0 fixed (DF)
        self.last_flags = cand.flags
        self.max_segments = _MAX_UDP_SEGMENTS if proto == IPPROTO_UDP else _MAX_TCP_SEGMENTS
        # A first packet with PSH or FIN ends its super-packet at once.
        self.closed = bool(cand.flags & _TCP_LAST_ONLY)
        self.validated = False  # checksums of the head checked (lazily, on a merge)

    def accepts(self, cand: _Candidate, df: bool) -> bool:
        """Return whether *cand* may follow the packets so far (checksums aside)."""
        if cand.sig != self.head_cand.sig or cand.payload_len > self.gso_size:
            return False
        if cand.flags & _TCP_FIRST_ONLY:
            return False  # CWR may start a super-packet, not join one
        if self.total_len + cand.payload_len > IP_MAX_PACKET_LEN:
            return False
        if len(self.indices) >= self.max_segments:
            return False
        if self.proto == IPPROTO_TCP and cand.seq != self.next_seq:
            return False
        if not self.is_v6:
            counted = (self.first_id + len(self.indices)) & 0xFFFF
            if self.id_step is None:
                if cand.ip_id == counted:
                    self.id_step = 1
                elif df and cand.ip_id == self.first_id:
                    self.id_step = 0
                else:
                    return False
            elif cand.ip_id != (counted if self.id_step else self.first_id):
                return False
        return True

    def append(self, index: int, pkt: memoryview, cand: _Candidate) -> None:
        """Add *pkt* (accepted and valid) as the last segment."""
        self.indices.append(index)
        self.packets.append(pkt)
        if not self.payloads:
            self.payloads.append(self.head[self.head_cand.hdr_len :])
        self.payloads.append(pkt[cand.hdr_len :])
        self.total_len += cand.payload_len
        self.next_seq = (self.next_seq + cand.payload_len) & 0xFFFFFFFF
        self.last_flags = cand.flags
        if cand.payload_len < self.gso_size or cand.flags & _TCP_LAST_ONLY:
            self.closed = True


def _valid(pkt: memoryview, cand: _Candidate, proto: int, is_v6: bool) -> bool:
    """Return whether the IPv4 header and transport checksums of *pkt* verify."""
    iph_len = cand.iph_len
    if is_v6:
        addrs = pkt[IP6_SRC : IP6_SRC + 32]
    else:
        if ones_sum(pkt[:iph_len]) != 0xFFFF:
            return False
        addrs = pkt[IP4_SRC : IP4_SRC + 8]
    l4_len = len(pkt) - iph_len
    return ones_sum(pkt[iph_len:], pseudo_sum(addrs, proto, l4_len)) == 0xFFFF


class Coalescer:  # not final: _impl.NativeCoalescer plans the same writes in C
    """Turn batches of IP packets into kernel writes for a TUN device with a virtio header.

    One per device, used under the device's write lock: it owns a scratch
    buffer that each :meth:`coalesce` call reuses, so the writes of a call
    must be done before the next call. *tcp* and *udp* switch the coalescing
    of each protocol (a device turns *udp* off when the kernel lacks USO); as
    attributes they may change between calls.
    """

    __slots__ = ("_scratch", "tcp", "udp")

    def __init__(self, *, tcp: bool = True, udp: bool = True) -> None:
        self.tcp = tcp
        self.udp = udp
        self._scratch = bytearray(_SLOT_LEN * 32)

    def __repr__(self) -> str:
        return f"Coalescer(tcp={self.tcp}, udp={self.udp})"

    def coalesce(self, bufs: Sequence[ReadableBuffer], offset: int) -> list[Write]:
        """Plan the kernel writes that send ``bufs[i][offset:]`` for every *i*.

        Returns the writes in the order to make them (see the module's
        docstring for the order and what merges). The writes cover every
        packet exactly once; packets that do not merge (anything that is not
        a well-formed TCP or UDP packet included) come out alone, unchanged.
        Never raises for bad packet bytes: they are passed on for the kernel
        to judge. The caller's buffers are not modified.
        """
        entries: list[_Group | int] = []  # a group, or the index of a lone packet
        flows: dict[_FlowKey, _Group] = {}  # the open super-packet of each flow
        for index, buf in enumerate(bufs):
            pkt = byte_view(buf, offset)
            parsed = self._parse(pkt)
            if parsed is None:
                entries.append(index)
                continue
            key, cand, proto, is_v6, df = parsed
            if cand is None:
                # Same flow, but it cannot merge: it closes the flow's open
                # super-packet, whose packets all come before it.
                flows.pop(key, None)
                entries.append(index)
                continue
            group = flows.get(key)
            if group is not None and group.accepts(cand, df):
                if not group.validated:
                    group.validated = _valid(group.head, group.head_cand, proto, is_v6)
                if group.validated:  # else the head stays alone; pkt starts anew
                    if not _valid(pkt, cand, proto, is_v6):
                        flows.pop(key)
                        entries.append(index)
                        continue
                    group.append(index, pkt, cand)
                    if group.closed:
                        del flows[key]
                    continue
            group = _Group(index, pkt, cand, proto, is_v6)
            if group.closed:
                flows.pop(key, None)
                entries.append(index)
            else:
                flows[key] = group
                entries.append(group)
        return self._writes(entries, bufs, offset)

    def _parse(self, pkt: memoryview) -> tuple[_FlowKey, _Candidate | None, int, bool, bool] | None:
        """Return (flow, candidate or None, protocol, is IPv6, DF) of *pkt*, or None.

        None: not TCP or UDP, or not parseable, or its protocol's coalescing
        is off: it neither merges nor closes a super-packet. A flow without a
        candidate: the packet belongs to a flow but cannot merge.
        """
        n = len(pkt)
        if n < IP4_MIN_HDR_LEN:
            return None
        version = pkt[0] >> 4
        if version == 4:
            vihl, tos, total_len, ip_id, frag, ttl, proto, _, src, dst = IP4_HDR.unpack_from(pkt)
            iph_len = (vihl & 0x0F) * 4
            if iph_len < IP4_MIN_HDR_LEN:
                return None
            is_v6 = False
            df = bool(frag & IP4_FLAG_DF)
            mergeable = iph_len == IP4_MIN_HDR_LEN and total_len == n and not frag & _IP4_FRAGMENT
            ip_sig: tuple[int, ...] = (tos, frag, ttl)
        elif version == 6:
            if n < IP6_HDR_LEN:
                return None
            first_word, payload_len, proto, hop, src, dst = IP6_HDR.unpack_from(pkt)
            iph_len = IP6_HDR_LEN
            ip_id = 0
            is_v6 = df = True
            mergeable = payload_len == n - IP6_HDR_LEN
            ip_sig = (first_word, hop)
        else:
            return None
        if proto == IPPROTO_TCP:
            if not self.tcp:
                return None
            if n < iph_len + TCP_MIN_HDR_LEN:
                return _key_only(pkt, iph_len, proto, is_v6) if n >= iph_len + 4 else None
            sport, dport, seq, ack, doff, flags, window, _, urgent = TCP_HDR.unpack_from(
                pkt, iph_len
            )
            key: _FlowKey = (proto, src, dst, sport, dport)
            tcph_len = (doff >> 4) * 4
            hdr_len = iph_len + tcph_len
            if not mergeable or tcph_len < TCP_MIN_HDR_LEN or n <= hdr_len or flags & _TCP_NEVER:
                return key, None, proto, is_v6, df
            sig = (
                ip_sig,
                ack,
                doff,
                flags & ~(_TCP_LAST_ONLY | _TCP_FIRST_ONLY),
                window,
                # Linux ignores the urgent pointer without URG; equal, it
                # survives a split of the super-packet unchanged.
                urgent,
                bytes(pkt[iph_len + TCP_MIN_HDR_LEN : hdr_len]),
            )
            cand = _Candidate(iph_len, hdr_len, sig, seq, ip_id, flags, n - hdr_len)
            return key, cand, proto, is_v6, df
        if proto == IPPROTO_UDP:
            if not self.udp:
                return None
            if n < iph_len + UDP_HDR_LEN:
                return _key_only(pkt, iph_len, proto, is_v6) if n >= iph_len + 4 else None
            sport, dport, udp_len, udp_csum = UDP_HDR.unpack_from(pkt, iph_len)
            key = (proto, src, dst, sport, dport)
            hdr_len = iph_len + UDP_HDR_LEN
            # A zero checksum means "none" (IPv4) or is invalid (IPv6): merging
            # would make the kernel add one, so the packet goes as it is.
            if not mergeable or udp_len != n - iph_len or n <= hdr_len or udp_csum == 0:
                return key, None, proto, is_v6, df
            cand = _Candidate(iph_len, hdr_len, (ip_sig,), 0, ip_id, 0, n - hdr_len)
            return key, cand, proto, is_v6, df
        return None

    def _writes(
        self, entries: list[_Group | int], bufs: Sequence[ReadableBuffer], offset: int
    ) -> list[Write]:
        """Build the writes of *entries*, patching super-packet headers into scratch."""
        n_gso = sum(1 for e in entries if isinstance(e, _Group) and len(e.indices) > 1)
        if len(self._scratch) < n_gso * _SLOT_LEN:
            # A new buffer, not a resize: views of the old one may still exist.
            self._scratch = bytearray(n_gso * _SLOT_LEN * 2)
        scratch = memoryview(self._scratch)
        slot = 0
        writes: list[Write] = []
        for entry in entries:
            if isinstance(entry, int) or len(entry.indices) == 1:
                if isinstance(entry, int):
                    first = entry
                    pkt = byte_view(bufs[entry], offset)
                else:
                    first, pkt = entry.first, entry.head
                writes.append(Write([ZERO_VNET_HDR, pkt], [pkt], first, False, (first,)))
            else:
                iov = _patch(entry, scratch[slot * _SLOT_LEN : (slot + 1) * _SLOT_LEN])
                slot += 1
                indices = tuple(entry.indices)
                writes.append(Write(iov, entry.packets, entry.first, True, indices))
        return writes


def _key_only(
    pkt: memoryview, iph_len: int, proto: int, is_v6: bool
) -> tuple[_FlowKey, None, int, bool, bool]:
    """Return the flow of a TCP/UDP packet too short to merge (it only closes its flow)."""
    if is_v6:
        src, dst = bytes(pkt[IP6_SRC : IP6_SRC + 16]), bytes(pkt[IP6_SRC + 16 : IP6_SRC + 32])
    else:
        src, dst = bytes(pkt[IP4_SRC : IP4_SRC + 4]), bytes(pkt[IP4_SRC + 4 : IP4_SRC + 8])
    sport, dport = U16.unpack_from(pkt, iph_len)[0], U16.unpack_from(pkt, iph_len + 2)[0]
    return (proto, src, dst, sport, dport), None, proto, is_v6, False


def _patch(group: _Group, slot: memoryview) -> list[memoryview]:
    """Write the virtio header and patched headers of *group* into *slot*; return its iov."""
    cand = group.head_cand
    iph_len, hdr_len = cand.iph_len, cand.hdr_len
    head = group.head
    vnet = slot[:VNET_HDR_LEN]
    hdrs = slot[VNET_HDR_LEN : VNET_HDR_LEN + hdr_len]
    hdrs[:] = head[:hdr_len]
    total_len = group.total_len
    l4_len = total_len - iph_len
    if group.is_v6:
        U16.pack_into(hdrs, IP6_PAYLOAD_LEN, l4_len)
    else:
        # The head's header checksum was verified: update it (RFC 1624).
        old_len = len(head)
        old_csum = U16.unpack_from(head, IP4_CHECKSUM)[0]
        U16.pack_into(hdrs, IP4_TOTAL_LEN, total_len)
        U16.pack_into(hdrs, IP4_CHECKSUM, update16(old_csum, old_len, total_len))
    # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, not its
    # complement; the kernel adds the header and payload (csum_start on).
    addrs = head[group.addrs_at : group.addrs_at + (32 if group.is_v6 else 8)]
    partial = fold(pseudo_sum(addrs, group.proto, l4_len))
    if group.proto == IPPROTO_TCP:
        flags = cand.flags | (group.last_flags & _TCP_LAST_ONLY)
        hdrs[iph_len + TCP_FLAGS] = flags
        U16.pack_into(hdrs, iph_len + TCP_CHECKSUM, partial)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if group.is_v6 else VIRTIO_NET_HDR_GSO_TCPV4
        if flags & TCP_FLAG_CWR:
            gso_type |= VIRTIO_NET_HDR_GSO_ECN  # SKB_GSO_TCP_ECN: CWR on the first only
        csum_offset = TCP_CHECKSUM
    else:
        U16.pack_into(hdrs, iph_len + UDP_LEN, l4_len)
        U16.pack_into(hdrs, iph_len + UDP_CHECKSUM, partial)
        gso_type = VIRTIO_NET_HDR_GSO_UDP_L4
        csum_offset = UDP_CHECKSUM
    VnetHdr(
        VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, group.gso_size, iph_len, csum_offset
    ).pack_into(vnet)
    return [vnet, hdrs, *group.payloads]

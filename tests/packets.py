"""Hand-built test packets: TCP/UDP over IPv4/IPv6, GSO super-packets, virtio headers.

Built with ``struct`` and the slow checksums of ``tests/oracles.py`` only, so
that they are independent of the offload engine under test. ``Flow.segments``
states what splitting a super-packet must give, from the kernel's rules
(tcp_gso_segment, __udp_gso_segment, inet_gso_segment) rather than from
tunkit's code.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, replace

from oracles import slow_checksum, slow_l4_checksum, slow_ones_sum, slow_pseudo_header

TCP = 6
UDP = 17

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# <linux/virtio_net.h>
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80
VNET_LEN = 10

# TCP options of a Linux data segment: NOP, NOP, timestamps (RFC 7323).
TIMESTAMPS = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)


def vnet(
    flags: int = 0,
    gso_type: int = GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    """Return a struct virtio_net_hdr in host byte order."""
    return struct.pack("=BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def payload_bytes(n: int, seed: int = 0) -> bytes:
    """Return *n* deterministic, non-repeating-looking bytes."""
    return bytes((i * 7 + seed * 13 + (i >> 8)) & 0xFF for i in range(n))


@dataclass(frozen=True)
class Flow:
    """One direction of a TCP or UDP flow; builds its packets byte by byte."""

    version: int = 4
    proto: int = TCP
    src: str = "10.0.0.1"
    dst: str = "10.0.0.2"
    sport: int = 40000
    dport: int = 5201
    ttl: int = 64
    tos: int = 0
    df: bool = True
    flow_label: int = 0x12345
    ack: int = 1000
    window: int = 502
    tcp_options: bytes = b""
    ip_options: bytes = b""

    @staticmethod
    def v6(proto: int = TCP, **kw: object) -> Flow:
        """Return an IPv6 flow between fd00::1 and fd00::2."""
        return Flow(version=6, proto=proto, src="fd00::1", dst="fd00::2", **kw)  # type: ignore[arg-type]

    def with_(self, **kw: object) -> Flow:
        """Return a copy with some fields changed."""
        return replace(self, **kw)  # type: ignore[arg-type]

    @property
    def src_bytes(self) -> bytes:
        return ipaddress.ip_address(self.src).packed

    @property
    def dst_bytes(self) -> bytes:
        return ipaddress.ip_address(self.dst).packed

    @property
    def iph_len(self) -> int:
        return 20 + len(self.ip_options) if self.version == 4 else 40

    @property
    def l4h_len(self) -> int:
        return 20 + len(self.tcp_options) if self.proto == TCP else 8

    @property
    def hdr_len(self) -> int:
        return self.iph_len + self.l4h_len

    def _l4(self, payload: bytes, seq: int, flags: int, partial: bool) -> bytes:
        """Return the transport header + payload, checksum full or partial."""
        if self.proto == TCP:
            doff = (20 + len(self.tcp_options)) // 4
            head = struct.pack(
                "!HHIIBBHHH",
                self.sport,
                self.dport,
                seq & 0xFFFFFFFF,
                self.ack,
                doff << 4,
                flags,
                self.window,
                0,
                0,
            )
            seg = head + self.tcp_options + payload
            field = 16
        else:
            seg = struct.pack("!HHHH", self.sport, self.dport, 8 + len(payload), 0) + payload
            field = 6
        if partial:
            # CHECKSUM_PARTIAL: the folded pseudo-header sum, not complemented.
            pseudo = slow_pseudo_header(self.src_bytes, self.dst_bytes, self.proto, len(seg))
            value = slow_ones_sum(pseudo)
        else:
            value = slow_l4_checksum(self.src_bytes, self.dst_bytes, self.proto, seg)
        return seg[:field] + struct.pack("!H", value) + seg[field + 2 :]

    def _ip(self, l4: bytes, ip_id: int) -> bytes:
        """Return the IP header for a transport segment *l4*, followed by it."""
        if self.version == 4:
            ihl = (20 + len(self.ip_options)) // 4
            total = ihl * 4 + len(l4)
            head = struct.pack(
                "!BBHHHBBH4s4s",
                0x40 | ihl,
                self.tos,
                total,
                ip_id & 0xFFFF,
                0x4000 if self.df else 0,
                self.ttl,
                self.proto,
                0,
                self.src_bytes,
                self.dst_bytes,
            )
            head += self.ip_options
            csum = slow_checksum(head)
            return head[:10] + struct.pack("!H", csum) + head[12:] + l4
        first = (6 << 28) | (self.tos << 20) | self.flow_label
        head = struct.pack(
            "!IHBB16s16s", first, len(l4), self.proto, self.ttl, self.src_bytes, self.dst_bytes
        )
        return head + l4

    def packet(
        self,
        payload: bytes,
        *,
        seq: int = 0,
        ip_id: int = 0,
        flags: int = ACK,
        partial: bool = False,
    ) -> bytes:
        """Return one IP packet of this flow with correct lengths and checksums.

        With *partial* the transport checksum field holds the pseudo-header
        sum instead, as a CHECKSUM_PARTIAL packet from the kernel does.
        """
        return self._ip(self._l4(payload, seq, flags, partial), ip_id)

    def gso_type(self, *, ecn: bool = False) -> int:
        """Return the virtio gso_type of this flow's super-packets."""
        if self.proto == UDP:
            return GSO_UDP_L4
        kind = GSO_TCPV4 if self.version == 4 else GSO_TCPV6
        return kind | (GSO_ECN if ecn else 0)

    def super_packet(
        self,
        payload: bytes,
        gso_size: int,
        *,
        seq: int = 0,
        ip_id: int = 0,
        flags: int = ACK,
        ecn: bool | None = None,
        hdr_len: int | None = None,
    ) -> bytes:
        """Return a virtio header + GSO super-packet as the kernel hands it to a TUN reader.

        IP lengths cover the whole super-packet, the IPv4 header checksum is
        valid, the transport checksum is partial (NEEDS_CSUM). *ecn* defaults
        to "CWR set in *flags*", as the kernel marks SKB_GSO_TCP_ECN.
        """
        if ecn is None:
            ecn = bool(flags & CWR)
        pkt = self.packet(payload, seq=seq, ip_id=ip_id, flags=flags, partial=True)
        header = vnet(
            F_NEEDS_CSUM,
            self.gso_type(ecn=ecn),
            self.hdr_len if hdr_len is None else hdr_len,
            gso_size,
            self.iph_len,
            16 if self.proto == TCP else 6,
        )
        return header + pkt

    def segments(
        self, payload: bytes, gso_size: int, *, seq: int = 0, ip_id: int = 0, flags: int = ACK
    ) -> list[bytes]:
        """Return what splitting the super-packet of the same arguments must give.

        Segments of *gso_size* payload bytes (the last may be shorter); IPv4
        ids count up from *ip_id*; TCP sequence numbers advance; FIN and PSH
        only on the last segment, CWR only on the first.
        """
        chunks = [payload[i : i + gso_size] for i in range(0, len(payload), gso_size)] or [b""]
        out = []
        for i, chunk in enumerate(chunks):
            seg_flags = flags & ~(FIN | PSH | CWR)
            if i == 0:
                seg_flags |= flags & CWR
            if i == len(chunks) - 1:
                seg_flags |= flags & (FIN | PSH)
            out.append(self.packet(chunk, seq=seq + i * gso_size, ip_id=ip_id + i, flags=seg_flags))
        return out


def with_vnet_none(pkt: bytes) -> bytes:
    """Return *pkt* behind an all-zero virtio header (GSO_NONE, no checksum work)."""
    return vnet() + pkt


def partial_none(flow: Flow, payload: bytes, **kw: int) -> bytes:
    """Return a GSO_NONE packet with NEEDS_CSUM and a partial transport checksum."""
    pkt = flow.packet(payload, partial=True, **kw)
    return vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, flow.iph_len, 16 if flow.proto == TCP else 6) + pkt

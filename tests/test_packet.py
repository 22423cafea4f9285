"""tunkit.packet: summaries of packets built by scapy and tests/packets.py, and only ValueError."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import ACK, CWR, ECE, FIN, PSH, RST, SYN, TCP, UDP, URG, Flow
from scapy.all import (  # type: ignore[attr-defined]
    GRE,
    ICMP,
    IP,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    fragment,
    raw,
)
from scapy.all import TCP as STCP
from scapy.all import UDP as SUDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6PacketTooBig

from tunkit import packet
from tunkit.packet import Summary, describe, parse

V4 = {"src": "10.0.0.1", "dst": "10.0.0.2"}
V6 = {"src": "fd00::1", "dst": "fd00::2"}

CASES = [
    (IP(**V4) / STCP(sport=5201, dport=40112, flags="SA"),
     "IP 10.0.0.1.5201 > 10.0.0.2.40112: tcp [S.] len 0"),
    (IPv6(**V6) / ICMPv6EchoRequest(data=b"x" * 56),
     "IP6 fd00::1 > fd00::2: icmp6 echo request, len 64"),
    (IP(**V4) / SUDP(sport=53, dport=40000) / b"hello",
     "IP 10.0.0.1.53 > 10.0.0.2.40000: udp len 5"),
    (IP(**V4) / ICMP(type=0) / (b"p" * 56),
     "IP 10.0.0.1 > 10.0.0.2: icmp echo reply, len 64"),
    (IP(**V4) / ICMP(type=3, code=3) / IP(**V4) / SUDP(),
     "IP 10.0.0.1 > 10.0.0.2: icmp unreachable code 3, len 36"),
    (IP(**V4) / ICMP(type=42),
     "IP 10.0.0.1 > 10.0.0.2: icmp type 42, len 8"),
    (IP(**V4, options=b"\x01\x01\x01\x00") / STCP(sport=1, dport=2, flags="FPA",
                                                    options=[("MSS", 1460)]) / (b"d" * 10),
     "IP 10.0.0.1.1 > 10.0.0.2.2: tcp [FP.] len 10"),
    (IP(**V4) / STCP(flags=0), "IP 10.0.0.1.20 > 10.0.0.2.80: tcp [none] len 0"),
    (IP(**V4) / STCP(flags="FSRPAUEC"), "IP 10.0.0.1.20 > 10.0.0.2.80: tcp [FSRP.UEW] len 0"),
    (IPv6(**V6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt()
     / STCP(sport=7, dport=8, flags="R"),
     "IP6 fd00::1.7 > fd00::2.8: tcp [R] len 0"),
    (IPv6(**V6) / ICMPv6ND_NS(tgt="fd00::2"),
     "IP6 fd00::1 > fd00::2: icmp6 neighbor solicitation, len 24"),
    (IPv6(**V6) / ICMPv6PacketTooBig() / (b"q" * 40),
     "IP6 fd00::1 > fd00::2: icmp6 packet too big, len 48"),
    (IP(**V4) / GRE() / IP(**V4), "IP 10.0.0.1 > 10.0.0.2: proto 47, len 24"),
    (IPv6(**V6, nh=59), "IP6 fd00::1 > fd00::2: proto 59, len 0"),
]
IDS = ["tcp4-synack", "icmp6-echo", "udp4", "icmp4-reply", "icmp4-unreach", "icmp4-unknown",
       "tcp4-options", "tcp4-none", "tcp4-all-flags", "tcp6-ext-headers", "icmp6-ns",
       "icmp6-too-big", "gre4", "ip6-no-next"]


@pytest.mark.parametrize(("pkt", "line"), CASES, ids=IDS)
def test_summary_line(pkt: object, line: str) -> None:
    assert str(parse(raw(pkt))) == line
    assert describe(raw(pkt)) == line


@pytest.mark.parametrize(("pkt", "line"), CASES, ids=IDS)
def test_fields_match_scapy(pkt: IP | IPv6, line: str) -> None:
    data = raw(pkt)
    s = parse(data)
    dissected = (IP if data[0] >> 4 == 4 else IPv6)(data)
    assert s.version == dissected.version
    assert s.src == ipaddress.ip_address(dissected.src)
    assert s.dst == ipaddress.ip_address(dissected.dst)
    assert s.length == len(data)
    l4 = dissected.payload
    while isinstance(l4, (IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrDestOpt)):
        l4 = l4.payload
    if STCP in dissected and not isinstance(l4, ICMP):
        tcp = dissected[STCP]
        assert (s.protocol, s.sport, s.dport, s.tcp_flags) == (6, tcp.sport, tcp.dport,
                                                                int(tcp.flags))
        assert s.payload_len == len(tcp.payload)
    elif isinstance(l4, SUDP):
        assert (s.protocol, s.sport, s.dport) == (17, l4.sport, l4.dport)
        assert s.payload_len == len(l4.payload)
    elif isinstance(l4, ICMP):
        assert (s.protocol, s.icmp_type, s.icmp_code) == (1, l4.type, l4.code)
        assert s.payload_len == len(raw(l4))
    else:
        assert s.sport is None and s.tcp_flags is None
        assert s.payload_len == len(raw(l4))
        if s.protocol == 58:
            assert (s.icmp_type, s.icmp_code) == (l4.type, l4.code)


def test_summary_is_frozen() -> None:
    s = parse(raw(CASES[0][0]))
    with pytest.raises(AttributeError):
        s.sport = 1  # type: ignore[misc]
    assert s == Summary(4, ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Address("10.0.0.2"),
                        6, 40, 0, 5201, 40112, SYN | ACK)


def test_fragments_say_so() -> None:
    frags = fragment(IP(**V4) / SUDP(sport=9, dport=10) / (b"f" * 3000), fragsize=1480)
    first, second = parse(raw(frags[0])), parse(raw(frags[1]))
    assert (first.sport, first.fragment_offset) == (9, 0)  # the UDP header is in the first
    assert str(first) == "IP 10.0.0.1.9 > 10.0.0.2.10: udp len 1472 (first fragment)"
    assert (second.sport, second.fragment_offset, second.protocol) == (None, 1480, 17)
    assert str(second) == "IP 10.0.0.1 > 10.0.0.2: udp fragment at 1480, len 1480"
    v6 = IPv6(**V6) / IPv6ExtHdrFragment(offset=185, m=0, nh=6) / (b"g" * 100)
    later = parse(raw(v6))
    assert (later.protocol, later.fragment_offset, later.payload_len) == (6, 1480, 100)
    assert str(later) == "IP6 fd00::1 > fd00::2: tcp fragment at 1480, len 100"


# Flows from tests/packets.py: every field parse reports is one the flow was built with.
_ports = st.integers(0, 0xFFFF)


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    proto=st.sampled_from([TCP, UDP]),
    sport=_ports,
    dport=_ports,
    flags=st.integers(0, 0xFF),
    payload=st.binary(max_size=1400),
    tcp_options=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]),
)
def test_fields_match_the_flow_that_built_the_packet(
    version: int, proto: int, sport: int, dport: int, flags: int, payload: bytes,
    tcp_options: bytes,
) -> None:
    flow = (Flow() if version == 4 else Flow.v6()).with_(
        proto=proto, sport=sport, dport=dport,
        tcp_options=tcp_options if proto == TCP else b"",
    )
    pkt = flow.packet(payload, flags=flags)
    s = parse(pkt)
    assert (s.version, str(s.src), str(s.dst)) == (version, flow.src, flow.dst)
    assert (s.protocol, s.sport, s.dport, s.length) == (proto, sport, dport, len(pkt))
    assert s.payload_len == len(payload)
    assert s.tcp_flags == (flags if proto == TCP else None)
    # every cut short of the whole packet claims more than it has
    for cut in {0, 1, len(pkt) // 2, len(pkt) - 1}:
        with pytest.raises(ValueError):
            parse(pkt[:cut])


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=120))
def test_arbitrary_bytes_raise_only_value_error(data: bytes) -> None:
    try:
        s = parse(data)
    except ValueError:
        assert describe(data).startswith(f"malformed packet of {len(data)} bytes: ")
        return
    assert str(s) == describe(data)


@settings(max_examples=1000, deadline=None)
@given(
    version=st.sampled_from([0x45, 0x46, 0x60]),
    proto=st.sampled_from([0, 1, 6, 17, 43, 44, 51, 58, 60, 99]),
    rest=st.binary(max_size=100),
)
def test_near_valid_headers_raise_only_value_error(version: int, proto: int, rest: bytes) -> None:
    """Bytes that get past the version check: lengths and extension headers made up."""
    head = bytearray(40)
    head[0] = version
    head[9 if version >> 4 == 4 else 6] = proto
    data = bytes(head) + rest
    for length_at in (2, 4):  # IPv4 total length, IPv6 payload length: some consistent
        fixed = bytearray(data)
        claim = len(data) - (40 if version >> 4 == 6 else 0)
        fixed[length_at : length_at + 2] = claim.to_bytes(2, "big")
        for candidate in (data, bytes(fixed)):
            with contextlib.suppress(ValueError):
                str(parse(candidate))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty packet"),
        (b"\x50" + bytes(30), "IP version 5"),
        (b"\x45" + bytes(10), "IPv4 header truncated: 11 of 20"),
        (b"\x44" + bytes(19), "IPv4 header length 16 is below 20"),
        (raw(IP(**V4) / SUDP())[:-2], "IPv4 packet truncated: total length 28 but 26 bytes"),
        (raw(IP(**V4, len=19, proto=17)), "IPv4 total length 19 is below its header length 20"),
        (raw(IPv6(**V6) / SUDP())[:-1], "IPv6 packet truncated"),
        (raw(IP(**V4) / STCP())[:30], "IPv4 packet truncated: total length 40 but 30"),
        (raw(IP(**V4, proto=6, len=30) / (b"\0" * 10)), "TCP header truncated: 10 of 20"),
        (raw(IP(**V4) / STCP(dataofs=4)), "TCP data offset 16 is below 20"),
        (raw(IP(**V4) / STCP(dataofs=15)), "TCP header of 60 bytes overruns the 20"),
        (raw(IP(**V4) / SUDP(len=4)), "UDP length 4 is below 8"),
        (raw(IP(**V4) / SUDP(len=100)), "UDP length 100 overruns the 8 bytes"),
        (raw(IP(**V4, proto=1, len=22) / b"\0\0"), "ICMP header truncated: 2 of 4"),
        (raw(IPv6(**V6, nh=0, plen=4) / b"\x06\0\0\0"), "extension header 0 truncated"),
        (raw(IPv6(**V6, nh=43, plen=8) / b"\x06\x05" / bytes(6)), "overruns"),
    ],
    ids=["empty", "v5", "short4", "ihl", "total", "total-below-ihl", "short6", "cut-tcp",
         "short-tcp", "doff-small", "doff-big", "udp-short", "udp-long", "short-icmp",
         "ext-short", "ext-long"],
)
def test_malformed_packets_say_what_was_wrong(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(data)
    assert message in describe(data)


def test_parse_takes_any_buffer() -> None:
    data = raw(CASES[0][0])
    assert parse(memoryview(bytearray(b"\0" * 4 + data))[4:]) == parse(data)
    assert packet.tcp_flags_text(FIN | SYN | RST | PSH | ACK | URG | ECE | CWR) == "FSRP.UEW"

"""send_tun / recv_tun: the message format, what is refused, and a passed device that works."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from netns_util import NativeHarness, netns_factory, root  # noqa: F401

import tunkit
from tunkit import Event, NativeTun
from tunkit._linux import netns as tk_netns
from tunkit._linux.passing import MAGIC, Header, parse_header

MakeNs = Callable[[str], str]
KINDS = [socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM]
KIND_IDS = ["stream", "seqpacket", "dgram"]

GOOD = {"tunkit": 1, "name": "tk0", "index": 3, "mtu": 1500, "up": True, "offload": True,
        "offload_flags": 103, "fds": ["tun", "netns", "netlink"]}


def frame(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return MAGIC + struct.pack("!H", len(body)) + body


def test_a_good_header_parses() -> None:
    assert parse_header(frame(GOOD)) == Header("tk0", 3, 1500, True, True, 103,
                                               ("tun", "netns", "netlink"))


@pytest.mark.parametrize(
    "change",
    [{"tunkit": 2}, {"tunkit": True}, {"name": 5}, {"index": "3"}, {"mtu": True},
     {"up": 1}, {"offload": None}, {"fds": []}, {"fds": ["netns", "tun"]},
     {"fds": ["tun", "tun"]}, {"fds": ["tun", "pipe"]}, {"fds": "tun"}],
    ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_a_bad_field_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not a tunkit descriptor message"):
        parse_header(frame({**GOOD, **change}))


def test_a_missing_field_is_refused() -> None:
    for key in GOOD:
        with pytest.raises(ValueError, match="not a tunkit descriptor message"):
            parse_header(frame({k: v for k, v in GOOD.items() if k != key}))


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_value_error(data: bytes) -> None:
    for candidate in (data, MAGIC + data, MAGIC + struct.pack("!H", len(data)) + data):
        try:
            header = parse_header(candidate)
        except ValueError:
            continue
        assert isinstance(header, Header)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12))
def test_any_json_parses_or_raises_value_error(obj: object) -> None:
    try:
        header = parse_header(frame(obj))
    except ValueError:
        return
    assert isinstance(header, Header)


# -- over real sockets -------------------------------------------------------------


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(params=KINDS, ids=KIND_IDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, request.param)
    with a, b:
        yield a, b


def _send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    socket.send_fds(sock, [data], fds)


def test_a_message_that_is_not_ours_raises_value_error_and_closes_its_descriptors(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    cases = [
        (b"hello, not a descriptor", 1),
        (frame({**GOOD, "tunkit": 9}), 2),
        (frame({**GOOD, "fds": ["tun"]}), 2),  # more descriptors than the header says
        (frame({**GOOD, "fds": ["tun"]}), 4),  # more than any message carries
        (frame({**GOOD, "fds": ["tun"]}), 1),  # a pipe where the device should be
    ]
    for data, count in cases:
        before = _fds()
        pipes = [os.pipe() for _ in range(count)]
        _send_raw(a, data, [r for r, _ in pipes])
        for r, w in pipes:
            os.close(r)
            os.close(w)
        with pytest.raises(ValueError):
            tunkit.recv_tun(b)
        if a.type == socket.SOCK_STREAM:  # what is left of a refused message
            b.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while b.recv(65536):
                    pass
            b.setblocking(True)
        assert _fds() == before, data  # every descriptor received was closed


@pytest.mark.parametrize("kind", KINDS[:2], ids=KIND_IDS[:2])  # a datagram socket has no end
def test_the_peer_closing_raises_eof_error(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    a.close()
    with b, pytest.raises(EOFError):
        tunkit.recv_tun(b)


def test_send_tun_needs_an_open_native_tun(pair: tuple[socket.socket, socket.socket]) -> None:
    left, _right = tunkit.pipe()
    with pytest.raises(TypeError):
        tunkit.send_tun(pair[0], left)  # type: ignore[arg-type]
    left.close()


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("offload", [False, True], ids=["plain", "vnet"])
def test_a_passed_device_reads_writes_and_reports_events(
    netns_factory: MakeNs, kind: int, offload: bool
) -> None:
    h = NativeHarness(netns_factory("pass"), offload=offload)
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    got: NativeTun | None = None
    try:
        tunkit.send_tun(a, h.tun)
        if kind == socket.SOCK_STREAM:
            a.sendall(b"the next bytes")
        got = tunkit.recv_tun(b)
        if kind == socket.SOCK_STREAM:
            assert b.recv(100) == b"the next bytes"  # recv_tun read its message, no more
        assert (got.name(), got.index(), got.mtu()) == (h.tun.name(), h.tun.index(), 1500)
        assert got.offload == offload and got.offload_flags == h.tun.offload_flags
        assert got.batch_size() == h.tun.batch_size()
        assert got.fileno() != h.tun.fileno()

        # The same queue: what the namespace sends, the received object reads.
        pkt = h.packet(1, 200)
        h.inject([pkt])
        bufs = [bytearray(16 + 1500) for _ in range(got.batch_size())]
        sizes = [0] * len(bufs)
        assert got.read(bufs, sizes) == 1
        assert bytes(bufs[0][16 : 16 + sizes[0]]) == pkt
        reply = h.packet(2, 300)
        assert got.write([bytes(16) + reply]) == 1
        assert h.collect(1, timeout=5) == [reply]

        # Events of the device, whoever changes it: the link was up when sent.
        events = got.events()
        assert events.get(timeout=5) == Event.UP
        got.set_mtu(1400)  # as root, configuration works (in the device's namespace)
        assert events.get(timeout=5) == Event.MTU_UPDATE and got.mtu() == 1400
        h.tun.down()
        assert events.get(timeout=5) == Event.DOWN
    finally:
        if got is not None:
            got.close()
        a.close()
        b.close()
        h.close()


def test_the_receiver_in_the_device_namespace_configures_without_entering_it(
    netns_factory: MakeNs,
) -> None:
    # A receiver that runs in the device's namespace gets no namespace
    # descriptor to enter: it needs no CAP_SYS_ADMIN to configure it.
    ns = netns_factory("samens")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, tunkit.create_tun(netns=ns, offload=False) as tun:
        tunkit.send_tun(a, tun)
        with tk_netns.inside(ns):
            got = tunkit.recv_tun(b)
            try:
                assert got._ns_fd is None
                got.set_mtu(1280)
            finally:
                got.close()
        assert tun.events().get(timeout=5) == Event.MTU_UPDATE and tun.mtu() == 1280

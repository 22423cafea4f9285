"""The rtnetlink parsing of the event thread and the namespace helpers."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from netns_util import netns_factory, ns_run, root  # noqa: F401

from tunkit import Event
from tunkit._linux import netlink
from tunkit._linux import netns as tk_netns
from tunkit._linux.device import create_tun

MakeNs = Callable[[str], str]

RTM_NEWLINK, RTM_DELLINK, NLMSG_ERROR = 16, 17, 2


def _rtattr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _newlink(index: int, name: str, mtu: int, flags: int, kind: int = RTM_NEWLINK) -> bytes:
    # Built from <linux/rtnetlink.h> by hand: nlmsghdr, ifinfomsg, IFLA_IFNAME (3), IFLA_MTU (4).
    body = struct.pack("=BBHiII", 0, 0, 0xFFFE, index, flags, 0)
    body += _rtattr(3, name.encode() + b"\0") + _rtattr(4, struct.pack("=I", mtu))
    body += _rtattr(7, b"\x01\x02\x03")  # an attribute the parser does not know
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 9, 0) + body


def test_parses_link_messages_in_one_datagram() -> None:
    data = _newlink(5, "tk0", 1400, 0x1043) + _newlink(6, "tk1", 9000, 0x1002, RTM_DELLINK)
    data += struct.pack("=IHHII", 20, NLMSG_ERROR, 0, 3, 0) + struct.pack("=i", -19)
    msgs = netlink._parse_messages(memoryview(data))
    assert msgs == [
        (RTM_NEWLINK, 9, netlink.LinkState(5, "tk0", 1400, True)),
        (RTM_DELLINK, 9, netlink.LinkState(6, "tk1", 9000, False, deleted=True)),
        (NLMSG_ERROR, 3, 19),
    ]


@given(st.binary(max_size=600))
def test_garbage_never_raises(data: bytes) -> None:
    for _type, _seq, payload in netlink._parse_messages(memoryview(data)):
        assert payload is None or isinstance(payload, (int, netlink.LinkState))


@given(
    st.integers(1, 2**31 - 1),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=15),
    st.integers(68, 65535),
    st.integers(0, 2**32 - 1),
    st.integers(0, 40),
)
def test_truncated_messages_keep_what_fits(
    index: int, name: str, mtu: int, flags: int, cut: int
) -> None:
    data = _newlink(index, name, mtu, flags)
    assert netlink._parse_messages(memoryview(data)) == [
        (RTM_NEWLINK, 9, netlink.LinkState(index, name, mtu, bool(flags & 1)))
    ]
    # A datagram cut short: the message's length claim no longer fits, so it is skipped.
    assert netlink._parse_messages(memoryview(data[: len(data) - 1 - cut])) == []


def test_configuration_from_inside_a_running_event_loop(netns_factory: MakeNs) -> None:
    ns = netns_factory("aio")

    async def main() -> None:
        with create_tun("tkaio0", netns=ns) as tun:
            tun.up()  # pyroute2's own loop cannot run here: done on a helper thread
            tun.add_address("10.82.0.1/24")
            assert tun.events().get(timeout=5) == Event.UP
            assert "10.82.0.1/24" in ns_run(ns, "ip", "-o", "addr").stdout

    asyncio.run(main())


def test_attaches_to_a_free_persistent_device(netns_factory: MakeNs) -> None:
    ns = netns_factory("persist")
    ns_run(ns, "ip", "tuntap", "add", "mode", "tun", "name", "tkpers0")
    with create_tun("tkpers0", mtu=1300, netns=ns) as tun:
        assert tun.name() == "tkpers0" and tun.mtu() == 1300
    # Persistent: it outlives our descriptor.
    assert "tkpers0" in ns_run(ns, "ip", "-o", "link").stdout


def test_namespace_helpers(root: None) -> None:
    name = tk_netns.unique_netns_name("helpers")
    tk_netns.create_netns(name)
    try:
        assert name in tk_netns.list_netns()
        with pytest.raises(FileExistsError, match=name):
            tk_netns.create_netns(name)
    finally:
        tk_netns.delete_netns(name)
    assert name not in tk_netns.list_netns()
    with pytest.raises(FileNotFoundError, match=name):
        tk_netns.delete_netns(name)
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(ValueError):
            tk_netns.create_netns(bad)


def test_leftovers_of_dead_processes_are_removed(root: None) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = f"tk-{int(dead.stdout)}-stale"
    mine = tk_netns.unique_netns_name("alive")
    tk_netns.create_netns(stale)
    tk_netns.create_netns(mine)
    try:
        removed = tk_netns.remove_stale_netns()
        assert stale in removed
        assert mine in tk_netns.list_netns() and stale not in tk_netns.list_netns()
    finally:
        for name in (stale, mine):
            if name in tk_netns.list_netns():
                tk_netns.delete_netns(name)


def test_root_tests_say_why_they_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import netns_util

    monkeypatch.setattr(netns_util.os, "geteuid", lambda: 1000)
    reason = netns_util.root_unavailable()
    assert reason is not None and "root" in reason

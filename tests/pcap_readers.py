"""Capture files as tshark and scapy read them: the independent readers of tunkit's files.

Each returns one :class:`Seen` per packet, in file order, so that a test
can compare what tshark and scapy saw with what it sent.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from netns_util import need_tool

# scapy maps link type 101 to IP/IPv6 once its inet layers are loaded.
from scapy.all import PcapNgReader, PcapReader

_DIRECTIONS = {1: "in", 2: "out"}  # epb_flags bits 0-1


class Seen(NamedTuple):
    """One packet as a reader saw it."""

    data: bytes
    direction: str | None
    interface: str | None
    src: str | None
    dst: str | None


def tshark(path: Path, display_filter: str | None = None) -> list[Seen]:
    """Read *path* with ``tshark -T json -x`` (frame bytes, interface, direction, addresses)."""
    tool = need_tool("tshark")
    args = [tool, "-r", str(path), "-T", "json", "-x"]
    if display_filter:
        args += ["-Y", display_filter]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    out = []
    for packet in json.loads(result.stdout):
        layers: dict[str, Any] = packet["_source"]["layers"]
        frame = layers["frame"]
        name = frame.get("frame.interface_id_tree", {}).get("frame.interface_name")
        flags = frame.get("frame.packet_flags_tree", {}).get("frame.packet_flags_direction")
        ip = layers.get("ip") or layers.get("ipv6") or {}
        key = "ip" if "ip" in layers else "ipv6"
        out.append(Seen(
            bytes.fromhex(layers["frame_raw"][0]),
            _DIRECTIONS.get(int(flags, 16)) if flags else None,
            name,
            ip.get(f"{key}.src"),
            ip.get(f"{key}.dst"),
        ))
    return out


def tshark_fields(
    path: Path, *fields: str, display_filter: str | None = None, prefs: Sequence[str] = ()
) -> list[list[str]]:
    """``tshark -r path -T fields -e ...``: one list of field values per packet.

    *prefs* are ``-o name:value`` preferences (``"tcp.check_checksum:TRUE"``).
    """
    tool = need_tool("tshark")
    args = [tool, "-r", str(path), "-T", "fields"]
    for pref in prefs:
        args += ["-o", pref]
    for field in fields:
        args += ["-e", field]
    if display_filter:
        args += ["-Y", display_filter]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


def scapy(path: Path) -> list[Seen]:
    """Read *path* with scapy's PcapNgReader or PcapReader (as its magic says)."""
    pcapng = path.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"
    reader = PcapNgReader(str(path)) if pcapng else PcapReader(str(path))
    out = []
    try:
        if not pcapng:
            assert reader.linktype == 101
        for pkt in reader:
            out.append(Seen(
                bytes(pkt),
                _DIRECTIONS.get(getattr(pkt, "direction", None) or 0),
                getattr(pkt, "sniffed_on", None),
                getattr(pkt, "src", None),
                getattr(pkt, "dst", None),
            ))
    finally:
        reader.close()
    return out

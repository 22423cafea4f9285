"""tunkit: TUN devices for Python.

A batched :class:`Tun` protocol compatible with wireguard-go's (a port of the
Go package ``github.com/asciimoth/gonnect/tun``), in-memory :class:`Channel`
and :func:`pipe`, an ``io`` adapter, :func:`copy`, :class:`Forwarder`,
:class:`Point2Point`, buffer pools, and a Linux device with kernel offloads;
:func:`capture` records what crosses a Tun into a pcapng file (:mod:`tunkit.pcap`)
and :mod:`tunkit.packet` sums a packet up in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import packet, pcap
from ._callback import CallbackTun
from ._capture import capture
from ._channel import Channel
from ._copy import copy
from ._errors import (
    BufferPoolError,
    ClosedError,
    OffsetError,
    ReadOnClosedChannelError,
    ReadOnClosedPipeError,
    RetryableError,
    TooManySegmentsError,
    TunError,
    WriteOnClosedChannelError,
    WriteOnClosedPipeError,
)
from ._events import Event, Events
from ._forwarder import Forwarder, ForwarderStats, Point2Point
from ._offload import speedups_enabled
from ._offload_state import OffloadKind, OffloadOff, OffloadState
from ._pipe import pipe
from ._pool import BufferPool, DebugPool, Pool
from ._tun import GsoTun, Tun
from ._tunio import TunIO

if TYPE_CHECKING:
    from ._linux.device import NativeTun, TunStats, create_tun, open_tun
    from ._linux.passing import recv_tun, send_tun
    from ._linux.persist import attach_tun, delete_tun
    from .transport.stream import StreamTun
    from .transport.udp import UdpTun

__version__ = "0.1.0"

# The Linux device needs pyroute2; it is imported on first use, so the
# in-memory core imports nothing beyond the standard library.
# The transports sit on the Linux layer (sockets, the descriptor that close() wakes).
_LINUX_NAMES = {
    "NativeTun": "_linux.device",
    "TunStats": "_linux.device",
    "create_tun": "_linux.device",
    "open_tun": "_linux.device",
    "attach_tun": "_linux.persist",
    "delete_tun": "_linux.persist",
    "send_tun": "_linux.passing",
    "recv_tun": "_linux.passing",
    "UdpTun": "transport.udp",
    "StreamTun": "transport.stream",
}


def __getattr__(name: str) -> Any:
    module = _LINUX_NAMES.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tunkit' has no attribute {name!r}")


__all__ = [
    "BufferPool",
    "BufferPoolError",
    "CallbackTun",
    "Channel",
    "ClosedError",
    "DebugPool",
    "Event",
    "Events",
    "Forwarder",
    "ForwarderStats",
    "GsoTun",
    "NativeTun",
    "OffloadKind",
    "OffloadOff",
    "OffloadState",
    "OffsetError",
    "Point2Point",
    "Pool",
    "ReadOnClosedChannelError",
    "ReadOnClosedPipeError",
    "RetryableError",
    "StreamTun",
    "TooManySegmentsError",
    "Tun",
    "TunError",
    "TunIO",
    "TunStats",
    "UdpTun",
    "WriteOnClosedChannelError",
    "WriteOnClosedPipeError",
    "attach_tun",
    "capture",
    "copy",
    "create_tun",
    "delete_tun",
    "open_tun",
    "packet",
    "pcap",
    "pipe",
    "recv_tun",
    "send_tun",
    "speedups_enabled",
]

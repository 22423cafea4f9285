"""tunkit: TUN devices for Python.

A batched :class:`Tun` protocol compatible with wireguard-go's (a port of the
Go package ``github.com/asciimoth/gonnect/tun``), in-memory :class:`Channel`
and :func:`pipe`, an ``io`` adapter, :func:`copy`, :class:`Forwarder`,
:class:`Point2Point`, buffer pools, and a Linux device with kernel offloads.
"""

from __future__ import annotations

from ._callback import CallbackTun
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
from ._forwarder import Forwarder, Point2Point
from ._pipe import pipe
from ._pool import BufferPool, DebugPool, Pool
from ._tun import GsoTun, Tun
from ._tunio import TunIO

__version__ = "0.1.0"

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
    "GsoTun",
    "OffsetError",
    "Point2Point",
    "Pool",
    "ReadOnClosedChannelError",
    "ReadOnClosedPipeError",
    "RetryableError",
    "TooManySegmentsError",
    "Tun",
    "TunError",
    "TunIO",
    "WriteOnClosedChannelError",
    "WriteOnClosedPipeError",
    "copy",
    "pipe",
]

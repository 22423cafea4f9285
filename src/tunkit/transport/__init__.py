"""Transports: Tuns whose packets travel to a peer over an ordinary socket.

``copy(device, transport)`` is then a tunnel. :class:`StreamTun` carries
packets as length-prefixed frames over TCP, a Unix socket or TLS.
"""

from __future__ import annotations

from .stream import StreamTun

__all__ = ["StreamTun"]

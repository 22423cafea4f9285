"""Transports: Tuns whose packets travel to a peer over an ordinary socket.

``copy(device, transport)`` is then a tunnel. :class:`UdpTun` carries one IP
packet per UDP datagram (with UDP GSO/GRO); :class:`StreamTun` carries
packets as length-prefixed frames over TCP, a Unix socket or TLS.
"""

from __future__ import annotations

from .stream import StreamTun
from .udp import UdpStats, UdpTun

__all__ = ["StreamTun", "UdpStats", "UdpTun"]

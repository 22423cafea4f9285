"""Transports: Tuns whose packets travel to a peer over an ordinary socket.

``copy(device, transport)`` is then a tunnel. :class:`UdpTun` carries one IP
packet per UDP datagram (with UDP GSO/GRO).
"""

from __future__ import annotations

from .udp import UdpStats, UdpTun

__all__ = ["UdpStats", "UdpTun"]

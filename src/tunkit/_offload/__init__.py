"""The offload engine: pure packet code for a TUN device with ``IFF_VNET_HDR``.

No system calls happen here: buffers in, buffers out. ``split`` turns what
one kernel read returned (virtio-net header + packet or GSO super-packet)
into finished IP packets; ``Coalescer`` turns a batch of IP packets to write
into kernel writes (GRO), each a list of buffers for ``os.writev``.
``checksum`` and ``headers`` hold the Internet checksum and the header
layouts both use.
"""

from __future__ import annotations

from .coalesce import ZERO_VNET_HDR, Coalescer, Write
from .headers import VNET_HDR_LEN, VnetHdr, _Malformed, _TooBig
from .split import split

__all__ = [
    "VNET_HDR_LEN",
    "ZERO_VNET_HDR",
    "Coalescer",
    "VnetHdr",
    "Write",
    "_Malformed",
    "_TooBig",
    "split",
]

"""The offload engine: pure packet code for a TUN device with ``IFF_VNET_HDR``.

No system calls happen here: buffers in, buffers out. ``split`` turns what
one kernel read returned (virtio-net header + packet or GSO super-packet)
into finished IP packets; ``Coalescer`` turns a batch of IP packets to write
into kernel writes (GRO), each a list of buffers for ``os.writev``.
``checksum`` and ``headers`` hold the Internet checksum and the header
layouts both use. ``split`` and ``Coalescer`` come from the C extension
``tunkit._speedups`` when it is built (``_impl`` decides, once, at import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._impl import speedups_enabled, split
from .coalesce import ZERO_VNET_HDR, Write
from .headers import _Malformed, _TooBig
from .vnet import VNET_HDR_LEN, VnetHdr

# ``split`` and ``Coalescer`` are the C extension's when it loaded (see
# _impl.py). For the type checker Coalescer is the pure class, which the
# native one subclasses: annotations stay valid with either.
if TYPE_CHECKING:
    from .coalesce import Coalescer
else:
    from ._impl import Coalescer

__all__ = [
    "VNET_HDR_LEN",
    "ZERO_VNET_HDR",
    "Coalescer",
    "VnetHdr",
    "Write",
    "_Malformed",
    "_TooBig",
    "speedups_enabled",
    "split",
]

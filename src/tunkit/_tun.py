"""The batched Tun protocol, compatible with wireguard-go's ``tun.Device``."""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ._errors import OffsetError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from ._events import Events

__all__ = ["GsoTun", "Tun", "Wrapping", "check_offset"]


@runtime_checkable
class Tun(Protocol):
    """A layer-3 device that reads and writes batches of IP packets.

    ``read`` stores packet ``i`` at ``bufs[i][offset:offset + sizes[i]]`` and
    returns how many it stored, blocking until at least one is there; ``write``
    sends ``bufs[i][offset:]`` as one packet each and returns how many it sent,
    possibly fewer than ``len(bufs)``. Size read batches from ``batch_size()``
    and each buffer as ``offset + mtu()``; leave ``mwo()`` bytes of headroom in
    front of written packets and read at ``mro()`` or more.
    """

    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 0
    ) -> int:
        """Read a batch of packets into *bufs* at *offset*; return the count."""
        ...

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = 0) -> int:
        """Write ``bufs[i][offset:]`` as one packet each; return the count sent."""
        ...

    def mwo(self) -> int:
        """Minimal write offset: headroom a writer must leave in front of a packet."""
        ...

    def mro(self) -> int:
        """Minimal read offset."""
        ...

    def mtu(self) -> int:
        """The device's MTU."""
        ...

    def name(self) -> str:
        """The device's name."""
        ...

    def events(self) -> Events:
        """The device's event stream; it ends when the device closes."""
        ...

    def batch_size(self) -> int:
        """How many packets one call may carry; constant, >= 1."""
        ...

    def fileno(self) -> int:
        """The OS descriptor; raises ``io.UnsupportedOperation`` when there is none."""
        ...

    def close(self) -> None:
        """Close the device and end its events stream; idempotent."""
        ...


@runtime_checkable
class GsoTun(Protocol):
    """A Tun that can also move whole GSO super-packets with their virtio-net header.

    The 10-byte header of packet ``i`` sits at ``bufs[i][offset - 10:offset]``.
    """

    def read_gso(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = 16
    ) -> int:
        """Like ``Tun.read``, but a packet may be a super-packet with its header."""
        ...

    def write_gso(self, bufs: Sequence[ReadableBuffer], offset: int = 16) -> int:
        """Like ``Tun.write``, but a packet may be a super-packet with its header."""
        ...


def check_offset(kind: str, offset: int, minimum: int) -> None:
    """Raise :class:`OffsetError` when *offset* is below *minimum* (``mro()``/``mwo()``)."""
    if offset < minimum:
        which = "mro()" if kind == "read" else "mwo()"
        raise OffsetError(f"{kind} offset {offset} is below {which} {minimum}")


class Wrapping:
    """The Tun protocol's descriptive calls of a wrapper, answered by the Tun it wraps,
    ``self.tun``: :class:`CallbackTun`, :class:`TunIO` and ``capture``'s Tun."""

    __slots__ = ()
    tun: Tun

    def mwo(self) -> int:
        """The wrapped Tun's ``mwo()``."""
        return self.tun.mwo()

    def mro(self) -> int:
        """The wrapped Tun's ``mro()``."""
        return self.tun.mro()

    def mtu(self) -> int:
        """The wrapped Tun's ``mtu()``."""
        return self.tun.mtu()

    def name(self) -> str:
        """The wrapped Tun's ``name()``."""
        return self.tun.name()

    def events(self) -> Events:
        """The wrapped Tun's events stream."""
        return self.tun.events()

    def batch_size(self) -> int:
        """The wrapped Tun's ``batch_size()``."""
        return self.tun.batch_size()

    def fileno(self) -> int:
        """The wrapped Tun's descriptor (``io.UnsupportedOperation`` when it has none)."""
        return self.tun.fileno()

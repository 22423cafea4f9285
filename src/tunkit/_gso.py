"""Moving GSO super-packets whole between two GsoTuns, and splitting them when the far end can't.

Shared by :func:`copy` and :class:`Forwarder`. A super-packet is kept as the
kernel gave it: the 10-byte virtio-net header at ``buf[offset - 10:offset]``
and up to 64 KB of one TCP or UDP flow at ``buf[offset:]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ._errors import TooManySegmentsError
from ._offload.vnet import VNET_HDR_LEN
from ._tun import GsoTun
from ._write import write_all

if TYPE_CHECKING:

    from ._tun import Tun

__all__ = [
    "GSO_BATCH",
    "GSO_BUF_LEN",
    "VNET_HDR_LEN",
    "CopyBuffers",
    "fits_whole",
    "gso_offset",
    "gso_pair",
    "split_for",
    "write_split",
]

# Room for the largest IP packet (a 64 KB super-packet) behind the headroom:
# also the size of the first read buffer of every forwarding loop, so that the
# next packet fits whatever the source's MTU has become meanwhile.
GSO_BUF_LEN: Final = 65535
# Super-packets read per call: each is one system call of up to 64 KB, so a
# few per call already amortise the Python around them (memory: 16 x 64 KB).
GSO_BATCH: Final = 16


class CopyBuffers:
    """The buffers of one direction of a copy loop (:func:`tunkit.copy`, ``aio.copy``).

    *count* buffers with *offset* bytes of headroom, and their ``sizes``. The
    first holds 64 KB: a read that was already waiting when the source's MTU
    grew stores the next packet there (a device keeps one that does not fit a
    later buffer for its next read). With *gso* every buffer holds 64 KB (a
    super-packet each); without, the others hold the MTU that :meth:`follow`
    was last given, and are made again when it changes.
    """

    __slots__ = ("_mtu", "bufs", "offset", "sizes", "views")

    def __init__(self, offset: int, count: int, *, gso: bool = False) -> None:
        self.offset = offset
        self.sizes = [0] * count
        self.bufs = [bytearray(offset + GSO_BUF_LEN) for _ in range(count if gso else 1)]
        self.views = [memoryview(buf) for buf in self.bufs]
        self._mtu = -1

    def follow(self, mtu: int) -> None:
        """Size the buffers after the first for packets of *mtu* bytes."""
        if mtu != self._mtu:
            self._mtu = mtu
            count = len(self.sizes)
            del self.bufs[1:], self.views[1:]
            self.bufs += [bytearray(self.offset + mtu) for _ in range(count - 1)]
            self.views += [memoryview(buf) for buf in self.bufs[1:]]

    def packets(self, n: int) -> list[memoryview]:
        """The first *n* packets read, each behind its headroom (as ``write`` takes them)."""
        views, sizes, offset = self.views, self.sizes, self.offset
        return [views[i][: offset + sizes[i]] for i in range(n)]


def fits_whole(before: tuple[int, int], now: tuple[int, int]) -> bool:
    """Whether a batch of super-packets read while an MTU changed can be written whole.

    *before* and *now* are (source MTU, destination MTU) when the batch was
    read and after: its segments are of the old source MTU or the new one, so
    the destination's MTU must take the larger.
    """
    return now[1] >= max(before[0], now[0])


def gso_pair(src: object, dst: object, *, checked: bool = False) -> bool:
    """Whether super-packets can go from *src* to *dst* whole.

    Both must be :class:`GsoTun` s (*checked*: the caller knows they are) and
    the destination's MTU must fit the source's segments.
    """
    if not checked and not (isinstance(src, GsoTun) and isinstance(dst, GsoTun)):
        return False
    return dst.mtu() >= src.mtu()  # type: ignore[attr-defined, no-any-return]


def gso_offset(src: Tun, dst: Tun | None) -> int:
    """The read offset for super-packets: room for the header and both ends' minimums."""
    return max(VNET_HDR_LEN, src.mro(), dst.mwo() if dst is not None else 0)


def split_for(dst: Tun, packet: memoryview, offset: int) -> tuple[list[bytearray], list[int]]:
    """Split one super-packet (header at ``packet[:10]``) into packets for plain ``dst.write``.

    Returns buffers holding each segment behind *offset* bytes of headroom,
    and their sizes. A malformed super-packet gives no packets (dropped).
    """
    from ._offload import _Malformed, _TooBig, split

    room = offset + max(dst.mtu(), 1280)
    count = 48
    while True:
        bufs = [bytearray(room) for _ in range(count)]
        sizes = [0] * count
        try:
            n = split(packet, bufs, sizes, offset)
        except TooManySegmentsError:
            count *= 2
            if count > 4096:
                return [], []
            continue
        except (_Malformed, _TooBig):
            return [], []
        return bufs[:n], sizes[:n]


def write_split(dst: Tun, packet: memoryview, headroom: int) -> int:
    """Split super-packet *packet* (header at ``packet[:10]``) and write its segments to *dst*.

    Returns how many segments were written; 0 when *packet* is malformed
    (dropped: nothing to write).

    Raises:
        TunError: a write made no progress.
    """
    segments, sizes = split_for(dst, packet, headroom)
    pairs = zip(segments, sizes, strict=True)
    write_all(dst, [memoryview(seg)[: headroom + k] for seg, k in pairs], headroom)
    return len(segments)

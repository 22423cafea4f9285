# Type stub of the optional C extension built from _speedups.c (see _offload/_impl.py).
from collections.abc import MutableSequence, Sequence

from _typeshed import ReadableBuffer, WriteableBuffer

from tunkit._offload.coalesce import Write

def ones_sum(data: ReadableBuffer, initial: int = 0) -> int: ...
def checksum(data: ReadableBuffer, initial: int = 0) -> int: ...
def pseudo_sum(addrs: ReadableBuffer, proto: int, l4_len: int) -> int: ...
def update16(csum: int, old: int, new: int) -> int: ...
def split(
    pkt: ReadableBuffer,
    out_bufs: Sequence[WriteableBuffer],
    sizes: MutableSequence[int],
    offset: int,
) -> int: ...
def coalesce(bufs: Sequence[ReadableBuffer], offset: int, tcp: bool, udp: bool) -> list[Write]: ...
def bind(
    malformed: type[Exception],
    too_big: type[Exception],
    too_many: type[Exception],
    write_cls: type[Write],
    zero_hdr: memoryview,
) -> None: ...

# Type stub of the optional C extension built from _speedups/*.c (see _offload/_impl.py).
from collections.abc import MutableSequence, Sequence
from typing import final

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
@final
class PacketIo:
    def __init__(self, fd: int, wake: int) -> None: ...
    def read(self, buf: WriteableBuffer, offset: int, overflow: WriteableBuffer) -> int: ...
    def write(self, buf: ReadableBuffer, offset: int) -> int: ...
    def read_gso(
        self,
        bufs: Sequence[WriteableBuffer],
        sizes: MutableSequence[int],
        at: int,
        overflow: WriteableBuffer,
    ) -> tuple[int, int]: ...
    def write_gso(
        self, bufs: Sequence[ReadableBuffer], at: int, refused: int
    ) -> tuple[int, int]: ...
    def drain(self) -> None: ...
    def counts(self) -> dict[str, int]: ...

def gso_segments(data: ReadableBuffer) -> tuple[int, int]: ...
@final
class UdpIo:
    def __init__(
        self,
        fd: int,
        wake: int,
        family: int,
        addr: bytes,
        port: int,
        scope_id: int,
        slot: int,
        nslots: int,
        mtu: int,
        max_segments: int,
        max_payload: int,
        lost: tuple[int, ...],
    ) -> None: ...
    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int
    ) -> tuple[int, int]: ...
    def read_gso(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], at: int
    ) -> tuple[int, int]: ...
    def write(
        self, bufs: Sequence[ReadableBuffer], offset: int, gso: bool
    ) -> tuple[int, int, int, int, int, int]: ...
    def write_gso(
        self, bufs: Sequence[ReadableBuffer], at: int, gso: bool
    ) -> tuple[int, int, int, int, int, int]: ...
    def counts(self) -> dict[str, int]: ...
    def pending(self) -> int: ...

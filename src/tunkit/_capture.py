"""capture(): a Tun that records every packet read from it and written to it into a pcap file.

The wrapper does the Tun's work first, then copies what moved into a
bounded buffer; one thread per capture (``tunkit-capture:<name>``) empties
the buffer into a :class:`tunkit.pcap.Writer`. A full buffer drops capture
records, counted, and never delays or drops a packet. A super-packet that
``read_gso``/``write_gso`` moves whole is queued whole and split into the
segments it stands for on the capture thread, with the offload engine's
``split``. Nothing changes in the Tun classes: a Tun that is not captured
pays nothing.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, MutableSequence, Sequence
from typing import IO, TYPE_CHECKING, Any, Final, NamedTuple

from ._errors import TooManySegmentsError
from ._offload import VNET_HDR_LEN, VnetHdr, _Malformed, _TooBig, split
from ._offload.headers import byte_view
from ._offload.vnet import gso_segments
from ._tun import GsoTun, Wrapping
from .pcap import Direction, PcapFormat, Writer

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, StrOrBytesPath, WriteableBuffer

    from ._tun import Tun

__all__ = ["DEFAULT_BUFFER_SIZE", "CaptureStats", "CapturedGsoTun", "CapturedTun", "capture"]

# Bytes of packets a capture may hold before its thread has written them:
# 128 super-packets of 64 KB, or some 5,000 full-size packets.
DEFAULT_BUFFER_SIZE: Final = 8 << 20

# The headroom the Tun protocol gives super-packets when a caller names none.
_GSO_OFFSET: Final = 16


class CaptureStats(NamedTuple):
    """Counters of one capture.

    ``recorded``: packets written to the file (a super-packet counts as its
    segments). ``dropped``: packets that crossed the Tun but not into the
    file, because the buffer was full, the capture was closing, or writing
    the file failed. ``queued_bytes``: packet bytes waiting in the buffer.
    """

    recorded: int
    dropped: int
    queued_bytes: int


def _default_offset(method: Any, fallback: int) -> int:
    """The default of *method*'s ``offset`` parameter (a NativeTun's is its headroom)."""
    try:
        default = inspect.signature(method).parameters["offset"].default
    except (KeyError, TypeError, ValueError):
        return fallback
    return default if isinstance(default, int) else fallback


def _packet_count(packets: Sequence[bytes | bytearray], gso: bool) -> int:
    """How many packets *packets* stand for: super-packets count as their segments."""
    if not gso:
        return len(packets)
    return sum(gso_segments(memoryview(pkt))[0] or 1 for pkt in packets)


def _copy(buf: ReadableBuffer, start: int, end: int | None) -> bytes | bytearray:
    """A copy of ``buf[start:end]``'s bytes (the packet a Tun call moved)."""
    if type(buf) is bytearray or type(buf) is bytes:
        return buf[start:end]  # a slice of these is a copy
    return byte_view(buf)[start:end].tobytes()


def _segments(data: bytes | bytearray) -> list[memoryview]:
    """The packets one kernel (super-)packet stands for: *data* is its virtio header and packet.

    Partial checksums are completed, as the kernel would before sending.
    Bytes the offload engine cannot split are recorded as they are.
    """
    view = memoryview(data)
    count, hdr_len = gso_segments(view)
    if count:
        room = hdr_len + VnetHdr.unpack_from(view).gso_size if hdr_len else len(view)
        bufs = [bytearray(room) for _ in range(count)]
        sizes = [0] * count
        try:
            n = split(view, bufs, sizes, 0)
        except (_Malformed, _TooBig, TooManySegmentsError):
            pass
        else:
            return [memoryview(buf)[:size] for buf, size in zip(bufs[:n], sizes, strict=False)]
    return [view[VNET_HDR_LEN:]]


class CapturedTun(Wrapping):
    """A Tun that records each packet read from *tun* ("in") and written to it ("out").

    Made by :func:`capture`; takes ownership of *tun* (``close()`` closes it).
    Every Tun method behaves as *tun*'s, on any thread *tun* allows; other
    attributes (``stats()``, ``add_address``, ...) are *tun*'s; *tun* itself is :attr:`tun`.
    """

    __slots__ = (
        "_active",
        "_close_lock",
        "_closed",
        "_closing",
        "_dropped",
        "_error",
        "_idle",
        "_interface",
        "_limit",
        "_lock",
        "_owns_writer",
        "_queue",
        "_queued",
        "_read_offset",
        "_recorded",
        "_thread",
        "_waiting_idle",
        "_wake",
        "_write_offset",
        "_writer",
        "tun",
    )

    def __init__(
        self, tun: Tun, writer: Writer, *, owns_writer: bool, buffer_size: int, name: str
    ) -> None:
        self._interface = writer.add_interface(name)
        self.tun = tun
        self._writer = writer
        self._owns_writer = owns_writer
        self._limit = buffer_size
        self._read_offset = _default_offset(tun.read, 0)
        self._write_offset = _default_offset(tun.write, 0)
        self._lock = threading.Lock()  # guards the fields below up to _closing
        self._wake = threading.Condition(self._lock)  # the buffer is no longer empty, or closing
        self._idle = threading.Condition(self._lock)  # no Tun call is in flight
        # Tun calls between their start and their records' queueing: close()
        # waits for them, so that a packet that moved is recorded.
        self._active = 0
        self._waiting_idle = False
        # (timestamp_ns, direction, packets, gso, bytes) per Tun call
        self._queue: list[tuple[int, Direction, list[bytes | bytearray], bool, int]] = []
        self._queued = 0
        self._dropped = 0
        self._closing = False
        self._recorded = 0  # written by the capture thread only
        self._error: Exception | None = None  # the capture thread's, raised by close()
        self._close_lock = threading.Lock()  # one close() at a time; the others wait for it
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name=f"tunkit-capture:{name}")
        self._thread.start()

    # -- the Tun protocol ---------------------------------------------------------

    def read(
        self,
        bufs: Sequence[WriteableBuffer],
        sizes: MutableSequence[int],
        offset: int | None = None,
    ) -> int:
        """``tun.read``; the packets it stored are recorded as "in"."""
        at = self._read_offset if offset is None else offset
        self._enter()
        n = 0
        try:
            n = self.tun.read(bufs, sizes, at)
            return n
        finally:
            self._keep("in", [_copy(bufs[i], at, at + sizes[i]) for i in range(n)])

    def write(self, bufs: Sequence[ReadableBuffer], offset: int | None = None) -> int:
        """``tun.write``; the packets it sent are recorded as "out"."""
        at = self._write_offset if offset is None else offset
        self._enter()
        n = 0
        try:
            n = self.tun.write(bufs, at)
            return n
        finally:
            self._keep("out", [_copy(bufs[i], at, None) for i in range(n)])

    def close(self) -> None:
        """Close *tun*, write what the buffer holds, join the capture thread, flush the file.

        The file is closed if :func:`capture` opened it (a path given), else
        flushed and left open. Idempotent; a call from a second thread
        returns once the first is done. Waits for the file to take the
        queued records.

        Raises:
            Exception: what *tun*'s ``close()`` raised, else the first error
                writing the file met (once; later records were dropped and
                counted).
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.tun.close()
            finally:
                with self._lock:
                    # Calls in flight end now that tun is closed; let them queue
                    # what they moved before the capture thread is told to finish.
                    self._waiting_idle = True
                    while self._active:
                        self._idle.wait()
                    self._closing = True
                    self._wake.notify()
                self._thread.join()
                if self._owns_writer:
                    self._writer.close()
                else:
                    self._writer.flush()
            if self._error is not None:
                raise self._error

    # -- capture ------------------------------------------------------------------

    def capture_stats(self) -> CaptureStats:
        """Packets recorded and dropped so far, and the bytes waiting to be written."""
        with self._lock:
            return CaptureStats(self._recorded, self._dropped, self._queued)

    @property
    def capture_error(self) -> Exception | None:
        """The error that stopped writing the file, or ``None``."""
        return self._error

    def _enter(self) -> None:
        """A Tun call starts; :meth:`_keep` ends it."""
        with self._lock:
            self._active += 1

    def _keep(
        self, direction: Direction, packets: list[bytes | bytearray], gso: bool = False
    ) -> None:
        """End a Tun call: queue the leading *packets* that fit, count the rest as dropped."""
        now = time.time_ns() if packets else 0
        with self._lock:
            self._active -= 1
            if self._waiting_idle and not self._active:
                self._idle.notify_all()
            if not packets:
                return
            total = sum(map(len, packets))
            room = 0 if self._closing else self._limit - self._queued
            if total > room:  # keep what fits, in order
                kept = total = 0
                for pkt in packets:
                    if total + len(pkt) > room:
                        break
                    total += len(pkt)
                    kept += 1
                self._dropped += _packet_count(packets[kept:], gso)
                if not kept:
                    return
                del packets[kept:]
            if not self._queue:
                self._wake.notify()  # the capture thread waits only on an empty buffer
            self._queue.append((now, direction, packets, gso, total))
            self._queued += total

    def _drain(self) -> None:
        """The capture thread: write what is queued, until closing and nothing is left."""
        writer, interface = self._writer, self._interface
        while True:
            with self._lock:
                while not self._queue:
                    if self._closing:
                        return
                    self._wake.wait()
                batches, self._queue = self._queue, []
            lost = written = 0
            for timestamp_ns, direction, data, gso, _ in batches:
                if self._error is None:
                    packets: Sequence[ReadableBuffer] = data
                    try:
                        if gso:
                            packets = [s for d in data for s in _segments(d)]
                        writer.write(interface, packets, direction, timestamp_ns)
                    except Exception as exc:  # raised by close()
                        self._error = exc
                        lost += len(packets)
                    else:
                        written += len(packets)
                else:
                    lost += _packet_count(data, gso)
            with self._lock:
                self._queued -= sum(batch[4] for batch in batches)
                self._recorded += written
                self._dropped += lost

    # -- the rest is tun's --------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not forwarded: also keeps a half-made wrapper finite
            raise AttributeError(name)
        return getattr(self.tun, name)

    def __enter__(self) -> CapturedTun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<capture of {self.tun!r}>"


class CapturedGsoTun(CapturedTun):
    """A :class:`CapturedTun` of a :class:`GsoTun`: super-packets pass whole, recorded split."""

    __slots__ = ()

    def read_gso(
        self,
        bufs: Sequence[WriteableBuffer],
        sizes: MutableSequence[int],
        offset: int = _GSO_OFFSET,
    ) -> int:
        """``tun.read_gso``; each packet is recorded as the segments it stands for, "in"."""
        start = offset - VNET_HDR_LEN
        read_gso: Callable[..., int] = self.tun.read_gso  # type: ignore[attr-defined]
        self._enter()
        n = 0
        try:
            n = read_gso(bufs, sizes, offset)
            return n
        finally:
            self._keep("in", [_copy(bufs[i], start, offset + sizes[i]) for i in range(n)], True)

    def write_gso(self, bufs: Sequence[ReadableBuffer], offset: int = _GSO_OFFSET) -> int:
        """``tun.write_gso``; each packet is recorded as the segments it stands for, "out"."""
        start = offset - VNET_HDR_LEN
        write_gso: Callable[..., int] = self.tun.write_gso  # type: ignore[attr-defined]
        self._enter()
        n = 0
        try:
            n = write_gso(bufs, offset)
            return n
        finally:
            self._keep("out", [_copy(bufs[i], start, None) for i in range(n)], True)


def capture(
    tun: Tun,
    file: StrOrBytesPath | IO[bytes] | Writer,
    *,
    pcap_format: PcapFormat = "pcapng",
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    name: str | None = None,
) -> CapturedTun:
    """Return a Tun that behaves as *tun* and records every packet crossing it into *file*.

    Packets read from it are recorded as direction "in" (they came to this
    program), packets written to it as "out", each with a nanosecond
    timestamp, in an interface block named *name* (default ``tun.name()``;
    give one when two devices share a name, as ``tun0`` in two network
    namespaces). *file* is a path
    (opened now, closed by ``close()``), a binary file object (flushed by
    ``close()``, left open), or a :class:`tunkit.pcap.Writer`: pass one
    Writer to several ``capture`` calls and their Tuns share the file, one
    interface block each (then *pcap_format* is the Writer's; ``close()``
    flushes it, and closing it is yours).

    Safe for a reader and a writer thread at once. At most *buffer_size*
    bytes of packets wait for the capture thread (``tunkit-capture:<name>``);
    when they do not fit, the capture record is dropped and counted in
    ``capture_stats().dropped``, the packet itself goes on. If *tun* is a
    :class:`GsoTun` the result is one too (:class:`CapturedGsoTun`), so that
    ``copy`` still moves super-packets whole; each is recorded as the
    segments it stands for. ``close()`` closes *tun*, writes what is queued
    and joins the thread.

    Raises:
        ValueError: *buffer_size* is negative, *pcap_format* unknown, or a
            classic pcap Writer already has its one interface.
        OSError: the file cannot be opened or written.
    """
    if buffer_size < 0:
        raise ValueError(f"buffer_size {buffer_size} must not be negative")
    owns_writer = not isinstance(file, Writer)
    writer = Writer(file, pcap_format=pcap_format) if not isinstance(file, Writer) else file
    cls = CapturedGsoTun if isinstance(tun, GsoTun) else CapturedTun
    try:
        label = tun.name() if name is None else name
        return cls(tun, writer, owns_writer=owns_writer, buffer_size=buffer_size, name=label)
    except BaseException:
        if owns_writer:
            writer.close()
        raise

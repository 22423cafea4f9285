"""``bridge --verbose``: one summary line per packet, printed without holding the bridge up.

The packets come from :func:`tunkit.capture`, whose thread hands each batch
it records to a :class:`TeeWriter`: the batch goes to the pcap file (with
``--pcap``) and, if it was read from a device ("in": one packet crossing
the bridge), to :class:`PacketLines`. That is already off the packets' way:
a capture that falls behind drops records, never packets.

:class:`PacketLines` then bounds what printing costs. It holds at most
:data:`QUEUE_LINES` lines and prints them in batches, at most one batch per
:data:`PERIOD` seconds, on a thread of its own: some 10,000 lines a
second. A line that does not fit is not made (the packet is only counted),
so a fast bridge pays for a bounded number of summaries, not one per
packet, and a slow terminal holds nothing up. What was left out is said in
a line of its own, and counted in :meth:`PacketLines.not_shown`.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING, Final

from rich.console import Console

from ..packet import describe
from ..pcap import Direction, Writer

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, StrOrBytesPath

__all__ = ["PERIOD", "QUEUE_LINES", "PacketLines", "TeeWriter"]

QUEUE_LINES: Final = 1000  # lines waiting to be printed, at most
PERIOD: Final = 0.1  # seconds between two printed batches, at least


class PacketLines:
    """Print one line per packet on a thread of its own (``tunkit-verbose:lines``).

    *routes* names each capture interface's direction across the bridge
    (``"tka → tkb"`` for interface 0, say). Lines are written to *console*'s
    file whole, never wrapped, with the seconds since this object was made, from
    :meth:`start` on (lines offered before wait, up to the bound).
    ``close()`` prints what is queued and joins the thread.
    """

    def __init__(self, console: Console, routes: Sequence[str]) -> None:
        self._console = console
        self._routes = list(routes)
        self._start_ns = time.time_ns()
        self._lock = threading.Lock()  # guards the fields below
        self._ready = threading.Condition(self._lock)  # lines queued, or closing
        self._lines: list[str] = []
        self._making = 0  # lines being made outside the lock: their room is taken
        self._not_shown = 0  # packets left out, all told
        self._reported = 0  # of those, the ones said in a line already
        self._printed = 0
        self._closing = False
        self._thread = threading.Thread(target=self._print, name="tunkit-verbose:lines")

    def start(self) -> None:
        """Start printing (once)."""
        if self._thread.ident is None:
            self._thread.start()

    def offer(self, interface: int, packets: Sequence[ReadableBuffer], timestamp_ns: int) -> None:
        """Queue a line for each of *packets* that fits; count the others. Never blocks."""
        with self._lock:
            room = 0 if self._closing else QUEUE_LINES - len(self._lines) - self._making
            taken = packets[:max(0, room)]
            self._not_shown += len(packets) - len(taken)
            if not taken:
                return
            self._making += len(taken)
        # Made outside the lock, so that the other capture thread and the
        # printing one need not wait for these summaries.
        when = (timestamp_ns - self._start_ns) / 1e9
        route = self._routes[interface]
        lines = [f"{when:9.6f} {route} {describe(pkt)}" for pkt in taken]
        with self._lock:
            self._making -= len(lines)
            if not self._lines:
                self._ready.notify()
            self._lines.extend(lines)

    def not_shown(self) -> int:
        """Packets that crossed and got no line (the queue was full), so far."""
        with self._lock:
            return self._not_shown

    def printed(self) -> int:
        """Lines printed so far."""
        with self._lock:
            return self._printed

    def _print(self) -> None:
        while True:
            with self._lock:
                while not self._lines and not self._closing:
                    self._ready.wait()
                lines, self._lines = self._lines, []
                missed = self._not_shown - self._reported
                self._reported = self._not_shown
                self._printed += len(lines)
                closing = self._closing
            if missed:
                lines.append(f"[{missed:,} packets not shown: they came faster than "
                             "lines are printed]")
            if lines:
                # Straight to the console's file, in one write: rich would spend
                # ~17 ms rendering 1,000 lines, and its counter lines, written
                # in one call each too, stay whole beside these.
                out = self._console.file
                out.write("\n".join(lines) + "\n")
                out.flush()
            if closing:
                return
            time.sleep(PERIOD)  # meanwhile lines queue up to QUEUE_LINES, the rest are counted

    def close(self) -> None:
        """Print what is queued and join the thread; idempotent."""
        with self._lock:
            self._closing = True
            self._ready.notify()
        self.start()  # what was offered is printed, even if printing had not begun
        self._thread.join()


class TeeWriter(Writer):
    """A pcap Writer for :func:`tunkit.capture` that also gives packets read to *packet_lines*.

    *file* is the pcap file's path, or ``None`` for none (the interface
    blocks then go to memory, and packets nowhere else). Set
    :attr:`packet_lines` before the captures start.
    """

    def __init__(self, file: StrOrBytesPath | None) -> None:
        target: StrOrBytesPath | IO[bytes] = io.BytesIO() if file is None else file
        super().__init__(target)
        self._to_file = file is not None
        self.packet_lines: PacketLines | None = None

    def write(
        self,
        interface: int,
        packets: Iterable[ReadableBuffer],
        direction: Direction | None = None,
        timestamp_ns: int | None = None,
    ) -> None:
        """:meth:`Writer.write`, and a line for each packet read ("in")."""
        if timestamp_ns is None:
            timestamp_ns = time.time_ns()
        batch = packets if isinstance(packets, Sequence) else list(packets)
        if self.packet_lines is not None and direction == "in":
            self.packet_lines.offer(interface, batch, timestamp_ns)
        if self._to_file:
            super().write(interface, batch, direction, timestamp_ns)

"""GsoNativeTun: a TUN device with the virtio-net header: kernel offloads, super-packets."""

from __future__ import annotations

import errno
import os
from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, Final, final

from .._errors import ClosedError, TooManySegmentsError
from .._offload import Coalescer, Write, _Malformed, _TooBig, split
from .._offload.headers import byte_view
from .._offload.vnet import (
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR,
    VNET_HDR_LEN,
    gso_segments,
)
from .._offload_state import OffloadKind, describe_errno
from .._tun import check_offset
from . import netlink
from .constants import IFF_VNET_HDR
from .device import _DROPPED_ON_WRITE, _MAX_KERNEL_PACKET, BATCH_OFFLOAD, HEADROOM, NativeTun
from .ioctl import OFFLOAD_USO, get_iff, get_vnet_hdr_sz, set_vnet_hdr_sz

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["GsoNativeTun"]

_readv: Final = os.readv
_writev: Final = os.writev
_write: Final = os.write  # one buffer: no list to build

_SPLIT_FIRST: Final = 1  # PacketIo.write_gso: a super-packet of a refused kind
# The kinds of super-packet a kernel refused, as bits (PacketIo.write_gso's *refused*).
_REFUSED_TCP: Final = 1
_REFUSED_UDP: Final = 2


_KIND_OF_BIT: Final = {_REFUSED_TCP: OffloadKind.TCP, _REFUSED_UDP: OffloadKind.UDP}


def _refused_bit(gso_type: int) -> int:
    """The refusal bit of a virtio ``gso_type``: UDP (USO) or TCP (TSO, v4 or v6)."""
    if gso_type & ~VIRTIO_NET_HDR_GSO_ECN == VIRTIO_NET_HDR_GSO_UDP_L4:
        return _REFUSED_UDP
    return _REFUSED_TCP


@final
class GsoNativeTun(NativeTun):
    """A :class:`NativeTun` with the virtio-net header: the kernel's offloads, and super-packets.

    What :func:`create_tun` returns with ``offload=True`` (and :func:`open_tun`
    for a descriptor with ``IFF_VNET_HDR``). ``read`` splits super-packets
    into packets, ``write`` coalesces a batch into super-packets (GRO), and
    ``read_gso``/``write_gso`` move super-packets whole: this class is a
    :class:`tunkit.GsoTun`, while a plain :class:`NativeTun` is not.
    """

    def __init__(
        self,
        fd: int,
        name: str,
        *,
        vnet_hdr: bool,
        offload_flags: int,
        ns_fd: int | None,
        monitor: netlink.LinkMonitor,
    ) -> None:
        """Private: use :func:`create_tun` or :func:`open_tun` (see :class:`NativeTun`)."""
        # Read side, guarded by the read lock, which read() and read_gso()
        # hold on every path (C too): either may be called from its own thread.
        # One kernel packet (header included) lands in _rbuf; _pending is the
        # length of one read there but not yet handed out (it did not fit the
        # rest of a batch), 0 if none.
        self._rbuf = bytearray(_MAX_KERNEL_PACKET)
        self._rview = memoryview(self._rbuf)
        self._pending = 0
        self._read_error: BaseException | None = None  # kept for the next call
        self._split_sizes = [0] * BATCH_OFFLOAD
        # Write side, guarded by the write lock. A kind of super-packet that the
        # kernel refused (EINVAL) is split before writing from then on.
        uso = offload_flags & OFFLOAD_USO == OFFLOAD_USO
        self._coalescer = Coalescer(tcp=True, udp=bool(uso))
        self._refused = 0  # kinds refused (_REFUSED_TCP, _REFUSED_UDP), as PacketIo.write_gso takes
        self._seg_bufs: list[bytearray] = []  # segments of a refused super-packet
        self._seg_sizes: list[int] = []
        # An error that cost packets (dropped below the count a write returned),
        # raised by the next write or write_gso.
        self._write_error: OSError | None = None
        # The fault seam (tests only, see _fail_gso): the next _fault_left
        # super-packets of the kinds in _fault_kinds fail with _fault_errno
        # instead of reaching the kernel. 0: no fault, one int check per write.
        self._fault_left = 0
        self._fault_kinds = 0
        self._fault_errno = 0
        super().__init__(
            fd, name, vnet_hdr=vnet_hdr, offload_flags=offload_flags, ns_fd=ns_fd, monitor=monitor
        )
        self._check_attach()

    def _check_attach(self) -> None:
        """Check that the kernel frames packets as this object does; fix it, or turn offload off.

        Read back on every open and attach (a persistent device or another
        queue may have been set otherwise by an earlier owner): TUNGETIFF
        must show ``IFF_VNET_HDR`` and TUNGETVNETHDRSZ 10 bytes. A wrong size
        is set back (TUNSETVNETHDRSZ); what stays wrong turns TCP and UDP
        offload off, with the reason, in :meth:`offload_state`.
        """
        raw = self._fd.fileno()
        problem = None
        try:
            if not get_iff(raw)[1] & IFF_VNET_HDR:
                problem = "TUNGETIFF reads back no IFF_VNET_HDR on attach"
            else:
                size = get_vnet_hdr_sz(raw)
                if size != VNET_HDR_LEN:
                    set_vnet_hdr_sz(raw, VNET_HDR_LEN)
                    again = get_vnet_hdr_sz(raw)
                    if again != VNET_HDR_LEN:
                        problem = (
                            f"TUNGETVNETHDRSZ reads back {again} bytes on attach, "
                            f"not {VNET_HDR_LEN}, and setting it did not hold"
                        )
        except OSError as exc:
            problem = f"the attach check failed: {describe_errno(exc.errno or 0)}"
        if problem is not None:
            with self._write_lock:
                for bit in (_REFUSED_TCP, _REFUSED_UDP):
                    self._turn_off_bit(bit, problem, None)

    def _fail_gso(self, kinds: int, count: int, err: int = errno.EINVAL) -> None:
        """Private, for tests only: fail the next *count* super-packet writes of *kinds* with *err*.

        The fault seam: a real device whose kernel refuses its coalesced
        writes. *kinds* is a set of bits (1: TCP, 2: UDP, as
        ``_REFUSED_TCP``/``_REFUSED_UDP``); each such write, on every path
        (``write``, ``write_gso``, in Python and in C), fails as if the
        kernel had answered *err*, and nothing reaches the kernel. Packets of
        other kinds and plain packets are written as usual. ``count=0`` ends it.
        The Python paths and PacketIo each count *count* on their own (set
        before traffic starts: PacketIo reads it without the GIL).
        """
        with self._write_lock:
            self._fault_kinds = kinds
            self._fault_errno = err
            self._fault_left = count
            if self._io is not None:
                self._io._fail_gso(kinds, count, err)

    def _fault(self, gso_type: int) -> None:
        """The fault seam on the Python paths: raise the injected error for *gso_type*, if due.

        Called with the write lock held, only when ``_fault_left`` is non-zero.
        """
        if self._fault_kinds & _refused_bit(gso_type):
            self._fault_left -= 1
            raise OSError(self._fault_errno, os.strerror(self._fault_errno))

    # -- packets: read splits, write coalesces ----------------------------------

    def read(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = HEADROOM
    ) -> int:
        """Read packets into ``bufs[i][offset:]``, splitting super-packets; return the count.

        Blocks until one kernel packet comes, then takes the ones already
        waiting while buffers remain. A super-packet (TCP or UDP GSO) becomes
        its segments, one per buffer, with their own headers and checksums; a
        partial checksum is completed. A malformed kernel packet is dropped
        and counted (``dropped_malformed``) and the read goes on. A kernel
        packet that does not fit the buffers left after others were stored is
        kept for the next call, where it comes first; one that does not fit
        from the first buffer on is dropped and counted (``dropped_too_big``).
        An error after some packets were stored is raised by the next call.

        Raises:
            OffsetError: *offset* is below ``mro()``.
            ValueError: fewer buffers than ``batch_size()``, or fewer sizes than buffers.
            TooManySegmentsError: a super-packet has more segments than
                *bufs*; it is dropped (and counted), and the next read goes on.
            ClosedError: the device is closed, or closes while the call waits.
        """
        self._check_read_args(bufs, sizes, offset)
        want = len(bufs)
        iov: list[WriteableBuffer] = [self._rbuf]
        rview = self._rview
        with self._read_lock:
            if self._read_error is not None:
                error, self._read_error = self._read_error, None
                raise error
            stored = 0
            while True:
                if self._pending:
                    n, self._pending = self._pending, 0
                else:
                    n = self._receive(iov, stored)
                    if n < 0:
                        return stored
                try:
                    if stored:
                        got = self._handle_kernel_packet(
                            rview[:n], bufs[stored:], self._split_sizes, offset
                        )
                        sizes[stored : stored + got] = self._split_sizes[:got]
                    else:
                        got = self._handle_kernel_packet(rview[:n], bufs, sizes, offset)
                except (TooManySegmentsError, _TooBig) as exc:
                    if stored:
                        # First in the next call, with all the buffers: more of
                        # them, and the first one may be larger (forwarding
                        # loops make it 64 KB, for a packet of a grown MTU).
                        self._pending = n
                        return stored
                    self._dropped_too_big += 1
                    if isinstance(exc, TooManySegmentsError):
                        raise
                    continue
                stored += got
                if stored >= want:
                    return stored

    def _receive(self, iov: list[WriteableBuffer], stored: int) -> int:
        """One packet from the kernel into *iov*, under the read lock, for a read that
        has *stored* packets so far: the first is waited for, a later one only taken
        if ready. -1: none ready, or an error, kept for the next call to raise."""
        if not stored:
            return self._fd.call_locked(_readv, iov, "read")
        try:
            return self._fd.call_locked(_readv, iov, "read", block=False)
        except OSError as exc:
            self._read_error = exc
            return -1

    def _handle_kernel_packet(
        self,
        data: memoryview,
        bufs: Sequence[WriteableBuffer],
        sizes: MutableSequence[int],
        offset: int,
    ) -> int:
        """Turn one kernel read (virtio header + packet) into packets in *bufs*; return the count.

        A malformed one is dropped and counted: 0. Called with the read lock held.

        Raises:
            TooManySegmentsError: more segments than buffers; nothing stored
                or counted (the caller decides).
            _TooBig: a packet does not fit its buffer; nothing counted (the
                caller decides).
        """
        try:
            count = split(data, bufs, sizes, offset)
        except _Malformed:
            self._dropped_malformed += 1
            return 0
        if data[1] & ~VIRTIO_NET_HDR_GSO_ECN != VIRTIO_NET_HDR_GSO_NONE:
            self._gso_split += 1
        self._packets_read += count
        self._bytes_read += sum(sizes[:count]) if count > 1 else sizes[0]
        return count

    def write(self, bufs: Sequence[ReadableBuffer], offset: int = HEADROOM) -> int:
        """Write ``bufs[i][offset:]`` as packets, coalescing each flow's into super-packets.

        The TCP segments and UDP datagrams of one flow in the batch go to the
        kernel as one super-packet (GRO); every other packet is written alone.
        Returns how many packets were handled, not how many system calls. If
        the kernel refuses a super-packet (EINVAL: some kernels lack USO), its
        packets are written one by one, that kind of coalescing is turned off
        for the device, and ``stats().gro_refused`` counts it. A packet the
        kernel refuses is dropped and counted as in :meth:`NativeTun.write`.

        The count returned means: these first packets were handled, and no
        later one was sent, so a retry of ``bufs[count:]`` sends no packet
        twice. The writes go out flow by flow, so when one fails after others
        went out, the count is 1 + the index of the last packet that went
        out; a packet below it that did not go out (of a flow written later)
        is dropped and counted (``dropped_write``), and the error that cost
        it is raised by the next call.

        Raises:
            OffsetError: *offset* is below ``mwo()``.
            ClosedError: the device is closed, or closes during the call.
            OSError: any other refusal of the first write, or the error kept
                by the call before.
        """
        if offset < HEADROOM:
            check_offset("write", offset, HEADROOM)
        fd = self._fd
        with self._write_lock:
            if self._write_error is not None:
                error, self._write_error = self._write_error, None
                raise error
            writes = self._coalescer.coalesce(bufs, offset)
            for k, w in enumerate(writes):
                # A super-packet of a kind refused earlier in this batch (the
                # coalescer heard of it too late to leave it whole) goes apart.
                if not w.gso or not self._was_refused(w.iov[0][1]):
                    try:
                        if self._fault_left and w.gso:
                            self._fault(w.iov[0][1])
                        n = fd.call_locked(_writev, w.iov, "write")
                    except OSError as exc:
                        if isinstance(exc, ClosedError) or exc.errno not in _DROPPED_ON_WRITE:
                            return self._write_failed(writes, k, 0, exc)
                        if exc.errno != errno.EINVAL or not w.gso:
                            self._dropped_write += len(w.packets)
                            continue
                        self._refuse(w.iov[0][1], False, exc.errno)  # and apart, below
                    else:
                        if w.gso:
                            self._gro_coalesced += len(w.packets)
                            self._packets_written += len(w.packets)
                            self._bytes_written += sum(map(len, w.packets))
                        else:
                            self._packets_written += 1
                            self._bytes_written += n - VNET_HDR_LEN
                        continue
                for j, iov in enumerate(w.one_by_one()):
                    try:
                        self._write_one(iov)
                    except OSError as exc:
                        return self._write_failed(writes, k, j, exc)
            return len(bufs)

    def _write_failed(self, writes: list[Write], k: int, j: int, exc: OSError) -> int:
        """What :meth:`write` returns when ``writes[k]`` failed with *exc* after *j* of its
        packets (written one by one) and every earlier write were handled.

        Raises:
            OSError: *exc*, when no packet was handled.
        """
        handled = [i for w in writes[:k] for i in w.indices]
        handled += writes[k].indices[:j]
        if not handled:
            raise exc
        count = max(handled) + 1
        lost = sum(i < count for i in writes[k].indices[j:])
        lost += sum(i < count for w in writes[k + 1 :] for i in w.indices)
        if lost:
            # Below the count but never sent: dropped, and the error that cost
            # them is raised by the next call. (With none lost, the caller's
            # retry starts with the packet that failed, and meets the error
            # or sends it.)
            self._dropped_write += lost
            self._write_error = exc
        return count

    def _was_refused(self, gso_type: int) -> bool:
        """Whether the kernel refused a super-packet of *gso_type*'s kind before."""
        return bool(self._refused & _refused_bit(gso_type))

    def _refuse(self, gso_type: int, whole: bool, err: int) -> None:
        """The kernel refused a super-packet of *gso_type* with *err*: split that kind from now on.

        *whole*: one of ``write_gso``'s, else one that ``write`` coalesced.
        Called with the write lock held.
        """
        self._gro_refused += 1
        bit = _refused_bit(gso_type)
        proto = "TCP" if bit == _REFUSED_TCP else "UDP"
        what = f"a {proto} super-packet (write_gso)" if whole else f"a coalesced {proto} write"
        reason = f"the kernel refused {what}: {describe_errno(err)}"
        self._turn_off_bit(bit, reason, err)

    def _turn_off_bit(self, bit: int, reason: str, err: int | None) -> None:
        """Split the kind of refusal *bit* from now on, and say why in offload_state()."""
        self._refused |= bit
        if bit == _REFUSED_UDP:
            self._coalescer.udp = False
        else:
            self._coalescer.tcp = False
        self._turn_off(_KIND_OF_BIT[bit], reason, err)

    def _write_one(self, iov: list[memoryview]) -> None:
        """Write one packet (header and packet in *iov*), dropping and counting a refusal."""
        try:
            n = self._fd.call_locked(_writev, iov, "write")
        except OSError as exc:
            if isinstance(exc, ClosedError) or exc.errno not in _DROPPED_ON_WRITE:
                raise
            self._dropped_write += 1
            return
        self._packets_written += 1
        self._bytes_written += n - VNET_HDR_LEN

    # -- super-packets whole ----------------------------------------------------

    def read_gso(
        self, bufs: Sequence[WriteableBuffer], sizes: MutableSequence[int], offset: int = HEADROOM
    ) -> int:
        """Read kernel packets whole, super-packets included; return how many were stored.

        Packet ``i`` is stored at ``bufs[i][offset:offset + sizes[i]]`` with
        its 10-byte virtio-net header at ``bufs[i][offset - 10:offset]``: a
        GSO super-packet of up to 64 KB of one TCP or UDP flow, or a single
        packet (``GSO_NONE``, possibly with a partial checksum to complete).
        Blocks until the first comes, then takes those already waiting, one
        per buffer. Any number of buffers will do; give each room for
        ``offset + 65535`` bytes, because a packet longer than its buffer's
        room is dropped and counted (``dropped_too_big``), as is one whose
        header does not match it (``dropped_malformed``). An error after some
        packets were stored is raised by the next call.

        Raises:
            OffsetError: *offset* is below ``mro()``.
            ValueError: no buffers, or fewer sizes than buffers.
            ClosedError: the device is closed, or closes while the call waits.
        """
        if offset < HEADROOM:
            check_offset("read", offset, HEADROOM)
        if not bufs:
            raise ValueError("read_gso with 0 buffers")
        if len(sizes) < len(bufs):
            raise ValueError(f"read_gso with {len(sizes)} sizes for {len(bufs)} buffers")
        io = self._io
        want = len(bufs)
        fd = self._fd
        overflow = self._overflow
        at = offset - VNET_HDR_LEN
        with self._read_lock:
            if self._read_error is not None:
                error, self._read_error = self._read_error, None
                raise error
            if io is not None and not self._pending:
                # The whole batch in one C call (PacketIo.read_gso): the reads,
                # the header checks and the counters, with the GIL released
                # once. Under the read lock all the same, as every read is:
                # the error it keeps and read()'s _pending are this lock's.
                stored, err = io.read_gso(bufs, sizes, at, overflow)
                if err:
                    exc = fd.errno_failure(err, "read")
                    if not stored:
                        raise exc
                    self._read_error = exc
                return stored
            stored = 0
            while stored < want:
                room = byte_view(bufs[stored], at)
                iov: list[WriteableBuffer] = [room, overflow]
                if self._pending:
                    # Left by read(): hand it on whole if it fits.
                    n, self._pending = self._pending, 0
                    if n <= len(room):
                        room[:n] = self._rview[:n]
                else:
                    n = self._receive(iov, stored)
                    if n < 0:
                        return stored
                if n > len(room):
                    self._dropped_too_big += 1
                    continue
                segments, hdr_len = gso_segments(room[:n])
                if not segments:
                    self._dropped_malformed += 1
                    continue
                ip_len = n - VNET_HDR_LEN
                sizes[stored] = ip_len
                stored += 1
                self._packets_read += segments
                # As many bytes as the segments carry: headers once per segment.
                self._bytes_read += ip_len + (segments - 1) * hdr_len
                if hdr_len:
                    self._gso_read += 1
            return stored

    def write_gso(self, bufs: Sequence[ReadableBuffer], offset: int = HEADROOM) -> int:
        """Write packets whole with their virtio-net headers; return how many were handled.

        Packet ``i`` is ``bufs[i][offset:]`` and its header is
        ``bufs[i][offset - 10:offset]`` (as :meth:`read_gso` stores them): one
        system call each, super-packets included. A super-packet the kernel
        refuses (EINVAL, a kernel without USO say) is split and written
        segment by segment, and that kind is split first from then on
        (``stats().gro_refused``): nothing is lost. Other refusals are
        dropped and counted as in :meth:`write`. The packets go out in order:
        when another error hits after some went out, returns how many were
        handled, and the caller's retry starts with the one that failed. (If
        it failed between the segments of a split super-packet, that one
        counts as handled, its other segments are dropped and counted, and
        the error is raised by the next call: a retry sends no segment twice.)

        Raises:
            OffsetError: *offset* is below ``mwo()``.
            ClosedError: the device is closed, or closes during the call.
            OSError: any other refusal of the first packet, or the error kept
                by the call before.
        """
        if offset < HEADROOM:
            check_offset("write", offset, HEADROOM)
        io = self._io
        if io is None:
            return self._write_gso_pure(bufs, offset)
        if self._write_error is not None:  # a hint: _write_gso_pure raises it, under the lock
            return self._write_gso_pure(bufs, offset)
        # The batch in C (PacketIo.write_gso). A packet it hands back (a kind
        # the kernel refused, before or now) and the rest of the batch go the
        # Python way: each packet is handled once, whatever number of them
        # are handed back.
        n, err = io.write_gso(bufs, offset - VNET_HDR_LEN, self._refused)
        if not err:
            return n
        if err == _SPLIT_FIRST or err == -errno.EINVAL:
            return self._write_gso_pure(bufs, offset, n, refused=err == -errno.EINVAL)
        if n:
            return n  # in order: the caller's retry starts with the packet that failed
        raise self._fd.errno_failure(err, "write")

    def _write_gso_pure(
        self, bufs: Sequence[ReadableBuffer], offset: int, done: int = 0, refused: bool = False
    ) -> int:
        """:meth:`write_gso` in Python, from ``bufs[done]`` on; return the count handled.

        *refused*: the kernel has just refused ``bufs[done]`` (EINVAL), a super-packet.
        """
        call = self._fd.call_locked
        at = offset - VNET_HDR_LEN
        with self._write_lock:
            if self._write_error is not None:
                error, self._write_error = self._write_error, None
                if done:
                    self._write_error = error  # still the next call's
                    return done
                raise error
            for i in range(done, len(bufs)):
                data = byte_view(bufs[i], at)
                kind = data[1] & ~VIRTIO_NET_HDR_GSO_ECN if len(data) > 1 else 0
                gso = kind != VIRTIO_NET_HDR_GSO_NONE
                try:
                    apart = gso and (refused or self._was_refused(kind))
                    if not apart:
                        try:
                            if self._fault_left and gso:
                                self._fault(kind)
                            call(_write, data, "write")
                        except OSError as exc:
                            if isinstance(exc, ClosedError) or exc.errno not in _DROPPED_ON_WRITE:
                                raise
                            apart = gso and exc.errno == errno.EINVAL
                            if not apart:
                                self._dropped_write += 1
                        else:
                            self._count_written(data)
                    # A kind refused before is split first; the first refusal
                    # of a kind (EINVAL: PacketIo hands back only that) turns it off.
                    if apart and self._write_split(data) and not self._was_refused(kind):
                        self._refuse(kind, True, errno.EINVAL)
                except OSError:
                    if done:
                        return done  # in order: the caller's retry starts with this one
                    raise
                refused = False
                done += 1
                if self._write_error is not None:
                    return done  # a split that failed after some segments went out
        return done

    def _count_written(self, data: memoryview) -> None:
        """Count what a whole kernel packet (header + packet) written as it is carried."""
        segments, hdr_len = gso_segments(data)
        if hdr_len:
            self._gso_written += 1
        segments = segments or 1  # not ours to judge: the kernel took it
        self._packets_written += segments
        self._bytes_written += len(data) - VNET_HDR_LEN + (segments - 1) * hdr_len

    def _write_split(self, data: memoryview) -> bool:
        """Split super-packet *data* (header + packet) and write the segments one by one.

        Returns whether it could be split; one that cannot is dropped and
        counted in ``dropped_write``. Called with the write lock held.

        Raises:
            OSError: the first segment's write failed (nothing went out).
        """
        segments, hdr_len = gso_segments(data)
        if not segments:
            self._dropped_write += 1
            return False
        seg_room = VNET_HDR_LEN + hdr_len + VNET_HDR.unpack_from(data)[3]
        if len(self._seg_bufs) < segments or len(self._seg_bufs[0]) < seg_room:
            count = max(segments, len(self._seg_bufs))
            size = max(seg_room, len(self._seg_bufs[0]) if self._seg_bufs else 0)
            # Zero-filled: the first 10 bytes of each stay an empty virtio header.
            self._seg_bufs = [bytearray(size) for _ in range(count)]
            self._seg_sizes = [0] * count
        try:
            count = split(data, self._seg_bufs, self._seg_sizes, VNET_HDR_LEN)
        except (_Malformed, _TooBig, TooManySegmentsError):
            self._dropped_write += 1
            return False
        for i in range(count):
            seg = memoryview(self._seg_bufs[i])[: VNET_HDR_LEN + self._seg_sizes[i]]
            try:
                self._write_one([seg])
            except OSError as exc:
                if not i:
                    raise
                # Part of it went out: the super-packet was handled (a retry
                # must not send those segments again); the rest is dropped,
                # and the error that cost it is raised by the next call.
                self._dropped_write += count - i
                self._write_error = exc
                break
        return True

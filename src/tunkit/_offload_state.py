"""What a device asked of the kernel's offloads, what it got, and what it turned off since.

Pure values, no I/O: ``NativeTun.offload_state()`` makes them (SPEC.md,
"Diagnosis"), ``tunkit doctor`` and people read them.
"""

from __future__ import annotations

import dataclasses
import enum
import errno as _errno
import os
import time

__all__ = ["OffloadKind", "OffloadOff", "OffloadState", "describe_errno"]


@enum.unique
class OffloadKind(enum.Enum):
    """One kind of kernel offload a TUN device with the virtio-net header may use.

    ``CHECKSUM``: partial checksums (``TUN_F_CSUM``), completed by whoever
    hands a packet on. ``TCP``: TCP segmentation (``TUN_F_TSO4``,
    ``TUN_F_TSO6``): the kernel hands over TCP super-packets, and ``write``
    coalesces TCP segments into them (GRO). ``UDP``: UDP segmentation
    (``TUN_F_USO4``, ``TUN_F_USO6``, Linux 6.2 and later), the same for UDP.
    """

    CHECKSUM = "checksum"
    TCP = "tcp"
    UDP = "udp"

    def __str__(self) -> str:
        return self.value


def describe_errno(err: int) -> str:
    """``"EINVAL (Invalid argument)"``: the symbolic name of *err* and its text."""
    name = _errno.errorcode.get(err, f"errno {err}")
    return f"{name} ({os.strerror(err)})"


@dataclasses.dataclass(frozen=True, slots=True)
class OffloadOff:
    """One offload kind a device turned off on its own, with when and why.

    *when* is wall-clock time (``time.time()``, seconds), so a person can
    read it; *errno* is the kernel's answer that caused it, ``None`` when it
    was no system call's failure (an attach check that found a mismatch).
    The packets of that kind go on, split into plain packets.
    """

    kind: OffloadKind
    when: float
    reason: str
    errno: int | None = None

    def __str__(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.when))
        return f"{self.kind} off since {stamp}Z: {self.reason}"


@dataclasses.dataclass(frozen=True, slots=True)
class OffloadState:
    """What a device asked of the kernel's offloads, what it accepted, and what is off since.

    *requested*: the kinds asked for (``TUNSETOFFLOAD``); *accepted*: those
    the kernel took (and the attach check read back); *off*: each kind the
    device turned off since, once per kind, oldest first. In use are the
    accepted kinds not in *off* (:attr:`active`). A device without the
    virtio-net header asks for none.
    """

    requested: frozenset[OffloadKind]
    accepted: frozenset[OffloadKind]
    off: tuple[OffloadOff, ...] = ()

    @property
    def active(self) -> frozenset[OffloadKind]:
        """The accepted kinds still in use: *accepted* less the kinds in *off*."""
        return self.accepted - {o.kind for o in self.off}

    def __str__(self) -> str:
        def kinds(ks: frozenset[OffloadKind]) -> str:
            return ", ".join(k.value for k in OffloadKind if k in ks) or "none"

        lines = [
            f"requested: {kinds(self.requested)}",
            f"accepted:  {kinds(self.accepted)}",
            f"active:    {kinds(self.active)}",
        ]
        lines += [f"off:       {o}" for o in self.off]
        return "\n".join(lines)

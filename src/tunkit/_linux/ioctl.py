"""The ioctls of ``/dev/net/tun``: open it, attach a device (TUNSETIFF), set its offloads.

Each function makes one kind of request and turns the kernel's refusals into
the errors a caller can act on (a ``PermissionError`` naming CAP_NET_ADMIN,
a ``FileExistsError`` for a name in use).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import Final

from .._offload.vnet import VNET_HDR_LEN
from .constants import (
    IFNAMSIZ,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
    TUNGETIFF,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
)

__all__ = [
    "IFREQ",
    "OFFLOAD_BASE",
    "OFFLOAD_USO",
    "TUN_PATH",
    "enable_vnet",
    "get_iff",
    "name_exists",
    "open_dev_tun",
    "set_iff",
    "set_offload",
]

TUN_PATH: Final = "/dev/net/tun"

# struct ifreq, <linux/if.h>: ifr_name[IFNAMSIZ], then a union of which the
# TUN ioctls use ifr_flags (short); 40 bytes in all on every Linux ABI.
IFREQ: Final = struct.Struct(f"={IFNAMSIZ}sH22x")
# What an offload device asks the kernel for (TUNSETOFFLOAD): partial
# checksums and TCP segmentation always, UDP segmentation where accepted.
OFFLOAD_BASE: Final = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
OFFLOAD_USO: Final = TUN_F_USO4 | TUN_F_USO6


def open_dev_tun() -> int:
    try:
        return os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(
            errno.ENOENT,
            f"{TUN_PATH} does not exist: load the TUN driver (modprobe tun)",
            TUN_PATH,
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            # The device node is there but no driver answers it.
            raise FileNotFoundError(
                errno.ENOENT,
                f"{TUN_PATH} has no driver behind it: load the TUN driver (modprobe tun)",
                TUN_PATH,
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionError(
                exc.errno,
                f"cannot open {TUN_PATH}: {os.strerror(exc.errno)} "
                "(creating a TUN device needs CAP_NET_ADMIN and access to the file)",
                TUN_PATH,
            ) from exc
        raise


def name_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def set_iff(fd: int, name: str, flags: int) -> str:
    """TUNSETIFF on *fd*; return the device's name (the kernel picks one for ``""``)."""
    try:
        result = fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), flags))
    except OSError as exc:
        shown = repr(name) if name else "(kernel-chosen name)"
        if exc.errno == errno.EPERM:
            raise PermissionError(
                exc.errno, f"creating TUN device {shown} needs CAP_NET_ADMIN"
            ) from exc
        if exc.errno == errno.EBUSY:
            raise FileExistsError(
                exc.errno,
                f"device name {name!r} is in use: that TUN device is open elsewhere",
            ) from None
        if exc.errno == errno.EINVAL and name and name_exists(name):
            raise FileExistsError(
                exc.errno, f"device name {name!r} is in use by a device that is not TUN"
            ) from None
        raise OSError(exc.errno, f"TUNSETIFF {shown}: {os.strerror(exc.errno or 0)}") from exc
    raw_name, _flags = IFREQ.unpack(result)
    return str(raw_name.split(b"\0", 1)[0].decode())


def get_iff(fd: int) -> tuple[str, int]:
    result = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ.size))
    raw_name, flags = IFREQ.unpack(result)
    return str(raw_name.split(b"\0", 1)[0].decode()), int(flags)


def set_offload(fd: int, flags: int) -> None:
    # TUNSETOFFLOAD takes the flags by value, not through a pointer.
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def enable_vnet(fd: int) -> int:
    """Set the virtio header size and ask for the offloads; return the TUN_F_* accepted.

    TSO and checksum offload first with USO (Linux 6.2 and later), then
    without it; a kernel that refuses even those gets none (whole packets
    with full checksums only), quietly: offload is a speed-up, not a feature
    a caller can lose.
    """
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("=i", VNET_HDR_LEN))
    for flags in (OFFLOAD_BASE | OFFLOAD_USO, OFFLOAD_BASE):
        try:
            set_offload(fd, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            continue
        return flags
    set_offload(fd, 0)
    return 0

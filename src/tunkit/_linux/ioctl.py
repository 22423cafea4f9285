"""The ioctls of ``/dev/net/tun``: open it, attach a device (TUNSETIFF), set its offloads,
its persistence, owner and group, and a multi-queue device's queue state.

Each function makes one kind of request and turns the kernel's refusals into
the errors a caller can act on (a ``PermissionError`` naming CAP_NET_ADMIN,
a ``FileExistsError`` for a name in use).
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
import struct
from typing import Final

from .._offload.vnet import VNET_HDR_LEN
from .constants import (
    IFF_ATTACH_QUEUE,
    IFF_DETACH_QUEUE,
    IFNAMSIZ,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
    TUNGETIFF,
    TUNGETVNETHDRSZ,
    TUNSETGROUP,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETOWNER,
    TUNSETPERSIST,
    TUNSETQUEUE,
    TUNSETVNETHDRSZ,
)

__all__ = [
    "IFREQ",
    "OFFLOAD_BASE",
    "OFFLOAD_USO",
    "TUN_PATH",
    "dev_tun_mode",
    "dev_tun_open_to",
    "enable_vnet",
    "get_iff",
    "get_vnet_hdr_sz",
    "name_exists",
    "open_dev_tun",
    "set_group",
    "set_iff",
    "set_offload",
    "set_owner",
    "set_persist",
    "set_queue",
    "set_vnet_hdr_sz",
]

TUN_PATH: Final = "/dev/net/tun"

# struct ifreq, <linux/if.h>: ifr_name[IFNAMSIZ], then a union of which the
# TUN ioctls use ifr_flags (short); 40 bytes in all on every Linux ABI.
IFREQ: Final = struct.Struct(f"={IFNAMSIZ}sH22x")
# What an offload device asks the kernel for (TUNSETOFFLOAD): partial
# checksums and TCP segmentation always, UDP segmentation where accepted.
OFFLOAD_BASE: Final = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
OFFLOAD_USO: Final = TUN_F_USO4 | TUN_F_USO6


def dev_tun_mode(path: str = TUN_PATH) -> str:
    """Describe who may open *path*: ``"mode 0600, owner root, group root"``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"not readable: {os.strerror(exc.errno or 0)}"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner {owner}, group {group}"


def dev_tun_open_to(uid: int | None, gid: int | None, path: str = TUN_PATH) -> bool:
    """Whether the user *uid* (with group *gid* and its supplementary groups) or, with
    *uid* ``None``, every member of group *gid*, may open *path* read-write.

    What the file's mode bits say (no ACLs); root may always.
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    mode = stat.S_IMODE(st.st_mode)
    if uid == 0 or mode & 0o006 == 0o006:
        return True
    if uid is not None and uid == st.st_uid:
        return mode & 0o600 == 0o600
    groups = set() if gid is None else {gid}
    if uid is not None:
        try:
            user = pwd.getpwuid(uid)
            groups |= set(os.getgrouplist(user.pw_name, user.pw_gid))
        except KeyError:
            pass
    return st.st_gid in groups and mode & 0o060 == 0o060


def open_dev_tun(purpose: str = "create") -> int:
    """Open ``/dev/net/tun`` read-write, close-on-exec; the caller owns the descriptor.

    *purpose* (``"create"`` or ``"attach"``) shapes the message of a refusal:
    a user without privilege who may attach to a device still needs the file
    open to them (mode 0666, as distributions ship it), and when its mode is
    what stops them the ``PermissionError`` shows the mode and says so.

    Raises:
        FileNotFoundError: no ``/dev/net/tun``, or no driver behind it.
        PermissionError: the file's mode keeps this user out.
    """
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
            mode = dev_tun_mode()
            if purpose == "attach":
                hint = (
                    "attaching to a TUN device without privilege needs the file open to "
                    "this user: mode 0666, as distributions ship it (udev); "
                    f"an administrator can run: chmod 0666 {TUN_PATH}"
                )
            else:
                hint = "creating a TUN device needs CAP_NET_ADMIN and access to the file"
            raise PermissionError(
                exc.errno,
                f"cannot open {TUN_PATH} ({mode}): {os.strerror(exc.errno)}; {hint}",
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
                exc.errno,
                f"device name {name!r} is in use by a device that is not TUN "
                "(or a TUN device that is multi-queue where this asks for one that is not, "
                "or the other way round)",
            ) from None
        raise OSError(exc.errno, f"TUNSETIFF {shown}: {os.strerror(exc.errno or 0)}") from exc
    raw_name, _flags = IFREQ.unpack(result)
    return str(raw_name.split(b"\0", 1)[0].decode())


def get_iff(fd: int) -> tuple[str, int]:
    result = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ.size))
    raw_name, flags = IFREQ.unpack(result)
    return str(raw_name.split(b"\0", 1)[0].decode()), int(flags)


def get_vnet_hdr_sz(fd: int) -> int:
    """TUNGETVNETHDRSZ: the size of the virtio header the kernel puts in front of each packet."""
    result = fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4))
    size: int = struct.unpack("=i", result)[0]
    return size


def set_vnet_hdr_sz(fd: int, size: int = VNET_HDR_LEN) -> None:
    """TUNSETVNETHDRSZ: the size of the virtio header (tunkit's is 10 bytes)."""
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("=i", size))


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
    set_vnet_hdr_sz(fd)
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


def set_persist(fd: int, persist: bool) -> None:
    """TUNSETPERSIST: keep the device after its last descriptor closes (or stop keeping it)."""
    fcntl.ioctl(fd, TUNSETPERSIST, int(persist))


def set_owner(fd: int, uid: int) -> None:
    """TUNSETOWNER: the user who may attach without CAP_NET_ADMIN (-1: no owner)."""
    fcntl.ioctl(fd, TUNSETOWNER, uid)


def set_group(fd: int, gid: int) -> None:
    """TUNSETGROUP: the group whose members may attach without CAP_NET_ADMIN (-1: none)."""
    fcntl.ioctl(fd, TUNSETGROUP, gid)


def set_queue(fd: int, attached: bool) -> None:
    """TUNSETQUEUE on a queue of a multi-queue device: take part in its traffic, or not.

    A detached queue keeps the device alive (it is still one of its
    descriptors) but the kernel steers no packet to it and takes none from it.
    """
    flags = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
    fcntl.ioctl(fd, TUNSETQUEUE, IFREQ.pack(b"", flags))

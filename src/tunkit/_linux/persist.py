"""Persistent devices: attach to one (or add a queue to a multi-queue one), delete one.

A persistent TUN device (``create_tun(persist=True)``, ``ip tuntap add``)
outlives its descriptors. Its owner and group, when set, may attach to it
without CAP_NET_ADMIN: how a process without privilege moves the traffic of
a device that root made and configured.

What the kernel checks on attach (``tun_not_capable()`` in
``drivers/net/tun.c``): a device with an owner needs that effective uid, one
with a group needs that group among the process's groups (both, when it has
both), unless the process has CAP_NET_ADMIN. A device with neither can be
attached by anyone who can open ``/dev/net/tun``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Final

from . import netlink
from .constants import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TUNSETIFF
from .device import BATCH_OFFLOAD, NativeTun, _make, _netns_fd, check_name, set_offloads
from .ioctl import IFREQ, get_iff, open_dev_tun
from .netns import inside as netns_inside
from .owners import describe_gid, describe_uid, process_credentials

__all__ = ["attach_in", "attach_tun", "delete_tun"]

_TUNSETIFF_ERRORS: Final = (errno.EPERM, errno.EBUSY, errno.EINVAL)


def _where(netns: str | None) -> str:
    return "" if netns is None else f" in network namespace {netns!r}"


def _tun_or_missing(ns: int | None, name: str, where: str) -> netlink.TunInfo:
    """The TUN device *name* in namespace descriptor *ns*, or FileNotFoundError naming it."""
    info = netlink.tun_info(ns, name)
    if info is None:
        raise FileNotFoundError(
            errno.ENOENT, f"no TUN device {name!r}{where}: there is no such link", name
        )
    if not info.is_tun:
        if info.kind == "tun":
            kind = "a TAP device"
        else:
            kind = f"a {info.kind} link" if info.kind else "not a TUN device"
        raise FileNotFoundError(errno.ENOENT, f"no TUN device {name!r}{where}: it is {kind}", name)
    return info


def _refused(name: str, info: netlink.TunInfo, code: int) -> OSError:
    """The error of a TUNSETIFF that the kernel refused on an existing device."""
    if code == errno.EPERM:
        return PermissionError(
            code,
            f"TUN device {name!r} has owner {describe_uid(info.owner)} and group "
            f"{describe_gid(info.group)}; this process ({process_credentials()}) is not "
            "allowed to attach to it without CAP_NET_ADMIN",
            name,
        )
    if code == errno.EBUSY:
        return OSError(
            code,
            f"TUN device {name!r} is in use: it is not multi-queue and another "
            "descriptor is attached to it",
            name,
        )
    return OSError(code, f"attaching to TUN device {name!r}: {os.strerror(code)}", name)


def attach_in(name: str, ns_fd: int | None, offload: bool | None, where: str = "") -> NativeTun:
    """:func:`attach_tun` in the namespace of descriptor *ns_fd* (``None``: this thread's).

    Takes ownership of *ns_fd* on success; on error the caller keeps it.
    *where* is said in messages after the device's name (`` in network namespace 'x'``).
    """
    with netns_inside(ns_fd):
        info = _tun_or_missing(None, name, where)  # inside already
        vnet = info.vnet_hdr if offload is None else offload
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        if info.multi_queue:
            flags |= IFF_MULTI_QUEUE  # the kernel refuses (EINVAL) a mismatch
        fd = open_dev_tun("attach")
        try:
            try:
                fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), flags))
            except OSError as exc:
                if exc.errno in _TUNSETIFF_ERRORS:
                    raise _refused(name, info, exc.errno) from None
                raise
            real_name, real_flags = get_iff(fd)
            if socket.if_nametoindex(real_name) != info.ifindex:
                # Deleted between the look-up and TUNSETIFF, which then made (as
                # root) a new device of that name: not the device asked for. It
                # goes with this descriptor.
                raise FileNotFoundError(
                    errno.ENOENT, f"TUN device {name!r}{where} was deleted while attaching", name
                )
            # The queues of a multi-queue device share its flags: a queue added
            # to one whose first queue has the virtio header has it too,
            # whatever it asked. Honour the header as it is, never pretend.
            has_vnet = bool(real_flags & IFF_VNET_HDR)
            if offload is not None and has_vnet != offload:
                state = "on" if has_vnet else "off"
                raise ValueError(
                    f"offload={offload}, but TUN device {name!r} is multi-queue and its "
                    f"other queues have the virtio header {state}: attach with "
                    f"offload={has_vnet} or offload=None"
                )
            offload_flags = set_offloads(fd, has_vnet)
            # Unprivileged callers cannot cap the super-packets (EPERM, ignored);
            # a device made by create_tun has the cap already.
            cap = has_vnet and info.gso_max_segs > BATCH_OFFLOAD
            return _make(fd, real_name, has_vnet, offload_flags, ns_fd, None, cap_segs=cap)
        except BaseException:
            os.close(fd)
            raise


def attach_tun(name: str, *, netns: str | None = None, offload: bool | None = None) -> NativeTun:
    """Attach to the existing TUN device *name*: a persistent one, or one more queue of a
    multi-queue one; return it as a :class:`NativeTun`.

    Needs no CAP_NET_ADMIN when this process is allowed by the device's
    owner and group (its effective uid is the owner, if the device has one,
    and it is in the group, if the device has one). It does need
    ``/dev/net/tun`` open to its user (mode 0666, as distributions ship it).
    *netns* names the device's namespace; entering it needs CAP_SYS_ADMIN, so
    a process without privilege runs in the device's namespace instead and
    leaves it ``None``.

    *offload* ``None`` (the default) keeps the device's virtio header as it
    is (a persistent device keeps what its last owner set); ``True`` or
    ``False`` sets or clears it. Either way the kernel's offloads are set to
    match, so a device without the header is never handed a super-packet. A
    multi-queue device's queues share the header: a queue added to one whose
    other queues have it must have it too.

    Raises:
        ValueError: a bad *name*, or an *offload* that the device's other queues rule out.
        FileNotFoundError: no TUN device *name* there (the message names it),
            or *netns* does not exist.
        PermissionError: the device's owner or group keeps this process out
            (the message names them), or ``/dev/net/tun`` is not open to its
            user (the message shows its mode).
        OSError: EBUSY, a device that is not multi-queue and is attached already.
    """
    check_name(name)
    if not name:
        raise ValueError("attach_tun needs the name of an existing TUN device")
    ns_fd = _netns_fd(netns)
    try:
        return attach_in(name, ns_fd, offload, _where(netns))
    except BaseException:
        if ns_fd is not None:
            os.close(ns_fd)
        raise


def delete_tun(name: str, *, netns: str | None = None) -> None:
    """Delete the persistent TUN device *name* (in namespace *netns*, if given).

    Queues still attached to it are cut off: their reads and writes fail.
    Needs CAP_NET_ADMIN.

    Raises:
        FileNotFoundError: no TUN device *name* there.
        ValueError: the device is not persistent (it goes with its last
            descriptor; deleting it would pull it from under its user).
        PermissionError: no CAP_NET_ADMIN.
    """
    check_name(name)
    if not name:
        raise ValueError("delete_tun needs the name of a TUN device")
    ns_fd = _netns_fd(netns)
    try:
        info = _tun_or_missing(ns_fd, name, _where(netns))
        if not info.persist:
            raise ValueError(
                f"TUN device {name!r}{_where(netns)} is not persistent: it goes when "
                "its last descriptor closes"
            )
        netlink.delete_link(ns_fd, info.ifindex, f"deleting TUN device {name!r}")
    finally:
        if ns_fd is not None:
            os.close(ns_fd)

"""Drop every privilege of this process for good: the start of a privilege-separated worker.

What ``setpriv --reuid=U --regid=G --clear-groups --inh-caps=-all
--bounding-set=-all --no-new-privs`` does before it runs a program, done in
the running process instead. A worker started by root with
``sys.executable`` drops here, once it has imported what it needs: unlike
``setpriv``, that works when the interpreter and its libraries are not
readable by the user it becomes (a pyenv under ``/root``, a virtual
environment in a home of mode 0700).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pwd
from typing import Final

from .owners import resolve_group, resolve_user

__all__ = ["capabilities", "drop_privileges"]

# <linux/prctl.h>
_PR_CAPBSET_DROP: Final = 24
_PR_SET_NO_NEW_PRIVS: Final = 38
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
# <linux/capability.h>: capset(2) with version 3 takes two 32-bit words per set.
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
_CAP_SETPCAP: Final = 8

# What a worker needs after the drop, imported before it: modules that
# tunkit loads on first use would otherwise be read from files the new user
# may not be allowed to open.
_PRELOAD: Final = (
    "json",
    "tunkit._linux.device",
    "tunkit._linux.gso_device",
    "tunkit._linux.netlink",
    "tunkit._linux.passing",
    "tunkit._linux.persist",
    "tunkit._copy",
    "tunkit._forwarder",
    "pyroute2",
    "pyroute2.netlink.exceptions",
)

_libc: Final = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _prctl(option: int, arg: int, arg2: int = 0, what: str = "prctl") -> None:
    if _libc.prctl(option, arg, arg2, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def capabilities() -> dict[str, int]:
    """This process's capability sets from ``/proc/self/status``: ``{"CapEff": 0, ...}``."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                out[key] = int(value.strip(), 16)
    return out


def _has_cap(cap: int) -> bool:
    return bool(capabilities().get("CapEff", 0) >> cap & 1)


def drop_privileges(user: int | str = "nobody", group: int | str | None = None) -> None:
    """Become *user* (and *group*, default the user's own group) with no privilege left.

    In order: load the modules a tunkit worker uses later; set
    ``no_new_privs`` (no program run later gains privilege, setuid or file
    capabilities); empty the capability bounding set and the ambient set;
    drop the supplementary groups; set the real, effective and saved gid,
    then uid; clear every capability set. Then it checks that it worked,
    and that uid 0 cannot come back. The descriptors already open stay
    usable: that is how a worker keeps the device it was handed.

    Raises:
        ValueError: no such user or group.
        PermissionError: this process may not change its credentials (not root).
        RuntimeError: a privilege survived (the check failed).
    """
    uid = resolve_user(user)
    if group is not None:
        gid = resolve_group(group)
    else:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise ValueError(
                f"user {user!r} has no entry in the user database: name a group"
            ) from None
    for name in _PRELOAD:
        importlib.import_module(name)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, what="setting no_new_privs")
    if _has_cap(_CAP_SETPCAP):
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):
            _prctl(_PR_CAPBSET_DROP, cap, what=f"dropping capability {cap} from the bounding set")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, what="clearing the ambient capabilities")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # Leaving uid 0 clears the effective and permitted sets, not the inheritable one.
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"clearing the capabilities: {os.strerror(code)}")
    _check(uid, gid)


def _check(uid: int, gid: int) -> None:
    left = {k: v for k, v in capabilities().items() if v}
    if left:
        raise RuntimeError(f"capabilities survived the drop: {left}")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise RuntimeError(f"credentials after the drop: {os.getresuid()} {os.getresgid()}")
    if os.getgroups() not in ([], [gid]):
        raise RuntimeError(f"supplementary groups survived the drop: {os.getgroups()}")
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise RuntimeError("uid 0 came back after the drop")

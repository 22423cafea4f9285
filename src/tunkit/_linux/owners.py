"""Users and groups of TUN devices: names to ids (TUNSETOWNER/TUNSETGROUP) and ids to words."""

from __future__ import annotations

import grp
import os
import pwd

__all__ = ["describe_gid", "describe_uid", "process_credentials", "resolve_group", "resolve_user"]


def _resolve(what: str, value: int | str, by_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{what} must be an int or a str, not {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value < 2**32 - 1:
            raise ValueError(f"{what} {value} is not a valid id")
        return value
    if value.isdigit():
        return _resolve(what, int(value), by_name)
    try:
        if by_name == "user":
            return pwd.getpwnam(value).pw_uid
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"{what} {value!r}: no such {by_name} on this system") from None


def resolve_user(owner: int | str) -> int:
    """Return the uid of *owner*: a uid, or a user's name (or its digits).

    Raises:
        ValueError: no such user, or an id out of range.
    """
    return _resolve("owner", owner, "user")


def resolve_group(group: int | str) -> int:
    """Return the gid of *group*: a gid, or a group's name (or its digits).

    Raises:
        ValueError: no such group, or an id out of range.
    """
    return _resolve("group", group, "group")


def describe_uid(uid: int | None) -> str:
    """``"uid 65534 (nobody)"``; ``"none"`` for a device without an owner."""
    if uid is None:
        return "none"
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def describe_gid(gid: int | None) -> str:
    """``"gid 100 (users)"``; ``"none"`` for a device without a group."""
    if gid is None:
        return "none"
    try:
        return f"gid {gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return f"gid {gid}"


def process_credentials() -> str:
    """What the kernel checks of this process on attach: ``"uid 65534 (nobody), gid ..."``."""
    groups = sorted({os.getegid(), *os.getgroups()})
    shown = ", ".join(describe_gid(g) for g in groups)
    return f"{describe_uid(os.geteuid())}, groups {shown}"

"""``tunkit create`` / ``tunkit delete``: persistent TUN devices for users without privilege.

As ``ip tuntap add mode tun NAME user U`` does, plus the configuration a
user cannot do themselves (MTU, addresses, up), in one command.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

from rich.console import Console

from .._linux import netlink
from .._linux.device import check_name, create_tun
from .._linux.ioctl import TUN_PATH, dev_tun_mode, dev_tun_open_to, set_persist
from .._linux.owners import describe_gid, describe_uid, resolve_group, resolve_user
from .._linux.persist import delete_tun
from .preflight import HelpFormatter, UsageError, missing_capabilities, positive

__all__ = ["CREATE_HELP", "DELETE_HELP", "add_parser", "dev_tun_note", "run"]

CREATE_HELP = """\
Create a persistent TUN device that stays after tunkit exits, configured
(MTU, addresses, up) and owned by a user or group who may then attach to it
without any privilege: tunkit.attach_tun(NAME) in their program. Needs root.

The device carries the virtio-net header (offload) unless --no-offload:
attach_tun(NAME) then gets the kernel's offloads. With --multi-queue every
attach_tun(NAME) is one more queue, for one process per core.

A user without privilege also needs /dev/net/tun open to them (mode 0666,
as distributions ship it): tunkit says so when it is not.

examples:
  sudo tunkit create tk0 --owner alice --address 10.9.0.1/24 --up
  sudo tunkit create tkq --group vpn --multi-queue --mtu 1400 --netns red --up
  sudo tunkit delete tk0
"""

DELETE_HELP = """\
Delete a persistent TUN device (one made by "tunkit create" or "ip tuntap
add"). Processes still attached to it lose it. Needs root.

examples:
  sudo tunkit delete tk0
  sudo tunkit delete tkq --netns red
"""


def dev_tun_note(uid: int | None, gid: int | None, path: str = TUN_PATH) -> str | None:
    """One line saying that *path*'s mode keeps the device's user out, or ``None``."""
    if uid is None and gid is None:
        return None
    if dev_tun_open_to(uid, gid, path):
        return None
    who = describe_uid(uid) if uid is not None else f"members of {describe_gid(gid)}"
    return (
        f"note: {path} is {dev_tun_mode(path)}: {who} cannot open it to attach; "
        f"distributions ship it mode 0666 (udev): chmod 0666 {path}"
    )


def _need_root(what: str, netns: str | None) -> None:
    missing = missing_capabilities()
    if netns is None and "CAP_SYS_ADMIN" in missing:
        missing.remove("CAP_SYS_ADMIN")  # entering a namespace is all it is needed for
    if missing:
        raise UsageError(f"{what} needs root ({' and '.join(missing)} missing)")


def _add(sub: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """Add subcommand *name* with the arguments both commands take: NAME and --netns."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", help="the device's name (at most 15 bytes)")
    parser.add_argument("--netns", metavar="NS",
                        help="the network namespace (as ip netns names it)")
    return parser


def _add_create(sub: Any) -> None:
    parser = _add(sub, "create", "create a persistent TUN device for a user without privilege",
                  CREATE_HELP)
    parser.add_argument("--owner", metavar="USER", help="the user who may attach (name or uid)")
    parser.add_argument("--group", metavar="GROUP", help="the group whose members may attach")
    parser.add_argument("--multi-queue", action="store_true", help="one queue per attach")
    parser.add_argument("--mtu", type=positive, metavar="N", help="the MTU (default 1500)")
    parser.add_argument("--address", action="append", default=[], metavar="CIDR",
                        help="an address such as 10.9.0.1/24 or fd00::1/64 (repeatable)")
    parser.add_argument("--up", action="store_true", help="set the device up")
    parser.add_argument("--no-offload", action="store_true",
                        help="no virtio-net header: attachers get no kernel offloads")


def _message(exc: Exception) -> str:
    """An exception as one line, without the ``[Errno N]`` and file name of an OSError."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _where(netns: str | None) -> str:
    return "" if netns is None else f" in namespace {netns}"


def _run_create(args: argparse.Namespace, console: Console) -> int:
    if not args.name:
        raise UsageError("NAME must not be empty: a persistent device needs a name to attach to")
    try:
        check_name(args.name)
        uid = None if args.owner is None else resolve_user(args.owner)
        gid = None if args.group is None else resolve_group(args.group)
        addresses = [ipaddress.ip_interface(a) for a in args.address]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _need_root("tunkit create", args.netns)
    try:
        if netlink.tun_info(args.netns, args.name) is not None:
            raise UsageError(f"a device named {args.name!r} exists already{_where(args.netns)}")
        tun = create_tun(args.name, args.mtu or 1500, offload=not args.no_offload,
                         netns=args.netns, persist=True, owner=uid, group=gid,
                         multi_queue=args.multi_queue)
    except (ValueError, OSError) as exc:
        raise UsageError(_message(exc)) from None
    try:
        for iface in addresses:
            tun.add_address(str(iface))
        if args.up:
            tun.up()
        info = netlink.tun_info(args.netns, tun.name())
    except BaseException as exc:
        set_persist(tun.fileno(), False)  # half made: it goes with its descriptor
        tun.close()
        if isinstance(exc, OSError):
            raise UsageError(f"configuring {args.name!r}: {_message(exc)}") from None
        raise
    tun.close()
    assert info is not None
    parts = [
        f"owner {describe_uid(info.owner)}",
        f"group {describe_gid(info.group)}",
        f"mtu {info.mtu}",
        "offload" if info.vnet_hdr else "no offload",
    ]
    if info.multi_queue:
        parts.append("multi-queue")
    parts.append("up" if info.up else "down")
    parts += [str(a) for a in addresses]
    console.print(
        f"created persistent TUN device {info.name}{_where(args.netns)}: {', '.join(parts)}",
        highlight=False,
    )
    note = dev_tun_note(info.owner, info.group)
    if note:
        console.print(note, highlight=False)
    return 0


def _run_delete(args: argparse.Namespace, console: Console) -> int:
    _need_root("tunkit delete", args.netns)
    try:
        delete_tun(args.name, netns=args.netns)
    except (ValueError, OSError) as exc:
        raise UsageError(_message(exc)) from None
    console.print(f"deleted TUN device {args.name}{_where(args.netns)}", highlight=False)
    return 0


def add_parser(sub: Any) -> None:
    """Add ``create`` and ``delete`` to the subcommands *sub*, once (both names lead here)."""
    if "create" not in sub.choices:
        _add_create(sub)
        _add(sub, "delete", "delete a persistent TUN device", DELETE_HELP)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``tunkit create`` or ``tunkit delete``; return the exit status."""
    if args.command == "delete":
        return _run_delete(args, console)
    return _run_create(args, console)

"""``tunkit bridge A B``: join two TUN devices until Ctrl-C or SIGTERM, printing counters."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from contextlib import ExitStack
from typing import Any

from rich.console import Console

from .._forwarder import Point2Point
from .._linux.device import NativeTun, create_tun
from .._pool import Pool
from .preflight import UsageError, positive, positive_float, require

__all__ = ["BRIDGE_HELP", "add_parser", "run"]

BRIDGE_HELP = """\
Join two TUN devices, A and B, both ways, until Ctrl-C or SIGTERM, printing
packet, byte and drop counters every few seconds.

Without --create, A and B name existing persistent TUN devices (made with
"ip tuntap add mode tun NAME"); with --create, tunkit makes them (gone again
when it exits), and --mtu and --address configure them. --netns-a/--netns-b
put a device in a network namespace (as "ip netns" names them).

examples:
  sudo tunkit bridge tun-left tun-right
  sudo tunkit bridge tka tkb --create --netns-a red --netns-b blue \\
       --address tka=10.9.0.1/24 --address tkb=10.9.0.2/24
"""


def _parse_addresses(items: list[str], names: tuple[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in names}
    for item in items:
        dev, sep, cidr = item.partition("=")
        if not sep or not cidr:
            raise UsageError(f"--address {item!r}: expected DEV=CIDR, like tka=10.9.0.1/24")
        if dev not in out:
            raise UsageError(
                f"--address {item!r}: {dev!r} is neither {names[0]!r} nor {names[1]!r}"
            )
        out[dev].append(cidr)
    return out


def _open(name: str, netns: str | None, args: argparse.Namespace,
          addresses: list[str]) -> NativeTun:
    try:
        tun = create_tun(name, args.mtu or 1500, netns=netns)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except FileExistsError:
        raise UsageError(f"{name!r} is in use (by another program, or not a TUN device)") from None
    try:
        if args.mtu:
            tun.set_mtu(args.mtu)
        for cidr in addresses:
            tun.add_address(cidr)
        if args.create:
            tun.up()
    except BaseException:
        tun.close()
        raise
    return tun


def add_parser(sub: Any) -> None:
    """Add ``bridge`` to the subcommands *sub* (``argparse``'s subparsers action)."""
    bridge = sub.add_parser(
        "bridge",
        help="join two TUN devices until Ctrl-C, printing counters",
        description=BRIDGE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bridge.add_argument("a", metavar="A", help="first device's name")
    bridge.add_argument("b", metavar="B", help="second device's name")
    bridge.add_argument("--create", action="store_true", help="make the devices")
    bridge.add_argument("--mtu", type=positive, help="MTU of created devices")
    bridge.add_argument("--address", action="append", metavar="DEV=CIDR",
                        help="address for a created device (repeatable)")
    bridge.add_argument("--netns-a", metavar="NS", help="network namespace of A")
    bridge.add_argument("--netns-b", metavar="NS", help="network namespace of B")
    bridge.add_argument("--interval", type=positive_float, default=5.0,
                        help="seconds between counter lines")


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``tunkit bridge`` with parsed *args* until Ctrl-C or SIGTERM; return the status."""
    require("tunkit bridge", tools=())  # configuration goes over netlink: no programs needed
    stop = threading.Event()
    try:
        return _bridge(args, console, stop)
    except KeyboardInterrupt:
        stop.set()
        console.print("stopped")
        return 0


def _bridge(args: argparse.Namespace, console: Console, stop: threading.Event) -> int:
    names = (args.a, args.b)
    if args.a == args.b and args.netns_a == args.netns_b:
        raise UsageError("A and B are the same device")
    if (args.mtu or args.address) and not args.create:
        raise UsageError("--mtu and --address configure devices tunkit makes: add --create")
    addresses = _parse_addresses(args.address or [], names)
    if not args.create:
        _check_existing(args)
    with ExitStack() as stack:
        a = stack.enter_context(_open(args.a, args.netns_a, args, addresses[args.a]))
        b = stack.enter_context(_open(args.b, args.netns_b, args, addresses[args.b]))
        p2p = Point2Point(Pool())
        stack.callback(p2p.stop)
        p2p.set_a(a)
        p2p.set_b(b)
        console.print(f"bridging {a.name()} ⇄ {b.name()} (Ctrl-C to stop)")
        last = time.monotonic()
        while not stop.wait(0.2):
            if time.monotonic() - last >= args.interval:
                last = time.monotonic()
                console.print(_counters(a, b))
        console.print(_counters(a, b))
    return 0


def _counters(a: NativeTun, b: NativeTun) -> str:
    sa, sb = a.stats(), b.stats()
    drops_ab = sa.dropped_malformed + sa.dropped_too_big + sb.dropped_write
    drops_ba = sb.dropped_malformed + sb.dropped_too_big + sa.dropped_write
    return (
        f"{a.name()}→{b.name()}: {sa.packets_read:,} pkts {sa.bytes_read:,} B "
        f"drops {drops_ab}   "
        f"{b.name()}→{a.name()}: {sb.packets_read:,} pkts {sb.bytes_read:,} B drops {drops_ba}"
    )


def _check_existing(args: argparse.Namespace) -> None:
    """Without --create, both devices must exist (as persistent TUN devices)."""
    from .._linux.netns import inside

    for name, ns in ((args.a, args.netns_a), (args.b, args.netns_b)):
        with inside(ns):  # a socket made here asks this namespace
            try:
                socket.if_nametoindex(name)
            except OSError:
                where = f" in namespace {ns!r}" if ns else ""
                raise UsageError(
                    f"no TUN device named {name!r}{where} (make one with "
                    f"'ip tuntap add mode tun {name}', or pass --create)"
                ) from None

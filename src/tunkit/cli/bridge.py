"""``tunkit bridge A B``: join two TUN devices until Ctrl-C or SIGTERM, printing counters."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import time
from contextlib import ExitStack
from typing import Any

from rich.console import Console

from .._forwarder import Point2Point
from .._linux.device import NativeTun, create_tun
from .._linux.netns import inside, netns_path
from .._pool import Pool
from .preflight import HelpFormatter, UsageError, positive, positive_float, require

__all__ = ["BRIDGE_HELP", "add_parser", "run"]

BRIDGE_HELP = """\
Join two TUN devices, A and B, both ways, printing packet, byte and drop
counters every few seconds. Ctrl-C or SIGTERM stops it: it prints the totals
and exits 0.

With --create, tunkit makes A and B (they go again when it stops), and --mtu
and --address configure them. Without it, A and B name existing persistent TUN
devices (made with "ip tuntap add mode tun NAME"), which stay. --netns-a and
--netns-b put a device in a network namespace, which must exist: make one with
"ip netns add NAME".

examples:
  # a device in each of two new namespaces, joined until Ctrl-C:
  sudo ip netns add red
  sudo ip netns add blue
  sudo tunkit bridge tka tkb --create --netns-a red --netns-b blue \\
       --address tka=10.9.0.1/24 --address tkb=10.9.0.2/24
  # meanwhile, in another terminal:
  sudo ip netns exec red ping -c 3 10.9.0.2
  # afterwards:
  sudo ip netns delete red
  sudo ip netns delete blue

  # two persistent devices, made beforehand (they stay when the bridge stops):
  sudo ip tuntap add mode tun tun-left
  sudo ip tuntap add mode tun tun-right
  sudo tunkit bridge tun-left tun-right
  # afterwards:
  sudo ip tuntap delete mode tun tun-left
  sudo ip tuntap delete mode tun tun-right
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
        try:
            ipaddress.ip_interface(cidr)
        except ValueError:
            raise UsageError(
                f"--address {item!r}: {cidr!r} is not an address with a prefix length, "
                "like 10.9.0.1/24 or fd00::1/64"
            ) from None
        out[dev].append(cidr)
    return out


def _check_netns(option: str, ns: str | None) -> None:
    if ns is None:
        return
    try:
        path = netns_path(ns)
    except ValueError as exc:
        raise UsageError(f"{option} {ns!r}: {exc}") from None
    if not os.path.exists(path):
        raise UsageError(
            f"{option} {ns!r}: no network namespace of that name (make it with "
            f"'ip netns add {ns}')"
        )


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
            try:
                tun.add_address(cidr)
            except OSError as exc:  # the address is taken, say: the person's to change
                raise UsageError(f"--address {name}={cidr}: {exc.strerror or exc}") from None
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
        formatter_class=HelpFormatter,
    )
    bridge.add_argument("a", metavar="A", help="first device's name")
    bridge.add_argument("b", metavar="B", help="second device's name")
    bridge.add_argument("--create", action="store_true", help="make the devices")
    bridge.add_argument("--mtu", type=positive, metavar="N",
                        help="MTU of created devices (default: 1500)")
    bridge.add_argument("--address", action="append", metavar="DEV=CIDR",
                        help="address for a created device (repeatable)")
    bridge.add_argument("--netns-a", metavar="NS", help="network namespace of A")
    bridge.add_argument("--netns-b", metavar="NS", help="network namespace of B")
    bridge.add_argument("--interval", type=positive_float, default=5.0, metavar="S",
                        help="seconds between counter lines")


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``tunkit bridge`` with parsed *args* until Ctrl-C or SIGTERM; return the status."""
    require("tunkit bridge", tools=())  # configuration goes over netlink: no programs needed
    names = (args.a, args.b)
    if args.a == args.b and args.netns_a == args.netns_b:
        raise UsageError("A and B are the same device")
    if (args.mtu or args.address) and not args.create:
        raise UsageError("--mtu and --address configure devices tunkit makes: add --create")
    addresses = _parse_addresses(args.address or [], names)
    _check_netns("--netns-a", args.netns_a)
    _check_netns("--netns-b", args.netns_b)
    if not args.create:
        _check_existing(args)
    with ExitStack() as stack:
        a = stack.enter_context(_open(args.a, args.netns_a, args, addresses[args.a]))
        b = stack.enter_context(_open(args.b, args.netns_b, args, addresses[args.b]))
        p2p = Point2Point(Pool())
        stack.callback(p2p.stop)
        p2p.set_a(a)
        p2p.set_b(b)
        started = time.monotonic()
        try:
            console.print(f"bridging {a.name()} ⇄ {b.name()} (Ctrl-C to stop)")
            while True:
                time.sleep(args.interval)
                _print_counters(console, a, b)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how a bridge is stopped
            pass
        p2p.stop()  # the totals are final once nothing moves
        console.print(f"stopped after {time.monotonic() - started:.1f} s; totals:")
        _print_counters(console, a, b)
    return 0


def _print_counters(console: Console, a: NativeTun, b: NativeTun) -> None:
    sa, sb = a.stats(), b.stats()
    for src, dst, s, d in ((a, b, sa, sb), (b, a, sb, sa)):
        dropped = s.dropped_malformed + s.dropped_too_big + d.dropped_write
        console.print(f"  {src.name()} → {dst.name()}: {s.packets_read:,} packets, "
                      f"{s.bytes_read:,} bytes, {dropped:,} dropped", highlight=False)


def _check_existing(args: argparse.Namespace) -> None:
    """Without --create, both devices must exist (as persistent TUN devices)."""
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

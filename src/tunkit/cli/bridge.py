"""``tunkit bridge A B``: join two TUN devices until Ctrl-C or SIGTERM, printing counters.

With ``--pcap`` and ``--verbose`` both devices are wrapped by
:func:`tunkit.capture`, sharing one :class:`.packet_lines.TeeWriter`: the
file gets an interface block per device, and each packet read gets a line.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import time
from contextlib import ExitStack
from typing import Any

from rich.console import Console

from .._capture import CapturedTun, capture
from .._forwarder import Point2Point
from .._linux.device import NativeTun, TunStats, create_tun
from .._linux.netns import netns_path
from .._linux.persist import attach_tun
from .._pool import Pool
from .._tun import Tun
from .packet_lines import PacketLines, TeeWriter
from .preflight import HelpFormatter, UsageError, positive, positive_float, require

__all__ = ["BRIDGE_HELP", "add_parser", "run"]

BRIDGE_HELP = """\
Join two TUN devices, A and B, both ways, printing packet, byte and drop
counters every few seconds. Ctrl-C or SIGTERM stops it: it prints the totals
and exits 0.

With --create, tunkit makes A and B (they go again when it stops), and --mtu
and --address configure them. Without it, A and B name existing persistent TUN
devices (made with "ip tuntap add mode tun NAME" or "tunkit create NAME"),
which stay. --netns-a and --netns-b put a device in a network namespace, which
must exist: make one with "ip netns add NAME".

--pcap FILE records every packet of both devices into one pcapng file
(Wireshark, tshark, tcpdump): an interface per device, "in" for a packet read
from it, "out" for one written to it. --verbose prints a line per packet that
crosses, like tcpdump's; it is for looking, not for full speed: beyond some
10,000 packets a second it leaves packets out and says how many. To watch the
first example's pings, add "--pcap bridge.pcapng --verbose" to its bridge.

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
        if args.create:
            tun = create_tun(name, args.mtu or 1500, netns=netns)
        else:
            tun = _attach(name, netns)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except FileExistsError:
        raise UsageError(f"{name!r} is in use (by another program, or not a TUN device)") from None
    except FileNotFoundError as exc:
        raise UsageError(f"{exc.strerror} (make one with 'ip tuntap add mode tun {name}', "
                         "or pass --create)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EBUSY):
            raise
        raise UsageError(exc.strerror or str(exc)) from None  # names the owner, or the user
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


def _attach(name: str, netns: str | None) -> NativeTun:
    """Attach to the existing device *name*, with offload unless its other queues rule it out."""
    try:
        return attach_tun(name, netns=netns, offload=True)
    except ValueError:
        # A multi-queue device whose other queues have no virtio header: as they are.
        return attach_tun(name, netns=netns)


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
    bridge.add_argument("--pcap", metavar="FILE",
                        help="record both devices' packets into FILE (pcapng)")
    bridge.add_argument("--verbose", action="store_true",
                        help="print a line per packet that crosses (for debugging)")


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
    with ExitStack() as stack:
        writer, lines = None, None
        if args.pcap or args.verbose:
            try:
                writer = TeeWriter(args.pcap)
            except OSError as exc:  # found out before any device is made
                raise UsageError(f"--pcap {args.pcap}: {exc.strerror or exc}") from None
            stack.callback(writer.close)
        a = stack.enter_context(_open(args.a, args.netns_a, args, addresses[args.a]))
        b = stack.enter_context(_open(args.b, args.netns_b, args, addresses[args.b]))
        devices = (a.name(), b.name())
        ends: list[Tun] = [a, b]
        if writer is not None:
            if args.verbose:
                lines = PacketLines(console, (f"{devices[0]} → {devices[1]}",
                                              f"{devices[1]} → {devices[0]}"))
                stack.callback(lines.close)  # after the captures have written what they hold
                writer.packet_lines = lines
            # Each device's interface block; named apart when only their namespaces differ.
            labels = devices if devices[0] != devices[1] else (f"A:{devices[0]}", f"B:{devices[1]}")
            ends = [stack.enter_context(capture(tun, writer, name=label))
                    for tun, label in zip((a, b), labels, strict=True)]
        p2p = Point2Point(Pool())
        stack.callback(p2p.stop)
        p2p.set_a(ends[0])
        p2p.set_b(ends[1])
        started = time.monotonic()
        try:
            console.print(f"bridging {devices[0]} ⇄ {devices[1]} (Ctrl-C to stop)")
            if args.pcap:
                console.print(f"recording both into {args.pcap}", highlight=False)
            if lines is not None:
                lines.start()  # below the line above, which says the bridge runs
            while True:
                time.sleep(args.interval)
                _print_counters(console, devices, a.stats(), b.stats())
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how a bridge is stopped
            pass
        p2p.stop()  # the totals are final once nothing moves
        totals = a.stats(), b.stats()
        # The captures write what they hold, the lines of it are printed, the devices close.
        stack.close()
    console.print(f"stopped after {time.monotonic() - started:.1f} s; totals:")
    _print_counters(console, devices, *totals)
    if writer is not None:
        _print_capture(console, args, ends, lines)
    return 0


def _print_capture(console: Console, args: argparse.Namespace, ends: list[Tun],
                   lines: PacketLines | None) -> None:
    if args.pcap:
        stats = [end.capture_stats() for end in ends if isinstance(end, CapturedTun)]
        recorded, dropped = sum(s.recorded for s in stats), sum(s.dropped for s in stats)
        behind = f", {dropped:,} left out (the capture fell behind)" if dropped else ""
        console.print(f"  --pcap: {recorded:,} packets recorded{behind}", highlight=False)
    if lines is not None:
        console.print(f"  --verbose: {lines.printed():,} lines, {lines.not_shown():,} packets "
                      "not shown", highlight=False)


def _print_counters(console: Console, names: tuple[str, str], sa: TunStats,
                    sb: TunStats) -> None:
    for src, dst, s, d in ((names[0], names[1], sa, sb), (names[1], names[0], sb, sa)):
        dropped = s.dropped_malformed + s.dropped_too_big + d.dropped_write
        console.print(f"  {src} → {dst}: {s.packets_read:,} packets, "
                      f"{s.bytes_read:,} bytes, {dropped:,} dropped", highlight=False)

"""``tunkit tunnel``: one end of a point-to-point IP tunnel, a TUN device joined to a peer.

The device is made (or attached to, if a persistent one of that name exists)
and configured; the transport is a :class:`~tunkit.UdpTun` (``udp``) or a
stream (``tcp``, ``tls``: a :class:`~tunkit.StreamTun` per connection);
:func:`tunkit.copy` joins the two (device and UdpTun exchange super-packets
whole). The main thread prints counters and waits for Ctrl-C or SIGTERM, which
reach it as ``KeyboardInterrupt``.

A stream end does not stop the tunnel: a ``--listen`` end takes the next
connection (over TLS, one that arrives while another runs replaces it: the
peer was restarted), a ``--connect`` end connects again, with backoff. Each
connection gets its own :class:`~tunkit.NativeTun` on a duplicate of the
device's descriptor, which ``copy`` closes when the connection ends while
the device itself stays, with its addresses and routes.

With ``--pcap FILE`` the device side is recorded: each connection's device
is wrapped by :func:`tunkit.capture`, all into one pcapng file (an interface
block per connection, named after the device), "in" for a packet read from
the device (on its way to the peer), "out" for one written to it (from the
peer). Super-packets are recorded as their segments.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from rich.console import Console

from .._capture import CapturedTun, capture
from .._copy import copy
from .._errors import TunError
from .._linux.device import NativeTun, TunStats, create_tun, open_tun
from .._linux.netns import inside, open_netns
from .._tun import Tun
from ..pcap import Writer
from ..transport.stream import MAX_FRAME, StreamTun
from ..transport.udp import UdpTun
from .preflight import HelpFormatter, UsageError, positive, positive_float, require

__all__ = ["TUNNEL_HELP", "add_parser", "run"]

TUNNEL_HELP = """\
One end of a point-to-point IP tunnel: a TUN device here, joined to the same
command on another host. Packets that enter the device travel to the peer and
leave its device, both ways, until Ctrl-C or SIGTERM (then it prints the
totals and exits 0). Counters are printed every few seconds.

One end listens (--listen HOST:PORT), the other connects to it (--connect
HOST:PORT). Transports:
  udp  one packet per UDP datagram (IP-in-UDP), with UDP GSO/GRO: the
       fastest, and NOT encrypted or authenticated (it says so at start);
       the --listen end takes the first source it hears as its peer
  tcp  packets as length-prefixed frames over one TCP connection
  tls  the same inside TLS with certificates on both sides: --cert and --key
       are this end's certificate and key, --ca the authority that signed the
       peer's; the listening end requires the connecting end's certificate,
       and the connecting end checks that the listener's names HOST

A --listen end takes a new connection when the old one ends (over tls also
when a new one arrives: the peer was restarted); a --connect end connects
again, with backoff. Start the --listen end first: a --connect end that
cannot reach its peer at start says so and exits 2. Give both ends the same
--mtu.

--pcap FILE records the device's packets into one pcapng file that tshark,
Wireshark, tcpdump and scapy read: direction "in" for a packet on its way to
the peer, "out" for one that came from it; super-packets as their segments.

examples:
  # host A (192.0.2.1):
  sudo tunkit tunnel --transport tcp --listen 0.0.0.0:5555 --address 10.7.0.1/24
  # host B:
  sudo tunkit tunnel --transport tcp --connect 192.0.2.1:5555 --address 10.7.0.2/24
  ping 10.7.0.1

  # the same, encrypted, each end with its certificate:
  sudo tunkit tunnel --transport tls --listen 0.0.0.0:5555 --address 10.7.0.1/24 \\
       --cert a.pem --key a.key --ca ca.pem
  sudo tunkit tunnel --transport tls --connect 192.0.2.1:5555 --address 10.7.0.2/24 \\
       --cert b.pem --key b.key --ca ca.pem

  # see what crosses: tshark -r a.pcapng
  sudo tunkit tunnel --transport tcp --listen 0.0.0.0:5555 --address 10.7.0.1/24 \\
       --pcap a.pcapng
"""

STREAM_MTU: Final = 9000
"""The device MTU of the tcp and tls transports unless --mtu says otherwise.

A stream carries frames of any size up to 65535 bytes, so the device's MTU
is not bound to the underlay's: at 9000 bytes (a jumbo frame) each packet
costs the same work as at 1500 and carries six times as much (measured
with the tunnel-load benchmark at both MTUs: about 2x the throughput of
1500; larger gains little more).
"""

# The connecting end: how long one connection attempt (and a TLS handshake)
# may take, and the waits between attempts once the peer was reached before.
_CONNECT_TIMEOUT: Final = 5.0
_BACKOFF_FIRST: Final = 0.2
_BACKOFF_MAX: Final = 5.0
# A peer that vanishes without closing (its host gone) is noticed by TCP
# keepalive after about _KEEPIDLE + _KEEPCNT * _KEEPINTVL seconds.
_KEEPIDLE: Final = 10
_KEEPINTVL: Final = 5
_KEEPCNT: Final = 3
_TICK: Final = 0.2  # how often the main thread looks at the session and the listener


@dataclass(frozen=True)
class Endpoint:
    """A ``HOST:PORT`` given on the command line."""

    option: str  # "--listen" or "--connect", for messages
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(option: str, text: str) -> Endpoint:
    """Parse ``HOST:PORT`` (``[V6]:PORT`` for an IPv6 address) given to *option*.

    Raises:
        UsageError: not of that form, or the port is not 1 to 65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text:
        raise UsageError(f"{option} {text!r}: expected HOST:PORT, like 192.0.2.1:5555")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{option} {text!r}: write an IPv6 address in brackets, like [::1]:5555")
    if not host:
        raise UsageError(f"{option} {text!r}: no host (use 0.0.0.0 or [::] for every address)")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise UsageError(f"{option} {text!r}: the port must be a number from 1 to 65535")
    return Endpoint(option, host, port)


def add_parser(sub: Any) -> None:
    """Add ``tunnel`` to the subcommands *sub* (``argparse``'s subparsers action)."""
    tunnel = sub.add_parser(
        "tunnel",
        help="one end of a point-to-point IP tunnel to another host",
        description=TUNNEL_HELP,
        formatter_class=HelpFormatter,
    )
    where = tunnel.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="HOST:PORT", help="wait for the peer here")
    where.add_argument("--connect", metavar="HOST:PORT", help="reach the peer there")
    tunnel.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp",
                        help="how packets travel")
    tunnel.add_argument("--dev", metavar="NAME",
                        help="device name (default: the kernel picks, tun0 ...); the name of "
                        "an existing persistent TUN device attaches to it")
    tunnel.add_argument("--address", action="append", metavar="CIDR",
                        help="address of the device, like 10.7.0.1/24 or fd00:7::1/64 "
                        "(repeatable)")
    tunnel.add_argument("--mtu", type=positive, metavar="N",
                        help=f"device MTU (default: {STREAM_MTU} over tcp and tls; over udp "
                        "the route's MTU less the IP and UDP headers); the same on both ends")
    tunnel.add_argument("--netns", metavar="NS",
                        help="network namespace (as 'ip netns' names them) of the device "
                        "and of the transport's socket")
    tunnel.add_argument("--cert", metavar="FILE", help="tls: this end's certificate (PEM)")
    tunnel.add_argument("--key", metavar="FILE", help="tls: this end's private key (PEM)")
    tunnel.add_argument("--ca", metavar="FILE",
                        help="tls: the authority that signed the peer's certificate (PEM)")
    tunnel.add_argument("--interval", type=positive_float, default=5.0, metavar="S",
                        help="seconds between counter lines")
    tunnel.add_argument("--pcap", metavar="FILE",
                        help="record the device's packets into FILE (pcapng): 'in' on their "
                        "way to the peer, 'out' from it")


# -- checking what was asked for -----------------------------------------------------


def _check_addresses(items: list[str]) -> None:
    for cidr in items:
        try:
            ipaddress.ip_interface(cidr)
        except ValueError:
            raise UsageError(
                f"--address {cidr!r} is not an address with a prefix length, "
                "like 10.7.0.1/24 or fd00:7::1/64"
            ) from None


def _check_netns(name: str) -> None:
    try:
        os.close(open_netns(name))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--netns {name}: {exc.args[-1] if exc.args else exc} "
                         f"(make it with 'ip netns add {name}')") from None


def _tls_context(args: argparse.Namespace, server: bool) -> ssl.SSLContext:
    """The TLS context of this end, from --cert, --key and --ca.

    Raises:
        UsageError: a file is missing, unreadable or not what it should be.
    """
    for option, path in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca)):
        if path is None:
            raise UsageError(f"--transport tls needs --cert, --key and --ca ({option} is missing)")
        if not os.path.isfile(path):
            raise UsageError(f"{option} {path}: no such file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(args.cert, args.key)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--cert {args.cert} --key {args.key}: {_reason(exc)}") from None
    try:
        ctx.load_verify_locations(args.ca)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--ca {args.ca}: {_reason(exc)}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED  # a server asks for the client's certificate too
    return ctx


def _reason(exc: BaseException) -> str:
    """One line for an OSError or SSLError: its reason, without the errno prefix."""
    if isinstance(exc, ssl.SSLError):
        if not exc.reason:
            return str(exc)
        text = str(exc.reason).lower().replace("_", " ")
        verify = getattr(exc, "verify_message", None)
        return f"{text}: {verify}" if verify else text
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    return str(exc) or type(exc).__name__


def _family(
    endpoint: Endpoint, ns: str | None, kind: int = socket.SOCK_STREAM
) -> tuple[int, Any]:
    """The address family and socket address of *endpoint* (resolved in *ns*)."""
    with inside(ns):
        try:
            infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=kind)
        except socket.gaierror as exc:
            raise UsageError(f"{endpoint.option} {endpoint}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _tune(sock: socket.socket) -> None:
    """Keepalive on a stream socket: a peer whose host vanished ends the session."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPIDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPINTVL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPCNT)


def _say(console: Console, text: str) -> None:
    """Print one line as it is: no wrapping (a log that is read by programs too), no colours."""
    console.print(text, highlight=False, soft_wrap=True)


# -- the device ----------------------------------------------------------------------


def _open_device(args: argparse.Namespace, mtu: int) -> NativeTun:
    try:
        tun = create_tun(args.dev, mtu, netns=args.netns)
    except ValueError as exc:
        raise UsageError(f"--dev {args.dev!r}: {exc}") from None
    except FileExistsError:
        raise UsageError(
            f"--dev {args.dev!r} is in use (by another program, or not a TUN device)"
        ) from None
    except FileNotFoundError as exc:  # the namespace (the message names it), or /dev/net/tun
        raise UsageError(str(exc)) from None
    try:
        for cidr in args.address:
            try:
                tun.add_address(cidr)
            except OSError as exc:
                raise UsageError(f"--address {cidr}: {_reason(exc)}") from None
        tun.up()
    except BaseException:
        tun.close()
        raise
    return tun


def _session_device(device: NativeTun, netns: str | None) -> NativeTun:
    """A NativeTun of its own for one connection, on a duplicate of *device*'s descriptor.

    ``copy`` closes it when the connection ends; the device stays, held by *device*.
    """
    fd = os.dup(device.fileno())
    try:
        return open_tun(fd, netns=netns)
    except BaseException:
        os.close(fd)
        raise


# -- the counters --------------------------------------------------------------------


@dataclass
class _Totals:
    """Counters of the connections that ended, and how many there were."""

    sent: int = 0  # packets sent to the peer
    sent_bytes: int = 0
    received: int = 0  # packets received from the peer
    received_bytes: int = 0
    dropped: int = 0
    sessions: int = 0
    last: list[TunStats] = field(default_factory=list)

    def add(self, stream: TunStats, device: TunStats) -> None:
        self.sent += stream.packets_written
        self.sent_bytes += stream.bytes_written
        self.received += stream.packets_read
        self.received_bytes += stream.bytes_read
        self.dropped += _dropped(stream, device)


def _dropped(stream: TunStats, device: TunStats) -> int:
    return (
        stream.dropped_malformed + stream.dropped_too_big
        + device.dropped_malformed + device.dropped_too_big + device.dropped_write
    )


def _counter_line(totals: _Totals, session: _Session | None) -> str:
    sent, sent_bytes = totals.sent, totals.sent_bytes
    received, received_bytes, dropped = totals.received, totals.received_bytes, totals.dropped
    if session is not None:
        s, d = session.link.stats(), session.device.stats()
        sent += s.packets_written
        sent_bytes += s.bytes_written
        received += s.packets_read
        received_bytes += s.bytes_read
        dropped += _dropped(s, d)
    return (
        f"  to peer: {sent:,} packets, {sent_bytes:,} bytes; "
        f"from peer: {received:,} packets, {received_bytes:,} bytes; "
        f"dropped: {dropped:,}; connections: {totals.sessions}"
    )


# -- one connection ------------------------------------------------------------------


class _Recording:
    """``--pcap``: one file for the whole command, each connection's device captured into it."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.recorded = 0  # of the connections that ended
        self.dropped = 0
        self.error: Exception | None = None  # the first failure writing the file
        self._writer: Writer | None = None
        if path is not None:
            try:
                self._writer = Writer(path)
            except OSError as exc:  # found out before any device or socket is made
                raise UsageError(f"--pcap {path}: {exc.strerror or exc}") from None

    def wrap(self, device: NativeTun) -> Tun:
        """*device* itself, or (with --pcap) a capture of it that owns it."""
        if self._writer is None:
            return device
        return capture(device, self._writer, name=device.name())

    def ended(self, tun: Tun) -> None:
        """Count what the closed *tun* recorded, if it is a capture."""
        if isinstance(tun, CapturedTun):
            stats = tun.capture_stats()
            self.recorded += stats.recorded
            self.dropped += stats.dropped

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as exc:
                self.error = self.error or exc

    def summary(self) -> str | None:
        """The closing line about the file, or None without --pcap."""
        if self.path is None:
            return None
        behind = f", {self.dropped:,} left out (the capture fell behind)" if self.dropped else ""
        failed = f"; writing {self.path} failed: {_reason(self.error)}" if self.error else ""
        return f"  --pcap: {self.recorded:,} packets recorded into {self.path}{behind}{failed}"


class _Session:
    """``copy(device, link)`` on a thread of its own: one connection, or the UDP transport.

    *recording* may wrap the device in a capture; ``device`` stays the
    NativeTun (its counters), ``tun`` is what ``copy`` moves packets through.
    """

    def __init__(self, device: NativeTun, link: StreamTun | UdpTun,
                 recording: _Recording) -> None:
        self.device = device
        self.link = link
        self._recording = recording
        try:
            self.tun = recording.wrap(device)
        except BaseException:
            device.close()
            raise
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"tunkit-tunnel:{device.name()}"
        )
        self.thread.start()

    def _run(self) -> None:
        try:
            copy(self.tun, self.link)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def done(self) -> bool:
        return not self.thread.is_alive()

    def end(self) -> None:
        """Close both ends (copy then returns), wait for the thread, count the capture."""
        self.link.close()
        try:
            self.tun.close()  # a capture closes the device and writes what it holds
        except OSError as exc:  # only a capture's file can fail here
            self._recording.error = self._recording.error or exc
        self.device.close()
        self.thread.join()
        self._recording.ended(self.tun)


# -- the two roles -------------------------------------------------------------------


class _Listener:
    """The --listen end: a listening socket, and a stream for each connection that arrives."""

    def __init__(self, endpoint: Endpoint, ns: str | None, tls: ssl.SSLContext | None,
                 console: Console) -> None:
        family, sockaddr = _family(endpoint, ns)
        with inside(ns):  # the socket stays in the namespace it was made in
            try:
                self.sock = socket.create_server(sockaddr, family=family, backlog=4)
            except OSError as exc:
                raise UsageError(f"--listen {endpoint}: {_reason(exc)}") from None
        self._tls = tls
        self._console = console
        self.endpoint = endpoint

    def pending(self) -> bool:
        """Whether a connection is waiting to be accepted."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def next_stream(self, mtu: int, *, block: bool = True) -> StreamTun | None:
        """Accept connections until one is a working stream (TLS: the handshake passed).

        Without *block*, returns ``None`` once no connection is waiting.
        """
        while True:
            if not block and not self.pending():
                return None
            conn, addr = self.sock.accept()
            peer = Endpoint("--listen", addr[0], addr[1])
            try:
                _tune(conn)
                if self._tls is not None:
                    conn.settimeout(_CONNECT_TIMEOUT)
                    conn = self._tls.wrap_socket(conn, server_side=True)
                return StreamTun(conn, mtu=mtu)
            except (OSError, ValueError) as exc:  # one peer's failure: wait for the next
                conn.close()
                _say(self._console, f"refused {peer}: {_reason(exc)}")

    def close(self) -> None:
        self.sock.close()


class _Refused(ConnectionResetError):
    """The TLS peer hung up on this end right after the handshake: it refused our certificate."""


def _refused(endpoint: Endpoint, why: str) -> str:
    return (
        f"--connect {endpoint}: the peer refused this end ({why}): is --cert signed by "
        "the authority the peer trusts, and --key its key?"
    )


class _Connector:
    """The --connect end: a stream to the peer, again after each loss, with backoff."""

    def __init__(self, endpoint: Endpoint, ns: str | None, tls: ssl.SSLContext | None,
                 console: Console) -> None:
        self.family, self.sockaddr = _family(endpoint, ns)
        self.endpoint = endpoint
        self._ns = ns
        self._tls = tls
        self._console = console

    def connect(self, mtu: int) -> StreamTun:
        """One attempt: a connected (and TLS-handshaken) stream.

        Raises:
            OSError: the peer could not be reached, or the handshake failed.
        """
        with inside(self._ns):
            sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_CONNECT_TIMEOUT)
            sock.connect(self.sockaddr)
            _tune(sock)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.endpoint.host)
            try:
                return StreamTun(sock, mtu=mtu)
            except ValueError:  # no longer connected: the peer hung up at once
                if self._tls is None:
                    raise ConnectionResetError(
                        errno.ECONNRESET, "the peer closed the connection at once"
                    ) from None
                # TLS 1.3: a server that refuses our certificate does so
                # after our side of the handshake is done.
                raise _Refused("it closed the connection after the TLS handshake") from None
        except BaseException:
            sock.close()
            raise

    def reconnect(self, mtu: int) -> StreamTun:
        """Connect again, waiting longer after each failure (Ctrl-C ends the wait)."""
        delay = _BACKOFF_FIRST
        while True:
            try:
                return self.connect(mtu)
            except OSError as exc:
                _say(self._console,
                     f"cannot reach {self.endpoint}: {_reason(exc)}; again in {delay:.1f} s")
            time.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    def close(self) -> None:
        pass


# -- the command ---------------------------------------------------------------------


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``tunkit tunnel`` with parsed *args* until Ctrl-C or SIGTERM; return the status."""
    require("tunkit tunnel", tools=())  # configuration goes over netlink: no programs needed
    listen = args.listen is not None
    endpoint = parse_endpoint(*(("--listen", args.listen) if listen else
                                ("--connect", args.connect)))
    args.dev = args.dev or ""
    args.address = args.address or []
    _check_addresses(args.address)
    if args.netns is not None:
        _check_netns(args.netns)
    tls = _tls_context(args, server=listen) if args.transport == "tls" else None
    if tls is None and (args.cert or args.key or args.ca):
        raise UsageError("--cert, --key and --ca are for --transport tls")
    if args.mtu is not None and args.mtu > MAX_FRAME:
        raise UsageError(f"--mtu {args.mtu}: a packet carries at most {MAX_FRAME} bytes")
    recording = _Recording(args.pcap)
    with contextlib.ExitStack() as stack:
        stack.callback(recording.close)  # last: after every connection's capture
        role: _Listener | _Connector | UdpTun
        if args.transport == "udp":
            role = stack.enter_context(_udp(endpoint, listen, args.netns, args.mtu, console))
            mtu = role.mtu()
        elif listen:
            role = _Listener(endpoint, args.netns, tls, console)
            stack.callback(role.close)
            mtu = args.mtu or STREAM_MTU
        else:
            role = _Connector(endpoint, args.netns, tls, console)
            mtu = args.mtu or STREAM_MTU
        device = stack.enter_context(_open_device(args, mtu))
        where = f" in namespace {args.netns}" if args.netns else ""
        addresses = ", ".join(args.address) or "no address"
        _say(console,
             f"tunnel: {device.name()}{where} ({addresses}, mtu {device.mtu()}) over "
             f"{args.transport}, {'listening on' if listen else 'connecting to'} {endpoint}")
        if args.transport == "tls":
            _say(console, "tls: encrypted; both ends prove their certificates")
        if args.transport == "udp":
            _say(console, UDP_WARNING)
        if args.pcap:
            _say(console, f"recording the device's packets into {args.pcap}")
        totals = _Totals()
        started = time.monotonic()
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C or SIGTERM: how it stops
            if isinstance(role, UdpTun):
                _serve_udp(role, device, args, console, totals, recording)
            else:
                _serve(role, device, args, console, totals, recording)
        _say(console, f"stopped after {time.monotonic() - started:.1f} s; totals:")
        _say(console, _counter_line(totals, None))
    summary = recording.summary()  # the file is closed: the count is final
    if summary is not None:
        _say(console, summary)
    return 0


UDP_WARNING: Final = (
    "udp: NOT encrypted and NOT authenticated: anyone on the path can read and change "
    "the packets, and anyone who can forge the peer's address can send packets into "
    "this network; across a network you do not trust, use --transport tls"
)


def _udp(endpoint: Endpoint, listen: bool, ns: str | None, mtu: int | None,
         console: Console) -> UdpTun:
    """The UDP transport: bound to *endpoint* (--listen) or sending to it (--connect).

    A --listen end takes the first source it hears as its peer, and keeps it.
    So that a --connect end that is restarted comes back from the same
    address, it binds the peer's port number too (on every address), as
    tunnels over UDP usually do; only when that port is taken here does it
    take any port, and say what that costs.
    """
    family, sockaddr = _family(endpoint, ns, socket.SOCK_DGRAM)
    with inside(ns):  # the socket stays in the namespace it was made in
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
        try:
            sock.bind(sockaddr if listen else (wildcard, endpoint.port))
        except OSError as exc:
            if listen or exc.errno != errno.EADDRINUSE:
                raise UsageError(f"{endpoint.option} {endpoint}: {_reason(exc)}") from None
            sock.bind((wildcard, 0))
            _say(console, f"udp: port {endpoint.port} is taken here: sending from port "
                          f"{sock.getsockname()[1]}; the listener will not know this end "
                          "again if it restarts")
        peer = None if listen else (endpoint.host, endpoint.port)
        try:
            return UdpTun(sock, peer, mtu=mtu)  # takes the socket
        except ValueError as exc:
            raise UsageError(f"--mtu: {exc}") from None
    except BaseException:
        sock.close()
        raise


def _serve_udp(udp: UdpTun, device: NativeTun, args: argparse.Namespace, console: Console,
               totals: _Totals, recording: _Recording) -> None:
    """Join *device* and *udp* until KeyboardInterrupt (or a failure, which ends the command)."""
    totals.sessions = 1
    session = _Session(device, udp, recording)
    peer = "the first peer heard" if args.listen else str(parse_endpoint("--connect",
                                                                         args.connect))
    _say(console, f"ready: {udp.name()} to {peer}")
    next_line = time.monotonic() + args.interval
    try:
        while not session.done():
            session.thread.join(_TICK)
            if time.monotonic() >= next_line:
                next_line += args.interval
                _say(console, _counter_line(totals, session))
    finally:
        session.end()
        totals.add(udp.stats(), device.stats())
    if session.error is not None:
        raise UsageError(f"the tunnel failed: {_reason(session.error)}")
def _serve(role: _Listener | _Connector, device: NativeTun, args: argparse.Namespace,
           console: Console, totals: _Totals, recording: _Recording) -> None:
    """Run connections one after another until KeyboardInterrupt."""
    mtu = device.mtu()
    stream: StreamTun | None = None
    if isinstance(role, _Connector):
        try:
            stream = role.connect(mtu)
        except _Refused as exc:
            raise UsageError(_refused(role.endpoint, str(exc))) from None
        except OSError as exc:  # a person's to fix: the address, the peer, the certificates
            raise UsageError(f"--connect {role.endpoint}: {_reason(exc)}") from None
    session: _Session | None = None
    replacing = role if isinstance(role, _Listener) and args.transport == "tls" else None
    next_line = time.monotonic() + args.interval
    try:
        while True:
            while stream is None:
                stream = (role.next_stream(mtu) if isinstance(role, _Listener)
                          else role.reconnect(mtu))
            session = _Session(_session_device(device, args.netns), stream, recording)
            totals.sessions += 1
            _say(console, f"connected: {stream.name()}")
            stream = None
            while not session.done():
                session.thread.join(_TICK)
                if time.monotonic() >= next_line:
                    next_line += args.interval
                    _say(console, _counter_line(totals, session))
                if replacing is not None and not session.done() and replacing.pending():
                    # Over TLS a new connection is a peer that proved its
                    # certificate: the peer was restarted, the new one wins.
                    # (Over plain TCP it waits: a stray connection must not
                    # end a working one.)
                    stream = replacing.next_stream(mtu, block=False)
                    if stream is not None:
                        _say(console, f"replacing {session.link.name()}")
                        session.end()
            first = totals.sessions == 1 and isinstance(role, _Connector)
            _ended(session, totals, console, role.endpoint if first else None)
            session = None
    finally:
        if stream is not None:
            stream.close()
        if session is not None:
            session.end()
            totals.add(session.link.stats(), session.device.stats())


def _ended(session: _Session, totals: _Totals, console: Console,
           endpoint: Endpoint | None) -> None:
    """Account for a finished session and say why it ended.

    *endpoint* is given for the first connection of a --connect end: a TLS
    refusal there is this end's to fix (UsageError).
    """
    session.end()
    stats = session.link.stats()
    totals.add(stats, session.device.stats())
    error = session.error
    if endpoint is not None and isinstance(error, ssl.SSLError) and not stats.packets_read:
        # TLS 1.3: a server that refuses our certificate says so after the
        # handshake, in the first read. At start, that is the person's to fix.
        raise UsageError(_refused(endpoint, _reason(error)))
    if error is None:
        why = "the peer closed the connection"
    elif isinstance(error, TunError):  # the peer broke the frame format
        why = str(error)
        if "longer than mtu()" in why:
            why += " (give both ends the same --mtu)"
    elif isinstance(error, OSError):
        reset = error.errno in (errno.ECONNRESET, errno.EPIPE)
        why = "the peer reset the connection" if reset else _reason(error)
    else:
        raise error
    _say(console, f"disconnected: {session.link.name()}: {why}")

"""Multi-queue devices across processes: QueueWorkers, each worker one queue of each device.

TCP connections are made here, in this process (sockets opened inside the
namespaces), so the test knows which worker carries each flow: the kernel
picks a flow's queue by a hash of it with a random key, so the test opens
idle connections, sees from the workers' own stats() which one carried each
handshake, and keeps two per worker. Then it moves data on all four at once.
"""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from netns_util import disable_ipv6, netns_factory, ns_run, ns_socket, root  # noqa: F401
from priv_util import NOBODY

import tunkit
from tunkit import NativeTun
from tunkit._linux import netlink
from tunkit.workers import QueueReport, QueueWorkers, cpu_seconds

pytestmark = pytest.mark.timeout(120)

MakeNs = Callable[[str], str]
A4, B4 = "10.82.0.1", "10.82.0.2"
PORT = 5301
NAME = f"tkq{os.getpid()}"


class Devices:
    """A device in each of two namespaces, addressed and up; multi-queue if asked."""

    def __init__(self, netns_factory: MakeNs, multi_queue: bool) -> None:
        self.ns_a, self.ns_b = netns_factory("qa"), netns_factory("qb")
        self.tuns: list[NativeTun] = []
        for ns, addr in ((self.ns_a, A4), (self.ns_b, B4)):
            disable_ipv6(ns)  # no router solicitations: the handshakes are all that moves
            tun = tunkit.create_tun(NAME, netns=ns, multi_queue=multi_queue)
            self.tuns.append(tun)
            tun.add_address(f"{addr}/24")
            tun.up()
        self.a, self.b = self.tuns

    def info(self) -> netlink.TunInfo:
        info = netlink.tun_info(self.ns_a, NAME)
        assert info is not None
        return info

    def close(self) -> None:
        for tun in self.tuns:
            tun.close()


class Flows:
    """TCP connections from namespace A to a listener in B, made and read in this process."""

    def __init__(self, devices: Devices) -> None:
        self._devices = devices
        self._server = ns_socket(devices.ns_b, socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind((B4, PORT))
        self._server.listen(64)
        self._sockets: list[socket.socket] = [self._server]

    def connect(self) -> tuple[socket.socket, socket.socket]:
        client = ns_socket(self._devices.ns_a, socket.AF_INET, socket.SOCK_STREAM)
        self._sockets.append(client)
        client.settimeout(10)
        client.connect((B4, PORT))
        self._server.settimeout(10)
        conn, _ = self._server.accept()
        self._sockets.append(conn)
        return client, conn

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def _packets(reports: list[QueueReport]) -> list[int]:
    return [r.packets for r in reports]


def flows_on(workers: QueueWorkers, flows: Flows, want: dict[int, int],
             limit: int = 64) -> dict[int, list[tuple[socket.socket, socket.socket]]]:
    """Open connections until worker *i* (by pid) carries ``want[pid]`` of them.

    A connection's handshake (3 packets) shows in exactly one worker's
    counters; one seen in none or several (a stray packet) is not used.
    """
    chosen: dict[int, list[tuple[socket.socket, socket.socket]]] = {pid: [] for pid in want}
    for _ in range(limit):
        if all(len(chosen[pid]) >= n for pid, n in want.items()):
            return chosen
        before = workers.stats()
        pair = flows.connect()
        after = workers.stats()
        moved = [(a.pid, b.packets - a.packets) for a, b in zip(before, after, strict=True)]
        busy = [pid for pid, n in moved if n]
        pid = busy[0] if len(busy) == 1 and dict(moved)[busy[0]] == 3 else None
        if pid in chosen and len(chosen[pid]) < want[pid]:
            chosen[pid].append(pair)
    raise AssertionError(f"{limit} connections did not spread as {want}: {chosen}")


def transfer(pairs: list[tuple[socket.socket, socket.socket]], size: int) -> None:
    """Send *size* random bytes on each connection at once; check what arrives, byte for byte."""
    errors: list[BaseException] = []
    digests: dict[int, str] = {}

    def send(i: int, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except BaseException as exc:
            errors.append(exc)

    def receive(i: int, sock: socket.socket) -> None:
        try:
            digest, left = hashlib.sha256(), size
            sock.settimeout(60)
            while left:
                chunk = sock.recv(min(left, 1 << 20))
                if not chunk:
                    raise EOFError(f"stream {i} ended {left} bytes short")
                digest.update(chunk)
                left -= len(chunk)
            digests[i] = digest.hexdigest()
        except BaseException as exc:
            errors.append(exc)

    data = [random.Random(i).randbytes(size) for i in range(len(pairs))]
    threads = []
    for i, (client, conn) in enumerate(pairs):
        threads.append(threading.Thread(target=send, args=(i, client, data[i])))
        threads.append(threading.Thread(target=receive, args=(i, conn)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert digests == {i: hashlib.sha256(d).hexdigest() for i, d in enumerate(data)}


@pytest.fixture
def mq(netns_factory: MakeNs) -> Iterator[Devices]:
    devices = Devices(netns_factory, multi_queue=True)
    try:
        yield devices
    finally:
        devices.close()


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "split"])
def test_two_workers_carry_four_streams_both_queues_busy(mq: Devices, passthrough: bool) -> None:
    size = 4 << 20
    flows = Flows(mq)
    try:
        with QueueWorkers(mq.a, mq.b, passthrough=passthrough, user="nobody") as workers:
            workers.start(2)
            assert [w.uid for w in workers.workers] == [NOBODY, NOBODY]
            info = mq.info()
            # Two queues of the workers; the parent's own is detached, steered nothing.
            assert (info.queues, info.disabled_queues) == (2, 1)
            pids = [w.pid for w in workers.workers]
            chosen = flows_on(workers, flows, {pid: 2 for pid in pids})
            before = workers.stats()
            transfer([p for pid in pids for p in chosen[pid]], size)
            after = workers.stats()
            cpu = workers.cpu_seconds()
        for b, a in zip(before, after, strict=True):
            # Each worker read, from device A, the payload of its own two streams.
            assert a.a.bytes_read - b.a.bytes_read >= 2 * size, (b, a)
            assert a.a.dropped_too_big == a.b.dropped_too_big == 0
            if passthrough:
                assert a.a.gso_read > b.a.gso_read  # super-packets, passed whole
            else:
                assert a.a.gso_split > b.a.gso_split  # split on read, per packet
            assert cpu[a.pid] > 0
        info = mq.info()
        assert (info.queues, info.disabled_queues) == (1, 0)  # the parent's queue is back
    finally:
        flows.close()


def test_a_worker_killed_and_replaced_while_the_device_stays(mq: Devices) -> None:
    flows = Flows(mq)
    try:
        with QueueWorkers(mq.a, mq.b) as workers:
            workers.start(2)
            first, second = workers.workers
            chosen = flows_on(workers, flows, {first.pid: 1, second.pid: 1})
            workers.kill(first)
            with pytest.raises(ProcessLookupError):
                cpu_seconds(first.pid)  # killed and reaped
            assert mq.info().queues == 1  # its queue went with it; the device stays
            # Both flows go on, the dead worker's on the remaining queue.
            transfer(chosen[first.pid] + chosen[second.pid], 1 << 20)
            third = workers.add()
            assert mq.info().queues == 2
            more = flows_on(workers, flows, {third.pid: 1})
            before = {r.pid: r for r in workers.stats()}
            transfer(more[third.pid], 1 << 20)
            after = {r.pid: r for r in workers.stats()}
            assert after[third.pid].a.bytes_read - before[third.pid].a.bytes_read >= 1 << 20
        assert mq.info().queues == 1
    finally:
        flows.close()


def test_one_worker_for_devices_that_are_not_multi_queue(netns_factory: MakeNs) -> None:
    devices = Devices(netns_factory, multi_queue=False)
    flows = Flows(devices)
    try:
        workers = QueueWorkers(devices.a, devices.b, passthrough=False)
        try:
            only = workers.add()
            with pytest.raises(ValueError, match="not both multi-queue"):
                workers.add()
            transfer([flows.connect()], 1 << 20)
            (report,) = workers.stats()
            assert report.pid == only.pid and report.a.bytes_read >= 1 << 20
            workers.kill(only)
            replacement = workers.add()  # the device stayed: the parent holds it
            transfer([flows.connect()], 1 << 20)
            assert workers.stats()[0].pid == replacement.pid
        finally:
            reports = workers.close()
        assert [r.pid for r in reports] == [replacement.pid]
        assert reports[0].a.bytes_read >= 1 << 20 and not reports[0].error
        # The parent's devices work again without the workers: a ping through copy.
        copier = threading.Thread(target=tunkit.copy, args=(devices.a, devices.b))
        copier.start()
        try:
            ping = ns_run(devices.ns_a, "ping", "-c", "1", "-W", "5", B4, check=False)
            assert ping.returncode == 0, ping.stdout
        finally:
            devices.a.close()
            copier.join(10)
    finally:
        flows.close()
        devices.close()


def test_a_worker_that_cannot_start_is_reported(mq: Devices) -> None:
    workers = QueueWorkers(mq.a, mq.b, user="no-such-user")
    with pytest.raises((RuntimeError, OSError)):
        workers.add()
    assert workers.workers == ()
    assert workers.close() == []
    assert mq.info().queues == 1 and mq.info().disabled_queues == 0


# A parent that starts two workers, says their pids, and waits to be killed.
_PARENT = """
import sys, time, tunkit
from tunkit.workers import QueueWorkers
a = tunkit.create_tun(sys.argv[3], netns=sys.argv[1], multi_queue=True)
b = tunkit.create_tun(sys.argv[3], netns=sys.argv[2], multi_queue=True)
workers = QueueWorkers(a, b)
workers.start(2)
print(" ".join(str(w.pid) for w in workers.workers), flush=True)
time.sleep(120)
"""


def test_workers_die_with_a_parent_killed_outright_even_a_stopped_one(
    netns_factory: MakeNs,
) -> None:
    ns_a, ns_b = netns_factory("qda"), netns_factory("qdb")
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, ns_a, ns_b, f"tkd{os.getpid()}"],
                              stdout=subprocess.PIPE, text=True)
    pidfds: list[int] = []
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        pidfds = [os.pidfd_open(pid) for pid in pids]
        # A stopped worker cannot read its control socket's end: only the
        # kernel (PR_SET_PDEATHSIG) can end it when the parent dies.
        signal.pidfd_send_signal(pidfds[0], signal.SIGSTOP)
        parent.kill()
        parent.wait(10)
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + 10
        exited: set[int] = set()
        while len(exited) < 2 and time.monotonic() < deadline:
            exited |= {fd for fd, _ in poller.poll(100)}
        assert exited == set(pidfds), "a worker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        for fd in pidfds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)

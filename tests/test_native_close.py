"""Closing a NativeTun: prompt wake-ups, races with reads and writes, nothing left behind."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable

import pytest
from blocking import asleep_in, signal_when_polling, wait_in_poll, wait_until
from netns_util import (  # noqa: F401
    _NEEDS_PACKET_IO,
    DEVICE_KINDS,
    NativeHarness,
    device_kind,
    netns_factory,
    ns_run,
    root,
)
from reuse import occupy

from tunkit import ClosedError
from tunkit._linux import device as tk_device
from tunkit._linux.device import NativeTun, create_tun

MakeNs = Callable[[str], str]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_close_wakes_a_blocked_read_within_100_ms(
    netns_factory: MakeNs, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = netns_factory("wake")
    tun = create_tun(netns=ns, offload=device_kind(kind, monkeypatch))
    raised_at: list[float] = []
    errors: list[BaseException] = []

    def reader() -> None:
        bufs = [bytearray(16 + 1500) for _ in range(tun.batch_size())]
        try:
            tun.read(bufs, [0] * len(bufs), 16)
        except BaseException as exc:
            raised_at.append(time.monotonic())
            errors.append(exc)

    thread = threading.Thread(target=reader, name="test-reader")
    thread.start()
    try:
        wait_in_poll(thread)  # blocked in the kernel, not returned, not spinning
        thread.join(0.2)  # and it stays blocked
        assert thread.is_alive(), "read returned with nothing to read"
        started = time.monotonic()
        tun.close()
        close_took = time.monotonic() - started
        thread.join(2)
    finally:
        tun.close()
        thread.join(2)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ClosedError), errors
    assert raised_at[0] - started < 0.1
    assert close_took < 0.1


def _race_round(tun: NativeTun, pkt: bytes, delay: float) -> None:
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            while True:
                tun.write([pkt, pkt, pkt])
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        bufs = [bytearray(16 + 1500) for _ in range(tun.batch_size())]
        sizes = [0] * len(bufs)
        try:
            while True:
                tun.read(bufs, sizes, 16)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, name="test-writer"),
        threading.Thread(target=reader, name="test-reader"),
    ]
    for t in threads:
        t.start()
    time.sleep(delay)
    fd = tun.fileno()
    tun.close()
    # The closed number is free again: take it, and check no late call used it.
    with occupy(fd) as nobody_used_it:
        for t in threads:
            t.join(5)
            assert not t.is_alive(), "a call hung across close()"
        assert {type(e) for e in errors} <= {ClosedError}, errors
        assert len(errors) == 2
        nobody_used_it()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_reads_and_writes_racing_close(
    netns_factory: MakeNs, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call completes or raises ClosedError, none hangs, none reaches a reused number."""
    h = NativeHarness(netns_factory("race"))
    h.close()  # only its namespace is wanted; each round makes its own device
    rng = random.Random(7)
    pkt = bytes(16) + h.packet(1, 200)
    offload = device_kind(kind, monkeypatch)
    for _round in range(40):
        tun = create_tun(netns=h.ns, offload=offload)
        tun.add_address(f"{h.LOCAL}/24")
        tun.up()
        _race_round(tun, pkt, rng.uniform(0, 0.01))


@pytest.mark.timeout(60)
def test_close_from_many_threads_at_once(netns_factory: MakeNs) -> None:
    tun = create_tun(netns=netns_factory("many"))
    barrier = threading.Barrier(8)

    def close() -> None:
        barrier.wait()
        tun.close()

    threads = [threading.Thread(target=close, name=f"test-close-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert tun.closed and "[closed]" in repr(tun)
    assert tun.events().get(timeout=1) is None


@pytest.mark.timeout(30)
def test_a_close_that_meets_another_returns_when_that_one_is_done(netns_factory: MakeNs) -> None:
    """SPEC: no thread or descriptor remains once close() has returned, from any thread."""
    tun = create_tun(netns=netns_factory("close2"))
    events_thread = f"tunkit-events:{tun.name()}"
    monitor = tun._monitor
    letting_go = threading.Event()
    holding = threading.Event()

    class HeldMonitor:
        """The event listener, whose close() waits until the test lets it go."""

        def __getattr__(self, name: str) -> object:
            return getattr(monitor, name)

        def close(self) -> None:
            holding.set()
            letting_go.wait(10)
            monitor.close()

    left: list[list[str]] = []  # what the second close() left behind when it returned

    def second_close() -> None:
        tun.close()
        left.append([t.name for t in threading.enumerate() if t.name == events_thread])

    tun._monitor = HeldMonitor()  # type: ignore[assignment]
    first = threading.Thread(target=tun.close, name="test-close-1")
    first.start()
    try:
        assert holding.wait(10), "the first close() never reached the event listener"
        second = threading.Thread(target=second_close, name="test-close-2")
        second.start()
        wait_until(
            lambda: bool(left) or asleep_in(second, NativeTun.close),
            "the second close() returned or waits",
        )
        letting_go.set()
        second.join(5)
    finally:
        letting_go.set()
        first.join(5)
        tun._monitor = monitor  # type: ignore[assignment]
    assert left == [[]], f"the second close() returned with {left[0]} still running"


@pytest.mark.timeout(90)
def test_200_create_close_cycles_leave_nothing(netns_factory: MakeNs) -> None:
    ns = netns_factory("cycles")
    # One round first, so that lazily made things (imports, caches) exist before counting.
    with create_tun(netns=ns) as tun:
        tun.up()
    fds_before = _fds()
    threads_before = set(threading.enumerate())
    for i in range(200):
        tun = create_tun(netns=ns, offload=i % 2 == 1)
        if i % 20 == 0:  # configuration too: pyroute2 sockets must not leak either
            tun.add_address("10.79.0.1/24")
            tun.up()
            assert tun.addresses()
        tun.close()
    assert _fds() == fds_before
    assert set(threading.enumerate()) == threads_before


# -- close() from a signal handler, on the thread inside the call -----------------------

# (offload, io path, call): every read and write of both device kinds, on both paths.
_SIGNAL_CASES = [
    pytest.param(offload, path, call, id=f"{'vnet' if offload else 'plain'}-{path}-{call}",
                 marks=_NEEDS_PACKET_IO if path == "c" else [])
    for offload in (False, True)
    for path in ("c", "pure")
    for call in ("read", "write", *(("read_gso", "write_gso") if offload else ()))
]


def _closed_on_signal(
    tun: NativeTun, call: Callable[[], object], blocks: bool
) -> BaseException | None:
    """Run *call* on this (the main) thread until it raises; SIGUSR1 comes once it sleeps
    in poll() (*blocks*: a read with nothing to read) or 0.1 s in (a loop of writes, which
    a TUN device never blocks), and its handler closes *tun*. Returns what the call
    raised, or None if it returned."""
    assert threading.current_thread() is threading.main_thread()
    tun_fds = (tun.fileno(), tun._fd.wake_fd)
    closed_in_handler: list[bool] = []
    taken: list[int] = []

    def handler(signum: int, frame: object) -> None:
        tun.close()
        closed_in_handler.append(tun.closed)
        # As another thread may do at any moment: take free numbers, up to the
        # device's two if they are free now. A wait retried on them would then
        # wait on these pipes, never readable: a hang.
        numbers = {tun_fds[0], tun_fds[1]}
        while len(taken) < 256 and not numbers <= set(taken):
            taken.extend(os.pipe())

    try:
        if blocks:
            with signal_when_polling(handler):
                return _raised(call)
        old = signal.signal(signal.SIGUSR1, handler)
        timer = threading.Timer(0.1, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR1))
        timer.start()
        try:
            return _raised(call)
        finally:
            timer.cancel()
            timer.join()
            signal.signal(signal.SIGUSR1, old)
    finally:
        for fd in taken:
            os.close(fd)
        assert closed_in_handler == [True], "the handler did not run, or close() did not finish"


def _raised(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("offload", "path", "call"), _SIGNAL_CASES)
def test_a_signal_handler_may_close_the_device_its_own_thread_uses(
    netns_factory: MakeNs, monkeypatch: pytest.MonkeyPatch, offload: bool, path: str, call: str
) -> None:
    """What README says: ``signal.signal(SIGUSR1, lambda *_: tun.close())`` while this
    thread is blocked in a read (or in a loop of writes) of *tun*.

    The call ends with ClosedError, nothing hangs, and right after it the
    device's descriptor and its eventfd are closed and the device is gone.
    """
    if path == "pure":
        monkeypatch.setattr(tk_device, "_packet_io", None)
    h = NativeHarness(netns_factory("signal"), offload=offload)
    tun = h.tun
    fds = (tun.fileno(), tun._fd.wake_fd)
    name = tun.name()
    bufs = [bytearray(16 + 65535) for _ in range(tun.batch_size())]
    sizes = [0] * len(bufs)
    packet = bytes(16) + h.packet(1, 200)
    whole = bytes(16) + h.packet(2, 200)  # all-zero virtio header: GSO_NONE
    calls: dict[str, Callable[[], object]] = {
        "read": lambda: tun.read(bufs, sizes, 16),
        "read_gso": lambda: tun.read_gso(bufs, sizes, 16),  # type: ignore[attr-defined]
        "write": lambda: [tun.write([packet] * tun.batch_size()) for _ in iter(int, 1)],
        "write_gso": lambda: [tun.write_gso([whole] * 8) for _ in iter(int, 1)],  # type: ignore[attr-defined]
    }
    try:
        raised = _closed_on_signal(tun, calls[call], blocks=call.startswith("read"))
        assert isinstance(raised, ClosedError), repr(raised)
        open_now = set(os.listdir("/proc/self/fd"))
        assert not {str(fd) for fd in fds} & open_now, "a descriptor outlived the call"
        gone = ns_run(h.ns, "ip", "link", "show", name, check=False)
        assert gone.returncode != 0, gone.stdout
    finally:
        h.close()


@pytest.mark.timeout(10)
def test_close_once_waits_for_another_thread_and_never_for_itself() -> None:
    """CloseOnce: a second close on another thread waits for the first; on the closing
    thread itself (a signal handler inside close()) it returns at once."""
    from tunkit._linux.fd import CloseOnce

    once = CloseOnce()
    assert once.begin() and once.begun
    assert not once.begin()  # the closing thread: no wait for itself
    returned = threading.Event()

    def second() -> None:
        assert not once.begin()
        returned.set()

    other = threading.Thread(target=second, name="test-close-2")
    other.start()
    wait_until(
        lambda: returned.is_set() or asleep_in(other, CloseOnce.begin), "the second close waits"
    )
    assert not returned.is_set(), "the second close returned before the first was done"
    once.end()
    other.join(5)
    assert returned.is_set()

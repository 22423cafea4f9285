"""Worker processes that join two devices queue by queue: one core each, no shared GIL.

:class:`QueueWorkers` takes two devices, ``a`` and ``b``. For each worker it
attaches one more queue of each (a multi-queue device) and hands both
queues to a new process over a Unix socket (:func:`send_tun`), which joins
them with :func:`tunkit.copy` until it is told to stop. The kernel spreads
flows over a multi-queue device's queues, so N workers move N shares of the
traffic on up to N cores. A device that is not multi-queue can have one
worker, which is then handed the device itself: the single-process setup,
with the same accounting.

The parent keeps ``a`` and ``b`` (configuration, events) but detaches their
own queues while workers run, so the kernel steers no packet to a queue
that nobody reads; :meth:`QueueWorkers.close` attaches them again. A worker
that dies takes its queues with it (the kernel then steers their flows to
the others); :meth:`QueueWorkers.add` starts a replacement. Workers may run
as another user with no privilege at all (``user="nobody"``).

The control protocol, over a SOCK_SEQPACKET pair: the parent sends the two
devices, the worker answers ``{"ready": ...}``; then ``b"stats"`` asks for a
report (JSON: pid, the stats of its two queues, an error if its copy
failed) and ``b"stop"`` (or the parent's end closing) ends the worker,
which sends a last report.

Run as ``python -m tunkit._linux.queues FD [--split] [--user U] [--group G]``:
the worker's side, started by :class:`QueueWorkers`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any, Final

from .constants import IFF_MULTI_QUEUE
from .device import NativeTun, TunStats
from .ioctl import get_iff, set_queue
from .passing import recv_tun, send_tun
from .persist import attach_in
from .process import die_with_parent

__all__ = ["QueueReport", "QueueWorkers", "Worker", "cpu_seconds"]

_READY_TIMEOUT: Final = 30.0
_STOP_TIMEOUT: Final = 10.0
_MESSAGE: Final = 65536
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process *pid* so far, all its threads (``/proc/PID/stat``).

    Raises:
        ProcessLookupError: no such process (reaped already).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    # Field 2 (comm) may hold spaces and parentheses: count from the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLK_TCK


@dataclasses.dataclass(frozen=True)
class QueueReport:
    """What one worker says of its two queues."""

    pid: int
    a: TunStats
    b: TunStats
    error: str = ""  # the copy's error, "" while it runs or when it ended normally

    @property
    def packets(self) -> int:
        """Packets this worker moved, both ways (read from either queue)."""
        return self.a.packets_read + self.b.packets_read

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> QueueReport:
        return cls(int(obj["pid"]), TunStats(**obj["a"]), TunStats(**obj["b"]),
                   str(obj.get("error", "")))


@dataclasses.dataclass
class Worker:
    """One worker process and the parent's end of its control socket."""

    process: subprocess.Popen[bytes]
    control: socket.socket
    uid: int
    gid: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def ask(self, request: bytes) -> QueueReport:
        """Send *request* (``b"stats"`` or ``b"stop"``) and return the report that answers it.

        Raises:
            ConnectionError: the worker is gone.
        """
        self.control.send(request)
        answer = self.control.recv(_MESSAGE)
        if not answer:
            raise ConnectionError(f"worker {self.pid} is gone (exit status {self.process.poll()})")
        return QueueReport.from_json(json.loads(answer))


def _is_multi_queue(tun: NativeTun) -> bool:
    return bool(get_iff(tun.fileno())[1] & IFF_MULTI_QUEUE)


class QueueWorkers:
    """Worker processes, each joining one queue of device *a* to one of device *b*.

    *passthrough* is :func:`tunkit.copy`'s (``False``: the per-packet path).
    With *user* (and *group*) each worker drops to that user with no
    privilege once it has started (see :func:`drop_privileges`); it receives
    its queues after that. The parent must be allowed to attach queues (it
    has CAP_NET_ADMIN, or is the devices' owner). Not thread-safe: one
    thread drives it. A context manager: leaving it calls :meth:`close`.

    Workers die with this process, even when it is killed outright: a
    worker reads the end of its control socket as "stop", and the kernel
    kills one that cannot read it, a worker stopped or stuck
    (``PR_SET_PDEATHSIG``). The kernel does that when the *thread* that
    started the worker ends, so add workers from a thread that outlives them.
    """

    def __init__(
        self,
        a: NativeTun,
        b: NativeTun,
        *,
        passthrough: bool = True,
        user: int | str | None = None,
        group: int | str | None = None,
        python: str = sys.executable,
    ) -> None:
        self._a, self._b = a, b
        self._passthrough = passthrough
        self._user, self._group = user, group
        self._python = python
        self._multi_queue = _is_multi_queue(a) and _is_multi_queue(b)
        self._detached = False
        self._handed_over = False  # a device that is not multi-queue, given to its one worker
        self._workers: list[Worker] = []

    @property
    def workers(self) -> tuple[Worker, ...]:
        """The workers running, oldest first."""
        return tuple(self._workers)

    def start(self, count: int) -> None:
        """Start *count* workers (see :meth:`add`)."""
        if count < 1:
            raise ValueError(f"count {count} must be at least 1")
        for _ in range(count):
            self.add()

    def _queues(self) -> tuple[NativeTun, NativeTun, bool]:
        """One queue of each device for a new worker, and whether they are new objects."""
        if not self._multi_queue:
            if self._handed_over:
                raise ValueError(
                    f"{self._a.name()!r} and {self._b.name()!r} are not both multi-queue: "
                    "they can have one worker"
                )
            self._handed_over = True
            return self._a, self._b, False
        if not self._detached:
            for tun in (self._a, self._b):
                set_queue(tun.fileno(), False)
            self._detached = True
        queues: list[NativeTun] = []
        try:
            for tun in (self._a, self._b):
                ns = tun._ns_fd
                ns_fd = None if ns is None else os.dup(ns)
                try:
                    queues.append(attach_in(tun.name(), ns_fd, tun.offload))
                except BaseException:
                    if ns_fd is not None:
                        os.close(ns_fd)
                    raise
        except BaseException:
            for q in queues:
                q.close()
            raise
        return queues[0], queues[1], True

    def add(self) -> Worker:
        """Start one more worker with a new queue of each device; return it once it runs.

        Raises:
            ValueError: the devices are not multi-queue and have their worker.
            RuntimeError: the worker did not start (its error is on stderr).
        """
        qa, qb, fresh = self._queues()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = self._spawn(child)
        except BaseException:
            parent.close()
            child.close()
            if fresh:
                qa.close()
                qb.close()
            raise
        child.close()
        try:
            send_tun(parent, qa)
            send_tun(parent, qb)
            parent.settimeout(_READY_TIMEOUT)
            answer = parent.recv(_MESSAGE)
            parent.settimeout(None)
            if not answer:
                raise RuntimeError(
                    f"worker {process.pid} ended before it was ready "
                    f"(exit status {process.wait(_STOP_TIMEOUT)})"
                )
            ready = json.loads(answer)
        except BaseException:
            parent.close()
            _end(process)
            raise
        finally:
            if fresh:  # the worker holds them now
                qa.close()
                qb.close()
        worker = Worker(process, parent, int(ready["uid"]), int(ready["gid"]))
        self._workers.append(worker)
        return worker

    def _spawn(self, child: socket.socket) -> subprocess.Popen[bytes]:
        argv = [self._python, "-m", __name__, str(child.fileno())]
        if not self._passthrough:
            argv.append("--split")
        if self._user is not None:
            argv += ["--user", str(self._user)]
        if self._group is not None:
            argv += ["--group", str(self._group)]
        # The worker imports this very tunkit, wherever it was imported from.
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": here if not path else f"{here}{os.pathsep}{path}"}
        return subprocess.Popen(argv, pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent(os.getpid()))

    def kill(self, worker: Worker) -> None:
        """Kill *worker* (SIGKILL, by its pid) and reap it: its queues go with it.

        Of a device that is not multi-queue, the parent's own descriptor stays
        (packets wait in it): :meth:`add` then starts the replacement.
        """
        self._workers.remove(worker)
        worker.control.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
        worker.process.wait()
        if not self._multi_queue:
            self._handed_over = False

    def stats(self) -> list[QueueReport]:
        """Each running worker's report on its two queues, oldest worker first."""
        return [w.ask(b"stats") for w in self._workers]

    def cpu_seconds(self) -> dict[int, float]:
        """CPU seconds (user + system) of each running worker so far, by pid."""
        return {w.pid: cpu_seconds(w.pid) for w in self._workers}

    def close(self) -> list[QueueReport]:
        """Stop every worker, reap it, attach the devices' own queues again; return the last
        reports. Idempotent; a worker that does not stop in 10 s is killed."""
        reports = []
        workers, self._workers = self._workers, []
        for w in workers:
            try:
                w.control.settimeout(_STOP_TIMEOUT)
                reports.append(w.ask(b"stop"))
            except (OSError, ValueError, KeyError):
                pass  # gone already, or killed below: no report
            finally:
                w.control.close()
                _end(w.process)
        if self._detached:
            for tun in (self._a, self._b):
                if not tun.closed:
                    set_queue(tun.fileno(), True)
            self._detached = False
        self._handed_over = False
        return reports

    def __enter__(self) -> QueueWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _end(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the worker's side ------------------------------------------------------------


def _report(a: NativeTun, b: NativeTun, error: list[BaseException]) -> bytes:
    return json.dumps({
        "pid": os.getpid(),
        "a": dataclasses.asdict(a.stats()),
        "b": dataclasses.asdict(b.stats()),
        "error": repr(error[0]) if error else "",
    }).encode()


def worker_main(argv: Sequence[str] | None = None) -> int:
    """The worker process: receive two queues on the control socket, copy until told to stop."""
    from .._copy import copy

    parser = argparse.ArgumentParser(prog="python -m tunkit._linux.queues")
    parser.add_argument("fd", type=int, help="the control socket (SOCK_SEQPACKET)")
    parser.add_argument("--split", action="store_true", help="copy with passthrough=False")
    parser.add_argument("--user")
    parser.add_argument("--group")
    args = parser.parse_args(argv)
    # The parent stops its workers; a Ctrl-C for the whole terminal is its to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=args.fd)
    if args.user is not None:
        from .privileges import drop_privileges

        drop_privileges(args.user, args.group)
    a = recv_tun(control)
    b = recv_tun(control)
    error: list[BaseException] = []

    def run() -> None:
        try:
            copy(a, b, passthrough=not args.split)
        except BaseException as exc:
            error.append(exc)

    copier = threading.Thread(target=run, name=f"tunkit-worker:{a.name()}")
    copier.start()
    control.send(json.dumps({"ready": True, "pid": os.getpid(), "uid": os.geteuid(),
                             "gid": os.getegid()}).encode())
    try:
        while True:
            request = control.recv(64)
            if request == b"stats":
                control.send(_report(a, b, error))
            else:  # b"stop", or the parent's end closed
                break
    finally:
        a.close()
        b.close()
        copier.join()
    with contextlib.suppress(OSError):
        control.send(_report(a, b, error))
    control.close()
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(worker_main())

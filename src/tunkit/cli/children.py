"""The processes a command starts: marked, dying with it, always reaped.

Every program a command runs (ping, iperf3, the demo's two TCP ends, the
naive baseline) is started by :func:`start` or :func:`run`, so that:

- the kernel kills it when tunkit dies, even by SIGKILL (``PR_SET_PDEATHSIG``);
- its environment carries ``TUNKIT_RUN=<tunkit's pid>``: a later run can tell
  what a dead run left behind (:func:`remove_leftovers`) and touch nothing else;
- it is killed if still running, and waited for, when the call that started it
  ends; :func:`end_all` does so for every one at once (Ctrl-C, SIGTERM), and
  refuses new ones from then on. No orphan, no zombie.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from .._linux.netns import remove_stale_netns
from .._linux.process import die_with_parent, end_process, environment, process_ids

__all__ = ["MARK", "end", "end_all", "remove_leftovers", "run", "session", "start"]

# The environment variable that names the tunkit process a child belongs to.
MARK: Final = "TUNKIT_RUN"

_lock = threading.Lock()
_running: set[subprocess.Popen[str]] = set()  # guarded by _lock
_ending = False  # guarded by _lock: end_all() ran, start() refuses


def start(argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[str]:
    """Start *argv* (text mode, stdin from ``/dev/null`` unless given) as a marked child.

    The caller ends it with :func:`end`. The kernel kills it when the thread
    calling this ends, so call it from a thread that outlives the child.

    Raises:
        KeyboardInterrupt: :func:`end_all` ran: the command is on its way out.
    """
    env = {**popen_kwargs.pop("env", os.environ), MARK: str(os.getpid())}
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    with _lock:  # so that end_all() cannot miss a child being started
        if _ending:
            raise KeyboardInterrupt("the command is ending")
        proc = subprocess.Popen(
            list(argv), env=env, text=True, preexec_fn=die_with_parent(os.getpid()),
            **popen_kwargs,
        )
        _running.add(proc)
    return proc


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    with _lock:
        _running.discard(proc)


def end(proc: subprocess.Popen[str]) -> None:
    """Kill *proc* if it is still running, wait for it, and close its pipes."""
    _reap(proc)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def run(
    argv: Sequence[str], timeout: float, tick: Callable[[], None] | None = None,
    **popen_kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run *argv* to its end and return its status and output, calling *tick* every 0.1 s.

    Raises:
        subprocess.TimeoutExpired: it ran for *timeout* seconds (it is killed).
        KeyboardInterrupt: as :func:`start`.
    """
    proc = start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_kwargs)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                # Output read before a timeout is kept for the next call.
                out, err = proc.communicate(timeout=max(0.0, min(left, 0.1)))
                break
            except subprocess.TimeoutExpired:
                if left <= 0.1:
                    raise subprocess.TimeoutExpired(list(argv), timeout) from None
                if tick is not None:
                    tick()
    finally:
        end(proc)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def end_all() -> None:
    """Kill and wait for every child still running; refuse new ones until the session ends.

    Pipes stay open for the thread reading them, which sees the child's end.
    """
    global _ending
    with _lock:
        _ending = True
        procs = list(_running)
    for proc in procs:
        _reap(proc)


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Run a command: on the way out, however it ends, every child still running is ended."""
    global _ending
    with _lock:
        _ending = False
    try:
        yield
    finally:
        end_all()
        with _lock:
            _ending = False


def _left_by_a_dead_run(pid: int) -> bool:
    # Started by a tunkit process that no longer exists (and so is not ours).
    maker = (environment(pid) or {}).get(MARK, "")
    return maker.isdigit() and int(maker) != os.getpid() and not os.path.exists(f"/proc/{maker}")


def remove_leftovers(prefix: str) -> tuple[list[int], list[str]]:
    """End what dead tunkit runs left behind: their processes, then their namespaces.

    A process is a leftover when its environment says ``TUNKIT_RUN=<pid>`` and
    no process *pid* exists; nothing else is signalled. Ending those first
    lets the namespaces they were in go with their names (a namespace lives as
    long as a process in it). Returns the process ids ended and the namespace
    names removed (those of :func:`remove_stale_netns` with *prefix*).
    """
    ended = [
        pid for pid in process_ids()
        if _left_by_a_dead_run(pid) and end_process(pid, _left_by_a_dead_run)
    ]
    return ended, remove_stale_netns(prefix)

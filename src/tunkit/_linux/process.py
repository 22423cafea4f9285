"""Processes: children that die with their parent, and ending one process safely.

The command line runs programs (ping, iperf3, small Python scripts) inside
the namespaces it makes. Two kernel features keep that tidy:
``prctl(PR_SET_PDEATHSIG)`` has the kernel kill a child when its parent dies,
even by SIGKILL; a pidfd names one process for good, so a process found by
its number is checked and signalled as the same process even if the number
is reused meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
from collections.abc import Callable
from typing import Final

from .constants import PR_SET_PDEATHSIG

__all__ = ["die_with_parent", "end_process", "environment", "process_ids"]

_libc: Final = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def die_with_parent(parent: int) -> Callable[[], None]:
    """Return a ``preexec_fn`` that has the child killed (SIGKILL) when its parent dies.

    *parent* is the parent's process id, ``os.getpid()`` before the fork. The
    kernel sends the signal when the *thread* that started the child ends, so
    start a child from a thread that outlives it. The setting survives
    ``execve`` of ordinary programs (and of programs with file capabilities
    when run by root). A child whose parent died before the setting took
    effect kills itself at once.
    """

    def setup() -> None:
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def process_ids() -> list[int]:
    """Return the ids of the processes this process can see in ``/proc``."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def environment(pid: int) -> dict[str, str] | None:
    """Return the environment process *pid* started with, or ``None`` if it cannot be read.

    ``None`` for a process that has exited, a kernel thread's empty one aside
    (``{}``), or one this process may not read.
    """
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    out: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def end_process(pid: int, is_target: Callable[[int], bool], timeout: float = 5.0) -> bool:
    """Kill process *pid* (SIGKILL) if ``is_target(pid)`` says so; wait until it has exited.

    A pidfd is opened before *is_target* looks at ``/proc/<pid>``, and the
    signal goes through it: if *pid* was reused meanwhile, the check saw the
    new process and the signal reaches no one (the pidfd's process is gone).
    Returns whether this call ended the process.

    Raises:
        TimeoutError: it had not exited *timeout* seconds after the signal.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        if not is_target(pid):
            return False
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        # A pidfd turns readable when its process exits (reaped or not).
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise TimeoutError(f"process {pid} did not exit within {timeout:g} s of SIGKILL")
        return True
    finally:
        os.close(pidfd)

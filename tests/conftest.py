"""Shared fixtures: every test must leave no thread, descriptor or child process behind."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _fds() -> set[int]:
    try:
        return {int(fd) for fd in os.listdir("/proc/self/fd")}
    except FileNotFoundError:  # not Linux: nothing to compare
        return set()


def _children() -> set[int]:
    """Our child processes, running or not yet reaped (each thread has its own list)."""
    pids: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except FileNotFoundError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return pids


def _fd_target(fd: int) -> str:
    try:
        return f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread running, a descriptor open or a child process.

    Checked at once when the test and its other fixtures are done, with no
    grace period: SPEC says nothing remains once ``close()``/``stop()`` has
    returned, so a ``tunkit-`` thread or a descriptor still there then is a
    leak, not slowness. Threads and processes the test started itself must be
    joined and reaped by the test.
    """
    threads_before, fds_before, children_before = _threads(), _fds(), _children()
    yield
    threads = _threads() - threads_before
    fds = _fds() - fds_before
    children = _children() - children_before
    details = []
    if threads:
        details.append(f"threads left running: {sorted(t.name for t in threads)}")
    if fds:
        details.append(f"descriptors left open: {[_fd_target(fd) for fd in sorted(fds)]}")
    if children:
        details.append(f"child processes left: {sorted(children)}")
    if details:
        pytest.fail("; ".join(details))

"""Shared fixtures: every test must leave no tunkit thread and no descriptor behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest


def _tunkit_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("tunkit-")}


def _fds() -> set[int]:
    try:
        return {int(fd) for fd in os.listdir("/proc/self/fd")}
    except FileNotFoundError:  # not Linux: nothing to compare
        return set()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a ``tunkit-`` thread running or a descriptor open."""
    threads_before = _tunkit_threads()
    fds_before = _fds()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        threads = _tunkit_threads() - threads_before
        fds = _fds() - fds_before
        if not threads and not fds:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    details = []
    if threads:
        details.append(f"threads left running: {sorted(t.name for t in threads)}")
    if fds:
        targets = []
        for fd in sorted(fds):
            try:
                targets.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                targets.append(str(fd))
        details.append(f"descriptors left open: {targets}")
    pytest.fail("; ".join(details))

"""Network namespaces: enter one for the length of a call; create and delete named ones.

Named namespaces are the ones ``ip netns`` manages: a bind mount of a
namespace file under ``/var/run/netns``. Entering one changes only the calling
thread (``setns(2)`` with ``CLONE_NEWNET`` is per thread), and :func:`inside`
always puts the thread back, so every other thread of the process stays where
it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import threading
from collections.abc import Iterator
from typing import Final

from .constants import CLONE_NEWNET, MNT_DETACH, MS_BIND, MS_REC, MS_SHARED

__all__ = [
    "NETNS_RUN_DIR",
    "create_netns",
    "delete_netns",
    "inside",
    "list_netns",
    "netns_path",
    "open_netns",
    "remove_stale_netns",
    "unique_netns_name",
]

NETNS_RUN_DIR: Final = "/var/run/netns"

_libc: Final = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]

# "tk-<pid>-<tag>": names that tunkit makes carry the maker's process id, so a
# later run can tell leftovers of a dead process from namespaces in use.
_UNIQUE_RE: Final = re.compile(r"^(?P<prefix>[A-Za-z0-9_]+)-(?P<pid>\d+)-")


def _os_error(what: str, filename: str | None = None) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}", filename)


def netns_path(name: str) -> str:
    """Return the file of the named namespace *name*, checking the name.

    Raises:
        ValueError: *name* is empty, ``.``/``..`` or contains ``/`` or NUL.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"network namespace name {name!r} is not a valid file name")
    return os.path.join(NETNS_RUN_DIR, name)


def open_netns(name: str) -> int:
    """Return a new close-on-exec descriptor of the named namespace; the caller owns it.

    Raises:
        FileNotFoundError: no namespace of that name (the message names it).
    """
    path = netns_path(name)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, f"network namespace {name!r} does not exist", path
        ) from None


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        if code == errno.EPERM:
            raise PermissionError(code, f"{what} needs CAP_SYS_ADMIN")
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _describe(ns: int | str) -> str:
    """Name namespace *ns* (a name, or a descriptor) for a message, as ``ip netns`` would."""
    if isinstance(ns, str):
        return repr(ns)
    # A descriptor: the named namespace that is the same file, if there is one.
    try:
        st = os.fstat(ns)
    except OSError:
        return f"descriptor {ns}"
    for name in list_netns():
        with contextlib.suppress(OSError):
            other = os.stat(os.path.join(NETNS_RUN_DIR, name))
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return repr(name)
    return f"net:[{st.st_ino}] (no name)"


@contextlib.contextmanager
def inside(ns: int | str | None) -> Iterator[None]:
    """Run the body with the calling thread in network namespace *ns*, then restore it.

    *ns* is a namespace name, a descriptor of a namespace (not taken over), or
    ``None`` for "stay where you are" (no system call at all, so no
    CAP_SYS_ADMIN needed). The thread's own namespace is restored whatever the
    body does; other threads are never affected.

    Raises:
        FileNotFoundError: a named namespace does not exist.
        PermissionError: no CAP_SYS_ADMIN to enter a namespace.
    """
    if ns is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = open_netns(ns) if isinstance(ns, str) else ns
        try:
            _setns(target, f"entering network namespace {_describe(ns)}")
        finally:
            if isinstance(ns, str):
                os.close(target)
        try:
            yield
        finally:
            # Failing here would leave this thread in a foreign namespace; there
            # is no safe way on, so the error propagates.
            _setns(own, "returning to the thread's own network namespace")
    finally:
        os.close(own)


def list_netns() -> list[str]:
    """Return the names of the named namespaces, sorted."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def _share_run_dir() -> None:
    # As iproute2 does: make /var/run/netns a shared mount (binding it onto
    # itself first if needed), so that namespaces created here are seen in
    # every mount namespace that sees the directory.
    os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
    run_dir = NETNS_RUN_DIR.encode()
    if _libc.mount(b"none", run_dir, None, MS_SHARED | MS_REC, None) == 0:
        return
    if _libc.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None) != 0:
        raise _os_error(f"binding {NETNS_RUN_DIR} onto itself", NETNS_RUN_DIR)
    if _libc.mount(b"none", run_dir, None, MS_SHARED | MS_REC, None) != 0:
        raise _os_error(f"making {NETNS_RUN_DIR} a shared mount", NETNS_RUN_DIR)


def _bind_new_netns(path: str, result: list[BaseException]) -> None:
    # Runs on its own short-lived thread: unshare() moves only this thread into
    # the new namespace, and the bind mount keeps it alive after the thread ends.
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise _os_error("unshare(CLONE_NEWNET)")
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        if _libc.mount(src, path.encode(), b"none", MS_BIND, None) != 0:
            raise _os_error(f"binding the new namespace to {path}", path)
    except BaseException as exc:
        result.append(exc)


def create_netns(name: str) -> None:
    """Create the named network namespace *name*, as ``ip netns add`` does.

    Needs CAP_SYS_ADMIN. No process is forked: a short-lived thread enters the
    new namespace, binds it under :data:`NETNS_RUN_DIR` and ends.

    Raises:
        FileExistsError: a namespace of that name exists.
    """
    path = netns_path(name)
    _share_run_dir()
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, f"network namespace {name!r} already exists", path
        ) from None
    result: list[BaseException] = []
    worker = threading.Thread(
        target=_bind_new_netns, args=(path, result), name=f"tunkit-netns:{name}"
    )
    worker.start()
    worker.join()
    if result:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise result[0]


def delete_netns(name: str) -> None:
    """Delete the named network namespace *name*, as ``ip netns delete`` does.

    The namespace itself ends when nothing uses it any more (processes,
    descriptors, devices such as a TUN device whose descriptor is open).

    Raises:
        FileNotFoundError: no namespace of that name.
    """
    path = netns_path(name)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"network namespace {name!r} does not exist", path)
    # EINVAL: not a mount point (a half-made namespace); unlink it all the same.
    if _libc.umount2(path.encode(), MNT_DETACH) != 0 and ctypes.get_errno() != errno.EINVAL:
        raise _os_error(f"unmounting {path}", path)
    os.unlink(path)


def unique_netns_name(tag: str, prefix: str = "tk") -> str:
    """Return ``"<prefix>-<pid>-<tag>"``: a name that marks this process as its maker."""
    return f"{prefix}-{os.getpid()}-{tag}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_netns(prefix: str = "tk") -> list[str]:
    """Delete the namespaces named by :func:`unique_netns_name` whose maker has exited.

    Returns the names deleted. Namespaces of live processes, and names of any
    other form, are left alone.
    """
    removed = []
    for name in list_netns():
        match = _UNIQUE_RE.match(name)
        if match is None or match["prefix"] != prefix or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            delete_netns(name)
            removed.append(name)
    return removed

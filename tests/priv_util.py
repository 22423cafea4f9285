"""Processes without any privilege, for root tests: uid 65534, no groups, no capabilities.

``setpriv`` drops everything before it runs a Python that the user may run
(``nobody_python``: the test interpreter, or the system's one of the same
version, with tunkit and pyroute2 on PYTHONPATH). ``/dev/net/tun`` is mode
0600 on some machines; a user needs 0666 to attach. Instead of changing the
machine's node (which a killed test could leave open, and which other
programs on the machine see), ``dev_tun_node`` makes a private node of the
same device, mode 0666, which ``start_unprivileged`` bind-mounts over
``/dev/net/tun`` in the child's own mount namespace only.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence

import pytest

from tunkit._linux.ioctl import TUN_PATH

NOBODY = 65534
SETPRIV = (
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
)
_counter = itertools.count()


def _package_dir(module: str) -> str:
    mod = __import__(module)
    return os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__)))


@functools.cache
def _find_python() -> tuple[str, str] | str:
    """``(interpreter, PYTHONPATH)`` that uid 65534 can run with tunkit, or why there is none."""
    path = os.pathsep.join(dict.fromkeys([_package_dir("tunkit"), _package_dir("pyroute2")]))
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    probe = "import sys, tunkit, pyroute2; print('%d.%d' % sys.version_info[:2])"
    tried = []
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
        if not os.path.exists(python):
            continue
        proc = subprocess.run([*SETPRIV, python, "-c", probe], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": path}, timeout=60, check=False)
        if proc.returncode == 0 and proc.stdout.strip() == want:
            return python, path
        tried.append(f"{python}: {(proc.stderr.strip().splitlines() or [proc.stdout])[-1]}")
    return f"no Python {want} that uid {NOBODY} can run with tunkit: {'; '.join(tried)}"


@pytest.fixture
def nobody_python(root: None) -> tuple[str, str]:
    """The interpreter and PYTHONPATH for unprivileged children (skip, or fail under CI)."""
    found = _find_python()
    if isinstance(found, str):
        if os.environ.get("CI") == "true":
            pytest.fail(found)
        pytest.skip(found)
    return found


@pytest.fixture
def dev_tun_node(root: None) -> Iterator[str]:
    """A private node of /dev/net/tun's device, mode 0666, removed after the test.

    The machine's /dev/net/tun is never touched: the test checks that its
    mode is the same afterwards.
    """
    real = os.stat(TUN_PATH)
    path = f"/dev/net/tk-{os.getpid()}-tun-{next(_counter)}"
    os.mknod(path, stat.S_IFCHR | 0o666, real.st_rdev)
    try:
        os.chmod(path, 0o666)  # past the umask
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        assert os.stat(TUN_PATH).st_mode == real.st_mode


def start_unprivileged(
    python: tuple[str, str],
    ns: str,
    code: str,
    *args: str,
    dev_tun: str | None = None,
    pass_fds: Sequence[int] = (),
    stdin: int | None = subprocess.DEVNULL,
) -> subprocess.Popen[str]:
    """Start ``python -c code args`` in namespace *ns* as uid 65534 with no privilege.

    With *dev_tun* (a ``dev_tun_node``), the child sees that node as
    ``/dev/net/tun``, as on a machine that ships it 0666. Output is piped.
    """
    interpreter, path = python
    argv = ["ip", "netns", "exec", ns]
    if dev_tun is not None:
        # ip netns exec gave the child a mount namespace of its own: the bind
        # mount is seen there and nowhere else.
        argv += ["sh", "-c", 'mount --bind "$0" /dev/net/tun && exec "$@"', dev_tun]
    argv += [*SETPRIV, interpreter, "-c", textwrap.dedent(code), *args]
    return subprocess.Popen(
        argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        pass_fds=pass_fds, env={**os.environ, "PYTHONPATH": path},
    )


def run_unprivileged(
    python: tuple[str, str], ns: str, code: str, *args: str, dev_tun: str | None = None,
    timeout: float = 60,
) -> str:
    """Run :func:`start_unprivileged` to its end; return its output (it must exit 0)."""
    proc = start_unprivileged(python, ns, code, *args, dev_tun=dev_tun)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        end(proc)
    assert proc.returncode == 0, err
    return out


def end(proc: subprocess.Popen[str], lines: Lines | None = None) -> None:
    """Kill *proc* (by its pid, it is ours) if it still runs, reap it, close its pipes
    (after *lines*, the reader of its output, has seen the end)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if lines is not None:
        lines.join()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()



class Lines:
    """The lines a child prints, read on a thread, so that waiting for one can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._proc = proc
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(proc.stdout,), name="test-lines")
        self._thread.start()

    def _run(self, pipe: object) -> None:
        for line in pipe:  # type: ignore[attr-defined]
            self._lines.put(line)
        self._lines.put("")  # EOF

    def next(self, timeout: float = 20) -> str:
        """The next line; AssertionError (with the child's stderr if it ended) on time-out."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from pid {self._proc.pid} within {timeout} s") from None
        if not line:
            err = self._proc.stderr.read() if self._proc.stderr is not None else ""
            raise AssertionError(f"pid {self._proc.pid} ended: {err}")
        return line

    def join(self) -> None:
        """Wait for the reader (call once the child is ended)."""
        self._thread.join(10)

"""What entering a network namespace says when it cannot: the namespace's name."""

# ruff: noqa: F811  (fixtures imported from netns_util are parameters here)

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from netns_util import netns_factory, root  # noqa: F401

# Keep CAP_NET_ADMIN (devices) but drop CAP_SYS_ADMIN (setns).
_NO_SYS_ADMIN = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin"]

_PROBE = """
import sys
from tunkit._linux.device import create_tun
from tunkit._linux.netns import inside, open_netns
try:
    with inside(sys.argv[1]):
        pass
except PermissionError as exc:
    print(exc.strerror)
fd = open_netns(sys.argv[1])
try:
    with inside(fd):
        pass
except PermissionError as exc:
    print(exc.strerror)
try:
    create_tun(netns=sys.argv[1])
except PermissionError as exc:
    print(exc.strerror)
"""


def test_entering_without_cap_sys_admin_names_the_namespace(
    netns_factory: Callable[[str], str],
) -> None:
    ns = netns_factory("nosys")
    proc = subprocess.run([*_NO_SYS_ADMIN, sys.executable, "-c", _PROBE, ns],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    # By name, by a descriptor of it (as create_tun enters it): the same words.
    expected = f"entering network namespace {ns!r} needs CAP_SYS_ADMIN"
    assert proc.stdout.splitlines() == [expected] * 3

"""The public names SPEC.md fixes are all there, and importing tunkit needs only the stdlib."""

from __future__ import annotations

import subprocess
import sys

import tunkit

SPEC_NAMES = {
    "Tun", "Event", "Events", "ReadOnClosedChannelError", "WriteOnClosedChannelError",
    "ReadOnClosedPipeError", "WriteOnClosedPipeError", "Channel", "pipe", "TunIO", "copy",
    "CallbackTun", "Forwarder", "Point2Point", "BufferPool", "Pool", "DebugPool", "GsoTun",
    "create_tun", "open_tun", "NativeTun", "TunStats", "TunError", "ClosedError",
    "OffsetError", "RetryableError", "TooManySegmentsError", "BufferPoolError",
    "attach_tun", "delete_tun", "send_tun", "recv_tun", "UdpTun",
    "OffloadKind", "OffloadOff", "OffloadState",
}


def test_every_spec_name_is_exported_and_resolves() -> None:
    assert set(tunkit.__all__) >= SPEC_NAMES
    for name in tunkit.__all__:
        assert getattr(tunkit, name) is not None
        assert getattr(tunkit, name).__doc__, f"{name} has no docstring"


def test_importing_the_core_loads_no_third_party_package() -> None:
    code = (
        "import sys, tunkit; tunkit.pipe(); "
        "print(sorted(m for m in ('pyroute2', 'rich') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

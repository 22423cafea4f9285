"""The README's Python examples run as pasted and print what their comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from netns_util import root  # noqa: F401 - fixture

README = Path(__file__).resolve().parent.parent / "README.md"
# Scripts (a first line "# name.py: ...") take arguments: their own tests run them
# (tunnel.py: tests/test_udp_netns.py).
SCRIPT = re.compile(r"# [\w-]+\.py: ")
BLOCKS = [
    b
    for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    if not SCRIPT.match(b)
]
IN_MEMORY = [b for b in BLOCKS if "create_tun" not in b]


def _runs_and_prints_what_it_says(block: str) -> None:
    expected = [m.group(1) for m in re.finditer(r"print\(.*\)  # (.*)$", block, re.M)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), {})
    assert out.getvalue().splitlines() == expected


@pytest.mark.parametrize("block", IN_MEMORY, ids=[f"block{i}" for i in range(len(IN_MEMORY))])
def test_readme_example_runs_and_prints_what_it_says(block: str) -> None:
    _runs_and_prints_what_it_says(block)


# The privilege-separated worker: root makes the devices, a worker without privilege moves them.
WORKER = [b for b in BLOCKS if "drop_privileges" in b]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("block", WORKER, ids=[f"worker{i}" for i in range(len(WORKER))])
def test_readme_worker_example_runs_and_prints_what_it_says(
    block: str, root: None  # noqa: F811
) -> None:
    _runs_and_prints_what_it_says(block)


def test_readme_has_the_worker_example() -> None:
    assert len(WORKER) == 1


# The StreamTun example is one end of a tunnel: tests/test_tunnel.py runs it
# against a `tunkit tunnel` process.
NATIVE = [b for b in BLOCKS if "create_tun" in b and b not in WORKER and "StreamTun" not in b
          and "tunkit.aio" not in b]
# The asyncio example answers a ping from its device (tunkit.aio).
AIO_NATIVE = [b for b in BLOCKS if "create_tun" in b and "tunkit.aio" in b]


def test_readme_has_the_asyncio_device_example() -> None:
    assert len(AIO_NATIVE) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("block", AIO_NATIVE, ids=[f"aio{i}" for i in range(len(AIO_NATIVE))])
def test_readme_asyncio_example_answers_a_ping(block: str, root: None) -> None:  # noqa: F811
    _runs_and_prints_what_it_says(block)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("block", NATIVE, ids=[f"native{i}" for i in range(len(NATIVE))])
def test_readme_device_example_reads_a_ping(block: str, root: None) -> None:  # noqa: F811
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[1] == "read 84 bytes: ICMP type 8 (echo request) 10.99.0.1 -> 10.99.0.2"
    assert lines[2].endswith("[closed]>")

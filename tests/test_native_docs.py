"""The README's native example works as pasted (docs/native.md, and README.md once merged)."""

# ruff: noqa: F811  (the fixtures imported from netns_util are parameters here)

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from netns_util import need_tool, root  # noqa: F401

from tunkit._linux import netns as tk_netns

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    found = []
    for doc in ("README.md", "docs/native.md"):
        path = ROOT / doc
        if path.exists():
            for i, code in enumerate(_BLOCK.findall(path.read_text())):
                if "create_tun(" in code and 'NS = "' in code:
                    found.append((f"{doc}#{i}", code))
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("where", "code"), _examples(), ids=[w for w, _ in _examples()])
def test_native_example_runs_as_pasted(root: None, where: str, code: str) -> None:
    need_tool("ping")
    # Only the namespace's name changes, to one that marks this test run.
    name = tk_netns.unique_netns_name("readme")
    code = re.sub(r'^NS = ".*"$', f'NS = "{name}"', code, count=1, flags=re.M)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=45, env=env
        )
    finally:
        if name in tk_netns.list_netns():
            tk_netns.delete_netns(name)
    assert result.returncode == 0, result.stderr
    assert "ICMP type 8 (echo request) 10.99.0.1 -> 10.99.0.2" in result.stdout
    assert "[closed]" in result.stdout

"""One behaviour, two implementations: run an offload test module on each engine.

A module calls ``engine = engine_fixture(__name__, "split", ...)``: its tests
then run once on the pure-Python engine and once on the C extension
(tunkit._speedups), with the named module globals rebound to the engine of
the current run, so helpers and tests alike use it. Without the extension the
native run is skipped with the reason; CI checks that the extension was built.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tunkit._offload._impl import NATIVE, PURE, REASON, Engine

ENGINES = [
    pytest.param(PURE, id="pure"),
    pytest.param(
        NATIVE,
        id="native",
        marks=[] if NATIVE else [pytest.mark.skip(reason=f"no C extension: {REASON}")],
    ),
]


def engine_fixture(module: str, *names: str) -> Callable[..., Any]:
    """Return a module-scoped autouse fixture that rebinds *names* in *module* per engine."""

    @pytest.fixture(scope="module", autouse=True, params=ENGINES)
    def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
        """Run the module's tests on one implementation of the offload engine."""
        impl: Engine = request.param
        with pytest.MonkeyPatch.context() as mp:
            for name in names:
                mp.setattr(sys.modules[module], name, getattr(impl, name))
            yield impl

    return engine

"""Pick the offload engine's kernels at import: the C extension if it loads, else pure Python.

``tunkit._speedups`` (built from ``src/tunkit/_speedups/*.c``) holds C twins of the hot
functions: the checksum, ``split`` and ``Coalescer.coalesce``. They behave
exactly as the pure modules do (the test suite runs on both, and hypothesis
compares them byte for byte); only the speed differs. The extension is
optional: when it was not built, fails to load, or ``TUNKIT_PURE_PYTHON`` is
set to anything but ``""``/``"0"``, the pure modules are used.

:data:`ACTIVE` is the engine in use, :data:`PURE` and :data:`NATIVE` (None
without the extension) both, for tests and benchmarks. The module-level names
(``split``, ``Coalescer``, ``ones_sum``, ...) are those of :data:`ACTIVE`.
"""

from __future__ import annotations

import os
from collections.abc import MutableSequence, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol, final

from .._errors import TooManySegmentsError
from .checksum import checksum as _pure_checksum
from .checksum import ones_sum as _pure_ones_sum
from .checksum import pseudo_sum as _pure_pseudo_sum
from .checksum import update16 as _pure_update16
from .coalesce import ZERO_VNET_HDR, Write
from .coalesce import Coalescer as PureCoalescer
from .headers import _Malformed, _TooBig
from .split import split as _pure_split

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "ACTIVE",
    "NATIVE",
    "NATIVE_MODULE",
    "PURE",
    "Coalescer",
    "Engine",
    "NativeCoalescer",
    "PureCoalescer",
    "checksum",
    "ones_sum",
    "pseudo_sum",
    "speedups_enabled",
    "split",
    "update16",
]


class SumFn(Protocol):
    """``ones_sum`` and ``checksum``: a buffer and an initial sum in, 16 bits out."""

    def __call__(self, data: ReadableBuffer, initial: int = 0) -> int: ...


class PseudoSumFn(Protocol):
    """``pseudo_sum``: adjacent source and destination addresses, protocol, length."""

    def __call__(self, addrs: ReadableBuffer, proto: int, l4_len: int) -> int: ...


class Update16Fn(Protocol):
    """``update16``: a checksum field after one 16-bit word changed (RFC 1624)."""

    def __call__(self, csum: int, old: int, new: int) -> int: ...


class SplitFn(Protocol):
    """``split``: one kernel read into finished packets (see ``split.split``)."""

    def __call__(
        self,
        pkt: memoryview,
        out_bufs: Sequence[WriteableBuffer],
        sizes: MutableSequence[int],
        offset: int,
    ) -> int: ...


class Engine(NamedTuple):
    """One implementation of the offload engine's kernels, under one name."""

    name: str  # "pure" or "native"
    ones_sum: SumFn
    checksum: SumFn
    pseudo_sum: PseudoSumFn
    update16: Update16Fn
    split: SplitFn
    Coalescer: type[PureCoalescer]


def _forced_pure() -> bool:
    return os.environ.get("TUNKIT_PURE_PYTHON", "") not in ("", "0")


def _load() -> tuple[ModuleType | None, str]:
    """Return the bound extension module, or None and why not."""
    if _forced_pure():
        return None, "TUNKIT_PURE_PYTHON is set"
    try:
        from .. import _speedups
    except ImportError as exc:  # not built (no compiler at install), or broken
        return None, f"tunkit._speedups did not load: {exc}"
    if not hasattr(_speedups, "bind"):
        # In a source checkout without a build, the C sources' folder
        # src/tunkit/_speedups/ imports as an empty namespace package.
        return None, "tunkit._speedups is not built (only its C sources are here)"
    _speedups.bind(_Malformed, _TooBig, TooManySegmentsError, Write, ZERO_VNET_HDR)
    return _speedups, "tunkit._speedups is loaded"


_native, REASON = _load()
"""Why the engine is what it is, for ``tunkit bench`` and bug reports."""
NATIVE_MODULE: Final[ModuleType | None] = _native
"""The bound extension module, or None: ``_linux`` takes its PacketIo from here."""


@final
class NativeCoalescer(PureCoalescer):
    """A :class:`~tunkit._offload.coalesce.Coalescer` whose batches are planned in C.

    Same constructor, attributes and results as the pure class; the writes'
    patched headers live in a buffer made for each call, so the views of a
    call stay valid after the next one (the pure class reuses its scratch).
    Raises ``RuntimeError`` if the extension is not loaded.
    """

    __slots__ = ()

    def __init__(self, *, tcp: bool = True, udp: bool = True) -> None:
        # No super().__init__(): the pure class's scratch buffer is not used.
        self.tcp = tcp
        self.udp = udp

    def coalesce(self, bufs: Sequence[ReadableBuffer], offset: int) -> list[Write]:
        """Plan the kernel writes that send ``bufs[i][offset:]`` (see the pure method)."""
        if _native is None:
            raise RuntimeError("tunkit._speedups is not loaded")
        result: list[Write] = _native.coalesce(bufs, offset, self.tcp, self.udp)
        return result


PURE: Final = Engine(
    "pure",
    _pure_ones_sum,
    _pure_checksum,
    _pure_pseudo_sum,
    _pure_update16,
    _pure_split,
    PureCoalescer,
)
NATIVE: Final[Engine | None] = (
    None
    if _native is None
    else Engine(
        "native",
        _native.ones_sum,
        _native.checksum,
        _native.pseudo_sum,
        _native.update16,
        _native.split,
        NativeCoalescer,
    )
)
ACTIVE: Final = PURE if NATIVE is None else NATIVE
ones_sum: Final = ACTIVE.ones_sum
checksum: Final = ACTIVE.checksum
pseudo_sum: Final = ACTIVE.pseudo_sum
update16: Final = ACTIVE.update16
split: Final = ACTIVE.split
Coalescer: Final = ACTIVE.Coalescer


def speedups_enabled() -> bool:
    """Return whether the offload engine runs on the C extension ``tunkit._speedups``.

    False when the extension was not built (no C compiler at install time),
    did not load, or ``TUNKIT_PURE_PYTHON=1`` was set before tunkit was
    imported; the engine then uses the pure-Python modules, with the same
    results.
    """
    return NATIVE is not None

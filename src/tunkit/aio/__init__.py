"""tunkit.aio: Tuns on an event loop (asyncio, uvloop, trio), through anyio.

:func:`wrap` makes any Tun an :class:`AsyncTun`: a Tun with a descriptor
(``NativeTun``, ``UdpTun``, ``StreamTun``) is waited for in the event loop
itself, with no thread; any other gets one worker thread per direction.
:func:`pipe` is a pure-async in-memory pair, and :func:`copy` moves packets
both ways between two AsyncTuns, super-packets whole.

Cancellation follows trio's rule, "a cancelled operation did not happen": a
cancelled ``read`` stored nothing and lost nothing; a cancelled ``write`` may
have handed over a prefix of its batch, never part of a packet, never a
packet twice. ``aclose()`` wakes every pending call with ``ClosedError``.

Needs the ``aio`` extra (anyio): ``pip install 'tunkit[aio]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._copy import copy
from ._pipe import AsyncPipeTun, pipe
from ._tun import AsyncGsoTun, AsyncTun, wrap

if TYPE_CHECKING:
    from .websocket import WebSocketTun


def __getattr__(name: str) -> Any:
    if name == "WebSocketTun":  # needs the ws extra (websockets): imported on first use
        from .websocket import WebSocketTun

        globals()[name] = WebSocketTun
        return WebSocketTun
    raise AttributeError(f"module 'tunkit.aio' has no attribute {name!r}")


__all__ = ["AsyncGsoTun", "AsyncPipeTun", "AsyncTun", "WebSocketTun", "copy", "pipe", "wrap"]

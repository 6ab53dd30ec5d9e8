"""Stop on SIGINT / SIGTERM at a safe point instead of wherever the signal lands.

A command runs inside ``stop_on_signals()``. The first SIGINT or SIGTERM only records the request; long loops call
``check()`` at points where stopping leaves nothing half-done (between sampling steps, calibration batches,
reconstruction steps, search candidates), and ``check()`` raises ``Interrupted``. A second signal raises at once.
Lightning's own SIGTERM handler is composed with this one (it keeps the handler it finds), and its
``SIGTERMException`` is treated by the CLI as the same stop.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator, Optional

from ditquant.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: Optional[int] = None


def requested() -> Optional[int]:
    """The signal that asked to stop, or None."""
    return _requested


def check() -> None:
    """Raise ``Interrupted`` if a stop was requested."""
    if _requested is not None:
        raise Interrupted(_requested)


def _handle(signum, frame) -> None:
    global _requested
    if _requested is not None:  # asked twice: stop now
        raise Interrupted(signum)
    _requested = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Install the handlers for the duration of a command (main thread only; elsewhere a no-op)."""
    global _requested
    _requested = None
    try:
        previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None

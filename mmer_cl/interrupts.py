"""Ctrl-C that cannot be lost.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be
when the signal is handled, and some library code (C extensions that clear
errors, generator finalisers) can swallow it. The CLI installs
:func:`remember_interrupts`, which also records the signal, and the store's
per-tensor loops call :func:`raise_if_interrupted`: an interrupt that was
swallowed is raised again at the next tensor, so the operation still stops
and rolls back.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


def _on_sigint(signum, frame) -> None:
    _requested.set()
    raise KeyboardInterrupt


def remember_interrupts() -> None:
    """Handle SIGINT by recording it and raising ``KeyboardInterrupt`` (call from the main thread)."""
    _requested.clear()
    signal.signal(signal.SIGINT, _on_sigint)


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C arrived (and was not raised or was swallowed)."""
    if _requested.is_set():
        raise KeyboardInterrupt

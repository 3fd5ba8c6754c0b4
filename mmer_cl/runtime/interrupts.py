"""Ctrl-C that cannot be lost, from the first line of the ``mmer`` process to its exit.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be
when the signal is handled, and some library code (C extensions that clear
errors, generator finalisers, an import of numba or scipy cut in half) can
swallow it or turn it into another error (a ``RecursionError``, an
``ImportError``), and one that lands while C++ runs Python code (torch's
import calls back into Python through pybind11) aborts the process. So the
``mmer`` entry point (:mod:`mmer_cl.cli.entry`) installs :func:`remember_interrupts`
before it imports anything heavy, in the mode where a Ctrl-C ends the process
at once, from the handler, with one line and exit 130: nothing is written
before the store opens. Once the store module is loaded (torch, SQLAlchemy)
and before the store is opened, the CLI calls :func:`raise_from_now_on`: a
Ctrl-C then raises ``KeyboardInterrupt``, so every write path rolls back. The
handler also records the signal, so that

* the CLI reports any failure that follows a Ctrl-C as the interrupt (exit
  130, one line), whatever exception the library made of it
  (:func:`was_interrupted`), and
* the store's per-tensor loops call :func:`raise_if_interrupted`: an
  interrupt that was swallowed is raised again at the next tensor, so the
  operation still stops and rolls back.
"""

from __future__ import annotations

import signal
import sys
import threading

_requested = threading.Event()
_at_once = [False]  # end the process from the handler (start-up, nothing written yet) instead of raising
INTERRUPTED_EXIT = 130


def _on_sigint(signum, frame) -> None:
    _requested.set()
    if _at_once[0]:
        exit_interrupted()
    raise KeyboardInterrupt


def _quiet_unraisable(unraisable) -> None:
    """A ``KeyboardInterrupt`` raised where Python can only print it ("Exception ignored in": a weakref
    callback of the import system, a finaliser) is already recorded and raised again at the next check."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) or _requested.is_set():
        return
    sys.__unraisablehook__(unraisable)


def remember_interrupts(clear: bool = True, at_once: bool | None = None) -> None:
    """Handle SIGINT by recording it and raising ``KeyboardInterrupt`` (call from the main thread).

    ``clear=False`` keeps a Ctrl-C already recorded (the entry point installed the handler first);
    ``at_once=True`` ends the process from the handler instead, until :func:`raise_from_now_on`
    (``None`` keeps the mode as it is).
    """
    if clear:
        _requested.clear()
    if at_once is not None:
        _at_once[0] = at_once
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _quiet_unraisable


def raise_from_now_on() -> None:
    """From now on a Ctrl-C raises ``KeyboardInterrupt`` (the store is about to be opened and written)."""
    _at_once[0] = False


def was_interrupted() -> bool:
    """Whether a Ctrl-C arrived since :func:`remember_interrupts`."""
    return _requested.is_set()


def ignore_further_interrupts() -> None:
    """While the process reports an interrupt and exits, a second Ctrl-C must not cut the report short."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread (a library embedding the CLI): nothing to change
        pass


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C arrived (and was not raised or was swallowed)."""
    if _requested.is_set():
        raise KeyboardInterrupt


def exit_interrupted() -> None:
    """Print the one-line report of a Ctrl-C on stderr and end the process with exit 130, now.

    Used where nothing is being written yet (start-up) and after a command has rolled back; ``os._exit``
    skips the interpreter's teardown, which a half-finished import (numba, scipy) could turn into a traceback.
    """
    import os
    import sys

    ignore_further_interrupts()
    _at_once[0] = False
    try:  # failures.py imports nothing heavy (describe_failure would import the registry, i.e. SQLAlchemy)
        from mmer_cl.runtime.failures import CONSISTENT

        message = "interrupted. " + CONSISTENT
    except BaseException:  # noqa: BLE001 - an import cut short: the short form still says what happened
        message = "interrupted"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # closed, or a reentrant call from the handler
            pass
    try:
        os.write(2, (message + "\n").encode())  # not through sys.stderr: the handler may have cut a write short
    except OSError:
        pass
    os._exit(INTERRUPTED_EXIT)

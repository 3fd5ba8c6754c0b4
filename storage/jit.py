"""Compiled loops, where numba is installed: one decorator and one switch.

The hot loops of the store and the math (byte-plane shuffles, scatters,
the fused merge) are written once as plain Python over numpy arrays and
compiled by numba on first use (cached on disk, GIL released, so the
prefetch thread and the main thread run them at once). Every caller keeps
its numpy/torch path, used where numba is missing or ``MMER_JIT=0`` is set,
and the tests hold both paths to the same bits.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

_OFF = ("0", "false", "no", "off")
_suspended = 0


@functools.cache
def _numba() -> Any | None:
    try:
        import numba
    except Exception:  # not installed, or a numpy it does not support: the plain paths serve
        return None
    return numba


def enabled() -> bool:
    """Whether compiled kernels run (numba importable, ``MMER_JIT`` not set to 0, not :func:`suspended`)."""
    return (not _suspended and os.environ.get("MMER_JIT", "1").strip().lower() not in _OFF
            and _numba() is not None)


@contextmanager
def suspended() -> Iterator[None]:
    """The plain paths inside the block, in every thread: for work where numba's own memory (about 130 MiB
    once LLVM is loaded) costs more than its speed gains, such as building a composed model."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def kernel(fn: Callable) -> Callable:
    """``fn`` compiled with numba on its first call (nopython, cached, GIL released).

    Call it only where :func:`enabled` is true; ``.py_func`` is the
    uncompiled function (for tests and debugging).
    """
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args):
        if not compiled:
            compiled.append(_numba().njit(cache=True, nogil=True)(fn))
        return compiled[0](*args)

    call.py_func = fn
    call.signatures = lambda: list(compiled[0].signatures) if compiled else []  # one per argument type seen
    return call


def array_list(arrays) -> Any:
    """``arrays`` (numpy, one dtype and rank) as one argument a kernel indexes like a tuple, but whose type
    does not depend on how many there are: a tuple of k arrays would compile the kernel once per k."""
    out = _numba().typed.List()
    for a in arrays:
        out.append(a)
    return out

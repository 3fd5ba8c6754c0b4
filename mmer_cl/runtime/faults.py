"""Fault injection for the crash-safety suite (``tests/reliability``).

Every write path calls :func:`fault_point` at the moments a crash would hurt
most (a blob written but not yet renamed, a registry transaction about to
commit, an export half written, ...). When the environment variable
``MMER_FAULT`` names that point, the process kills itself with SIGKILL, the
way ``kill -9`` or a power cut would end it: no ``finally`` block, no atexit
handler runs. ``MMER_FAULT=NAME@N`` fires at the N-th time the point is
reached (1-based), so a test can crash in the middle of a long write.
With ``MMER_FAULT_SIGNAL=INT`` the point sends SIGINT instead (Ctrl-C at
that moment). Without ``MMER_FAULT`` a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "MMER_FAULT"
ENV_SIGNAL = "MMER_FAULT_SIGNAL"  # "INT": send SIGINT (Ctrl-C) instead of SIGKILL

POINTS = (
    "blob.before_rename", "blob.after_rename",
    "registry.before_commit", "registry.after_commit",
    "export.mid_shard", "export.before_rename", "export.after_rename",
    "gc.mid_delete", "rollback.before", "remove.before",
)
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process if ``MMER_FAULT`` selects this point (see the module docstring)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):  # once: a Ctrl-C is one signal, even when the point runs again after it
        sig = signal.SIGINT if os.environ.get(ENV_SIGNAL) == "INT" else signal.SIGKILL
        os.kill(os.getpid(), sig)


"""Shared helpers of the reliability suite: a prepared store, the `mmer` CLI in a subprocess, invariants.

``MMER_RELIABILITY=full`` runs every trial; otherwise a reduced set runs
(small enough for the normal ``pytest -q``). Every trial appends one line to
the file named by ``MMER_RELIABILITY_LOG`` (if set), so a full run can be
summed up afterwards: ``kind<TAB>case<TAB>ok|FAIL``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FULL = os.environ.get("MMER_RELIABILITY", "") == "full"


def pick(reduced: list, full: list | None = None) -> list:
    """The trials to run: ``full`` (default: ``reduced``) with MMER_RELIABILITY=full, else ``reduced``."""
    return (full if full is not None else reduced) if FULL else reduced


def log_trial(kind: str, case: str, ok: bool) -> None:
    path = os.environ.get("MMER_RELIABILITY_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{kind}\t{case}\t{'ok' if ok else 'FAIL'}\n")


def mmer(store: Path, *args, env: dict | None = None, preexec_fn=None, cwd: Path | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``mmer --store STORE -q ARGS`` as a user would, in a fresh process (this worktree's code)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "MMER_ACTOR": "reliability", **(env or {})}
    full_env.pop("MMER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mmer_cl.cli", "--store", str(store), "-q", *map(str, args)],
                          capture_output=True, text=True, env=full_env, preexec_fn=preexec_fn,
                          cwd=cwd or REPO, timeout=timeout)


def assert_clean_failure(result: subprocess.CompletedProcess, codes=(1, 2)) -> None:
    """A failure shown as a message with exit 1 or 2, never a traceback."""
    out = result.stdout + result.stderr
    assert result.returncode in codes, f"exit {result.returncode}: {out}"
    assert "Traceback" not in out, out
    assert out.strip(), "a failure must say something"


def tree_digest(directory: Path, skip: tuple[str, ...] = (".mmer-export.json",)) -> dict[str, str]:
    """sha256 of every file under ``directory`` (the export marker, which holds a time, left out)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}


def snapshot_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (nothing left out)."""
    return tree_digest(directory, skip=())


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def store_state(store: Path) -> dict:
    """What the invariants look at, read through the Python API in this process."""
    from mmer_cl.store import Store

    with Store.open(store) as s:
        rep = s.audit()
        current = s.registry.version(s.base().id)
        return {"ok": rep.ok, "damaged": rep.damaged, "dangling": rep.dangling, "db": rep.database_problems,
                "unreferenced": rep.unreferenced, "current": current.number if current else None,
                "versions": [v.number for v in s.versions()],
                "entries": sorted(e.name for e in s.entries(include_removed=True)),
                "active": sorted(e.name for e in s.entries())}


def partial_leftovers(parent: Path) -> list[Path]:
    return sorted(p for p in parent.glob(".*.partial"))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))

"""What an export may write, and what ``--force`` may replace.

Every directory mmer writes (an exported checkpoint, a merge directory)
carries a marker file, ``.mmer-export.json``: ``{"mmer_export": 1, "store_id",
"version", "entry" (a name or "text"), "mmer_cl_version", "version_created_at"}``
(no export time, so two hosts exporting one version write identical bytes).
``--force`` (``overwrite=True``) replaces only a directory holding that marker.
It never touches:

* any other non-empty directory, or a file, or a symlink;
* the store (its root, or anything inside it), the base checkpoint directory,
  any registered entry's source directory, or any directory that *contains*
  one of those (``export --force .`` from a directory holding the store);
* ``/`` or the home directory;
* any mmer store (a directory holding ``objects/mmer-store.json``, or
  ``registry.db`` beside ``objects/``, or a blob location's ``mmer-store.json``),
  any directory inside one, or any directory that contains one.

An export is built in ``.NAME.<random>.partial`` beside its target and put in
place by one atomic rename (an atomic exchange when replacing). A crash leaves
at worst such a partial directory, which the next export to the same target
and ``mmer gc`` remove; each partial directory carries the marker from its
first moment, so only directories mmer created are ever removed. ``gc`` learns
the targets from the ``export`` events of the audit log, and never removes the
partial directory of a running export: exports hold the store's export lock
(:func:`mmer_cl.store.locks.export_lock`) shared; gc removes partial directories only
when it gets that lock exclusively, and otherwise only those untouched for
:data:`GRACE_SECONDS`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from mmer_cl.errors import ExportRefusedError

MARKER_NAME = ".mmer-export.json"
PARTIAL_SUFFIX = ".partial"
STORE_MARKER = "mmer-store.json"
GRACE_SECONDS = 3600  # a partial directory nothing wrote to for this long is no running export's


@dataclass(frozen=True)
class Protected:
    """A path no export may replace, contain or (for ``inside=True``) be placed inside."""

    path: Path
    what: str
    inside: bool = False


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def marker_bytes(**fields) -> bytes:
    from mmer_cl import __version__

    body = {"mmer_export": 1, **fields, "mmer_cl_version": __version__}  # no clock: exports are reproducible
    return json.dumps(body, indent=2, default=str).encode() + b"\n"


def has_marker(directory: Path) -> bool:
    """Whether ``directory`` (not a symlink) holds a readable mmer export marker."""
    marker = directory / MARKER_NAME
    if directory.is_symlink() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("mmer_export") == 1
    except (OSError, ValueError, AttributeError):
        return False


def default_protected() -> list[Protected]:
    found = [Protected(Path("/"), "the file system root")]
    home = os.environ.get("HOME")
    if home:
        found.append(Protected(_real(home), "your home directory"))
    return found


def is_store(directory: Path) -> bool:
    """Whether ``directory`` is an mmer store or blob location (of any store, not only this one)."""
    try:
        return ((directory / "objects" / STORE_MARKER).is_file() or (directory / STORE_MARKER).is_file()
                or ((directory / "registry.db").is_file() and (directory / "objects").is_dir()))
    except OSError:
        return False


def _store_at_or_above(real: Path) -> Path | None:
    return next((p for p in (real, *real.parents) if is_store(p)), None)


def _store_below(real: Path) -> Path | None:
    """A store anywhere inside ``real`` (symlinks not followed); None when there is none."""
    for parent, dirs, _ in os.walk(real):
        for d in dirs:
            if is_store(Path(parent) / d):
                return Path(parent) / d
    return None


def check_target(target: str | Path, overwrite: bool, protected: Iterable[Protected] = ()) -> None:
    """Raise :class:`ExportRefusedError` unless writing (or, with ``overwrite``, replacing) ``target`` is safe."""
    raw = Path(os.path.abspath(os.fspath(target)))
    real = _real(target)
    store = _store_at_or_above(real)
    if store is not None:
        rel = "is" if store == real else "is inside"
        raise ExportRefusedError(f"refusing to export to {target}: it {rel} an mmer store ({store}). Choose a "
                                 "directory outside every store, e.g. out/NAME.")
    for p in [*default_protected(), *protected]:
        pr = _real(p.path)
        if real == pr or pr.is_relative_to(real) and real != pr:
            rel = "is" if real == pr else "contains"
            raise ExportRefusedError(
                f"refusing to export to {target}: it {rel} {p.what} ({pr}). Choose a new directory outside it, "
                "e.g. out/NAME.")
        if p.inside and real.is_relative_to(pr):
            raise ExportRefusedError(f"refusing to export to {target}: it is inside {p.what} ({pr}). Choose a "
                                     "directory outside it.")
    if raw.is_symlink():
        raise ExportRefusedError(f"refusing to export to {target}: it is a symbolic link; give the real "
                                 "directory instead")
    if not raw.exists():
        return
    if not raw.is_dir():
        raise ExportRefusedError(f"refusing to export to {target}: it is a file, not a directory; choose "
                                 "another output directory")
    if not any(raw.iterdir()):
        return
    if not overwrite:
        raise ExportRefusedError(f"{target} already exists and is not empty; choose another output directory, "
                                 "or pass --force (overwrite=True) to replace an earlier mmer export there")
    if not has_marker(raw):
        raise ExportRefusedError(
            f"refusing to replace {target}: it was not written by mmer (no {MARKER_NAME} in it), and --force only "
            "replaces earlier mmer exports. Choose another output directory, or move its contents away first.")
    inner = _store_below(real)
    if inner is not None:
        raise ExportRefusedError(f"refusing to replace {target}: it contains an mmer store ({inner}). Move the "
                                 "store out first, or choose another output directory.")


def partial_dirs(target: Path) -> list[Path]:
    """``.NAME.*.partial`` directories beside ``target`` that mmer created (marked or still empty)."""
    parent = target.parent
    if not parent.is_dir():
        return []
    found = []
    for p in parent.glob(f".{target.name}.*{PARTIAL_SUFFIX}"):
        if p.is_dir() and not p.is_symlink() and (has_marker(p) or not any(p.iterdir())):
            found.append(p)
    return sorted(found)


def _idle_seconds(directory: Path) -> float:
    """Seconds since anything in ``directory`` (or the directory itself) was last written."""
    try:
        newest = max([directory.stat().st_mtime, *(p.stat().st_mtime for p in directory.iterdir())])
    except OSError:
        return 0.0
    return time.time() - newest


def remove_leftovers(target: str | Path, min_idle: float = 0.0) -> int:
    """Remove what a crashed export to ``target`` left beside it; returns how many directories went.

    ``min_idle``: leave partial directories written to within that many seconds (a running export's)."""
    target = Path(os.path.abspath(os.fspath(target)))
    removed = 0
    for p in partial_dirs(target):
        if min_idle and _idle_seconds(p) < min_idle:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed += not p.exists()
    return removed

"""Manifests: what is live does not depend on registry rows alone.

Every entry (each revision) and every version is described by a manifest,
an immutable blob in the content-addressed store like any other: canonical
JSON (sorted keys, no spaces) of the immutable part of its row and of every
blob it owns with its role and tensor key. The row records the manifest's
digest (``entries.manifest``, ``versions.manifest``), as a git ref points at
a tree; so does the audit log's ``register`` / ``update`` / ``expand`` event.
A version's manifest also names its members' manifests and the manifest of
the version numbered one less (its parent), so every earlier version and
every member entry is reachable from the latest version.

``entry``::

    {"mmer_manifest": 1, "kind": "entry", "id", "base_id", "lineage", "revision", "modality", "task",
     "fingerprint", "keymap_sha256", "referenced", "blobs": [[role, key, digest, stored_bytes, raw_bytes], ...]}

    plus ``"codec": "bitdelta"`` for an entry stored as 1-bit deltas (absent for the default, ``lossless``)

``version``::

    {"mmer_manifest": 1, "kind": "version", "id", "base_id", "number", "params", "recipe_sha256",
     "parent", "members": [[entry_id, entry_manifest, position, scale, mask_density], ...],
     "blobs": [[role, key, digest, stored_bytes, raw_bytes, entry_id], ...]}

Mutable fields (names of superseded revisions, removal, descriptions, tags,
aliases) are left out. :func:`check` compares every row with its manifest
and names each difference: that is damage, and ``gc`` refuses to run while
there is any. :func:`reachable` is what ``gc`` keeps: every digest any row
names, united with everything reachable from any manifest a row or the
audit log names; never less than the rows alone.

Stores of earlier releases have no manifests: the first write-locked open
writes them for the rows as they are (:func:`ensure`) and marks the registry
complete; until then their rows are trusted as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterable, Iterator

from sqlalchemy.exc import SQLAlchemyError

from mmer_cl.errors import MmerError, StoreDamagedError
from registry.records import EntryFacts, VersionFacts
from storage import BlobError, BlobStore

FORMAT = 1
EXAMPLES = 3  # differences named per kind in one problem line


def canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def _sorted(items: Iterable[list]) -> list[list]:
    return sorted(items, key=lambda item: json.dumps(item))


def entry_body(f: EntryFacts) -> dict:
    body = {"mmer_manifest": FORMAT, "kind": "entry", "id": f.id, "base_id": f.base_id, "lineage": f.label,
            "revision": f.revision, "modality": f.modality, "task": f.task, "fingerprint": f.fingerprint,
            "keymap_sha256": _sha(f.keymap), "referenced": f.referenced,
            "blobs": _sorted([b.role, b.key, b.digest, int(b.stored_bytes), int(b.raw_bytes)] for b in f.blobs)}
    if f.codec != "lossless":  # only where it is not the default: manifests written before schema 5 stay valid
        body["codec"] = f.codec
    return body


def version_body(f: VersionFacts) -> dict:
    return {"mmer_manifest": FORMAT, "kind": "version", "id": f.id, "base_id": f.base_id, "number": f.number,
            "params": json.loads(f.params), "recipe_sha256": _sha(f.recipe), "parent": f.parent,
            "members": [[e, f.member_manifests.get(e), int(p), float(s), float(d)] for e, p, s, d in f.members],
            "blobs": _sorted([b.role, b.key, b.digest, int(b.stored_bytes), int(b.raw_bytes), b.entry_id]
                             for b in f.blobs)}


def digest_of(body: dict) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


class ManifestWriter:
    """The registry's describer: writes a new row's manifest to the blob store and returns its digest."""

    def __init__(self, blobs: BlobStore):
        self.blobs = blobs

    def entry(self, facts: EntryFacts) -> str:
        return self.blobs.put(canonical(entry_body(facts)))

    def version(self, facts: VersionFacts) -> str:
        return self.blobs.put(canonical(version_body(facts)))


# ---- stores of earlier releases ------------------------------------------------------------
def backfill(registry, blobs: BlobStore, actor: str = "mmer-cl") -> tuple[int, int]:
    """Write the manifests of rows that have none (as the rows are now) and mark the registry complete.

    Call under the writer lock. Returns how many entry and version manifests were written."""
    entries: dict[int, str] = {}
    entry_manifests: dict[int, str | None] = {}
    for f in registry.entry_facts():
        if f.manifest is None:
            entries[f.id] = blobs.put(canonical(entry_body(f)))
        entry_manifests[f.id] = f.manifest or entries.get(f.id)
    versions: dict[int, str] = {}
    previous: dict[tuple[int, int], str | None] = {}
    for f in registry.version_facts():  # by base and number: a parent is described before its child
        parent = previous.get((f.base_id, f.number - 1), f.parent)
        digest = f.manifest
        if digest is None:
            f = dataclasses.replace(f, parent=parent, member_manifests={e: entry_manifests.get(e)
                                                                        for e in f.member_manifests})
            digest = versions[f.id] = blobs.put(canonical(version_body(f)))
        previous[(f.base_id, f.number)] = digest
    registry.record_manifests(entries, versions, actor)
    return len(entries), len(versions)


def ensure(registry, blobs: BlobStore, lock_now: Callable[[], AbstractContextManager[bool]]) -> bool:
    """On opening: describe the rows of an earlier release's store, when it can be written now. True when
    every row has its manifest. ``lock_now`` takes the writer lock without waiting (readers are never
    blocked): a store that cannot be written now (read-only files, another writer at work, a busy server) is
    left for a later open; audit says so, and gc writes them first."""
    if registry.manifests_complete():
        return True
    try:
        with lock_now() as held:
            if not held:
                return False
            if not registry.manifests_complete():
                backfill(registry, blobs)
    except (OSError, MmerError, SQLAlchemyError):
        return False
    return True


@contextmanager
def described_under(lock: AbstractContextManager, registry, blobs: BlobStore) -> Iterator[None]:
    """``lock`` (the writer lock), with every row described before the holder writes a new one: a new
    version's manifest names its members' and its parent's, so theirs must exist first."""
    with lock:
        if not registry.manifests_complete():
            backfill(registry, blobs)
        yield


# ---- audit and gc ----------------------------------------------------------------------------
def _load(blobs: BlobStore, digest: str) -> tuple[dict | None, str | None]:
    """A manifest's body, or why it cannot be read."""
    try:
        body = json.loads(blobs.get(digest))
    except BlobError as exc:
        return None, "missing" if "missing" in str(exc) else "damaged"
    except (ValueError, UnicodeDecodeError):
        return None, "not a manifest"
    if not isinstance(body, dict) or body.get("mmer_manifest") != FORMAT:
        return None, "not a manifest"
    return body, None


def _listed(items: list[list]) -> str:
    shown = "; ".join(" ".join(str(x) for x in item[:3]) for item in items[:EXAMPLES])
    return shown + (f"; and {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else "")


def _differences(rows: dict, manifest: dict) -> list[str]:
    found = []
    for name in ("blobs", "members"):
        have = [json.dumps(x) for x in rows.get(name, [])]
        want = [json.dumps(x) for x in manifest.get(name, [])]
        missing = [json.loads(x) for x in want if x not in set(have)]
        extra = [json.loads(x) for x in have if x not in set(want)]
        if missing:
            found.append(f"{len(missing)} {name[:-1]} row(s) of its manifest are missing or changed "
                         f"({_listed(missing)})")
        if extra:
            found.append(f"{len(extra)} {name[:-1]} row(s) are not in its manifest ({_listed(extra)})")
    for key in sorted(set(rows) | set(manifest)):
        if key not in ("blobs", "members") and rows.get(key) != manifest.get(key):
            found.append(f"{key} is {rows.get(key)!r} in the registry but {manifest.get(key)!r} in its manifest")
    return found


def _compare(blobs: BlobStore, label: str, recorded: str | None, body: dict, complete: bool) -> list[str]:
    if recorded is None:
        return [f"{label} records no manifest (its row was edited)"] if complete else []
    if digest_of(body) == recorded:
        return []
    manifest, why = _load(blobs, recorded)
    if manifest is None:
        return [f"{label}: its manifest {recorded} is {why} (its row's manifest digest was edited, or the blob "
                "was lost)"]
    found = _differences(body, manifest) or ["its rows differ from its manifest"]
    return [f"{label}: {d}" for d in found]


@dataclasses.dataclass(frozen=True)
class ManifestCheck:
    problems: list[str]
    described: int  # rows with a manifest
    undescribed: int  # rows of an earlier release's store without one yet


def check(registry, blobs: BlobStore) -> ManifestCheck:
    """Every entry and version row against its manifest, every manifest the audit log names against the
    rows, and every base's tensor rows against its fingerprint; each difference named."""
    complete = registry.manifests_complete()
    problems = []
    recorded: set[str | None] = set()
    rows = 0
    for f in registry.entry_facts():
        problems += _compare(blobs, f"entry {f.label} r{f.revision} (row id {f.id})", f.manifest, entry_body(f),
                             complete)
        recorded.add(f.manifest)
        rows += 1
    for v in registry.version_facts():
        problems += _compare(blobs, f"version {v.number} (row id {v.id})", v.manifest, version_body(v), complete)
        recorded.add(v.manifest)
        rows += 1
    for event_id, subject, digest in registry.manifest_events():
        if digest not in recorded:
            problems.append(f"{subject}: the audit log (event {event_id}) records its manifest {digest}, but no "
                            "row holds it (its row was deleted, or its manifest digest edited)")
    problems += _base_problems(registry)
    undescribed = registry.rows_without_manifest()
    return ManifestCheck(problems, rows - undescribed, undescribed)


def _base_problems(registry) -> list[str]:
    """A base's tensor rows against its fingerprint (recorded at init over exactly those rows)."""
    from mmer_cl.runtime.fingerprint import checkpoint_fingerprint

    found = []
    for b in registry.bases():
        tensors = registry.base_tensors(b.id)
        if checkpoint_fingerprint((t.name, t.shape, t.dtype, t.sha256) for t in tensors) != b.fingerprint:
            found.append(f"base {b.name}: its {len(tensors)} tensor rows no longer match its fingerprint "
                         f"{b.fingerprint[:12]} (a row was deleted or edited)")
    return found


def reachable(registry, blobs: BlobStore) -> set[str]:
    """What gc keeps: every digest a row names, and everything reachable from every manifest named by a row
    or by the audit log (through members and parents). Unreadable manifests are skipped (audit names them)."""
    keep = registry.referenced_digests()
    todo = registry.manifest_digests() + [digest for _, _, digest in registry.manifest_events()]
    seen: set[str] = set()
    while todo:
        digest = todo.pop()
        if not isinstance(digest, str) or digest in seen:
            continue
        seen.add(digest)
        keep.add(digest)
        body, _ = _load(blobs, digest)
        if body is None:
            continue
        keep.update(b[2] for b in body.get("blobs", []) if isinstance(b, list) and len(b) > 2)
        todo += [m[1] for m in body.get("members", []) if isinstance(m, list) and len(m) > 1]
        todo.append(body.get("parent"))
    return keep


def live_or_refuse(registry, blobs: BlobStore, restore_advice: str) -> set[str]:
    """For gc, under the writer lock: the digests to keep, or :class:`StoreDamagedError` when the registry
    is damaged (rows that differ from their manifests, references that point nowhere, a damaged database)."""
    from mmer_cl.store.identity import database_problems

    if not registry.manifests_complete():
        backfill(registry, blobs)
    problems = database_problems(registry) + registry.dangling_references() + check(registry, blobs).problems
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise StoreDamagedError(
            f"refusing to run gc: the registry is damaged ({shown}); run `mmer audit` for every difference. "
            f"{restore_advice} Every entry and version is also described by a manifest in the blob store, which "
            "gc keeps, so a backup of the registry taken before the damage works again once restored.")
    return reachable(registry, blobs)


__all__ = ["ManifestCheck", "ManifestWriter", "backfill", "canonical", "check", "ensure", "entry_body",
           "live_or_refuse", "reachable", "version_body"]

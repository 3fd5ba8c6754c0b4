"""Store identity: a store can never mistake itself for an empty one.

A store's registry (the database) and its blob location each carry the same
store id, a uuid4 hex string:

* in the registry, under the key ``store_id`` of the ``meta`` table;
* at the root of the blob location, in a marker written and read only through
  ``BlobStore.write_marker`` / ``BlobStore.read_marker`` (for a local store
  the file ``objects/mmer-store.json``: ``{"store_id": ..., "created_at": ...}``).

:func:`connect` runs before anything is written and decides, from what it
finds, whether the pair may be used:

=====================================  ==========================================
registry                               blob location -> outcome
=====================================  ==========================================
missing, 0 bytes, or no tables         no marker, no blobs -> ``init`` creates it;
                                       otherwise refused ("no store")
missing, 0 bytes, or no tables         marker or blobs present -> refused: restore
                                       ``registry.db`` from a backup. Never recreated.
not SQLite / malformed / truncated     refused (StoreDamagedError), nothing written
tables of something else (foreign)     refused
mmer registry with rows, no store id   migrated (previous release): a new id is
                                       written to the registry, then the marker;
                                       an existing marker is adopted if the
                                       registry's blobs are there
store id == marker id                  ok
store id, marker of another store      refused
store id, no marker                    the marker is written if the location holds
                                       no blobs or holds blobs this registry
                                       references (a crash between the two writes);
                                       refused otherwise
=====================================  ==========================================

The registry is written first and the marker second, so a crash between the
two is always completed by the rule in the last row.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from mmer_cl.errors import MmerError, StoreDamagedError

META_KEY = "store_id"
SQLITE_MAGIC = b"SQLite format 3\x00"
REGISTRY_TABLES = {"meta", "base_models"}


@dataclass(frozen=True)
class Probe:
    """What a registry database holds, read without creating or changing anything."""

    state: str  # "absent" (no file / 0 bytes / no tables) | "ok"
    store_id: str | None = None
    bases: int = 0
    why_absent: str = ""


def restore_advice(where: str) -> str:
    if "://" in where:  # a database server: name it without its password
        from registry.registry import shown_url

        return (f"Restore the registry database {shown_url(where)} from a backup (or point --db-url at the "
                "right one). mmer never recreates a registry over existing data; if you really mean to start a "
                "new store, use a new, empty database and blob location.")
    return (f"Restore the registry from a backup copy (e.g. `cp BACKUP/registry.db {where}`, or the database "
            "your --db-url names). mmer never recreates a registry over existing data; if you really mean to "
            "start a new store, use a new, empty directory.")


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL (None for other databases and in-memory SQLite)."""
    try:
        u = make_url(url)
    except ArgumentError as exc:
        raise StoreDamagedError(f"invalid database URL {url!r}: {exc}. Write it like "
                                "sqlite:////path/registry.db or postgresql://user@host/db") from None
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def _probe_sqlite(path: Path) -> Probe:
    if not path.exists():
        return Probe("absent", why_absent=f"{path} does not exist")
    size = path.stat().st_size
    if size == 0:
        return Probe("absent", why_absent=f"{path} is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        raise StoreDamagedError(f"the registry {path} is not a SQLite database (damaged, truncated or "
                                f"overwritten; {size} bytes). " + restore_advice(str(path)))
    try:
        con = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise StoreDamagedError(f"cannot open the registry {path}: {exc}. Check its permissions. ") from None
    try:
        problems = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise StoreDamagedError(f"the registry {path} is damaged ({'; '.join(problems[:3])}). "
                                    + restore_advice(str(path)))
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return _classify(tables, lambda q: con.execute(q).fetchall(), str(path))
    except sqlite3.DatabaseError as exc:
        raise StoreDamagedError(f"the registry {path} is damaged ({exc}). " + restore_advice(str(path))) from None
    finally:
        con.close()


def _classify(tables: set[str], query: Callable[[str], list], where: str) -> Probe:
    if not tables:
        return Probe("absent", why_absent=f"{where} holds no tables")
    if not REGISTRY_TABLES <= tables:
        raise StoreDamagedError(
            f"{where} is a database of something else (tables: {', '.join(sorted(tables)[:6])}), not an mmer "
            "registry. Point --store / --db-url at the right one, or " + restore_advice(where)[0].lower()
            + restore_advice(where)[1:])
    rows = query(f"SELECT value FROM meta WHERE key = '{META_KEY}'")
    bases = query("SELECT count(*) FROM base_models")[0][0]
    return Probe("ok", rows[0][0] if rows else None, int(bases))


def probe(url: str) -> Probe:
    """Read what the registry at ``url`` holds; raise :class:`StoreDamagedError` if it is not usable."""
    path = sqlite_path(url)
    if path is not None:
        return _probe_sqlite(path)
    try:
        engine = create_engine(url)
    except (ArgumentError, SQLAlchemyError, ImportError) as exc:
        raise StoreDamagedError(f"cannot use the database URL {url!r}: {exc}") from None
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            return _classify(tables, lambda q: conn.execute(text(q)).fetchall(), url)
    except SQLAlchemyError as exc:
        raise StoreDamagedError(f"cannot reach the registry database {engine.url!r}: "
                                f"{str(exc).splitlines()[0]}. Check that the server is running and the URL, "
                                "user and password are right.") from None
    finally:
        engine.dispose()


def read_marker_id(blobs) -> str | None:
    raw = blobs.read_marker()
    if raw is None:
        return None
    try:
        store_id = json.loads(raw)["store_id"]
        uuid.UUID(hex=store_id)
        return store_id
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StoreDamagedError(
            f"the store marker in {_where(blobs)} is damaged ({raw[:60]!r}); it names the store its blobs "
            "belong to. Restore it from a backup, or rewrite it with the store id from the registry's meta "
            "table (key store_id) as {\"store_id\": \"...\"}.") from None


def marker_bytes(store_id: str) -> bytes:
    return json.dumps({"store_id": store_id, "created_at": datetime.now(timezone.utc).isoformat()},
                      indent=2).encode() + b"\n"


def new_store_id() -> str:
    return uuid.uuid4().hex


def check_before_open(blobs, url: str, where: str, create: bool) -> Probe:
    """Refuse, before anything is created, a registry that is missing/empty/damaged next to existing data."""
    found = probe(url)
    if found.state == "ok" and (found.store_id or found.bases):
        return found
    marker = read_marker_id(blobs)
    if marker is not None or _has_blobs(blobs):
        what = f"a store marker (store id {marker})" if marker else "blobs"
        why = found.why_absent or f"{where} holds no base, entry or version"
        raise StoreDamagedError(
            f"this is an existing store ({_where(blobs)} holds {what}) but its registry is missing or empty: "
            f"{why}. " + restore_advice(where))
    if found.state == "absent" and not create:
        raise MmerError(f"no mmer store here: {found.why_absent}. Create one with `mmer init --base PATH`"
                                " (or Store.init), or point --store / MMER_STORE at an existing store.")
    return found


def settle(blobs, registry, found: Probe, lock: Callable[[], AbstractContextManager]) -> str:
    """After the registry is open: make registry and marker carry one id, or refuse. Returns the store id."""
    marker = read_marker_id(blobs)
    db_id = registry.get_meta(META_KEY)
    if db_id is not None and db_id == marker:
        return db_id
    with lock():  # something must be written: one writer at a time, and look again under the lock
        marker = read_marker_id(blobs)
        db_id = registry.get_meta(META_KEY)
        if db_id is None:
            if marker is not None and not _owns_blobs(blobs, registry):
                raise StoreDamagedError(
                    f"the registry at {_shown(registry.url)} carries no store id and references none of the blobs in "
                    f"{_where(blobs)}, which belong to store {marker}. Point --store / --db-url at matching "
                    "registry and objects. " + restore_advice(str(registry.url)))
            db_id = marker or new_store_id()
            registry.set_meta(META_KEY, db_id)
        if marker is None:
            if _has_blobs(blobs) and not _owns_blobs(blobs, registry):
                raise StoreDamagedError(
                    f"the registry (store {db_id}) references none of the blobs in {_where(blobs)}, which carry "
                    "no store marker: registry and objects do not belong together. Point --store / --db-url at "
                    "the matching pair, or restore the objects from a backup.")
            blobs.write_marker(marker_bytes(db_id))
            marker = db_id
        if marker != db_id:
            raise StoreDamagedError(
                f"the registry belongs to store {db_id} but {_where(blobs)} belongs to store {marker}: they are "
                "from different stores, and using them together could delete blobs. Point --store / --db-url at "
                "the matching pair. " + restore_advice(str(registry.url)))
        return db_id


def _has_blobs(blobs) -> bool:
    return next(iter(blobs.digests()), None) is not None


def _shown(url) -> str:
    from registry.registry import shown_url

    return shown_url(str(url))


def _where(blobs) -> str:
    """The blob location for messages: a directory or a (credential-free) URL such as s3://bucket/prefix."""
    return str(getattr(blobs, "location", None) or getattr(blobs, "objects", None) or "the blob store")


def _owns_blobs(blobs, registry) -> bool:
    """Whether the registry references no blob at all, or at least one of the stored ones."""
    owners = registry.blob_owners()
    if not owners:
        return True
    return any(blobs.exists(d) for d in owners)


def verify(blobs, registry, store_id: str) -> None:
    """Re-check, right before a destructive step such as ``gc``, that registry and blobs still match."""
    path = sqlite_path(str(registry.url))
    if path is not None:
        _probe_sqlite(path)
    db_id = registry.get_meta(META_KEY)
    marker = read_marker_id(blobs)
    if not (db_id == marker == store_id):
        raise StoreDamagedError(
            f"store identity check failed (registry: {db_id}, blob marker: {marker}, opened as: {store_id}); "
            "refusing to delete anything. Point --store / --db-url at the matching registry and objects. "
            + restore_advice(str(registry.url)))


def database_problems(registry) -> list[str]:
    """What is wrong with the registry database itself (``PRAGMA integrity_check`` on SQLite); [] when sound."""
    path = sqlite_path(str(registry.url))
    try:
        with registry.engine.connect() as conn:
            if path is None:
                conn.execute(text("SELECT 1"))
                return []
            rows = [r[0] for r in conn.execute(text("PRAGMA integrity_check")).fetchall()]
    except SQLAlchemyError as exc:
        return [f"cannot check the registry database: {str(getattr(exc, 'orig', exc)).splitlines()[0]}"]
    return [] if rows == ["ok"] else [f"integrity_check: {r}" for r in rows[:20]]

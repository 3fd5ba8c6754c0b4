"""The modality registry: bases, entries, immutable versions, aliases, audit log.

SQLite by default (WAL journal, busy timeout, foreign keys on); any
SQLAlchemy URL works. Every state change writes its audit event in the same
transaction. Knows nothing of tensors: blobs are digests with sizes.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from mmer_cl.errors import MmerError
from mmer_cl.runtime.faults import fault_point
from mmer_cl.runtime.names import validate_actor
from registry import postgres, urls
from registry.records import (BaseRecord, BaseTensor, BlobRef, EntryFacts, EntryRecord, EventRecord, Member, Trim,
                              VersionFacts, VersionRecord)
from registry.migrations import MANIFESTS_META_KEY, MigrationError, upgrade
from registry.schema import (APPEND_ONLY_TRIGGERS, SCHEMA_VERSION, AliasRow, Base, BaseModelRow, BaseTensorRow,
                             EntryBlobRow, EntryRow, EventRow, Meta, TagRow, TrimRow, VersionBlobRow,
                             VersionMemberRow, VersionRow, utcnow)

CURRENT = "current"
ENTRY, VERSION = "entry", "version"  # what a tag or description is on
BUSY_TIMEOUT_MS = 30_000
SCHEMA_ATTEMPTS = 5  # looks at a new registry's schema while another process creates it


class RegistryError(MmerError):
    """A registry lookup or change cannot be done; the message says what to do."""


class Describer(Protocol):
    """Writes the manifest blob of a new entry or version and returns its digest (see mmer_cl/store/manifests.py)."""

    def entry(self, facts: EntryFacts) -> str: ...

    def version(self, facts: VersionFacts) -> str: ...


def strict_json(value, **kw) -> str:
    """JSON for a registry column: never NaN or Infinity (which strict JSON readers, ``--json`` output and
    PostgreSQL's json type refuse), refused here with a message instead of stored."""
    try:
        return json.dumps(value, allow_nan=False, **kw)
    except ValueError as exc:
        raise RegistryError(f"refusing to record a value that is not a finite number ({exc}); every number the "
                            "registry stores must be finite. Check the parameters given (NaN, inf).") from None


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def shown_url(url: str) -> str:
    """A database URL fit for messages: its password replaced by ``***`` (see :mod:`registry.urls`)."""
    return urls.shown_url(url)


def version_number(ref: int | str | None) -> int | None:
    """``3`` or ``'3'`` or ``'v3'`` -> 3; an alias name (or None) -> None."""
    if isinstance(ref, int):
        return ref
    if ref is not None and re.fullmatch(r"[vV]?\d+", str(ref).strip()):
        return int(str(ref).strip().lstrip("vV"))
    return None


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path)}"


class Registry:
    """All reads and writes of the registry database.

    ``describer`` (set by the store) writes the manifest of every entry and version as its rows are written;
    the row records the manifest's digest, in the same transaction.
    """

    def __init__(self, url: str):
        self.describer: Describer | None = None
        self.url = postgres.normalise_url(url)
        problem = urls.check_url(self.url)
        if problem:
            raise RegistryError(problem + "; write it like sqlite:////path/registry.db or "
                                "postgresql://user@host:5432/dbname")
        try:
            self.engine: Engine = create_engine(self.url)
        except ImportError as exc:
            raise RegistryError(f"the registry URL {shown_url(url)} needs a database driver that is not installed "
                                f"({exc}); for PostgreSQL: pip install -e '.[postgres]' in a clone of mmer-cl") from None
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            migrated = upgrade(self.engine)  # an older registry is brought to this schema first
            self._create_schema(dialect)
        except MigrationError as exc:
            self.engine.dispose()
            raise RegistryError(str(exc)) from exc
        except OperationalError as exc:
            self.engine.dispose()
            raise RegistryError(f"cannot reach the registry at {shown_url(url)}: "
                                f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}; "
                                "check --db-url / MMER_DB_URL and that the server is up") from None
        self._check_schema()
        self.migrated = migrated  # schema versions applied on opening (each logged as a `migrate` event)

    def _create_schema(self, dialect: str) -> None:
        """Create whatever tables and triggers are missing. Two processes creating one new SQLite registry at
        once (two first `init`s) race between "is the table there?" and CREATE TABLE; the one that loses sees
        "already exists" and looks again, finding the other's tables (PostgreSQL serialises on a lock)."""
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    if dialect == "postgresql":
                        postgres.lock_schema(conn)
                    Base.metadata.create_all(conn)
                    if dialect == "sqlite":
                        for trigger in APPEND_ONLY_TRIGGERS:
                            conn.execute(text(trigger))
                    elif dialect == "postgresql":
                        postgres.install_append_only(conn)
                return
            except OperationalError as exc:
                if "already exists" not in str(exc.orig or exc) or attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _check_schema(self) -> None:
        try:
            self._record_schema_version()
        except IntegrityError:  # another process recorded it between our look and our insert
            self._record_schema_version()

    def _record_schema_version(self) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(Meta, "schema_version")
            if row is None:
                s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise RegistryError(f"this registry has schema version {row.value}, newer than this mmer-cl "
                                    f"understands ({SCHEMA_VERSION}); upgrade mmer-cl")

    def meta_value(self, key: str) -> str | None:
        """A value of the ``meta`` table (e.g. ``store_id`` where the store records one), or None."""
        with Session(self.engine) as s:
            row = s.get(Meta, key)
            return row.value if row else None

    def schema_version(self) -> int:
        with Session(self.engine) as s:
            return int(s.get(Meta, "schema_version").value)

    def close(self) -> None:
        self.engine.dispose()

    def checkpoint(self) -> None:
        """SQLite: move the write-ahead log into the database file and truncate it, so that the file holds
        every row (what ``du`` sees once the last connection closes and SQLite removes the log)."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s
            s.flush()
            fault_point("registry.before_commit")
        fault_point("registry.after_commit")

    def get_meta(self, key: str) -> str | None:
        """A value of the key/value ``meta`` table (None when unset)."""
        with Session(self.engine) as s:
            row = s.get(Meta, key)
            return None if row is None else row.value

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as s:
            row = s.get(Meta, key)
            if row is None:
                s.add(Meta(key=key, value=value))
            else:
                row.value = value

    @staticmethod
    def _event(s: Session, actor: str, action: str, subject: str, before: str, after: str,
               details: dict | None = None) -> None:
        validate_actor(actor)  # every change is logged here: no newline or escape sequence can forge history
        s.add(EventRow(actor=actor, action=action, subject=subject, before=before, after=after,
                       details=strict_json(details or {}), at=utcnow()))

    # ---- bases ---------------------------------------------------------------------------
    def add_base(self, name: str, source_path: str, fingerprint: str, tensors: Sequence[BaseTensor],
                 actor: str) -> BaseRecord:
        with self._tx() as s:
            if s.scalar(select(BaseModelRow).where(BaseModelRow.name == name)):
                raise RegistryError(f"a base model named {name!r} is already in this store")
            row = BaseModelRow(name=name, source_path=source_path, fingerprint=fingerprint, created_by=actor,
                               created_at=utcnow())
            s.add(row)
            s.flush()
            s.add_all(BaseTensorRow(base_id=row.id, position=i, name=t.name, shape=json.dumps(list(t.shape)),
                                    dtype=t.dtype, sha256=t.sha256) for i, t in enumerate(tensors))
            s.add(AliasRow(base_id=row.id, name=CURRENT, version_id=None))
            self._event(s, actor, "init", f"base {name}", "", fingerprint[:12],
                        {"source": source_path, "tensors": len(tensors)})
            return self._base_record(row)

    @staticmethod
    def _base_record(row: BaseModelRow) -> BaseRecord:
        return BaseRecord(row.id, row.name, row.source_path, row.fingerprint, row.created_at, row.created_by)

    def base(self, name: str | None = None) -> BaseRecord:
        with Session(self.engine) as s:
            rows = s.scalars(select(BaseModelRow).order_by(BaseModelRow.id)).all()
            if name is not None:
                rows = [r for r in rows if r.name == name]
                if not rows:
                    raise RegistryError(f"no base model named {name!r} in this store")
            if not rows:
                raise RegistryError("this store has no base model yet; run `mmer init --base PATH` first")
            if len(rows) > 1:
                raise RegistryError(f"this store has several base models ({', '.join(r.name for r in rows)}); "
                                    "name one with --base")
            return self._base_record(rows[0])

    def bases(self) -> list[BaseRecord]:
        with Session(self.engine) as s:
            return [self._base_record(r) for r in s.scalars(select(BaseModelRow).order_by(BaseModelRow.id))]

    def base_tensors(self, base_id: int) -> list[BaseTensor]:
        with Session(self.engine) as s:
            rows = s.scalars(select(BaseTensorRow).where(BaseTensorRow.base_id == base_id)
                             .order_by(BaseTensorRow.position))
            return [BaseTensor(r.name, tuple(json.loads(r.shape)), r.dtype, r.sha256) for r in rows]

    # ---- entries -------------------------------------------------------------------------
    @staticmethod
    def _tags(s: Session, kind: str, target_id: int) -> dict:
        rows = s.scalars(select(TagRow).where(TagRow.kind == kind, TagRow.target_id == target_id)
                         .order_by(TagRow.key))
        return {r.key: r.value for r in rows}

    def _entry_record(self, row: EntryRow, s: Session | None = None) -> EntryRecord:
        tags = self._tags(s, ENTRY, row.id) if s is not None else {}
        return EntryRecord(row.id, row.name, row.modality, row.task, row.source_path, row.fingerprint, row.keymap,
                           json.loads(row.stats), row.created_at, row.created_by, row.removed_at,
                           row.revision or 1, row.lineage, row.superseded_by, row.description or "", tags,
                           row.codec or "lossless")

    def add_entry(self, base_id: int, name: str, modality: str, task: str, source_path: str, fingerprint: str,
                  keymap: str, stats: dict, blobs: Sequence[BlobRef], actor: str, trims: Sequence[Trim] = (), *,
                  update: bool = False, description: str = "", tags: dict | None = None,
                  codec: str = "lossless") -> EntryRecord:
        """Add an entry; with ``update``, a new revision of entry ``name`` that supersedes the current one.

        The superseded revision keeps its row, blobs and versions (renamed ``NAME@REVISION``), so
        every version that holds it still exports it; it leaves the set that ``expand`` merges.
        ``trims`` are the trims computed on the way (their entry id is filled in).
        """
        with self._tx() as s:
            old = s.scalar(select(EntryRow).where(EntryRow.base_id == base_id, EntryRow.name == name))
            if old is not None and not update:
                raise RegistryError(f"an entry named {name!r} already exists (names stay taken after removal, "
                                    "so history stays readable); choose another name, or pass update=True "
                                    "(--update) to register a new revision of it")
            revision = 1
            if old is not None:
                revision = (old.revision or 1) + 1
                suffix = f"@{old.revision or 1}"
                old.name = name[:64 - len(suffix)] + suffix
                old.lineage = name
                old.removed_at = old.removed_at or utcnow()
                s.flush()
            row = EntryRow(base_id=base_id, name=name, modality=modality, task=task, source_path=source_path,
                           fingerprint=fingerprint, keymap=keymap, stats=strict_json(stats), created_by=actor,
                           created_at=utcnow(), lineage=name, revision=revision, description=description or "",
                           codec=codec)
            s.add(row)
            s.flush()
            if old is not None:
                old.superseded_by = row.id
            s.add_all(EntryBlobRow(entry_id=row.id, role=b.role, key=b.key, digest=b.digest,
                                   stored_bytes=b.stored_bytes, raw_bytes=b.raw_bytes) for b in blobs)
            s.flush()
            if self.describer is not None:
                row.manifest = self.describer.entry(self._entry_facts(s, row))
            self._add_trims(s, [Trim(row.id, t.density, t.key, t.bits, t.ties) for t in trims])
            s.add_all(TagRow(kind=ENTRY, target_id=row.id, key=k, value=str(v)) for k, v in (tags or {}).items())
            if old is None:
                self._event(s, actor, "register", f"entry {name}", "", f"{modality}/{task}",
                            {"source": source_path, "fingerprint": fingerprint, "blobs": len(blobs),
                             "manifest": row.manifest, "codec": codec})
            else:
                self._event(s, actor, "update", f"entry {name}", f"r{revision - 1}", f"r{revision}",
                            {"source": source_path, "fingerprint": fingerprint, "blobs": len(blobs),
                             "superseded_row": old.name, "manifest": row.manifest, "codec": codec})
            return self._entry_record(row, s)

    def entry_by_id(self, entry_id: int) -> EntryRecord:
        with Session(self.engine) as s:
            row = s.get(EntryRow, entry_id)
            if row is None:
                raise RegistryError(f"no entry with id {entry_id}; run `mmer audit`")
            return self._entry_record(row, s)

    def entries(self, base_id: int, include_removed: bool = False) -> list[EntryRecord]:
        with Session(self.engine) as s:
            q = select(EntryRow).where(EntryRow.base_id == base_id).order_by(EntryRow.id)
            if not include_removed:
                q = q.where(EntryRow.removed_at.is_(None))
            return [self._entry_record(r, s) for r in s.scalars(q)]

    def entry(self, base_id: int, name: str) -> EntryRecord:
        with Session(self.engine) as s:
            row = s.scalar(select(EntryRow).where(EntryRow.base_id == base_id, EntryRow.name == name))
            if row is None:
                names = [r.name for r in s.scalars(select(EntryRow).where(EntryRow.base_id == base_id))]
                raise RegistryError(f"no entry named {name!r}; registered: {', '.join(names) or 'none'}")
            return self._entry_record(row, s)

    def entry_by_fingerprint(self, base_id: int, fingerprint: str) -> EntryRecord | None:
        with Session(self.engine) as s:
            row = s.scalar(select(EntryRow).where(EntryRow.base_id == base_id, EntryRow.fingerprint == fingerprint,
                                                  EntryRow.removed_at.is_(None)))
            return self._entry_record(row, s) if row else None

    def _blob_refs(self, table, owner_column, owner_id: int, role: str | None) -> list[BlobRef]:
        with Session(self.engine) as s:
            q = select(table).where(owner_column == owner_id).order_by(table.id)
            if role:
                q = q.where(table.role == role)
            return [BlobRef(r.role, r.key, r.digest, r.stored_bytes, r.raw_bytes, r.entry_id) for r in s.scalars(q)]

    def entry_blobs(self, entry_id: int, role: str | None = None) -> list[BlobRef]:
        return self._blob_refs(EntryBlobRow, EntryBlobRow.entry_id, entry_id, role)

    # ---- versions ------------------------------------------------------------------------
    def add_version(self, base_id: int, params: dict, details: dict, members: Sequence[Member],
                    blobs: Sequence[BlobRef], actor: str, remove_entry: str | None = None, *,
                    trims: Sequence[Trim] = (), recipe: str | None = None, description: str = "",
                    tags: dict | None = None) -> VersionRecord:
        """Write a new version, move ``current`` to it, and log it, in one transaction.

        ``remove_entry`` marks that entry removed in the same transaction; ``trims`` are cached trim
        thresholds computed on the way (ones already recorded are skipped); ``recipe`` (the YAML text it
        was expanded from), ``description`` and ``tags`` are stored with it.
        """
        with self._tx() as s:
            self._add_trims(s, trims)
            number = (s.scalar(select(func.max(VersionRow.number)).where(VersionRow.base_id == base_id)) or 0) + 1
            alias = self._alias_row(s, base_id, CURRENT)
            before = self._alias_label(s, alias)
            if remove_entry is not None:
                self._mark_removed(s, base_id, remove_entry, actor)
            row = VersionRow(base_id=base_id, number=number, params=strict_json(params), details=strict_json(details),
                             created_by=actor, created_at=utcnow(), recipe=recipe, description=description or "")
            s.add(row)
            s.flush()
            s.add_all(TagRow(kind=VERSION, target_id=row.id, key=k, value=str(v)) for k, v in (tags or {}).items())
            s.add_all(VersionMemberRow(version_id=row.id, entry_id=m.entry_id, position=m.position, scale=m.scale,
                                       mask_density=m.mask_density) for m in members)
            s.add_all(VersionBlobRow(version_id=row.id, role=b.role, entry_id=b.entry_id, key=b.key, digest=b.digest,
                                     stored_bytes=b.stored_bytes, raw_bytes=b.raw_bytes) for b in blobs)
            s.flush()
            if self.describer is not None:
                row.manifest = self.describer.version(self._version_facts(s, row))
            alias.version_id = row.id
            self._event(s, actor, "expand", f"version {number}", before, f"v{number}",
                        {"members": [m.entry_name for m in members], **details, "manifest": row.manifest})
            return self._version_record(s, row)

    def remove_entry_without_version(self, base_id: int, name: str, actor: str) -> None:
        """Mark the last entry removed; ``current`` then points at no version."""
        with self._tx() as s:
            self._mark_removed(s, base_id, name, actor)
            alias = self._alias_row(s, base_id, CURRENT)
            before = self._alias_label(s, alias)
            alias.version_id = None
            self._event(s, actor, "alias", CURRENT, before, "none", {"reason": f"entry {name} removed"})

    def remove_entry(self, base_id: int, name: str, actor: str) -> None:
        """Mark an entry removed without a new version (one no version holds: a 1-bit delta entry)."""
        with self._tx() as s:
            self._mark_removed(s, base_id, name, actor)

    def _mark_removed(self, s: Session, base_id: int, name: str, actor: str) -> None:
        row = s.scalar(select(EntryRow).where(EntryRow.base_id == base_id, EntryRow.name == name))
        if row is None or row.removed_at is not None:
            raise RegistryError(f"no active entry named {name!r}")
        row.removed_at = utcnow()
        self._event(s, actor, "remove", f"entry {name}", "active", "removed", {})

    @staticmethod
    def _alias_row(s: Session, base_id: int, name: str) -> AliasRow:
        alias = s.scalar(select(AliasRow).where(AliasRow.base_id == base_id, AliasRow.name == name))
        if alias is None:
            alias = AliasRow(base_id=base_id, name=name, version_id=None)
            s.add(alias)
            s.flush()
        return alias

    @staticmethod
    def _alias_label(s: Session, alias: AliasRow) -> str:
        if alias.version_id is None:
            return "none"
        return f"v{s.get(VersionRow, alias.version_id).number}"

    def _version_record(self, s: Session, row: VersionRow) -> VersionRecord:
        members = []
        for m in s.scalars(select(VersionMemberRow).where(VersionMemberRow.version_id == row.id)
                           .order_by(VersionMemberRow.position)):
            e = s.get(EntryRow, m.entry_id)
            members.append(Member(m.entry_id, e.lineage or e.name, m.position, m.scale, m.mask_density,
                                  e.revision or 1))
        aliases = sorted(s.scalars(select(AliasRow.name).where(AliasRow.version_id == row.id)),
                         key=lambda a: (a != CURRENT, a))
        return VersionRecord(row.id, row.number, json.loads(row.params), json.loads(row.details), row.created_at,
                             row.created_by, members, aliases, row.description or "", self._tags(s, VERSION, row.id),
                             row.recipe)

    def versions(self, base_id: int) -> list[VersionRecord]:
        with Session(self.engine) as s:
            rows = s.scalars(select(VersionRow).where(VersionRow.base_id == base_id).order_by(VersionRow.number))
            return [self._version_record(s, r) for r in rows]

    def version(self, base_id: int, ref: int | str | None = None) -> VersionRecord | None:
        """A version by number, by alias name, or (``None``) the one ``current`` points at."""
        with Session(self.engine) as s:
            number = version_number(ref)
            if number is None:
                alias_name = str(ref) if ref is not None else CURRENT
                alias = s.scalar(select(AliasRow).where(AliasRow.base_id == base_id, AliasRow.name == alias_name))
                if alias is None:
                    raise RegistryError(f"no version or alias {alias_name!r}: name a version as 3 or v3, or one of "
                                        f"the aliases {', '.join(self._alias_names(s, base_id))}")
                return self._version_record(s, s.get(VersionRow, alias.version_id)) if alias.version_id else None
            row = s.scalar(select(VersionRow).where(VersionRow.base_id == base_id, VersionRow.number == number))
            if row is None:
                existing = list(s.scalars(select(VersionRow.number).where(VersionRow.base_id == base_id)))
                raise RegistryError(f"no version {number}; versions: {existing or 'none yet (run expand)'}")
            return self._version_record(s, row)

    @staticmethod
    def _add_trims(s: Session, trims: Sequence[Trim]) -> None:
        seen = set()
        for entry_id, density in {(t.entry_id, t.density) for t in trims}:
            seen |= {(entry_id, density, k) for k in s.scalars(
                select(TrimRow.key).where(TrimRow.entry_id == entry_id, TrimRow.density == density))}
        for t in trims:
            if (t.entry_id, t.density, t.key) not in seen:
                seen.add((t.entry_id, t.density, t.key))
                s.add(TrimRow(entry_id=t.entry_id, density=t.density, key=t.key, bits=t.bits, ties=t.ties))

    def trims(self, entry_ids: Sequence[int], density: float) -> dict[tuple[int, str], Trim]:
        """Cached trim thresholds of these entries at ``density``, by (entry id, tensor key)."""
        with Session(self.engine) as s:
            rows = s.scalars(select(TrimRow).where(TrimRow.entry_id.in_(list(entry_ids)),
                                                   TrimRow.density == density))
            return {(r.entry_id, r.key): Trim(r.entry_id, r.density, r.key, r.bits, r.ties) for r in rows}

    def version_blobs(self, version_id: int, role: str | None = None) -> list[BlobRef]:
        return self._blob_refs(VersionBlobRow, VersionBlobRow.version_id, version_id, role)

    def set_alias(self, base_id: int, name: str, number: int | str, actor: str) -> tuple[str, str]:
        """Point alias ``name`` at a version (``3``, ``v3`` or another alias); a rollback when ``name`` is current."""
        target = self.version(base_id, number)
        if target is None:
            raise RegistryError(f"alias {number!r} points at no version yet")
        with self._tx() as s:
            alias = self._alias_row(s, base_id, name)
            before = self._alias_label(s, alias)
            alias.version_id = target.id
            self._event(s, actor, "rollback" if name == CURRENT else "alias", name, before, f"v{target.number}", {})
            return before, f"v{target.number}"

    def remove_alias(self, base_id: int, name: str, actor: str) -> str:
        """Delete alias ``name`` (never ``current``); returns what it pointed at."""
        if name == CURRENT:
            raise RegistryError("`current` cannot be removed: it is what every command uses by default; "
                                "move it with `mmer rollback VERSION` instead")
        with self._tx() as s:
            alias = s.scalar(select(AliasRow).where(AliasRow.base_id == base_id, AliasRow.name == name))
            if alias is None:
                raise RegistryError(f"no alias named {name!r}; aliases: {', '.join(self._alias_names(s, base_id))}")
            before = self._alias_label(s, alias)
            s.delete(alias)
            self._event(s, actor, "alias", name, before, "none", {"removed": True})
            return before

    @staticmethod
    def _alias_names(s: Session, base_id: int) -> list[str]:
        return list(s.scalars(select(AliasRow.name).where(AliasRow.base_id == base_id).order_by(AliasRow.name)))

    def aliases(self, base_id: int) -> dict[str, int | None]:
        """Alias name -> version number (None when it points at no version)."""
        with Session(self.engine) as s:
            rows = s.scalars(select(AliasRow).where(AliasRow.base_id == base_id).order_by(AliasRow.name))
            return {a.name: (s.get(VersionRow, a.version_id).number if a.version_id else None) for a in rows}

    # ---- tags and descriptions -----------------------------------------------------------
    def set_tags(self, kind: str, target_id: int, label: str, tags: dict, remove: Sequence[str],
                 actor: str) -> dict:
        """Set and delete tags on a version or entry row (``kind`` ENTRY or VERSION); logged."""
        with self._tx() as s:
            before = self._tags(s, kind, target_id)
            for key in remove:
                if key not in before:
                    raise RegistryError(f"{label} has no tag {key!r}; its tags: {', '.join(before) or 'none'}")
                s.execute(TagRow.__table__.delete().where(TagRow.kind == kind, TagRow.target_id == target_id,
                                                          TagRow.key == key))
            for key, value in tags.items():
                row = s.scalar(select(TagRow).where(TagRow.kind == kind, TagRow.target_id == target_id,
                                                    TagRow.key == key))
                if row is None:
                    s.add(TagRow(kind=kind, target_id=target_id, key=key, value=str(value)))
                else:
                    row.value = str(value)
            s.flush()
            after = self._tags(s, kind, target_id)
            self._event(s, actor, "tag", label, strict_json(before, sort_keys=True), strict_json(after, sort_keys=True))
            return after

    def set_description(self, kind: str, target_id: int, label: str, text_: str, actor: str) -> None:
        with self._tx() as s:
            row = s.get(EntryRow if kind == ENTRY else VersionRow, target_id)
            before = row.description or ""
            row.description = text_
            self._event(s, actor, "describe", label, before, text_)

    # ---- manifests -----------------------------------------------------------------------
    @staticmethod
    def _grouped_blobs(s: Session, table, owner_column, owner_ids: Sequence[int] | None = None
                       ) -> dict[int, list[BlobRef]]:
        """Blob rows by owner id (all owners, or those given)."""
        q = select(table).order_by(table.id)
        if owner_ids is not None:
            q = q.where(owner_column.in_(list(owner_ids)))
        out: dict[int, list[BlobRef]] = {}
        for r in s.scalars(q):
            entry_id = r.entry_id if table is VersionBlobRow else None
            out.setdefault(getattr(r, owner_column.key), []).append(
                BlobRef(r.role, r.key, r.digest, r.stored_bytes, r.raw_bytes, entry_id))
        return out

    def _entry_facts(self, s: Session, row: EntryRow, blobs: Sequence[BlobRef] | None = None) -> EntryFacts:
        if blobs is None:
            blobs = self._grouped_blobs(s, EntryBlobRow, EntryBlobRow.entry_id, [row.id]).get(row.id, [])
        try:
            referenced = bool(json.loads(row.stats).get("referenced"))
        except (ValueError, TypeError, AttributeError):  # unreadable stats: the manifest then differs, named
            referenced = None
        return EntryFacts(row.id, row.base_id, row.lineage or row.name, row.revision or 1, row.modality, row.task,
                          row.fingerprint, row.keymap, tuple(blobs), row.manifest, referenced,
                          row.codec or "lossless")

    def _version_facts(self, s: Session, row: VersionRow, blobs: Sequence[BlobRef] | None = None,
                       members: Sequence[VersionMemberRow] | None = None, entry_manifests: dict | None = None,
                       parent: str | None = None, parent_known: bool = False) -> VersionFacts:
        if blobs is None:
            blobs = self._grouped_blobs(s, VersionBlobRow, VersionBlobRow.version_id, [row.id]).get(row.id, [])
        if members is None:
            members = list(s.scalars(select(VersionMemberRow).where(VersionMemberRow.version_id == row.id)))
        found = tuple(sorted(((m.entry_id, m.position, m.scale, m.mask_density) for m in members),
                             key=lambda m: (m[1], m[0])))
        if entry_manifests is None:
            entry_manifests = {e: s.scalar(select(EntryRow.manifest).where(EntryRow.id == e)) for e, *_ in found}
        if not parent_known:
            parent = s.scalar(select(VersionRow.manifest).where(VersionRow.base_id == row.base_id,
                                                                VersionRow.number == row.number - 1))
        return VersionFacts(row.id, row.base_id, row.number, row.params, row.recipe, found,
                            {e: entry_manifests.get(e) for e, *_ in found}, parent, tuple(blobs), row.manifest)

    def entry_facts(self) -> Iterator[EntryFacts]:
        """Every entry row (every base, removed and superseded ones too) as its manifest would describe it;
        one row's blob rows in memory at a time."""
        with Session(self.engine) as s:
            ids = list(s.scalars(select(EntryRow.id).order_by(EntryRow.id)))
            for entry_id in ids:
                row = s.get(EntryRow, entry_id)
                if row is not None:
                    yield self._entry_facts(s, row)
                s.expunge_all()

    def version_facts(self) -> Iterator[VersionFacts]:
        """Every version row as its manifest would describe it, by base and number; one at a time."""
        with Session(self.engine) as s:
            ids = list(s.scalars(select(VersionRow.id).order_by(VersionRow.base_id, VersionRow.number)))
            for version_id in ids:
                row = s.get(VersionRow, version_id)
                if row is not None:
                    yield self._version_facts(s, row)
                s.expunge_all()

    def manifests_complete(self) -> bool:
        """Whether every entry and version row records its manifest (false for a store of an earlier release
        until its manifests are written)."""
        return self.get_meta(MANIFESTS_META_KEY) == "complete"

    def record_manifests(self, entries: dict[int, str], versions: dict[int, str], actor: str) -> None:
        """Record the manifests written for rows that had none, and mark the registry complete; logged."""
        with self._tx() as s:
            for table, digests in ((EntryRow, entries), (VersionRow, versions)):
                for row_id, digest in digests.items():
                    row = s.get(table, row_id)
                    if row is not None and row.manifest is None:
                        row.manifest = digest
            meta = s.get(Meta, MANIFESTS_META_KEY)
            if meta is None:
                s.add(Meta(key=MANIFESTS_META_KEY, value="complete"))
            else:
                meta.value = "complete"
            if entries or versions:
                self._event(s, actor, "manifests", "registry", "", f"{len(entries)} entries, {len(versions)} versions",
                            {"entries": len(entries), "versions": len(versions)})

    def manifest_events(self) -> list[tuple[int, str, str]]:
        """(event id, subject, manifest digest) of every logged register, update and expand that names one."""
        with Session(self.engine) as s:
            rows = s.execute(select(EventRow.id, EventRow.subject, EventRow.details)
                             .where(EventRow.action.in_(["register", "update", "expand"])).order_by(EventRow.id))
            found = []
            for event_id, subject, details in rows:
                try:
                    digest = json.loads(details).get("manifest")
                except (ValueError, AttributeError):
                    continue
                if isinstance(digest, str):
                    found.append((event_id, subject, digest))
            return found

    def manifest_digests(self) -> list[str]:
        """The manifest digest every entry and version row records (rows without one left out)."""
        with Session(self.engine) as s:
            return [d for table in (EntryRow, VersionRow)
                    for d in s.scalars(select(table.manifest).where(table.manifest.isnot(None)))]

    def rows_without_manifest(self) -> int:
        """How many entry and version rows record no manifest."""
        with Session(self.engine) as s:
            return sum(s.scalar(select(func.count()).select_from(table).where(table.manifest.is_(None))) or 0
                       for table in (EntryRow, VersionRow))

    def referenced_digests(self) -> set[str]:
        """Every digest any row names: blob rows (joined to an owner or not) and manifest columns."""
        with Session(self.engine) as s:
            found = set(s.scalars(select(EntryBlobRow.digest))) | set(s.scalars(select(VersionBlobRow.digest)))
            found |= set(s.scalars(select(EntryRow.manifest))) | set(s.scalars(select(VersionRow.manifest)))
        found.discard(None)
        return found

    # ---- audit ---------------------------------------------------------------------------
    def record(self, actor: str, action: str, subject: str, before: str = "", after: str = "",
               details: dict | None = None) -> None:
        with self._tx() as s:
            self._event(s, actor, action, subject, before, after, details)

    def events(self, limit: int | None = None) -> list[EventRecord]:
        with Session(self.engine) as s:
            q = select(EventRow).order_by(EventRow.id.desc())
            if limit:
                q = q.limit(limit)
            rows = list(s.scalars(q))[::-1]
            return [EventRecord(r.id, r.at, r.actor, r.action, r.subject, r.before, r.after, json.loads(r.details))
                    for r in rows]

    def blob_owners(self, detailed: bool = False) -> dict[str, list[str]]:
        """Every referenced digest -> who references it (``entry NAME`` or ``version N``).

        ``detailed`` names the role and tensor too: ``entry vision own, tensor K`` or
        ``version 3 mask of entry vision, tensor K``.
        """
        owners: dict[str, set[str]] = {}
        with Session(self.engine) as s:
            names = dict(s.execute(select(EntryRow.id, EntryRow.name)).all())
            for digest, name, role, key in s.execute(
                    select(EntryBlobRow.digest, EntryRow.name, EntryBlobRow.role, EntryBlobRow.key)
                    .join(EntryRow, EntryRow.id == EntryBlobRow.entry_id)):
                owners.setdefault(digest, set()).add(f"entry {name} {role}, tensor {key}" if detailed
                                                     else f"entry {name}")
            for digest, number, role, key, entry_id in s.execute(
                    select(VersionBlobRow.digest, VersionRow.number, VersionBlobRow.role, VersionBlobRow.key,
                           VersionBlobRow.entry_id).join(VersionRow, VersionRow.id == VersionBlobRow.version_id)):
                if not detailed:
                    owners.setdefault(digest, set()).add(f"version {number}")
                    continue
                of = f" of entry {names.get(entry_id, entry_id)}" if entry_id is not None else ""
                owners.setdefault(digest, set()).add(f"version {number} {role}{of}, tensor {key}")
            for digest, name in s.execute(select(EntryRow.manifest, EntryRow.name)
                                          .where(EntryRow.manifest.isnot(None))):
                owners.setdefault(digest, set()).add(f"entry {name} manifest" if detailed else f"entry {name}")
            for digest, number in s.execute(select(VersionRow.manifest, VersionRow.number)
                                            .where(VersionRow.manifest.isnot(None))):
                owners.setdefault(digest, set()).add(f"version {number} manifest" if detailed else f"version {number}")
        return {d: sorted(o) for d, o in owners.items()}

    def dangling_references(self) -> list[str]:
        """Rows whose references point nowhere, and gaps in version numbers (should never happen; audit
        reports them as damage)."""
        problems = []
        with Session(self.engine) as s:
            bases = set(s.scalars(select(BaseModelRow.id)))
            entries = set(s.scalars(select(EntryRow.id)))
            versions = dict(s.execute(select(VersionRow.id, VersionRow.base_id)).all())
            for alias in s.scalars(select(AliasRow)):
                if alias.version_id is not None and alias.version_id not in versions:
                    problems.append(f"alias {alias.name} points at missing version id {alias.version_id}")
            for m in s.scalars(select(VersionMemberRow)):
                if m.entry_id not in entries:
                    problems.append(f"version id {m.version_id} names missing entry id {m.entry_id}")
                if m.version_id not in versions:
                    problems.append(f"a member row (entry id {m.entry_id}) belongs to missing version id "
                                    f"{m.version_id}")
            checks = [("blob rows of entry id", select(EntryBlobRow.entry_id), entries),
                      ("blob rows of version id", select(VersionBlobRow.version_id), set(versions)),
                      ("mask rows naming entry id", select(VersionBlobRow.entry_id)
                       .where(VersionBlobRow.entry_id.isnot(None)), entries),
                      ("trim rows of entry id", select(TrimRow.entry_id), entries),
                      ("entry rows of base id", select(EntryRow.base_id), bases),
                      ("version rows of base id", select(VersionRow.base_id), bases),
                      ("base tensor rows of base id", select(BaseTensorRow.base_id), bases)]
            for what, query, known in checks:
                for missing in sorted(set(s.scalars(query)) - known):
                    problems.append(f"{what} {missing}, which does not exist")
            numbers: dict[int, list[int]] = {}
            for number, base_id in s.execute(select(VersionRow.number, VersionRow.base_id)):
                numbers.setdefault(base_id, []).append(number)
            for base_id, found in numbers.items():
                gaps = sorted(set(range(1, max(found) + 1)) - set(found))
                if gaps:
                    problems.append(f"version {', '.join(map(str, gaps))} of base id {base_id} is missing "
                                    f"(versions {', '.join(map(str, sorted(found)))} exist)")
        return problems

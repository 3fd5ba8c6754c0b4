"""Schema migrations of the registry: the project's small equivalent of Alembic.

Each step brings a registry from schema ``version - 1`` to ``version``. It is
a plain function of a SQLAlchemy ``Connection`` and runs inside one
transaction together with the update of ``schema_version`` in ``meta``, so a
registry is never left half-migrated. Steps use only portable DDL (``ADD
COLUMN`` with a default, new tables through the ORM metadata), so they run on
SQLite and PostgreSQL alike.

A fresh registry is created at the current schema by ``create_all`` and needs
no step. To change the schema: change ``schema.py``, bump ``SCHEMA_VERSION``,
append a step here, and add a test that opens a registry of the previous
version (``tests/test_migrations.py``). Each applied step writes a ``migrate`` event to the audit log in
its transaction. Prefer new tables and added columns
with defaults; never rewrite or drop what older releases wrote.

Hand-written rather than Alembic: a few small steps keyed on the ``schema_version`` that every registry since
0.1 already carries in ``meta``; Alembic would add its own version table that older stores lack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from registry.schema import SCHEMA_VERSION, EventRow, TagRow, utcnow


class MigrationError(Exception):
    """A registry cannot be brought to this release's schema; the message says what to do."""


@dataclass(frozen=True)
class Step:
    version: int
    summary: str
    apply: Callable[[Connection], None]


def _add_columns(conn: Connection, table: str, columns: dict[str, str]) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each column the table lacks (portable DDL)."""
    have = {c["name"] for c in inspect(conn).get_columns(table)}
    for name, ddl in columns.items():
        if name not in have:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))


def _v2(conn: Connection) -> None:
    _add_columns(conn, "entries", {"lineage": "VARCHAR(64)", "revision": "INTEGER NOT NULL DEFAULT 1",
                                   "superseded_by": "INTEGER", "description": "TEXT NOT NULL DEFAULT ''"})
    _add_columns(conn, "versions", {"description": "TEXT NOT NULL DEFAULT ''", "recipe": "TEXT"})
    TagRow.__table__.create(conn, checkfirst=True)


def _v3(conn: Connection) -> None:
    """No table changes: from schema 3 on, blobs may use plane layouts (``storage/planes.py``), which
    releases before it would decode wrongly; the version number is what makes them refuse the store."""


MANIFESTS_META_KEY = "manifests"  # "complete" once every entry and version row records its manifest


def _v4(conn: Connection) -> None:
    """Entries and versions record the digest of their manifest blob. The manifests of existing rows are
    written by the store on its first write-locked open (a migration cannot reach the blob location); until
    then such rows are trusted as they are, and the meta flag saying that every row has one is cleared."""
    _add_columns(conn, "entries", {"manifest": "VARCHAR(64)"})
    _add_columns(conn, "versions", {"manifest": "VARCHAR(64)"})
    conn.execute(text("DELETE FROM meta WHERE key = :k"), {"k": MANIFESTS_META_KEY})


def _v5(conn: Connection) -> None:
    """Entries record their codec; every existing entry keeps its exact task vector ("lossless"). Releases
    before schema 5 would misread an entry stored as 1-bit deltas, hence the version bump."""
    _add_columns(conn, "entries", {"codec": "VARCHAR(16) NOT NULL DEFAULT 'lossless'"})


STEPS: list[Step] = [
    Step(2, "entry revisions and descriptions, version descriptions and recipes, tags", _v2),
    Step(3, "blobs may use plane layouts (signs apart, sparse planes) that earlier releases cannot read", _v3),
    Step(4, "entries and versions record the digest of their manifest blob", _v4),
    Step(5, "entries record their codec (lossless, or bitdelta: 1-bit deltas, lossy)", _v5),
]


def read_version(conn: Connection) -> int | None:
    """The registry's schema version, or None for an empty database."""
    if not inspect(conn).has_table("meta"):
        return None
    value = conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
    return int(value) if value is not None else None


def upgrade(engine: Engine, target: int = SCHEMA_VERSION) -> list[int]:
    """Apply every step above the registry's version up to ``target``; return the versions applied.

    Safe against a concurrent upgrade: each step first claims its version with
    a conditional ``UPDATE`` of ``meta`` (which takes the write lock), and is
    skipped when another process got there first.
    """
    with engine.connect() as conn:
        current = read_version(conn)
    if current is None:
        return []
    if current > target:
        raise MigrationError(f"this registry has schema version {current}, newer than this mmer-cl understands "
                             f"({target}); upgrade mmer-cl")
    applied = []
    for step in STEPS:
        if not current < step.version <= target:
            continue
        with engine.begin() as conn:
            claimed = conn.execute(text("UPDATE meta SET value = :new WHERE key = 'schema_version' AND value = :old"),
                                   {"new": str(step.version), "old": str(step.version - 1)}).rowcount
            if claimed == 1:
                step.apply(conn)
                conn.execute(EventRow.__table__.insert().values(  # logged in the same transaction
                    at=utcnow(), actor="mmer-cl", action="migrate", subject="registry",
                    before=f"schema {step.version - 1}", after=f"schema {step.version}",
                    details=json.dumps({"step": step.summary})))
                applied.append(step.version)
        current = step.version
    return applied

"""The store's writer lock: one writer at a time, on one host or many.

- SQLite registry: an ``flock`` on a file beside it (the registry lives on one
  machine, so the lock does too).
- PostgreSQL registry: a session-level advisory lock (``pg_advisory_lock``) on a
  key derived from the store id, held on its own connection for the duration
  of the write. Writers on different hosts sharing the database serialise; if
  a writer dies, its connection closes and PostgreSQL releases the lock.

Readers are never blocked. Other databases are refused for writing, since
nothing would keep two hosts apart.
"""

from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Engine

from mmer_cl.errors import MmerError

NAMESPACE = "mmer-cl writer"


class LockError(MmerError):
    """The writer lock cannot be taken on this registry."""


def advisory_key(store_id: str | None) -> int:
    """A signed 64-bit advisory-lock key for a store (PostgreSQL keys are bigint)."""
    digest = hashlib.sha256(f"{NAMESPACE}:{store_id or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def advisory_lock(engine: Engine, key: int) -> Iterator[None]:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()  # a session-level lock outlives the transaction that took it
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def writer_lock(engine: Engine, lock_file: Path, store_id: str | None = None):
    """The lock that keeps writers of one store apart, chosen by the registry's database."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return file_lock(lock_file)
    if dialect == "postgresql":
        return advisory_lock(engine, advisory_key(store_id))
    raise LockError(f"cannot lock a {dialect} registry across hosts; use PostgreSQL (or SQLite on one machine) "
                    "for a registry that mmer writes to")

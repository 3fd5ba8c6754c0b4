"""The store's writer lock: one writer at a time, on one host or many.

- SQLite registry: an ``flock`` on a file beside it (the registry lives on one
  machine, so the lock does too).
- PostgreSQL registry: a session-level advisory lock (``pg_advisory_lock``) on a
  key derived from the store id, held on its own connection for the duration
  of the write. Writers on different hosts sharing the database serialise; if
  a writer dies, its connection closes and PostgreSQL releases the lock.

Readers are never blocked. Other databases are refused for writing, since
nothing would keep two hosts apart.

The export lock keeps exports and ``gc`` apart: every export holds it shared
(``flock(LOCK_SH)`` on a second file beside the writer lock, or
``pg_advisory_lock_shared`` on a second key) while its partial directory
exists; ``gc`` tries to take it exclusively, without waiting, before removing
partial directories, and knows from a refusal that an export is running.

Hand-written rather than ``filelock``: filelock has no shared mode, which the export lock needs, and the
same three shapes (exclusive, shared, exclusive-if-free-now) must also map onto PostgreSQL advisory locks.
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
EXPORT_NAMESPACE = "mmer-cl export"


class LockError(MmerError):
    """The writer lock cannot be taken on this registry."""


def advisory_key(store_id: str | None, namespace: str = NAMESPACE) -> int:
    """A signed 64-bit advisory-lock key for a store (PostgreSQL keys are bigint)."""
    digest = hashlib.sha256(f"{namespace}:{store_id or ''}".encode()).digest()
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


@contextmanager
def _shared_file_lock(path: Path) -> Iterator[None]:
    try:
        fh = open(path, "a+")
    except OSError:  # a store this user cannot write (read-only files): exporting from it needs no lock
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _exclusive_file_lock_now(path: Path) -> Iterator[bool]:
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _shared_advisory_lock(engine: Engine, key: int) -> Iterator[None]:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock_shared(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock_shared(:k)"), {"k": key})
            conn.commit()


@contextmanager
def _exclusive_advisory_lock_now(engine: Engine, key: int) -> Iterator[bool]:
    with engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def writer_lock_now(engine: Engine, lock_file: Path, store_id: str | None = None):
    """The writer lock if it is free now: a context yielding True (held) or False (another writer has it)."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return _exclusive_file_lock_now(lock_file)
    if dialect == "postgresql":
        return _exclusive_advisory_lock_now(engine, advisory_key(store_id))
    raise LockError(f"cannot lock a {dialect} registry across hosts; use PostgreSQL (or SQLite on one machine) "
                    "for a registry that mmer writes to")


@contextmanager
def export_lock(engine: Engine, lock_file: Path, store_id: str | None = None) -> Iterator[None]:
    """Held (shared) by every export of one store while it writes: gc leaves its partial directory alone."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        with _shared_file_lock(lock_file):
            yield
    elif dialect == "postgresql":
        with _shared_advisory_lock(engine, advisory_key(store_id, EXPORT_NAMESPACE)):
            yield
    else:  # a registry mmer cannot lock is read-only to it: no gc can run against it either
        yield


def no_export_running(engine: Engine, lock_file: Path, store_id: str | None = None):
    """A context yielding True when no export of the store runs (and none can start until it ends), False
    when one does; gc removes partial export directories only under True."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        return _exclusive_advisory_lock_now(engine, advisory_key(store_id, EXPORT_NAMESPACE))
    if dialect != "sqlite":
        raise LockError(f"cannot lock a {dialect} registry across hosts; use PostgreSQL (or SQLite on one "
                        "machine) for a registry that mmer writes to")
    return _exclusive_file_lock_now(lock_file)

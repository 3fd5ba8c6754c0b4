"""The registry's tables (SQLAlchemy 2.0 ORM). Knows nothing of tensors: blobs are digests."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 5  # see registry/migrations.py for how older registries are brought up to it


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class BaseModelRow(Base):
    """A base LLM every entry of this lineage was fine-tuned from."""

    __tablename__ = "base_models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    source_path: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class BaseTensorRow(Base):
    """One tensor of a base model: shape, dtype and content digest (checked whenever it is read)."""

    __tablename__ = "base_tensors"
    id: Mapped[int] = mapped_column(primary_key=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(Text)
    shape: Mapped[str] = mapped_column(Text)  # JSON list
    dtype: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))


class EntryRow(Base):
    """A registered fine-tuned model: its modality, task, source and key map."""

    __tablename__ = "entries"
    __table_args__ = (UniqueConstraint("base_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(64))
    source_path: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    keymap: Mapped[str] = mapped_column(Text)  # JSON
    stats: Mapped[str] = mapped_column(Text)  # JSON
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # schema 2: entry revisions (`register --update`) and descriptions. A superseded revision keeps its
    # row (renamed NAME@REVISION, so the name stays unique) and its lineage, the name users type.
    lineage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    superseded_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    # schema 4: the digest of the entry's manifest blob (see mmer_cl/store/manifests.py), like a git ref to a tree
    manifest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # schema 5: how the entry's LLM delta is stored: "lossless" (its exact task vector) or "bitdelta" (1-bit
    # signs and one scale per matrix, lossy; see mmer_cl/method/bitdelta.py)
    codec: Mapped[str] = mapped_column(String(16), default="lossless", server_default="lossless")


class BlobColumns:
    """What every row pointing at a blob holds: its role, tensor key, digest and sizes."""

    id: Mapped[int] = mapped_column(primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    stored_bytes: Mapped[int] = mapped_column(Integer)
    raw_bytes: Mapped[int] = mapped_column(Integer)


class EntryBlobRow(BlobColumns, Base):
    """A blob that belongs to an entry (role task_vector | own | aux | reference | bitdelta_*)."""

    __tablename__ = "entry_blobs"
    entry_id: Mapped[int] = mapped_column(ForeignKey("entries.id"), index=True)


class VersionRow(Base):
    """One expansion: immutable once written."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("base_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    params: Mapped[str] = mapped_column(Text)  # JSON
    details: Mapped[str] = mapped_column(Text)  # JSON
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    # schema 2: a description and the recipe (YAML text) the version was expanded from.
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    recipe: Mapped[str | None] = mapped_column(Text, nullable=True)
    # schema 4: the digest of the version's manifest blob (see mmer_cl/store/manifests.py)
    manifest: Mapped[str | None] = mapped_column(String(64), nullable=True)


class VersionMemberRow(Base):
    __tablename__ = "version_members"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("entries.id"))
    position: Mapped[int] = mapped_column(Integer)
    scale: Mapped[float] = mapped_column(Float)
    mask_density: Mapped[float] = mapped_column(Float)


class VersionBlobRow(BlobColumns, Base):
    """A blob of a version (role merged | acc.<part> | mask), for one tensor; masks name their entry."""

    __tablename__ = "version_blobs"
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    entry_id: Mapped[int | None] = mapped_column(ForeignKey("entries.id"), nullable=True)


class TrimRow(Base):
    """What trimming kept of one entry's task vector for one tensor at one density.

    Two integers that let a later expansion trim the entry again with one
    comparison (see ``mmer_cl.method.merging.TrimThreshold``): a cache, derivable
    from the task vector, written with the version that first computed it.
    """

    __tablename__ = "trims"
    __table_args__ = (UniqueConstraint("entry_id", "density", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("entries.id"), index=True)
    density: Mapped[float] = mapped_column(Float)
    key: Mapped[str] = mapped_column(Text)
    bits: Mapped[int] = mapped_column(BigInteger)
    ties: Mapped[int] = mapped_column(BigInteger)


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("base_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    name: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), nullable=True)


class TagRow(Base):
    """schema 2: a key=value tag on a version or an entry (``kind`` says which; ``target_id`` is its row id)."""

    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("kind", "target_id", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    target_id: Mapped[int] = mapped_column(Integer, index=True)
    key: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(Text)


class EventRow(Base):
    """The append-only audit log: who did what, when, and what changed."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(Text)
    before: Mapped[str] = mapped_column(Text)
    after: Mapped[str] = mapped_column(Text)
    details: Mapped[str] = mapped_column(Text)  # JSON


APPEND_ONLY_TRIGGERS = [
    "CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
]

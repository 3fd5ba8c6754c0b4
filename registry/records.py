"""Plain records the registry hands out (never live ORM objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class BlobRef:
    """A row pointing at a blob: what it is (role, key, entry) and its sizes."""

    role: str
    key: str
    digest: str
    stored_bytes: int
    raw_bytes: int
    entry_id: int | None = None


@dataclass(frozen=True)
class Trim:
    """A cached trim threshold: entry, density, tensor key and the two integers that define it."""

    entry_id: int
    density: float
    key: str
    bits: int
    ties: int


@dataclass(frozen=True)
class BaseTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str


@dataclass(frozen=True)
class BaseRecord:
    id: int
    name: str
    source_path: str
    fingerprint: str
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class EntryRecord:
    id: int
    name: str
    modality: str
    task: str
    source_path: str
    fingerprint: str
    keymap: str
    stats: dict
    created_at: datetime
    created_by: str
    removed_at: datetime | None
    revision: int = 1
    lineage: str | None = None
    superseded_by: int | None = None
    description: str = ""
    tags: dict = field(default_factory=dict)
    codec: str = "lossless"  # or "bitdelta" (lossy: 1-bit deltas, served without merging; mmer_cl/method/bitdelta.py)

    @property
    def active(self) -> bool:
        return self.removed_at is None

    @property
    def label(self) -> str:
        """The name users type for this entry's lineage (a superseded revision's row is NAME@REVISION)."""
        return self.lineage or self.name


@dataclass(frozen=True)
class Member:
    entry_id: int
    entry_name: str
    position: int
    scale: float
    mask_density: float
    revision: int = 1


@dataclass(frozen=True)
class VersionRecord:
    id: int
    number: int
    params: dict
    details: dict
    created_at: datetime
    created_by: str
    members: list[Member] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    description: str = ""
    tags: dict = field(default_factory=dict)
    recipe: str | None = None

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.entry_name == name), None)


@dataclass(frozen=True)
class EventRecord:
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    before: str
    after: str
    details: dict


@dataclass(frozen=True)
class EntryFacts:
    """What an entry's manifest describes: the immutable part of its row and its blob rows."""

    id: int
    base_id: int
    label: str  # the name users type (its lineage)
    revision: int
    modality: str
    task: str
    fingerprint: str
    keymap: str
    blobs: tuple[BlobRef, ...]
    manifest: str | None = None  # what the row records
    referenced: bool = False  # registered by reference: its task vectors are read from its source
    codec: str = "lossless"


@dataclass(frozen=True)
class VersionFacts:
    """What a version's manifest describes: its row's immutable part, members and blob rows, and the
    manifests it reaches (its members' and its predecessor's), as the rows record them."""

    id: int
    base_id: int
    number: int
    params: str  # JSON text
    recipe: str | None
    members: tuple[tuple[int, int, float, float], ...]  # (entry id, position, scale, mask density)
    member_manifests: dict  # entry id -> that entry row's manifest digest (None when it has none)
    parent: str | None  # the manifest of the version numbered one less, of the same base
    blobs: tuple[BlobRef, ...]
    manifest: str | None = None

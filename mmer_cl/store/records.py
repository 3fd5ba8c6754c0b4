"""The store's records, errors, validators and constants (what its verbs return and check).

Moved here from ``mmer_cl/store.py`` when the store became a package; import them from
:mod:`mmer_cl.store` as before.
"""

from __future__ import annotations

import dataclasses
import getpass
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.checkpoints.keymap import KeyMap
from mmer_cl.errors import ConfigError, MmerError
from mmer_cl.method import bitdelta
from mmer_cl.runtime.fingerprint import tensor_digest
from mmer_cl.runtime.names import MAX_DESCRIPTION, MAX_TAG_VALUE, validate_actor, validate_name, validate_text
from mmer_cl.store.expansion_plan import llm_shapes
from registry import BaseRecord, BaseTensor, EntryRecord, RegistryError, VersionRecord, version_number


DB_NAME = "registry.db"
LOCK_NAME = ".lock"
MAX_RELATIVE_CHANGE = 0.5
GroupRunner = Callable[..., list]  # (blobs, plan, *, progress) -> one GroupResult per plan group, in order
ENV_ACTOR = "MMER_ACTOR"


def _summary(ckpt, keymap: KeyMap, base_rec: BaseRecord, codec: str = bitdelta.LOSSLESS) -> str:
    """:func:`_merge_summary`; an entry of 1-bit deltas merges nothing, and says so."""
    text = _merge_summary(ckpt, keymap, base_rec)
    if codec == bitdelta.BITDELTA:
        text = text.replace("LLM tensors merged", "LLM tensors stored as 1-bit deltas (1-D and tiny ones exactly)", 1)
    return text


def _merge_summary(ckpt, keymap: KeyMap, base_rec: BaseRecord) -> str:
    """What a registration merged: for a LoRA adapter over the base itself, only the LLM tensors it changes
    are counted (every other task vector is zero)."""
    text = keymap.describe()
    if not hasattr(ckpt, "modules") or Path(getattr(ckpt, "underlying_path", "")).resolve() != \
            Path(base_rec.source_path).resolve():
        return text
    changed = set(ckpt.modules) | set(getattr(ckpt, "full", {})) | set(getattr(ckpt, "token_rows", {}))
    count = sum(1 for key in keymap.llm if key in changed)
    first, *rest = text.splitlines()
    return "\n".join([f"{count} LLM tensors merged (changed by the adapter; the other {len(keymap.llm) - count} "
                      f"equal the base), {len(keymap.modality)} modality tensors kept verbatim", *rest])


class StoreError(MmerError):
    """The store cannot do what was asked; the message says what to do."""


def _merged_and_one_bit(entries: Iterable[EntryRecord]) -> tuple[list[EntryRecord], list[EntryRecord]]:
    """Entries ``expand`` merges (codec lossless) and those it leaves out (1-bit deltas, never merged)."""
    entries = list(entries)
    return ([e for e in entries if e.codec != bitdelta.BITDELTA],
            [e for e in entries if e.codec == bitdelta.BITDELTA])


def validate_alias(name: str) -> str:
    """An alias is a name that cannot be read as a version number (``3``, ``v3``)."""
    validate_name(name, "alias")
    if version_number(name) is not None:
        raise StoreError(f"alias {name!r} reads as a version number; choose a word such as 'production'")
    return name


def validate_tags(tags: dict | None) -> dict:
    """Tag keys are names; values are short printable strings (no newline or escape sequence)."""
    if tags is not None and not isinstance(tags, dict):
        raise ConfigError(f"tags must be a mapping of names to values, got {type(tags).__name__}")
    out = {}
    for key, value in (tags or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"tag keys must be text, got {key!r}")
        validate_name(key, "tag key")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"tag {key!r} must be text or a finite number, got {value!r}")
        if len(str(value)) > MAX_TAG_VALUE:
            raise StoreError(f"tag {key!r} is longer than {MAX_TAG_VALUE} characters; put long text in a "
                             "description")
        out[key] = validate_text(str(value), f"the value of tag {key!r}", MAX_TAG_VALUE)
    return out


def validate_codec(codec: str, reference: bool = False) -> str:
    """An entry codec: ``lossless`` (the exact task vector) or ``bitdelta`` (1-bit deltas, lossy)."""
    if codec not in bitdelta.CODECS:
        raise ConfigError(f"unknown codec {codec!r}; choose lossless (the exact task vector, merged by expand; the "
                          "default) or bitdelta (1 bit per LLM parameter plus one scale per matrix: lossy, served "
                          "from its own delta without merging)")
    if reference and codec != bitdelta.LOSSLESS:
        raise ConfigError("--reference keeps the checkpoint itself and --codec bitdelta a 1-bit copy of its delta; "
                          "choose one")
    return codec


def validate_description(text: str) -> str:
    """A description: printable text (no newline or escape sequence), at most MAX_DESCRIPTION characters."""
    return validate_text(text, "the description", MAX_DESCRIPTION)


def _skipped_files(ckpt) -> tuple[str, ...]:
    """The non-weight files of ``ckpt`` (and of a LoRA adapter's underlying model) left out by the allow-list."""
    names = list(getattr(ckpt, "skipped", []))
    underlying = getattr(ckpt, "underlying", None)
    names += [f"{n} (underlying model)" for n in getattr(underlying, "skipped", [])]
    return tuple(names)


def default_actor() -> str:
    """``MMER_ACTOR`` (checked: printable, at most 128 characters), else the login name, else "unknown"."""
    chosen = os.environ.get(ENV_ACTOR)
    if chosen:
        return validate_actor(chosen)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
    try:
        return validate_actor(user)
    except ConfigError:
        return "unknown"


@dataclass(frozen=True)
class RegisterResult:
    entry: EntryRecord
    created: bool
    keymap_summary: str
    skipped_files: tuple[str, ...] = ()  # files of the checkpoint not copied (off the allow-list)


@dataclass(frozen=True)
class ExpandResult:
    version: VersionRecord
    created: bool
    incremental: bool


@dataclass(frozen=True)
class DamagedBlob:
    digest: str
    problem: str
    owners: list[str]


@dataclass(frozen=True)
class AuditReport:
    checked: int
    damaged: list[DamagedBlob]
    dangling: list[str]
    base_problems: list[str]
    unreferenced: int
    database_problems: list[str] = dataclasses.field(default_factory=list)
    manifest_problems: list[str] = dataclasses.field(default_factory=list)  # rows that differ from manifests
    undescribed: int = 0  # rows of an earlier release's store whose manifests are not written yet

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.dangling or self.base_problems or self.database_problems
                    or self.manifest_problems)


class VerifiedBase:
    """Reads base tensors from their source path and checks each against its recorded sha256."""

    def __init__(self, record: BaseRecord, tensors: Sequence[BaseTensor]):
        self.record = record
        self.tensors = {t.name: t for t in tensors}
        try:
            self.checkpoint = Checkpoint(record.source_path)
        except MmerError as exc:
            raise StoreError(f"the base model {record.name!r} can no longer be read from {record.source_path}: "
                             f"{exc}. Restore it there (the store references the base, it does not copy it).") from exc

    def get(self, name: str) -> torch.Tensor:
        t = self.checkpoint.get(name)
        if tensor_digest(t) != self.tensors[name].sha256:
            raise StoreError(f"base tensor {name} at {self.record.source_path} changed since the store was "
                             "initialised; restore the original base model or init a new store")
        return t

    def llm_shapes(self) -> dict[str, tuple[int, ...]]:
        return llm_shapes(self.tensors.values())


COMPOSE_READ_CACHE_BYTES = 16 * 2**20  # Store.compose: decoded mask packs (+ the largest tensor's nonzero map)

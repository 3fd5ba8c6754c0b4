"""The Python API a lifelong-learning pipeline imports: a versioned MMER store.

A store is a directory with a registry database and a blob store::

    store = Store.init("my-store", base="llama-base/")
    store.register("llava-vision/", name="vision", modality="vision", task="vqa")
    store.register("qwen-audio/", name="audio", modality="audio", task="asr")
    v = store.expand()                     # merge + masks, a new immutable version
    model = store.load("vision")           # base + mask * merged, ready to run
    store.rollback(1)                      # current -> version 1, nothing deleted

Registering stores the entry's task vector (fine-tuned minus base, per LLM
tensor), its modality-side tensors and its non-weight files, compressed and
content-addressed, so the source checkpoint may be deleted afterwards. The
base is referenced by path and every base tensor is checked against its
recorded sha256 whenever it is read.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from sqlalchemy.exc import SQLAlchemyError

from mmer_cl.checkpoint import Checkpoint
from mmer_cl.confinement import read_confined
from mmer_cl.derived_masks import derived_mask_source, mask_at_nonzero, masks_derived, read_once_for_two
from mmer_cl.device import default_device
from mmer_cl import bitdelta, bitdelta_entries, identity, manifests
from mmer_cl.dtypes import refuse_unmergeable
from mmer_cl.errors import ConfigError, KeyMappingError, MmerError, StoreDamagedError
from mmer_cl.expansion_plan import (commit_expansion, llm_shapes, plan_expansion, run_plan,
                                    task_vector_from_spec, task_vector_sources)
from mmer_cl.faults import fault_point
from mmer_cl.export_guard import GRACE_SECONDS, Protected, check_target, marker_bytes, remove_leftovers
from mmer_cl.export import (Progress, TensorSource, layout_of, reconstructed_tensors, write_merged_llm,
                            write_model)
from mmer_cl.fingerprint import checkpoint_fingerprint, tensor_digest
from mmer_cl.interrupts import raise_if_interrupted
from mmer_cl.keymap import KeyMap
from mmer_cl.locks import export_lock, no_export_running, writer_lock, writer_lock_now
from mmer_cl.lora import open_checkpoint
from mmer_cl.names import MAX_DESCRIPTION, MAX_TAG_VALUE, validate_actor, validate_name, validate_text
from mmer_cl.params import MergeParams
from mmer_cl.prefetch import prefetched
from mmer_cl.pipeline import map_checkpoint
from mmer_cl.reconstruct import SparseMerged
from mmer_cl.merging import trim_threshold
from mmer_cl.references import TensorReference, read_task_vector
from mmer_cl.task_vector import sum_of_squares, task_vector_and_squares
from mmer_cl.threads import torch_single_threaded
from mmer_cl.write_behind import write_behind
from mmer_cl.writer import fsync_dir
from registry import (CURRENT, ENTRY, VERSION, BaseRecord, BaseTensor, BlobRef, EntryRecord, EventRecord,
                      Registry, RegistryError, Trim, VersionRecord, sqlite_url, version_number)
from registry.postgres import normalise_url
from registry.registry import shown_url
from registry.urls import check_url, scrub
from storage import BlobError, BlobStore, TensorReader, encode, jit

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


class Store:
    """A registry and a blob location; see the module docstring.

    By default both live in the directory ``root`` (``registry.db``,
    ``objects/``). ``url`` puts the registry elsewhere (any SQLAlchemy URL;
    ``postgresql://`` for one shared by many hosts) and ``objects`` the
    blobs (a directory or an fsspec URL such as ``s3://bucket/prefix``).
    """

    def __init__(self, root: str | Path, url: str | None = None, device: torch.device | None = None, *,
                 objects: str | Path | None = None, create: bool = False):
        """Open the store at ``root``; the identity checks of :mod:`mmer_cl.identity` run first.

        ``create=True`` (used by :meth:`init`) may create the registry and the blob location, but only
        where no store data exists.
        """
        self.root = Path(root)
        url = normalise_url(url or sqlite_url(self.root / DB_NAME))  # remembers its password: never shown
        problem = check_url(url)
        if problem:
            raise StoreError(problem + "; write it like sqlite:////path/registry.db or "
                             "postgresql://user@host:5432/dbname (--db-url / MMER_DB_URL)")
        try:
            self.blobs = BlobStore.open(objects, create=create) if objects else BlobStore(self.root, create=create)
        except BlobError as exc:
            raise StoreError(str(exc)) from None
        try:
            found = identity.check_before_open(self.blobs, url, str(identity.sqlite_path(url) or shown_url(url)),
                                               create)
        except MmerError as exc:  # its message may quote the URL or a driver's error: never its password
            scrubbed = scrub(str(exc), (url,))
            if scrubbed == str(exc):
                raise
            raise type(exc)(scrubbed) from None
        try:
            self.registry = Registry(url)
        except SQLAlchemyError as exc:
            raise StoreDamagedError(f"cannot open the registry {shown_url(url)}: {str(exc).splitlines()[0]}. "
                                    + identity.restore_advice(shown_url(url))) from None
        try:
            self.store_id = identity.settle(self.blobs, self.registry, found, self._lock)
        except BaseException:
            self.registry.close()
            raise
        self.registry.describer = manifests.ManifestWriter(self.blobs)  # every new row gets its manifest
        manifests.ensure(self.registry, self.blobs, lambda: writer_lock_now(  # an earlier release's rows get theirs
            self.registry.engine, self._lock_file(), self.store_id))
        self.reader = TensorReader(self.blobs)
        self.device = device or default_device()

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, url: str | None = None, *, objects: str | Path | None = None,
             **kw) -> "Store":
        """An existing store: ``root`` holds the SQLite registry and ``objects/`` unless ``url`` (a
        SQLAlchemy URL, e.g. ``postgresql://host/db``) or ``objects`` (a directory or URL such as
        ``s3://bucket/prefix``) say otherwise. Nothing is created: a mistyped location is an error."""
        root = Path(root)
        if url is None and not root.is_dir():
            raise StoreError(f"no mmer store at {root}; create one with `mmer init --base PATH` "
                             "(or Store.init) or point --store / MMER_STORE at an existing one")
        if url is None and not (root / DB_NAME).exists() and not (root / "objects").exists():
            raise StoreError(f"no mmer store at {root} (no {DB_NAME}); create one with `mmer init --base PATH` "
                             "(or Store.init) or point --store / MMER_STORE at an existing one")
        return cls(root, url, objects=objects, **kw)

    @classmethod
    def init(cls, root: str | Path, base: str | Path, base_name: str | None = None, actor: str | None = None,
             url: str | None = None, progress: Progress | None = None, *, objects: str | Path | None = None,
             **kw) -> "Store":
        """Create a store (or add a base to one) and record the base model's fingerprint.

        A base the store already holds (same tensors) is recognised, not added twice:
        ``store.init_created`` is then False and ``store.init_result`` the existing base.
        Giving it a second name is refused, since every command would then have to ask which base.
        ``objects`` (a directory or URL) is the blob location to create, when not ``root/objects``.
        """
        root = Path(root)
        chosen = base_name
        base_name = validate_name(base_name or Path(base).resolve().name, "base name")
        actor = validate_actor(actor) if actor else None  # refused before the base is read, not after
        ckpt = Checkpoint(base)
        refuse_unmergeable({n: i.dtype for n, i in ckpt.infos.items() if i.is_float}, f"base {base}")
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} is a file, not a store directory; choose another --store")
        tensors = []
        for i, (name, info) in enumerate(ckpt.infos.items(), start=1):
            t = ckpt.get(name)
            tensors.append(BaseTensor(name, info.shape, info.dtype, tensor_digest(t)))
            if progress:
                progress(i, len(ckpt.infos), name)
        fingerprint = checkpoint_fingerprint((t.name, t.shape, t.dtype, t.sha256) for t in tensors)
        if url is None or objects is None:  # something lives in the store directory
            root.mkdir(parents=True, exist_ok=True)
        store = cls(root, url, objects=objects, create=True, **kw)
        if root.is_dir():
            fsync_dir(root)
        with store._lock():
            same = next((b for b in store.registry.bases() if b.fingerprint == fingerprint), None)
            if same is not None:
                if chosen is not None and chosen != same.name:
                    store.close()
                    raise StoreError(
                        f"{root} already holds this base model (same tensors) as {same.name!r}; a second name "
                        f"for it would make every command ask for --base. Keep using {same.name!r} (no need to "
                        "init again), or create a separate store with --store OTHER_DIR.")
                store.init_result, store.init_created = same, False
                return store
            store.init_result = store.registry.add_base(base_name, str(Path(base).resolve()), fingerprint, tensors,
                                                        actor or default_actor())
            store.init_created = True
        return store

    def close(self) -> None:
        self.registry.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lock(self) -> ContextManager[None]:
        """One writer at a time per store (readers are never blocked), across hosts where the registry is
        shared: a PostgreSQL advisory lock there, a file lock beside a SQLite registry. Once the store is
        open, whoever holds it first writes the manifests an earlier release's rows lack."""
        lock = writer_lock(self.registry.engine, self._lock_file(), self.registry.meta_value("store_id"))
        if self.registry.describer is None:  # still opening: identity not settled yet
            return lock
        return manifests.described_under(lock, self.registry, self.blobs)

    def _export_lock(self) -> ContextManager[None]:
        """Held shared by every export while it writes, so that gc leaves its partial directory alone."""
        return export_lock(self.registry.engine, self._export_lock_file(), self.store_id)

    def _export_lock_file(self) -> Path:
        lock = self._lock_file()
        return lock.with_name(lock.name + "-export")

    def _lock_file(self) -> Path:
        """Beside the SQLite database: ``root/.lock`` for the default ``root/registry.db``, else ``DB.lock``,
        so every client of one database shares it whatever its working directory."""
        db = self.registry.engine.url.database if self.registry.engine.dialect.name == "sqlite" else None
        if not db or db == ":memory:" or Path(db).resolve() == (self.root / DB_NAME).resolve():
            return self.root / LOCK_NAME
        return Path(db).with_name(Path(db).name + ".lock")

    def base(self, name: str | None = None) -> BaseRecord:
        return self.registry.base(name)

    def blob_source(self, refs: Iterable[BlobRef]) -> TensorSource:
        """Tensors by key from blob rows, read (checksum-verified) and decoded on demand."""
        digests = {r.key: r.digest for r in refs}
        return lambda key: self.reader.tensor(digests[key], key)

    def _sparse_source(self, merged: list[BlobRef], masks: list[BlobRef] | None, derived=None
                       ) -> Callable[[str], SparseMerged | None]:
        """Merged tensors (with a mask, where ``masks`` are given, or computed where ``derived``, a
        (task vector source, version, member), is) in the sparse form they are stored in: None for a key
        whose blobs are coded otherwise (against an earlier version), which then reads dense."""
        merged_digests = {r.key: r.digest for r in merged}
        mask_digests = {r.key: r.digest for r in masks} if masks is not None else None
        if derived is not None:
            tau, v, member = derived
            params = MergeParams.from_dict(v.params)
            rule, lam = params.mask_rule, params.lam_for(member.entry_name)

        def read(key: str) -> SparseMerged | None:
            digest = merged_digests[key]
            if derived is not None:
                form = self.reader.sparse(digest)
                if form is None:
                    return None
                shape, bits, values = form
                return SparseMerged(tuple(shape), bits, values, mask_at_nonzero(tau(key), bits, values, rule, lam))
            ordered = None
            if mask_digests is not None:  # first: a mask coded against its parent needs no merged blob read
                ordered = self.reader.mask_by_context(mask_digests[key], key, digest)
                if ordered is None:
                    return None
            form = self.reader.sparse(digest)  # one read of the blob, which says whether it is sparse
            if form is None:
                return None
            shape, bits, values = form
            return SparseMerged(tuple(shape), bits, values, ordered[:values.numel()] if ordered is not None else None)

        return read

    def _verified_base(self, base: BaseRecord) -> VerifiedBase:
        return VerifiedBase(base, self.registry.base_tensors(base.id))

    # ---- register ------------------------------------------------------------------------
    def register(self, path: str | Path, name: str, modality: str | None = None, task: str | None = None, *,
                 llm_prefix: str | None = None, base: str | None = None, actor: str | None = None,
                 max_relative_change: float = MAX_RELATIVE_CHANGE,
                 progress: Progress | None = None, update: bool = False, description: str = "",
                 tags: dict | None = None, reference: bool = False, codec: str = bitdelta.LOSSLESS) -> RegisterResult:
        """Record a fine-tuned checkpoint (or a peft LoRA adapter): its task vector, modality side and files.

        The same checkpoint registered again is recognised (``created=False``).
        ``reference=True`` keeps the checkpoint's path and per-tensor sha256
        instead of a copy of its task vector (see :mod:`mmer_cl.references`).
        ``update=True`` registers it as a new revision of entry ``name``: the old
        revision leaves the next expansion but stays in the versions that hold it; its modality and task
        carry over unless given. A name that is taken (without ``update``) is refused before the checkpoint
        is read, unless the entry came from the same path (then the same weights are recognised); weights
        already registered under another name are refused, naming that entry (exit 2).
        A checkpoint whose LLM differs from the base by more than
        ``max_relative_change`` (||tau|| / ||theta_0|| over the weight matrices) is refused as probably
        fine-tuned from another base. A failure leaves the store as it was.
        ``codec="bitdelta"`` stores the LLM delta as 1 bit per parameter and one scale per matrix instead
        (lossy; such an entry is served from its own delta and never merged: :mod:`mmer_cl.bitdelta_entries`).
        """
        validate_name(name, "entry name")
        validate_codec(codec, reference)
        for value, what in ((modality, "modality"), (task, "task")):
            if value is not None:
                validate_name(value, what)
        tags = validate_tags(tags)
        validate_description(description)
        if not (isinstance(max_relative_change, (int, float)) and math.isfinite(max_relative_change)
                and max_relative_change > 0):
            raise ConfigError(f"max_relative_change (--max-change) must be a finite number > 0, "
                              f"got {max_relative_change!r}")
        actor = validate_actor(actor) if actor else default_actor()
        base_rec = self.registry.base(base)
        modality, task = self._register_names(base_rec, path, name, modality, task, update)
        vbase = self._verified_base(base_rec)
        ckpt = open_checkpoint(path, fallback_base=base_rec.source_path)  # a directory or a peft LoRA adapter
        keymap = map_checkpoint(vbase.llm_shapes(), ckpt, llm_prefix)
        if reference and hasattr(ckpt, "task_vector"):
            raise StoreError(f"{path} is a LoRA adapter; register it without --reference (its stored update is "
                             "already small)")
        with self._lock(), self.blobs.batch() as batch:
            current = self.registry.version(base_rec.id)
            densities = sorted({MergeParams().density} | ({current.params["density"]} if current else set()))
            if codec == bitdelta.BITDELTA:
                densities = []  # never merged: no trims to cache
            with torch_single_threaded(), write_behind(batch.put) as put:  # blobs written as the next tensor computes
                refs, parts, stats, trims = self._ingest(ckpt, keymap, vbase, put, progress, densities, reference,
                                                         codec)
            fingerprint = checkpoint_fingerprint(parts)
            existing = self.registry.entry_by_fingerprint(base_rec.id, fingerprint)
            if existing is not None:
                batch.discard()  # e.g. task vectors of an entry registered by reference before: none are kept
                if existing.label != name:  # a second name would merge the same weights twice
                    raise StoreError(f"{path} is already registered as entry {existing.label!r} (revision "
                                     f"{existing.revision}, {existing.modality}/{existing.task}); use that name, "
                                     f"e.g. `mmer export --entry {existing.label} ...`, or register other weights")
                if existing.codec != codec:
                    raise StoreError(f"{path} is already registered as entry {existing.label!r} with codec "
                                     f"{existing.codec!r}; to store it as {codec!r} instead, remove that entry "
                                     f"(`mmer remove {existing.label}`) and register it again under a new name")
                return RegisterResult(existing, False, _summary(ckpt, keymap, base_rec, codec), _skipped_files(ckpt))
            if stats["relative_change"] > max_relative_change:
                raise KeyMappingError(
                    f"{path} differs from base {base_rec.name!r} by {stats['relative_change']:.2f} "
                    "(||theta - theta_0|| / ||theta_0|| over weight matrices; fine-tunes are usually below 0.1, "
                    f"the limit is {max_relative_change}). It was probably fine-tuned from another base; register "
                    "it in a store of that base, or raise max_relative_change (--max-change) if this is intended.")
            entry = self.registry.add_entry(base_rec.id, name, modality, task, str(Path(path).resolve()),
                                            fingerprint, keymap.to_json(), stats, refs, actor, trims, update=update,
                                            description=description, tags=tags, codec=codec)
        return RegisterResult(entry, True, _summary(ckpt, keymap, base_rec, codec), _skipped_files(ckpt))

    def _register_names(self, base_rec: BaseRecord, path: str | Path, name: str, modality: str | None,
                        task: str | None, update: bool) -> tuple[str, str]:
        """The modality and task of a registration, checked against the entry ``name`` before any checkpoint
        is read: a taken name needs ``update`` (unless the entry came from this very path, which may be the
        same weights again), an update needs the entry and inherits its modality and task."""
        try:
            known = self.registry.entry(base_rec.id, name)
        except RegistryError:
            known = None
        if update:
            if known is None:
                raise StoreError(f"no entry named {name!r} to update; register it without --update (with "
                                 "--modality)")
            return modality or known.modality, task or known.task
        if known is not None and Path(known.source_path) != Path(path).resolve():  # the registry's own refusal
            raise RegistryError(f"an entry named {name!r} already exists ({known.modality}/{known.task}, revision "
                             f"{known.revision}, from {known.source_path}); pass --update to register a new "
                             "revision of it, or choose another name (names stay taken after removal)")
        if modality is None:
            raise ConfigError("give the entry's modality: --modality vision (or audio, video, text, ...)")
        return modality, task or "default"

    def _put(self, put: Callable[[bytes], str], role: str, key: str, t: torch.Tensor) -> BlobRef:
        blob = encode(t)
        return BlobRef(role, key, put(blob), len(blob), t.numel() * t.element_size())

    def _ingest(self, ckpt: Checkpoint, keymap: KeyMap, vbase: VerifiedBase, put: Callable[[bytes], str],
                progress: Progress | None, densities: Sequence[float] = (), reference: bool = False,
                codec: str = bitdelta.LOSSLESS) -> tuple[list[BlobRef], list, dict, list]:
        refs: list[BlobRef] = []
        one_bit = bitdelta_entries.DeltaWriter(put) if codec == bitdelta.BITDELTA else None
        sources: dict[str, dict] = {}
        parts = []
        trims: list[Trim] = []
        sq_tau = sq_base = 0.0
        llm_params = own_params = ckpt_bytes = 0
        own_keys = set(keymap.own_keys())

        def read(key: str) -> tuple:
            """One tensor and its sha256 and, for an LLM tensor, its task vector (against the checked base
            tensor), trims and squared norms: computed a tensor ahead, on a second thread, while this one
            compresses and writes the previous tensor."""
            t = ckpt.get(key)
            digest = tensor_digest(t)
            base_key = keymap.llm.get(key)
            if base_key is None:
                return key, t, digest, None, [], (0.0, 0.0)
            b = vbase.get(base_key).to(self.device)
            # squared norms of matrices only: norm scales (often all ones) would mask a foreign base
            if hasattr(ckpt, "task_vector") and key not in keymap.resized:  # LoRA: the update as computed
                tau = ckpt.task_vector(key, b)
                squares = (sum_of_squares(tau), sum_of_squares(b)) if tau.dim() >= 2 else (0.0, 0.0)
            else:
                tau, sq_tau, sq_base = task_vector_and_squares(b, keymap.llm_part(key, t))
                squares = (sq_tau, sq_base) if tau.dim() >= 2 else (0.0, 0.0)
            found = [(density, trim_threshold(tau, density)) for density in densities]  # so expand need not
            return key, t, digest, tau, found, squares

        for step, (key, t, digest, tau, found, squares) in enumerate(prefetched(read(k) for k in keymap.order),
                                                                    start=1):
            raise_if_interrupted()
            info = ckpt.infos[key]
            parts.append((key, info.shape, info.dtype, digest))
            ckpt_bytes += t.numel() * t.element_size()
            base_key = keymap.llm.get(key)
            if base_key is not None:
                trims += [Trim(0, density, base_key, f.bits, f.ties) for density, f in found]
                sq_tau += squares[0]
                sq_base += squares[1]
                llm_params += tau.numel()
                if reference:
                    sources[base_key] = {"key": key, "sha256": parts[-1][3], "rows": keymap.resized.get(key)}
                elif one_bit is not None:
                    refs.append(one_bit.tensor(base_key, tau))
                else:
                    refs.append(self._put(put, "task_vector", base_key, tau))
            if key in own_keys:
                own = keymap.modality_part(key, t)
                own_params += own.numel()
                refs.append(self._put(put, "own", key, own))
            if progress:
                progress(step, len(keymap.order), key)
        for f in ckpt.aux_files():  # allow-listed regular files inside the checkpoint (mmer_cl.confinement)
            data = read_confined(f.parent, f)
            refs.append(BlobRef("aux", f.name, put(data), len(data), len(data)))
        if reference:
            data = json.dumps(sources, sort_keys=True).encode()
            refs.append(BlobRef("reference", "task_vectors", put(data), len(data), len(data)))
        if one_bit is not None:
            refs.append(one_bit.finish())
        stats = {"relative_change": math.sqrt(sq_tau / sq_base) if sq_base else 0.0, "llm_params": llm_params,
                 "own_params": own_params, "checkpoint_bytes": ckpt_bytes, "resized": keymap.resized,
                 "referenced": reference}
        return refs, parts, stats, trims

    # ---- expand / remove -----------------------------------------------------------------
    def expand(self, params: MergeParams | None = None, *, base: str | None = None, actor: str | None = None,
               progress: Progress | None = None, members: Sequence[str] | None = None, recipe: str | None = None,
               description: str = "", tags: dict | None = None, runner: GroupRunner | None = None,
               store_masks: bool = False) -> ExpandResult:
        """Merge every active entry (or the named ``members``) into a new version and move ``current`` to it.

        With ``ties`` and unchanged merge parameters, the merge folds only the
        entries new since the current version into its stored accumulators;
        every mask is recomputed. Parameters default to the current version's.
        ``recipe`` (YAML text, see :mod:`mmer_cl.recipe`), ``description`` and ``tags`` are stored with it.
        ``runner`` runs the tensor groups elsewhere (e.g.
        :class:`mmer_cl.distributed.ray_expand.RayRunner`); the version is
        committed here once every group has succeeded. ``mmer`` and ``emr`` masks are computed from each
        entry's task vector when read (see :mod:`mmer_cl.derived_masks`); ``store_masks`` writes them instead,
        as releases before 0.3 did.
        """
        base_rec = self.registry.base(base)
        tags = validate_tags(tags)
        validate_description(description)
        with self._lock():
            previous = self.registry.version(base_rec.id)
            params = params or (MergeParams.from_dict(previous.params) if previous else MergeParams())
            entries, one_bit = _merged_and_one_bit(self.registry.entries(base_rec.id))
            if not entries and one_bit:
                raise StoreError(f"nothing to merge: {', '.join(e.name for e in one_bit)} "
                                 f"{'is' if len(one_bit) == 1 else 'are'} stored as 1-bit deltas (--codec bitdelta), "
                                 "which are served without merging (`mmer export --entry NAME`); register a "
                                 "checkpoint without --codec to build a version")
            if not entries:
                raise StoreError("nothing to expand: no entries are registered; run `mmer register` first")
            if members is not None and set(members) & {e.name for e in one_bit}:
                raise StoreError(f"members {sorted(set(members) & {e.name for e in one_bit})} are stored as 1-bit "
                                 "deltas (--codec bitdelta) and are never merged; leave them out of --members")
            if members is not None:
                by_name = {e.name: e for e in entries}
                unknown = [m for m in members if m not in by_name]
                if unknown or not members:
                    raise StoreError(f"members {unknown or '[]'} are not active entries; active: "
                                     f"{', '.join(by_name)}")
                entries = [e for e in entries if e.name in set(members)]
            unknown = sorted(set(params.lam_per_entry) - {e.name for e in entries})
            if unknown:
                raise StoreError(f"per-entry lambda given for {', '.join(unknown)}, not among the members "
                                 f"({', '.join(e.name for e in entries)}); fix the names")
            if previous and [m.entry_id for m in previous.members] == [e.id for e in entries] \
                    and MergeParams.from_dict(previous.params) == params and not (recipe or description or tags):
                return ExpandResult(previous, False, False)
            return self._new_version(base_rec, entries, params, previous, actor or default_actor(), progress,
                                     recipe=recipe, description=description, tags=tags, runner=runner,
                                     store_masks=store_masks)

    def remove(self, name: str, *, base: str | None = None, actor: str | None = None,
               progress: Progress | None = None, runner: GroupRunner | None = None) -> VersionRecord | None:
        """Remove an entry: a new version without it (None when it was the last, or before any version).

        The new version holds exactly the current version's members less this one: an entry registered or
        updated since (pending its ``expand``) would enter it unasked, so then nothing is done and the
        message says to expand first. History stays.
        """
        base_rec = self.registry.base(base)
        actor = actor or default_actor()
        with self._lock():
            fault_point("remove.before")
            entry = self.registry.entry(base_rec.id, name)
            if not entry.active:
                raise StoreError(f"entry {name!r} was already removed")
            if entry.codec == bitdelta.BITDELTA:  # in no version: removed without re-merging anything
                self.registry.remove_entry(base_rec.id, name, actor)
                return self.registry.version(base_rec.id)
            rest, _ = _merged_and_one_bit(e for e in self.registry.entries(base_rec.id) if e.id != entry.id)
            previous = self.registry.version(base_rec.id)
            if not rest or previous is None:
                self.registry.remove_entry_without_version(base_rec.id, name, actor)
                return None
            held = {m.entry_id for m in previous.members}
            pending = [e for e in rest if e.id not in held]
            if pending:
                what = ", ".join(f"{e.label} revision {e.revision}" if e.revision > 1 else f"{e.label} (new)"
                                 for e in pending)
                raise StoreError(f"not removing {name!r}: the new version would also take in {what}, which the "
                                 f"current version {previous.number} does not hold. Run `mmer expand` first (it "
                                 f"makes a version with them), then `mmer remove {name}`")
            self._refuse_unreadable_references(name, rest)
            params = MergeParams.from_dict(previous.params) if previous else MergeParams()
            return self._new_version(base_rec, rest, params, previous, actor, progress, remove=name,
                                     runner=runner).version

    @staticmethod
    def _refuse_unreadable_references(name: str, rest: list[EntryRecord]) -> None:
        """Before any work: the remaining entries are merged again, so each one registered by reference must
        still be readable; name those that are not, and the way out (they can always be removed)."""
        gone: list[tuple[str, str]] = []
        for e in rest:
            if e.stats.get("referenced"):
                try:
                    Checkpoint(e.source_path)
                except MmerError as exc:
                    gone.append((e.label, str(exc)))
        if gone:
            named = "; ".join(f"{label!r} ({why})" for label, why in gone)
            raise StoreError(
                f"cannot remove {name!r} yet: the new version merges the remaining entries again, and entry "
                f"{named} was registered by reference and its checkpoint can no longer be read. Put it back at "
                f"its path, or remove it first (`mmer remove {gone[0][0]}`: that needs no source, and every "
                f"version so far still exports it), then remove {name!r}. Nothing was changed.")

    def _new_version(self, base_rec: BaseRecord, entries: list[EntryRecord], params: MergeParams,
                     previous: VersionRecord | None, actor: str, progress: Progress | None,
                     remove: str | None = None, runner: GroupRunner | None = None, store_masks: bool = False,
                     **annotations) -> ExpandResult:
        """Plan, run every tensor group (here, or through ``runner``), and commit
        (see :mod:`mmer_cl.expansion_plan`)."""
        started = time.perf_counter()
        plan = plan_expansion(self.registry, base_rec.id, entries, params, previous, self.blobs, store_masks)
        if runner is not None:  # a failure leaves only unreferenced blobs, which gc removes
            results = runner(self.blobs, plan, progress=progress)
            version = commit_expansion(self.registry, plan, results, actor, started, remove, **annotations)
            return ExpandResult(version, True, plan.incremental)
        with self.blobs.batch() as batch:
            results = run_plan(self.reader, batch.put, plan, self.device, progress)
            version = commit_expansion(self.registry, plan, results, actor, started, remove, **annotations)
        return ExpandResult(version, True, plan.incremental)

    # ---- versions ------------------------------------------------------------------------
    def entries(self, include_removed: bool = False, base: str | None = None) -> list[EntryRecord]:
        return self.registry.entries(self.registry.base(base).id, include_removed)

    def versions(self, base: str | None = None) -> list[VersionRecord]:
        return self.registry.versions(self.registry.base(base).id)

    def version(self, ref: int | str | None = None, base: str | None = None) -> VersionRecord:
        v = self.registry.version(self.registry.base(base).id, ref)
        if v is None:
            raise StoreError("no current version: run `mmer expand` after registering entries")
        return v

    def rollback(self, version: int | str, *, base: str | None = None, actor: str | None = None) -> tuple[str, str]:
        """Point ``current`` at an earlier (or later) version (``3``, ``"v3"`` or an alias); nothing is deleted."""
        base_rec = self.registry.base(base)
        with self._lock():
            fault_point("rollback.before")
            return self.registry.set_alias(base_rec.id, CURRENT, version, actor or default_actor())

    # ---- aliases, tags, descriptions (MLflow-style registry conventions) -------------------
    def set_alias(self, name: str, version: int | str, *, base: str | None = None,
                  actor: str | None = None) -> tuple[str, str]:
        """Point alias ``name`` (e.g. ``production``) at a version; ``current`` moves like :meth:`rollback`."""
        validate_alias(name)
        base_rec = self.registry.base(base)
        with self._lock():
            return self.registry.set_alias(base_rec.id, name, version, actor or default_actor())

    def remove_alias(self, name: str, *, base: str | None = None, actor: str | None = None) -> str:
        """Delete alias ``name`` (not ``current``); versions are untouched. Returns what it pointed at."""
        base_rec = self.registry.base(base)
        with self._lock():
            return self.registry.remove_alias(base_rec.id, name, actor or default_actor())

    def aliases(self, base: str | None = None) -> dict[str, int | None]:
        return self.registry.aliases(self.registry.base(base).id)

    def _target(self, entry: str | None, version: int | str | None, base: str | None) -> tuple[str, int, str]:
        if entry is not None and version is not None:
            raise StoreError("name either an entry or a version, not both")
        base_rec = self.registry.base(base)
        if entry is not None:
            e = self.registry.entry(base_rec.id, entry)
            return ENTRY, e.id, f"entry {e.name}"
        v = self.version(version, base)
        return VERSION, v.id, f"version {v.number}"

    def tag(self, tags: dict | None = None, *, remove: Sequence[str] = (), entry: str | None = None,
            version: int | str | None = None, base: str | None = None, actor: str | None = None) -> dict:
        """Set (and ``remove``) key=value tags on an entry or a version (default: current); returns them all."""
        kind, target_id, label = self._target(entry, version, base)
        with self._lock():
            return self.registry.set_tags(kind, target_id, label, validate_tags(tags), list(remove),
                                          actor or default_actor())

    def describe(self, text: str, *, entry: str | None = None, version: int | str | None = None,
                 base: str | None = None, actor: str | None = None) -> None:
        """Set the description of an entry or a version (default: current)."""
        validate_description(text)
        kind, target_id, label = self._target(entry, version, base)
        with self._lock():
            self.registry.set_description(kind, target_id, label, text, actor or default_actor())

    def show(self, version: int | str | None = None, base: str | None = None) -> dict:
        """One version in full: members, parameters, mask densities, sizes, recipe (see :mod:`mmer_cl.versions`)."""
        from mmer_cl.versions import show_version

        return show_version(self, self.version(version, base))

    def diff(self, a: int | str, b: int | str, base: str | None = None) -> dict:
        """What changed from version ``a`` to version ``b`` (see :mod:`mmer_cl.versions`)."""
        from mmer_cl.versions import diff_versions

        return diff_versions(self.show(a, base), self.show(b, base))

    def history(self, limit: int | None = None) -> list[EventRecord]:
        return self.registry.events(limit)

    # ---- export / load -------------------------------------------------------------------
    def bitdelta_entry(self, name: str, version: int | str | None = None, base: str | None = None
                       ) -> EntryRecord | None:
        """Entry ``name`` when it is served from its own 1-bit delta (see :mod:`mmer_cl.bitdelta_entries`):
        its newest revision is stored with codec ``bitdelta`` (it needs no expand, so it is served at once),
        unless a ``version`` is named that holds an earlier, merged revision of it."""
        base_rec = self.registry.base(base)
        try:
            entry = self.registry.entry(base_rec.id, name)
        except RegistryError:
            return None
        if entry.codec != bitdelta.BITDELTA:
            return None
        if version is None:
            return entry
        v = self.registry.version(base_rec.id, version)
        return entry if v is None or v.member(name) is None else None

    def _sources(self, name: str, version: int | str | None, base: str | None, use_mask: bool = True
                 ) -> tuple[KeyMap, Iterator[tuple[str, torch.Tensor]], dict[str, bytes], EntryRecord]:
        one_bit = self.bitdelta_entry(name, version, base)
        if one_bit is not None:
            return bitdelta_entries.sources(self, one_bit, base)
        base_rec = self.registry.base(base)
        v = self.version(version, base)
        member = v.member(name)
        if member is None:
            raise StoreError(f"entry {name!r} is not in version {v.number} (members: "
                             f"{', '.join(m.entry_name for m in v.members)}); name another version or entry")
        entry = self.registry.entry_by_id(member.entry_id)  # the revision this version holds
        keymap = KeyMap.from_json(entry.keymap)
        vbase = self._verified_base(base_rec)
        merged_refs = list(self.registry.version_blobs(v.id, "merged"))
        aux = {r.key: self.blobs.get(r.digest) for r in self.registry.entry_blobs(entry.id, "aux")}
        merged = self.blob_source(merged_refs)
        mask_refs = [r for r in self.registry.version_blobs(v.id, "mask") if r.entry_id == entry.id]
        if use_mask and not mask_refs and masks_derived(v.details):
            merged = read_once_for_two(merged)  # the derived mask reads it too
            tau = self._task_vector_source(base_rec, entry, self.reader)
            mask = self._derived_masks(v, member, tau, merged)
            sparse = self._sparse_source(merged_refs, None, derived=(tau, v, member))
        else:
            mask = self.blob_source(mask_refs) if use_mask else None
            sparse = self._sparse_source(merged_refs, mask_refs if use_mask else None)
        tensors = reconstructed_tensors(
            keymap, base=vbase.get, merged=merged, mask=mask,
            own=self.blob_source(self.registry.entry_blobs(entry.id, "own")),
            scale=member.scale if use_mask else 1.0, sparse=sparse)
        return keymap, tensors, aux, entry

    def _task_vector_source(self, base_rec: BaseRecord, entry: EntryRecord, reader: TensorReader) -> TensorSource:
        """The entry's task vector by base key, from its blobs (or rebuilt from its checkpoints if referenced)."""
        specs = task_vector_sources(self.registry, self.blobs, base_rec.id, entry)
        checkpoints: dict = {}
        return lambda key: task_vector_from_spec(reader, specs[key], torch.device("cpu"), checkpoints)

    def _derived_masks(self, v: VersionRecord, member, tau: TensorSource, merged: TensorSource) -> TensorSource:
        params = MergeParams.from_dict(v.params)
        return derived_mask_source(tau, merged, params.mask_rule, params.lam_for(member.entry_name))

    def _mask_source(self, v: VersionRecord, base_rec: BaseRecord, entry: EntryRecord, member,
                     reader: TensorReader, merged: TensorSource) -> TensorSource:
        """One member's masks by base key: stored blobs, or computed from its task vector and ``merged``."""
        digests = {r.key: r.digest for r in self.registry.version_blobs(v.id, "mask") if r.entry_id == entry.id}
        if not digests and masks_derived(v.details):
            return self._derived_masks(v, member, self._task_vector_source(base_rec, entry, reader), merged)
        return lambda key: reader.tensor(digests[key], key)

    def _protected(self) -> list[Protected]:
        """Paths no export may replace or contain: the store, every base and every entry's source."""
        found = [Protected(self.root, "the mmer store", inside=True)]
        db = identity.sqlite_path(self.registry.url)
        if db is not None:
            found.append(Protected(db.parent, "the directory of the store's registry", inside=db.parent == self.root))
        found += [Protected(Path(b.source_path), f"the base model {b.name!r}") for b in self.registry.bases()]
        for b in self.registry.bases():
            found += [Protected(Path(e.source_path), f"the source of entry {e.name!r}")
                      for e in self.registry.entries(b.id, include_removed=True)]
        return found

    def _guarded(self, out_dir: str | Path, overwrite: bool, version: VersionRecord, entry: str,
                 actor: str | None) -> dict:
        """Check the target, log the export (so gc knows where leftovers may be) and build its marker."""
        protected = self._protected()
        check_target(out_dir, overwrite, protected)
        target = str(Path(os.path.abspath(out_dir)))
        self.registry.record(actor or default_actor(), "export", target, f"v{version.number}", entry,
                             {"target": target, "version": version.number, "entry": entry})
        return {"marker": marker_bytes(store_id=self.store_id, version=version.number, entry=entry,
                                       version_created_at=version.created_at.isoformat()),
                "protected": protected}

    def export_targets(self) -> list[str]:
        """Every directory an export was ever started into (from the audit log)."""
        return sorted({e.details.get("target", e.subject) for e in self.registry.events() if e.action == "export"})

    def export(self, name: str, out_dir: str | Path, *, version: int | str | None = None, base: str | None = None,
               overwrite: bool = False, max_shard_bytes: int | None = None, use_mask: bool = True,
               progress: Progress | None = None, actor: str | None = None) -> Path:
        """Write entry ``name`` reconstructed from a version (default: current) as a checkpoint directory.

        Shards hold the same tensors as the registered checkpoint's unless ``max_shard_bytes`` is given.
        ``use_mask=False`` writes the whole merged LLM (``theta_0 + tau_*``) with the entry's own
        encoder instead: the plain-merge (NaiveMC-style) baseline. ``overwrite`` replaces only an earlier
        mmer export, never the store, a base or a registered source (see :mod:`mmer_cl.export_guard`).
        An entry stored as a 1-bit delta is written as ``base + its delta`` at every version (none need exist;
        ``use_mask`` does not apply): see :meth:`bitdelta_entry` and :mod:`mmer_cl.bitdelta_entries`.
        """
        one_bit = self.bitdelta_entry(name, version, base)
        if one_bit is not None:
            return bitdelta_entries.export(self, one_bit, out_dir, base=base, overwrite=overwrite,
                                           max_shard_bytes=max_shard_bytes, progress=progress,
                                           actor=actor or default_actor())
        v = self.version(version, base)
        keymap, tensors, aux, entry = self._sources(name, v.number, base, use_mask)
        meta, card = self._provenance(v.number, base, entry, use_mask, aux)
        with self._export_lock():
            guard = self._guarded(out_dir, overwrite, v, name, actor)
            return write_model(out_dir, tensors=tensors, aux_files={**aux, **card}, overwrite=overwrite,
                               progress=progress, metadata=meta, **layout_of(keymap, max_shard_bytes), **guard)

    def export_text(self, out_dir: str | Path, *, version: int | str | None = None, base: str | None = None,
                    overwrite: bool = False, max_shard_bytes: int | None = None,
                    progress: Progress | None = None, actor: str | None = None) -> Path:
        """Write the merged text-only LLM ``theta_0 + tau_*`` in the base's layout."""
        v = self.version(version, base)
        vbase = self._verified_base(self.registry.base(base))
        merged = self.blob_source(self.registry.version_blobs(v.id, "merged"))
        meta, card = self._provenance(v.number, base, None, False, [p.name for p in vbase.checkpoint.aux_files()])
        with self._export_lock():
            guard = self._guarded(out_dir, overwrite, v, "text", actor)
            return write_merged_llm(out_dir, vbase.checkpoint, vbase.get, merged, overwrite, max_shard_bytes,
                                    progress, metadata=meta, extra_files=card, **guard)

    def _provenance(self, version: int | str | None, base: str | None, entry: EntryRecord | None, use_mask: bool,
                    files) -> tuple[dict[str, str], dict[str, bytes]]:
        """safetensors metadata, the model card (``README.md``, or ``MMER_CARD.md`` beside a shipped one) and
        ``mmer-recipe.yaml``."""
        from mmer_cl.provenance import export_files, export_metadata

        v = self.version(version, base)
        b = self.registry.base(base)
        meta = export_metadata(version=v.number, params=v.params, base_name=b.name, base_fingerprint=b.fingerprint,
                               entry=entry.label if entry else None, revision=entry.revision if entry else None,
                               use_mask=use_mask, store_id=self.store_id)
        return meta, export_files(metadata=meta, version=v, base_model=b.name, entry=entry, files=files)

    def load(self, name: str, *, version: int | str | None = None, base: str | None = None,
             model_class=None, device: str | torch.device | None = None, use_mask: bool = True):
        """Reconstruct entry ``name`` in memory and return a ready transformers model (eval mode).

        The class comes from ``architectures`` in the entry's config.json unless
        ``model_class`` (a ``PreTrainedModel`` subclass) is given. Nothing is
        written to disk. ``use_mask=False`` gives the plain-merge baseline (see
        :meth:`export`).
        """
        import transformers

        keymap, tensors, aux, _ = self._sources(name, version, base, use_mask)
        if "config.json" not in aux:
            raise StoreError(f"entry {name!r} has no config.json; use export() and load it yourself")
        try:
            config_dict = json.loads(aux["config.json"])
            if not isinstance(config_dict, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"the config.json stored with entry {name!r} is not valid JSON ({exc}); export the "
                             "entry with `mmer export` and fix config.json there, or register a corrected "
                             "checkpoint under a new name") from None
        model_type = config_dict.pop("model_type", None)
        if model_class is not None and getattr(model_class, "config_class", None) is not None:
            config = model_class.config_class(**config_dict)
        else:
            try:
                config = transformers.AutoConfig.for_model(model_type, **config_dict)
            except (ValueError, KeyError) as exc:
                raise StoreError(
                    f"entry {name!r} is a {model_type!r} model, which transformers does not know; pass its class: "
                    f"Store.load({name!r}, model_class=YourModel) (a PreTrainedModel subclass), or import the "
                    "module that calls AutoConfig.register for it first. Or export() it and load it yourself."
                ) from exc
        if model_class is None:
            archs = getattr(config, "architectures", None) or []
            if not archs or not hasattr(transformers, archs[0]):
                raise StoreError(f"cannot tell the model class of {name!r} from its config; pass model_class")
            model_class = getattr(transformers, archs[0])
        state = {k: t for k, t in tensors}
        model = model_class.from_pretrained(None, config=config, state_dict=state)
        return model.to(device or self.device).eval()

    def compose(self, entries: Sequence[str] | None = None, version: int | str | None = None,
                text_params: str = "merged", *, text_only: str = "base", base: str | None = None,
                cache_bytes: int | None = None, use_mask: bool = True, progress: Progress | None = None):
        """One in-memory model serving several entries' modalities, mixed inputs included.

        Holds the base LLM once, the merged vector once, each entry's mask
        packed and each entry's own encoder and projector; see
        :class:`mmer_cl.compose.ComposedModel`. ``entries`` default to every
        member of the version; ``text_params`` ("base", "merged" or an entry
        name) is what text tokens of a mixed input run on, ``text_only`` what
        inputs without a modality run on (defaults measured: README,
        "Expansion"). ``use_mask=False``
        runs every modality on the whole merged LLM (the NaiveMC-style baseline).
        """
        from mmer_cl.compose import DEFAULT_CACHE_BYTES, EntrySource, build_composed
        from mmer_cl.compose.model import release_free_memory

        base_rec = self.registry.base(base)
        v = self.version(version, base)
        names = list(entries) if entries is not None else [m.entry_name for m in v.members]
        # a reader of its own, with a cache sized for one tensor's masks and merged map at a time (the build
        # reads tensor by tensor), dropped with the build: the store's reader keeps no decoded maps afterwards
        vbase = self._verified_base(base_rec)
        shapes = vbase.llm_shapes()
        largest = max((math.prod(sh) for sh in shapes.values()), default=0)
        reader = TensorReader(self.blobs, cache_bytes=largest + COMPOSE_READ_CACHE_BYTES)

        def blob_source(refs, reader: TensorReader = reader):
            digests = {r.key: r.digest for r in refs}
            return lambda key: reader.tensor(digests[key], key)

        merged_source = blob_source(self.registry.version_blobs(v.id, "merged"))
        sources = []
        for name in names:
            member = v.member(name)
            if member is None and self.bitdelta_entry(name, v.number, base) is not None:
                raise StoreError(f"entry {name!r} is stored as a 1-bit delta (--codec bitdelta): it is not part of "
                                 "the merge a composed model shares. Serve it on its own (`mmer export --entry "
                                 f"{name}`, Store.load({name!r})), or, to compose it, remove it (`mmer remove "
                                 f"{name}`), register its checkpoint again without --codec under a new name (names "
                                 "stay taken) and expand")
            if member is None:
                raise StoreError(f"entry {name!r} is not in version {v.number} (members: "
                                 f"{', '.join(m.entry_name for m in v.members)}); name another version or entry")
            entry = self.registry.entry_by_id(member.entry_id)  # the revision this version holds, not the newest
            aux = {r.key: r for r in self.registry.entry_blobs(entry.id, "aux")}
            if "config.json" not in aux:
                raise StoreError(f"entry {name!r} has no config.json; a composition needs each entry's config")
            masks = self._mask_source(v, base_rec, entry, member, reader, merged_source)
            sources.append(EntrySource(name, entry.modality, self.blobs.get(aux["config.json"].digest),
                                       KeyMap.from_json(entry.keymap),
                                       blob_source(self.registry.entry_blobs(entry.id, "own")), masks,
                                       member.scale))
        config = next((p for p in vbase.checkpoint.aux_files() if p.name == "config.json"), None)
        if config is None:
            raise StoreError(f"the base at {base_rec.source_path} has no config.json; a composition builds its LLM "
                             "from it")
        with jit.suspended():  # a serving process need not carry numba's LLVM (~130 MiB) for a one-off build
            composed = build_composed(config.read_text(), list(shapes), vbase.get,
                                      merged_source, sources,
                                      text_params=text_params, text_only=text_only, use_mask=use_mask,
                                      progress=progress,
                                      cache_bytes=DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes)
        del sources, reader, blob_source  # the build's reader and its decoded maps go now, not at the next gc
        release_free_memory()
        return composed

    # ---- maintenance ---------------------------------------------------------------------
    def audit(self, check_base: bool = False, progress: Progress | None = None) -> AuditReport:
        """Verify the database, every referenced blob and every row's references (and, optionally, the base).

        A damaged blob is reported with every owner, down to the tensor: ``version 3 mask of entry vision,
        tensor model.layers.0.q_proj.weight``.
        """
        database_problems = identity.database_problems(self.registry)
        described = manifests.check(self.registry, self.blobs)
        owners = self.registry.blob_owners(detailed=True)
        damaged = []
        for step, digest in enumerate(sorted(owners), start=1):
            problem = self.blobs.verify(digest)
            if problem:
                damaged.append(DamagedBlob(digest, problem, owners[digest]))
            if progress:
                progress(step, len(owners), digest[:12])
        base_problems = []
        if check_base:
            for b in self.registry.bases():
                try:
                    vbase = self._verified_base(b)
                    for name in vbase.tensors:
                        vbase.get(name)
                except MmerError as exc:
                    base_problems.append(str(exc))
                base_problems += self._check_references(b)
        live = manifests.reachable(self.registry, self.blobs) | set(owners)
        unreferenced = sum(1 for d in self.blobs.digests() if d not in live)
        return AuditReport(len(owners), damaged, self.registry.dangling_references(), base_problems, unreferenced,
                           database_problems, described.problems, described.undescribed)

    def _check_references(self, base: BaseRecord) -> list[str]:
        """Problems with the checkpoints that entries registered by reference point at."""
        problems, opened = [], {}
        for entry in self.registry.entries(base.id):
            if not entry.stats.get("referenced"):
                continue
            try:
                for spec in task_vector_sources(self.registry, self.blobs, base.id, entry).values():
                    read_task_vector(TensorReference.from_spec(spec), opened)
            except MmerError as exc:
                problems.append(f"entry {entry.name}: {exc}")
        return problems

    def gc(self, actor: str | None = None):
        """Delete blobs no manifest or row reaches and partial exports (left by crashes); logged in the audit trail.

        Refused unless the registry and the blob location carry the same store id (see
        :mod:`mmer_cl.identity`), so a lost or swapped registry can never make gc delete real data, and
        refused while the rows differ from their manifests (see :mod:`mmer_cl.manifests`). The partial
        directory of a running export is left alone (see :mod:`mmer_cl.export_guard`).
        """
        with self._lock():
            identity.verify(self.blobs, self.registry, self.store_id)
            keep = manifests.live_or_refuse(self.registry, self.blobs, identity.restore_advice(
                str(identity.sqlite_path(self.registry.url) or self.registry.url)))
            result = self.blobs.gc(keep)
            with no_export_running(self.registry.engine, self._export_lock_file(), self.store_id) as idle:
                partial = sum(remove_leftovers(t, 0.0 if idle else GRACE_SECONDS) for t in self.export_targets())
            result = dataclasses.replace(result, partial_exports=partial)
            self.registry.record(actor or default_actor(), "gc", "objects", "", f"-{result.removed} blobs",
                                 {"removed": result.removed, "freed_bytes": result.freed_bytes,
                                  "temp_files": result.temp_files, "partial_exports": partial})
        return result

    def report(self, version: int | str | None = None, base: str | None = None, ranks: Sequence[int] = (8, 16, 64),
               svd: bool = True, progress: Progress | None = None) -> dict:
        """Storage cost of a version against full copies and LoRA baselines (see :mod:`mmer_cl.report`)."""
        from mmer_cl.report import storage_report

        return storage_report(self, self.version(version, base), self.registry.base(base), ranks, svd, progress)


__all__ = ["AuditReport", "DamagedBlob", "ExpandResult", "RegisterResult", "Store", "StoreError", "RegistryError"]

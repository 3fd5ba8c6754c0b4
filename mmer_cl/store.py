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

import fcntl
import getpass
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from mmer_cl.accumulators import TiesAccumulator
from mmer_cl.checkpoint import Checkpoint
from mmer_cl.device import default_device
from mmer_cl.dtypes import is_float_code
from mmer_cl.errors import KeyMappingError, MmerError
from mmer_cl.expansion import expand_tensor
from mmer_cl.export import (Progress, TensorSource, layout_of, reconstructed_tensors, write_merged_llm,
                            write_model)
from mmer_cl.fingerprint import checkpoint_fingerprint, tensor_digest
from mmer_cl.keymap import KeyMap
from mmer_cl.masks import emr_rescale
from mmer_cl.names import validate_name
from mmer_cl.params import MergeParams
from mmer_cl.pipeline import map_checkpoint
from mmer_cl.task_vector import task_vector
from registry import (CURRENT, BaseRecord, BaseTensor, BlobRef, EntryRecord, EventRecord, Member, Registry,
                      RegistryError, VersionRecord, sqlite_url)
from storage import Batch, BlobStore, decode, encode

DB_NAME = "registry.db"
ACC_PARTS = ("pos_sum", "neg_sum", "pos_count", "neg_count")
MAX_RELATIVE_CHANGE = 0.5
ENV_ACTOR = "MMER_ACTOR"


class StoreError(MmerError):
    """The store cannot do what was asked; the message says what to do."""


def default_actor() -> str:
    try:
        return os.environ.get(ENV_ACTOR) or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class RegisterResult:
    entry: EntryRecord
    created: bool
    keymap_summary: str


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

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.dangling or self.base_problems)


def llm_shapes(tensors: Iterable[BaseTensor]) -> dict[str, tuple[int, ...]]:
    """Shapes of the base's float tensors, in base order: the ones merging works on."""
    return {t.name: t.shape for t in tensors if is_float_code(t.dtype)}


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


class Store:
    """A directory holding ``registry.db`` and ``objects/``; see the module docstring."""

    def __init__(self, root: str | Path, url: str | None = None, device: torch.device | None = None):
        self.root = Path(root)
        self.blobs = BlobStore(self.root)
        self.registry = Registry(url or sqlite_url(self.root / DB_NAME))
        self.device = device or default_device()

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, url: str | None = None, **kw) -> "Store":
        root = Path(root)
        if url is None and not (root / DB_NAME).exists():
            raise StoreError(f"no mmer store at {root}; create one with `mmer init --base PATH` "
                             "(or Store.init) or point --store / MMER_STORE at an existing one")
        return cls(root, url, **kw)

    @classmethod
    def init(cls, root: str | Path, base: str | Path, base_name: str | None = None, actor: str | None = None,
             url: str | None = None, progress: Progress | None = None, **kw) -> "Store":
        """Create a store (or add a base to one) and record the base model's fingerprint."""
        root = Path(root)
        base_name = validate_name(base_name or Path(base).resolve().name, "base name")
        ckpt = Checkpoint(base)
        tensors = []
        for i, (name, info) in enumerate(ckpt.infos.items(), start=1):
            t = ckpt.get(name)
            tensors.append(BaseTensor(name, info.shape, info.dtype, tensor_digest(t)))
            if progress:
                progress(i, len(ckpt.infos), name)
        fingerprint = checkpoint_fingerprint((t.name, t.shape, t.dtype, t.sha256) for t in tensors)
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, url, **kw)
        with store._lock():
            store.registry.add_base(base_name, str(Path(base).resolve()), fingerprint, tensors,
                                    actor or default_actor())
        return store

    def close(self) -> None:
        self.registry.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time per store (readers are never blocked)."""
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def base(self, name: str | None = None) -> BaseRecord:
        return self.registry.base(name)

    def blob_source(self, refs: Iterable[BlobRef]) -> TensorSource:
        """Tensors by key from blob rows, read (checksum-verified) and decoded on demand."""
        digests = {r.key: r.digest for r in refs}
        return lambda key: decode(self.blobs.get(digests[key]))

    def _verified_base(self, base: BaseRecord) -> VerifiedBase:
        return VerifiedBase(base, self.registry.base_tensors(base.id))

    # ---- register ------------------------------------------------------------------------
    def register(self, path: str | Path, name: str, modality: str, task: str = "default", *,
                 llm_prefix: str | None = None, base: str | None = None, actor: str | None = None,
                 max_relative_change: float = MAX_RELATIVE_CHANGE,
                 progress: Progress | None = None) -> RegisterResult:
        """Record a fine-tuned checkpoint: its task vector, modality side and files.

        The same checkpoint registered again is recognised (``created=False``).
        A checkpoint whose LLM differs from the base by more than
        ``max_relative_change`` (||tau|| / ||theta_0|| over the weight matrices) is refused as probably
        fine-tuned from another base. A failure leaves the store as it was.
        """
        validate_name(name, "entry name")
        validate_name(modality, "modality")
        validate_name(task, "task")
        actor = actor or default_actor()
        base_rec = self.registry.base(base)
        vbase = self._verified_base(base_rec)
        ckpt = Checkpoint(path)
        keymap = map_checkpoint(vbase.llm_shapes(), ckpt, llm_prefix)
        with self._lock(), self.blobs.batch() as batch:
            refs, parts, stats = self._ingest(ckpt, keymap, vbase, batch, progress)
            fingerprint = checkpoint_fingerprint(parts)
            existing = self.registry.entry_by_fingerprint(base_rec.id, fingerprint)
            if existing is not None:
                return RegisterResult(existing, False, keymap.describe())
            if stats["relative_change"] > max_relative_change:
                raise KeyMappingError(
                    f"{path} differs from base {base_rec.name!r} by {stats['relative_change']:.2f} "
                    "(||theta - theta_0|| / ||theta_0|| over weight matrices; fine-tunes are usually below 0.1, "
                    f"the limit is {max_relative_change}). It was probably fine-tuned from another base; register "
                    "it in a store of that base, or raise max_relative_change (--max-change) if this is intended.")
            entry = self.registry.add_entry(base_rec.id, name, modality, task, str(Path(path).resolve()),
                                            fingerprint, keymap.to_json(), stats, refs, actor)
        return RegisterResult(entry, True, keymap.describe())

    def _put(self, batch: Batch, role: str, key: str, t: torch.Tensor) -> BlobRef:
        blob = encode(t)
        return BlobRef(role, key, batch.put(blob), len(blob), t.numel() * t.element_size())

    def _ingest(self, ckpt: Checkpoint, keymap: KeyMap, vbase: VerifiedBase, batch: Batch,
                progress: Progress | None) -> tuple[list[BlobRef], list, dict]:
        refs: list[BlobRef] = []
        parts = []
        sq_tau = sq_base = 0.0
        llm_params = own_params = ckpt_bytes = 0
        own_keys = set(keymap.own_keys())
        for step, key in enumerate(keymap.order, start=1):
            t = ckpt.get(key)
            info = ckpt.infos[key]
            parts.append((key, info.shape, info.dtype, tensor_digest(t)))
            ckpt_bytes += t.numel() * t.element_size()
            base_key = keymap.llm.get(key)
            if base_key is not None:
                b = vbase.get(base_key).to(self.device)
                tau = task_vector(b, keymap.llm_part(key, t))
                if tau.dim() >= 2:  # matrices: norm scales (often all ones) would mask a foreign base
                    sq_tau += float(tau.square().sum())
                    sq_base += float(b.float().square().sum())
                llm_params += tau.numel()
                refs.append(self._put(batch, "task_vector", base_key, tau))
            if key in own_keys:
                own = keymap.modality_part(key, t)
                own_params += own.numel()
                refs.append(self._put(batch, "own", key, own))
            if progress:
                progress(step, len(keymap.order), key)
        for f in ckpt.aux_files():
            data = f.read_bytes()
            refs.append(BlobRef("aux", f.name, batch.put(data), len(data), len(data)))
        stats = {"relative_change": math.sqrt(sq_tau / sq_base) if sq_base else 0.0, "llm_params": llm_params,
                 "own_params": own_params, "checkpoint_bytes": ckpt_bytes, "resized": keymap.resized}
        return refs, parts, stats

    # ---- expand / remove -----------------------------------------------------------------
    def expand(self, params: MergeParams | None = None, *, base: str | None = None, actor: str | None = None,
               progress: Progress | None = None) -> ExpandResult:
        """Merge every active entry into a new version and move ``current`` to it.

        With ``ties`` and unchanged merge parameters, the merge folds only the
        entries new since the current version into its stored accumulators;
        every mask is recomputed. Parameters default to the current version's.
        """
        base_rec = self.registry.base(base)
        with self._lock():
            previous = self.registry.version(base_rec.id)
            params = params or (MergeParams.from_dict(previous.params) if previous else MergeParams())
            entries = self.registry.entries(base_rec.id)
            if not entries:
                raise StoreError("nothing to expand: no entries are registered; run `mmer register` first")
            if previous and [m.entry_id for m in previous.members] == [e.id for e in entries] \
                    and MergeParams.from_dict(previous.params) == params:
                return ExpandResult(previous, False, False)
            return self._new_version(base_rec, entries, params, previous, actor or default_actor(), progress)

    def remove(self, name: str, *, base: str | None = None, actor: str | None = None,
               progress: Progress | None = None) -> VersionRecord | None:
        """Remove an entry: a new version without it (None when it was the last). History stays."""
        base_rec = self.registry.base(base)
        actor = actor or default_actor()
        with self._lock():
            entry = self.registry.entry(base_rec.id, name)
            if not entry.active:
                raise StoreError(f"entry {name!r} was already removed")
            rest = [e for e in self.registry.entries(base_rec.id) if e.id != entry.id]
            previous = self.registry.version(base_rec.id)
            if not rest:
                self.registry.remove_entry_without_version(base_rec.id, name, actor)
                return None
            params = MergeParams.from_dict(previous.params) if previous else MergeParams()
            return self._new_version(base_rec, rest, params, None, actor, progress, remove=name).version

    def _new_version(self, base_rec: BaseRecord, entries: list[EntryRecord], params: MergeParams,
                     previous: VersionRecord | None, actor: str, progress: Progress | None,
                     remove: str | None = None) -> ExpandResult:
        start = time.perf_counter()
        prev_ids = [m.entry_id for m in previous.members] if previous else []
        entry_ids = {e.id for e in entries}
        incremental = bool(previous and params.incremental and prev_ids and set(prev_ids) <= entry_ids
                           and MergeParams.from_dict(previous.params).merge_key() == params.merge_key())
        if incremental:  # old members first, in their order: the accumulators already hold them
            by_id = {e.id: e for e in entries}
            entries = [by_id[i] for i in prev_ids] + [e for e in entries if e.id not in set(prev_ids)]
            acc = {p: self.blob_source(self.registry.version_blobs(previous.id, f"acc.{p}")) for p in ACC_PARTS}
        new_from = len(prev_ids) if incremental else 0
        tv = [self.blob_source(self.registry.entry_blobs(e.id, "task_vector")) for e in entries]
        keys = list(llm_shapes(self.registry.base_tensors(base_rec.id)))  # merging needs no base weights
        kept = [0] * len(entries)
        sums = [[0.0, 0.0] for _ in entries]
        total = 0
        refs: list[BlobRef] = []
        with self.blobs.batch() as batch:
            for step, key in enumerate(keys, start=1):
                taus = [source(key).to(self.device) for source in tv]
                prev_acc = None
                if incremental:
                    prev_acc = TiesAccumulator.from_dict({p: acc[p](key).to(self.device) for p in ACC_PARTS})
                result = expand_tensor(taus, params, tensor_name=key, previous=prev_acc, new_from=new_from)
                refs.append(self._put(batch, "merged", key, result.merged))
                if result.accumulator is not None:
                    for part, t in result.accumulator.to_dict().items():
                        refs.append(self._put(batch, f"acc.{part}", key, t))
                for i, (entry, mask) in enumerate(zip(entries, result.masks)):
                    ref = self._put(batch, "mask", key, mask)
                    refs.append(BlobRef(ref.role, ref.key, ref.digest, ref.stored_bytes, ref.raw_bytes, entry.id))
                    kept[i] += int(mask.sum())
                    sums[i][0] += result.abs_sums[i][0]
                    sums[i][1] += result.abs_sums[i][1]
                total += taus[0].numel()
                if progress:
                    progress(step, len(keys), key)
            members = [Member(e.id, e.name, i, emr_rescale(*sums[i]) if params.mask_rule == "emr" else 1.0,
                              kept[i] / max(total, 1)) for i, e in enumerate(entries)]
            merge_read = ([f"accumulators of v{previous.number}"] if incremental else []) + \
                [f"task vector of {e.name}" for e in entries[new_from:]]
            details = {"incremental": incremental, "merge_read": merge_read,
                       "new_entries": [e.name for e in entries[new_from:]] if incremental else [],
                       "seconds": round(time.perf_counter() - start, 3)}
            version = self.registry.add_version(base_rec.id, params.to_dict(), details, members, refs, actor,
                                                remove_entry=remove)
        return ExpandResult(version, True, incremental)

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

    def rollback(self, number: int, *, base: str | None = None, actor: str | None = None) -> tuple[str, str]:
        """Point ``current`` at an earlier (or later) version; nothing is deleted."""
        base_rec = self.registry.base(base)
        with self._lock():
            return self.registry.set_alias(base_rec.id, CURRENT, int(number), actor or default_actor())

    def history(self, limit: int | None = None) -> list[EventRecord]:
        return self.registry.events(limit)

    # ---- export / load -------------------------------------------------------------------
    def _sources(self, name: str, version: int | str | None, base: str | None, use_mask: bool = True
                 ) -> tuple[KeyMap, Iterator[tuple[str, torch.Tensor]], dict[str, bytes], EntryRecord]:
        base_rec = self.registry.base(base)
        v = self.version(version, base)
        member = v.member(name)
        if member is None:
            raise StoreError(f"entry {name!r} is not in version {v.number} (members: "
                             f"{', '.join(m.entry_name for m in v.members)}); name another version or entry")
        entry = self.registry.entry(base_rec.id, name)
        keymap = KeyMap.from_json(entry.keymap)
        vbase = self._verified_base(base_rec)
        masks = self.blob_source(r for r in self.registry.version_blobs(v.id, "mask") if r.entry_id == entry.id)
        aux = {r.key: self.blobs.get(r.digest) for r in self.registry.entry_blobs(entry.id, "aux")}
        tensors = reconstructed_tensors(
            keymap, base=vbase.get, merged=self.blob_source(self.registry.version_blobs(v.id, "merged")),
            mask=masks if use_mask else None, own=self.blob_source(self.registry.entry_blobs(entry.id, "own")),
            scale=member.scale if use_mask else 1.0)
        return keymap, tensors, aux, entry

    def export(self, name: str, out_dir: str | Path, *, version: int | str | None = None, base: str | None = None,
               overwrite: bool = False, max_shard_bytes: int | None = None, use_mask: bool = True,
               progress: Progress | None = None) -> Path:
        """Write entry ``name`` reconstructed from a version (default: current) as a checkpoint directory.

        Shards hold the same tensors as the registered checkpoint's unless ``max_shard_bytes`` is given.
        ``use_mask=False`` writes the whole merged LLM (``theta_0 + tau_*``) with the entry's own
        encoder instead: the plain-merge (NaiveMC-style) baseline.
        """
        keymap, tensors, aux, _ = self._sources(name, version, base, use_mask)
        return write_model(out_dir, tensors=tensors, aux_files=aux, overwrite=overwrite, progress=progress,
                           **layout_of(keymap, max_shard_bytes))

    def export_text(self, out_dir: str | Path, *, version: int | str | None = None, base: str | None = None,
                    overwrite: bool = False, max_shard_bytes: int | None = None,
                    progress: Progress | None = None) -> Path:
        """Write the merged text-only LLM ``theta_0 + tau_*`` in the base's layout."""
        v = self.version(version, base)
        vbase = self._verified_base(self.registry.base(base))
        merged = self.blob_source(self.registry.version_blobs(v.id, "merged"))
        return write_merged_llm(out_dir, vbase.checkpoint, vbase.get, merged, overwrite, max_shard_bytes, progress)

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
        config_dict = json.loads(aux["config.json"])
        model_type = config_dict.pop("model_type", None)
        if model_class is not None and getattr(model_class, "config_class", None) is not None:
            config = model_class.config_class(**config_dict)
        else:
            config = transformers.AutoConfig.for_model(model_type, **config_dict)
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

        base_rec = self.registry.base(base)
        v = self.version(version, base)
        names = list(entries) if entries is not None else [m.entry_name for m in v.members]
        sources = []
        for name in names:
            member = v.member(name)
            if member is None:
                raise StoreError(f"entry {name!r} is not in version {v.number} (members: "
                                 f"{', '.join(m.entry_name for m in v.members)}); name another version or entry")
            entry = self.registry.entry(base_rec.id, name)
            aux = {r.key: r for r in self.registry.entry_blobs(entry.id, "aux")}
            if "config.json" not in aux:
                raise StoreError(f"entry {name!r} has no config.json; a composition needs each entry's config")
            masks = self.blob_source(r for r in self.registry.version_blobs(v.id, "mask") if r.entry_id == entry.id)
            sources.append(EntrySource(name, entry.modality, self.blobs.get(aux["config.json"].digest),
                                       KeyMap.from_json(entry.keymap),
                                       self.blob_source(self.registry.entry_blobs(entry.id, "own")), masks,
                                       member.scale))
        vbase = self._verified_base(base_rec)
        config = next((p for p in vbase.checkpoint.aux_files() if p.name == "config.json"), None)
        if config is None:
            raise StoreError(f"the base at {base_rec.source_path} has no config.json; a composition builds its LLM "
                             "from it")
        return build_composed(config.read_text(), list(vbase.llm_shapes()), vbase.get,
                              self.blob_source(self.registry.version_blobs(v.id, "merged")), sources,
                              text_params=text_params, text_only=text_only, use_mask=use_mask, progress=progress,
                              cache_bytes=DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes)

    # ---- maintenance ---------------------------------------------------------------------
    def audit(self, check_base: bool = False, progress: Progress | None = None) -> AuditReport:
        """Verify every referenced blob and every row's references (and, optionally, the base)."""
        owners = self.registry.blob_owners()
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
        unreferenced = sum(1 for d in self.blobs.digests() if d not in owners)
        return AuditReport(len(owners), damaged, self.registry.dangling_references(), base_problems, unreferenced)

    def gc(self, actor: str | None = None):
        """Delete blobs no row references (left by crashes); logged in the audit trail."""
        with self._lock():
            result = self.blobs.gc(self.registry.blob_owners())
            self.registry.record(actor or default_actor(), "gc", "objects", "", f"-{result.removed} blobs",
                                 {"removed": result.removed, "freed_bytes": result.freed_bytes,
                                  "temp_files": result.temp_files})
        return result

    def report(self, version: int | str | None = None, base: str | None = None, ranks: Sequence[int] = (8, 16, 64),
               svd: bool = True, progress: Progress | None = None) -> dict:
        """Storage cost of a version against full copies and LoRA baselines (see :mod:`mmer_cl.report`)."""
        from mmer_cl.report import storage_report

        return storage_report(self, self.version(version, base), self.registry.base(base), ranks, svd, progress)


__all__ = ["AuditReport", "DamagedBlob", "ExpandResult", "RegisterResult", "Store", "StoreError", "RegistryError"]

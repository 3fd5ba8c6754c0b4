"""`Store.export`, `export_text`, `load` and `compose`: serving a version.

The methods of :class:`~mmer_cl.store.core.Store` for this verb, as a mixin class it inherits.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from mmer_cl.checkpoints.export import (Progress, TensorSource, layout_of, reconstructed_tensors, write_merged_llm,
                                        write_model)
from mmer_cl.checkpoints.export_guard import Protected, check_target, marker_bytes
from mmer_cl.checkpoints.keymap import KeyMap
from mmer_cl.method import bitdelta
from mmer_cl.method.params import MergeParams
from mmer_cl.method.reconstruct import SparseMerged
from mmer_cl.store import bitdelta_entries, identity
from mmer_cl.store.derived_masks import derived_mask_source, mask_at_nonzero, masks_derived, read_once_for_two
from mmer_cl.store.expansion_plan import task_vector_from_spec, task_vector_sources
from mmer_cl.store.records import COMPOSE_READ_CACHE_BYTES, StoreError, default_actor
from registry import BaseRecord, BlobRef, EntryRecord, RegistryError, VersionRecord
from storage import TensorReader, jit


class ExportMixin:
    """`Store.export`, `export_text`, `load` and `compose`: serving a version."""

    def _sparse_source(self, merged: list[BlobRef], masks: list[BlobRef] | None,
                       derived: tuple[TensorSource, str, float] | None = None
                       ) -> Callable[[str], SparseMerged | None]:
        """Merged tensors (with a mask, where ``masks`` are given, or computed where ``derived``, a
        (task vector source, mask rule, lambda), is) in the sparse form they are stored in: None for a key
        whose blobs are coded otherwise (against an earlier version), which then reads dense."""
        merged_digests = {r.key: r.digest for r in merged}
        mask_digests = {r.key: r.digest for r in masks} if masks is not None else None

        def read(key: str) -> SparseMerged | None:
            digest = merged_digests[key]
            if derived is not None:
                form = self.reader.sparse(digest)
                if form is None:
                    return None
                shape, bits, values = form
                tau, rule, lam = derived
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

    # ---- export / load -------------------------------------------------------------------
    def bitdelta_entry(self, name: str, version: int | str | None = None, base: str | None = None
                       ) -> EntryRecord | None:
        """Entry ``name`` when it is served from its own 1-bit delta (see :mod:`mmer_cl.store.bitdelta_entries`):
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
        mask_refs = self._stored_masks(v, entry)
        if use_mask and not mask_refs and masks_derived(v.details):
            merged = read_once_for_two(merged)  # the derived mask reads it too
            tau = self._task_vector_source(base_rec, entry, self.reader)
            rule, lam = self._mask_rule(v, member)
            mask = derived_mask_source(tau, merged, rule, lam)
            sparse = self._sparse_source(merged_refs, None, derived=(tau, rule, lam))
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

    def _stored_masks(self, v: VersionRecord, entry: EntryRecord) -> list[BlobRef]:
        """The entry's mask blobs in version ``v``: none where its masks are computed on read."""
        return [r for r in self.registry.version_blobs(v.id, "mask") if r.entry_id == entry.id]

    @staticmethod
    def _mask_rule(v: VersionRecord, member) -> tuple[str, float]:
        """The mask rule and the member's lambda that version ``v`` was expanded with."""
        params = MergeParams.from_dict(v.params)
        return params.mask_rule, params.lam_for(member.entry_name)

    def _mask_source(self, v: VersionRecord, base_rec: BaseRecord, entry: EntryRecord, member,
                     reader: TensorReader, merged: TensorSource) -> TensorSource:
        """One member's masks by base key: stored blobs, or computed from its task vector and ``merged``."""
        digests = {r.key: r.digest for r in self._stored_masks(v, entry)}
        if not digests and masks_derived(v.details):
            tau = self._task_vector_source(base_rec, entry, reader)
            return derived_mask_source(tau, merged, *self._mask_rule(v, member))
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
        mmer export, never the store, a base or a registered source (see :mod:`mmer_cl.checkpoints.export_guard`).
        An entry stored as a 1-bit delta is written as ``base + its delta`` at every version (none need exist;
        ``use_mask`` does not apply): see :meth:`bitdelta_entry` and :mod:`mmer_cl.store.bitdelta_entries`.
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
        from mmer_cl.store.provenance import export_files, export_metadata

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

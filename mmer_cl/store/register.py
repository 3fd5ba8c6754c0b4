"""`Store.register`: a fine-tuned checkpoint (or adapter) becomes an entry.

The methods of :class:`~mmer_cl.store.core.Store` for this verb, as a mixin class it inherits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.checkpoints.confinement import read_confined
from mmer_cl.checkpoints.export import Progress
from mmer_cl.checkpoints.keymap import KeyMap
from mmer_cl.checkpoints.lora import open_checkpoint
from mmer_cl.errors import ConfigError, KeyMappingError
from mmer_cl.method import bitdelta
from mmer_cl.method.merging import trim_threshold
from mmer_cl.method.params import MergeParams
from mmer_cl.method.task_vector import sum_of_squares, task_vector_and_squares
from mmer_cl.runtime.fingerprint import checkpoint_fingerprint, tensor_digest
from mmer_cl.runtime.interrupts import raise_if_interrupted
from mmer_cl.runtime.names import validate_actor, validate_name
from mmer_cl.runtime.prefetch import prefetched
from mmer_cl.runtime.threads import torch_single_threaded
from mmer_cl.runtime.write_behind import write_behind
from mmer_cl.store import bitdelta_entries
from mmer_cl.store.pipeline import map_checkpoint
from mmer_cl.store.records import (MAX_RELATIVE_CHANGE, RegisterResult, StoreError, VerifiedBase, _skipped_files,
                                   _summary, default_actor, validate_codec, validate_description, validate_tags)
from registry import BaseRecord, BlobRef, RegistryError, Trim
from storage import encode


class RegisterMixin:
    """`Store.register`: a fine-tuned checkpoint (or adapter) becomes an entry."""

    # ---- register ------------------------------------------------------------------------
    def register(self, path: str | Path, name: str, modality: str | None = None, task: str | None = None, *,
                 llm_prefix: str | None = None, base: str | None = None, actor: str | None = None,
                 max_relative_change: float = MAX_RELATIVE_CHANGE,
                 progress: Progress | None = None, update: bool = False, description: str = "",
                 tags: dict | None = None, reference: bool = False, codec: str = bitdelta.LOSSLESS) -> RegisterResult:
        """Record a fine-tuned checkpoint (or a peft LoRA adapter): its task vector, modality side and files.

        The same checkpoint registered again is recognised (``created=False``).
        ``reference=True`` keeps the checkpoint's path and per-tensor sha256
        instead of a copy of its task vector (see :mod:`mmer_cl.checkpoints.references`).
        ``update=True`` registers it as a new revision of entry ``name``: the old
        revision leaves the next expansion but stays in the versions that hold it; its modality and task
        carry over unless given. A name that is taken (without ``update``) is refused before the checkpoint
        is read, unless the entry came from the same path (then the same weights are recognised); weights
        already registered under another name are refused, naming that entry (exit 2).
        A checkpoint whose LLM differs from the base by more than
        ``max_relative_change`` (||tau|| / ||theta_0|| over the weight matrices) is refused as probably
        fine-tuned from another base. A failure leaves the store as it was.
        ``codec="bitdelta"`` stores the LLM delta as 1 bit per parameter and one scale per matrix instead
        (lossy; such an entry is served from its own delta and never merged: :mod:`mmer_cl.store.bitdelta_entries`).
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
        for f in ckpt.aux_files():  # allow-listed regular files inside the checkpoint (mmer_cl.checkpoints.confinement)
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

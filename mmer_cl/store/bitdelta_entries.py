"""Entries stored as 1-bit deltas (``mmer register --codec bitdelta``): their blobs, and serving them.

The math is :mod:`mmer_cl.method.bitdelta`. Such an entry keeps, besides its
modality side and files (stored as for every entry):

* ``bitdelta_signs``: one blob per matrix, its sign plane (a bool tensor in
  the ``bits`` codec: packed 8 to a byte, then zstd);
* ``bitdelta_exact``: one blob per other LLM tensor (1-D, tiny), its exact
  task vector, coded as lossless entries' task vectors are;
* ``bitdelta_scales``: one blob per entry (key ``scales``), canonical JSON
  ``{"codec": "bitdelta", "scales": {base tensor name: float32 value}}``.

It keeps no exact task vector: the codec is lossy, and such an entry can
never be merged. It takes no part in ``expand`` (it needs no merging), is
never a member of a version, and is served from its own delta whatever
version is current (or with none): ``export --entry NAME`` /
``Store.load(NAME)`` give ``theta_0 + tau_hat`` with its own encoder and
projector, bit for bit the same on every run. Only a version named
explicitly that holds an earlier, lossless revision of NAME serves that
revision instead (as ``--update`` keeps history). A removed 1-bit entry
still exports (nothing is deleted; ``mmer entries --all`` lists it). The
composed runtime shares one merge among its entries, so it refuses these
(see :meth:`mmer_cl.store.Store.compose`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from mmer_cl.method import bitdelta
from mmer_cl.errors import MmerError
from mmer_cl.checkpoints.export import Progress, TensorSource, layout_of, reconstructed_tensors, write_model
from mmer_cl.checkpoints.export_guard import check_target, marker_bytes
from mmer_cl.checkpoints.keymap import KeyMap
from registry import BlobRef, EntryRecord
from storage import encode

if TYPE_CHECKING:
    from mmer_cl.store import Store

ROLE_SIGNS = "bitdelta_signs"
ROLE_EXACT = "bitdelta_exact"
ROLE_SCALES = "bitdelta_scales"
ROLES = (ROLE_SIGNS, ROLE_EXACT, ROLE_SCALES)
RECONSTRUCTION = "base + scale * sign(tau) per matrix (1-bit delta, lossy); other tensors exact"


class DeltaWriter:
    """Writes one entry's 1-bit delta, tensor by tensor, then its scales (:meth:`finish`)."""

    def __init__(self, put: Callable[[bytes], str]):
        self.put = put
        self.scales: dict[str, float] = {}

    def tensor(self, key: str, tau: torch.Tensor) -> BlobRef:
        """The blob of one LLM tensor's task vector: its sign plane, or (1-D, tiny) the exact values."""
        if not bitdelta.takes_one_bit(tuple(tau.shape)):
            blob = encode(tau)
            return BlobRef(ROLE_EXACT, key, self.put(blob), len(blob), tau.numel() * tau.element_size())
        code = bitdelta.encode(tau)
        self.scales[key] = code.scale
        blob = encode(code.signs)
        return BlobRef(ROLE_SIGNS, key, self.put(blob), len(blob), math.ceil(tau.numel() / 8))

    def finish(self) -> BlobRef:
        data = json.dumps({"codec": bitdelta.BITDELTA, "scales": self.scales}, sort_keys=True,
                          separators=(",", ":")).encode()
        return BlobRef(ROLE_SCALES, "scales", self.put(data), len(data), len(data))


def delta_source(store: "Store", entry: EntryRecord) -> TensorSource:
    """``tau_hat`` by base tensor name: ``+-scale`` (float32) for a matrix, the exact task vector otherwise."""
    refs = store.registry.entry_blobs(entry.id)
    scale_refs = [r for r in refs if r.role == ROLE_SCALES]
    if len(scale_refs) != 1:
        raise MmerError(f"entry {entry.label!r} is recorded as a 1-bit delta but holds {len(scale_refs)} scale "
                        "blobs; run `mmer audit` and restore the registry from a backup")
    scales = json.loads(store.blobs.get(scale_refs[0].digest))["scales"]
    signs = {r.key: r.digest for r in refs if r.role == ROLE_SIGNS}
    exact = {r.key: r.digest for r in refs if r.role == ROLE_EXACT}

    def read(key: str) -> torch.Tensor:
        if key in signs:
            return bitdelta.decode(bitdelta.OneBit(store.reader.tensor(signs[key], key), float(scales[key])))
        return store.reader.tensor(exact[key], key)

    return read


def sources(store: "Store", entry: EntryRecord, base: str | None
            ) -> tuple[KeyMap, Iterator[tuple[str, torch.Tensor]], dict[str, bytes], EntryRecord]:
    """What :meth:`Store.export` / :meth:`Store.load` read for an entry served from its 1-bit delta: its key
    map, its tensors (``theta_0 + tau_hat`` for the LLM, its own side verbatim), its files, the entry."""
    keymap = KeyMap.from_json(entry.keymap)
    vbase = store._verified_base(store.registry.base(base))
    aux = {r.key: store.blobs.get(r.digest) for r in store.registry.entry_blobs(entry.id, "aux")}
    tensors = reconstructed_tensors(keymap, base=vbase.get, merged=delta_source(store, entry), mask=None,
                                    own=store.blob_source(store.registry.entry_blobs(entry.id, "own")))
    return keymap, tensors, aux, entry


def export_metadata(store: "Store", entry: EntryRecord, base: str | None) -> dict[str, str]:
    """The safetensors ``__metadata__`` of such an export (keys ``mmer.*``, as other exports have)."""
    from mmer_cl.store.provenance import PREFIX, mmer_version, store_format

    b = store.registry.base(base)
    meta = {"mmer_cl_version": mmer_version(), "store_format": str(store_format()), "base": b.name,
            "base_fingerprint": b.fingerprint, "entry": entry.label, "entry_revision": str(entry.revision),
            "codec": bitdelta.BITDELTA, "reconstruction": RECONSTRUCTION}
    if store.store_id:
        meta["store_id"] = store.store_id
    return {PREFIX + k: v for k, v in meta.items()}


def model_card(entry: EntryRecord, base_name: str, meta: dict[str, str]) -> str:
    lines = ["---", f"base_model: {base_name}", "library_name: transformers",
             f"tags: [mmer, bitdelta, {entry.modality}]", "---",
             f"# {entry.label} (1-bit delta, lossy)", "",
             f"Entry `{entry.label}` (revision {entry.revision}, modality {entry.modality}, task {entry.task}) "
             f"rebuilt by mmer-cl from its 1-bit delta over the base `{base_name}`: every LLM weight matrix is "
             "the base plus one scale times the sign of the fine-tune's change (BitDelta, training-free); 1-D "
             "and tiny tensors and the entry's own encoder and projector are exact. This is an approximation of "
             "the registered checkpoint, not a copy.", "", "## Provenance", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    return "\n".join(lines) + "\n"


def export(store: "Store", entry: EntryRecord, out_dir: str | Path, *, base: str | None, overwrite: bool,
           max_shard_bytes: int | None, progress: Progress | None, actor: str) -> Path:
    """Write the entry rebuilt from its 1-bit delta as a checkpoint directory, logged like other exports."""
    from mmer_cl.store.provenance import card_name

    keymap, tensors, aux, _ = sources(store, entry, base)
    meta = export_metadata(store, entry, base)
    card = {card_name(aux): model_card(entry, store.registry.base(base).name, meta).encode()}
    with store._export_lock():
        protected = store._protected()
        check_target(out_dir, overwrite, protected)
        target = str(Path(os.path.abspath(out_dir)))
        store.registry.record(actor, "export", target, bitdelta.BITDELTA, entry.label,
                              {"target": target, "version": None, "entry": entry.label, "codec": bitdelta.BITDELTA})
        marker = marker_bytes(store_id=store.store_id, version=None, entry=entry.label, codec=bitdelta.BITDELTA,
                              entry_revision=entry.revision)
        return write_model(out_dir, tensors=tensors, aux_files={**aux, **card}, overwrite=overwrite,
                           progress=progress, metadata=meta, marker=marker, protected=protected,
                           **layout_of(keymap, max_shard_bytes))


__all__ = ["DeltaWriter", "ROLES", "ROLE_EXACT", "ROLE_SCALES", "ROLE_SIGNS", "delta_source", "export", "sources"]

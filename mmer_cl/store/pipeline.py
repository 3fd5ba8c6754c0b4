"""The register-free path: merge checkpoints into a directory, export modalities from it.

``merge_checkpoints`` streams one base tensor at a time: it reads that tensor
from the base and from every fine-tuned checkpoint, computes the task vectors,
the merged vector and every mask, and writes them out before the next tensor.
Peak memory is about (number of models) x (largest tensor), not model size.

Layout of a merge directory::

    mmer.json                  parameters, base path, per-model key maps and scales
    merged/                    tau_* (working dtype), keyed by base tensor names
    masks/<name>/              one boolean mask per base tensor, per model
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.checkpoints.dtypes import CODES, DTYPES, refuse_unmergeable
from mmer_cl.method.precision import working_dtype
from mmer_cl.runtime.device import default_device
from mmer_cl.errors import ConfigError, MmerError
from mmer_cl.method.expansion import expand_tensor
from mmer_cl.checkpoints.export_guard import Protected, marker_bytes
from mmer_cl.checkpoints.export import Progress, layout_of, reconstructed_tensors, write_merged_llm, write_model
from mmer_cl.checkpoints.keymap import KeyMap, map_keys
from mmer_cl.method.masks import emr_rescale
from mmer_cl.runtime.names import validate_name
from mmer_cl.method.params import MergeParams
from mmer_cl.method.task_vector import task_vector
from mmer_cl.checkpoints.writer import ShardedWriter, TensorSpec, atomic_directory

MANIFEST = "mmer.json"
FORMAT = "mmer-cl-merge/1"
INTERNAL_SHARD_BYTES = 256 * 1024**2


@dataclass
class PreparedModel:
    """A fine-tuned checkpoint opened and mapped onto the base."""

    name: str
    checkpoint: Checkpoint
    keymap: KeyMap


def base_llm_shapes(base: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Shapes of the base's float tensors: the ones merging works on (8-bit floats are refused)."""
    refuse_unmergeable({n: i.dtype for n, i in base.infos.items() if i.is_float}, f"base {base.path}")
    return {n: i.shape for n, i in base.infos.items() if i.is_float}


def map_checkpoint(base_shapes: dict[str, tuple[int, ...]], ckpt: Checkpoint,
                   llm_prefix: str | None = None) -> KeyMap:
    """:func:`map_keys` for an opened checkpoint, recording dtypes, shapes and shard files for export."""
    keymap = map_keys(base_shapes, {n: i.shape for n, i in ckpt.infos.items()}, llm_prefix=llm_prefix,
                      ckpt_dtypes={n: i.dtype for n, i in ckpt.infos.items()})
    keymap.files = {n: i.file.name for n, i in ckpt.infos.items()}
    refuse_unmergeable({k: ckpt.infos[k].dtype for k in keymap.llm}, str(ckpt.path))
    return keymap


def prepare_model(base: Checkpoint, path: str | Path, name: str | None = None,
                  llm_prefix: str | None = None) -> PreparedModel:
    ckpt = Checkpoint(path)
    keymap = map_checkpoint(base_llm_shapes(base), ckpt, llm_prefix)
    return PreparedModel(validate_name(name or Path(path).name, "model name"), ckpt, keymap)


def read_task_vector(base_tensor: torch.Tensor, model: PreparedModel, ckpt_key: str) -> torch.Tensor:
    """``theta_i - theta_0`` for one tensor, the fine-tune's extra rows left out."""
    tuned = model.keymap.llm_part(ckpt_key, model.checkpoint.get(ckpt_key))
    return task_vector(base_tensor, tuned)


def merge_checkpoints(
    base_path: str | Path,
    model_paths: Sequence[str | Path],
    out_dir: str | Path,
    params: MergeParams | None = None,
    names: Sequence[str] | None = None,
    llm_prefix: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    device: torch.device | None = None,
) -> Path:
    """Merge fine-tuned checkpoints of one base and write merged vector + masks to ``out_dir``."""
    if not model_paths:
        raise ConfigError("merge_checkpoints needs at least one fine-tuned checkpoint")
    names = list(names) if names else [Path(p).name for p in model_paths]
    if len(set(names)) != len(names) or len(names) != len(model_paths):
        raise ConfigError(f"model names must be unique, one per checkpoint; got {names}")
    params = params or MergeParams()
    device = device or default_device()
    base = Checkpoint(base_path)
    models = [prepare_model(base, p, n, llm_prefix) for p, n in zip(model_paths, names)]
    lookups = [m.keymap.base_to_ckpt() for m in models]
    keys = list(base_llm_shapes(base))
    sums = [[0.0, 0.0] for _ in models]
    kept = [0 for _ in models]
    total = sum(base.infos[k].numel for k in keys)

    protected = [Protected(Path(base_path), "the base checkpoint"),
                 *(Protected(Path(p), "a fine-tuned checkpoint being merged") for p in model_paths)]
    with atomic_directory(out_dir, overwrite=overwrite, protected=protected,
                          marker=marker_bytes(merge_of=names)) as tmp:
        shapes = [(k, base.infos[k].shape) for k in keys]
        merged_specs = [TensorSpec(k, s, CODES[working_dtype(
            DTYPES[base.infos[k].dtype], *(DTYPES[m.checkpoint.infos[lk[k]].dtype] for m, lk in zip(models, lookups)))])
            for k, s in shapes]
        merged_writer = ShardedWriter(tmp / "merged", merged_specs, INTERNAL_SHARD_BYTES)
        mask_writers = [ShardedWriter(tmp / "masks" / m.name, [TensorSpec(k, s, "BOOL") for k, s in shapes],
                                      INTERNAL_SHARD_BYTES) for m in models]
        try:
            for step, key in enumerate(keys, start=1):
                base_tensor = base.get(key).to(device)
                taus = [read_task_vector(base_tensor, m, lk[key]) for m, lk in zip(models, lookups)]
                result = expand_tensor(taus, params, tensor_name=key)
                merged_writer.add(key, result.merged)
                for i, mask in enumerate(result.masks):
                    mask_writers[i].add(key, mask)
                    kept[i] += int(mask.sum())
                    sums[i][0] += result.abs_sums[i][0]
                    sums[i][1] += result.abs_sums[i][1]
                if progress:
                    progress(step, len(keys), key)
            for w in [merged_writer, *mask_writers]:
                w.finish()
        finally:
            for w in [merged_writer, *mask_writers]:
                w.abort()
        manifest = {
            "format": FORMAT,
            "base": str(Path(base_path).resolve()),
            "params": params.to_dict(),
            "models": [
                {"name": m.name, "path": str(m.checkpoint.path.resolve()), "keymap": json.loads(m.keymap.to_json()),
                 "scale": emr_rescale(*sums[i]) if params.mask_rule == "emr" else 1.0,
                 "mask_density": kept[i] / max(total, 1)}
                for i, m in enumerate(models)
            ],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


class MergeDirectory:
    """A merge directory opened for export."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            raise MmerError(f"{self.path} is not a merge directory (no {MANIFEST}); run merge_checkpoints first")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise MmerError(f"{manifest} has format {self.manifest.get('format')!r}; this mmer-cl reads {FORMAT}")
        self.params = MergeParams.from_dict(self.manifest["params"])
        self.base = Checkpoint(self.manifest["base"])
        self.merged = Checkpoint(self.path / "merged")

    def model_names(self) -> list[str]:
        return [m["name"] for m in self.manifest["models"]]

    def model(self, name: str) -> dict:
        for m in self.manifest["models"]:
            if m["name"] == name:
                return m
        raise MmerError(f"no model named {name!r} in {self.path}; it holds {self.model_names()}")


def export_modality(merge_dir: str | Path, name: str, out_dir: str | Path, overwrite: bool = False,
                    progress: Progress | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write model ``name`` reconstructed (``base + mask * merged``) in its own checkpoint layout.

    Shards hold the same tensors as the original's unless ``max_shard_bytes`` is given.
    """
    md = MergeDirectory(merge_dir)
    entry = md.model(name)
    keymap = KeyMap.from_json(json.dumps(entry["keymap"]))
    source = Checkpoint(entry["path"])
    masks = Checkpoint(md.path / "masks" / name)
    tensors = reconstructed_tensors(
        keymap, base=md.base.get, merged=md.merged.get, mask=masks.get,
        own=lambda k: keymap.modality_part(k, source.get(k)), scale=entry["scale"])
    aux = {p.name: p for p in source.aux_files()}
    return write_model(out_dir, tensors=tensors, aux_files=aux, overwrite=overwrite, progress=progress,
                       **layout_of(keymap, max_shard_bytes), protected=_merge_protected(md, source.path),
                       marker=marker_bytes(merge_dir=str(md.path), entry=name))


def _merge_protected(md: "MergeDirectory", *sources: Path) -> list[Protected]:
    return [Protected(md.path, "the merge directory", inside=True), Protected(md.base.path, "the base checkpoint"),
            *(Protected(Path(s), "a source checkpoint") for s in sources)]


def export_merged_llm(merge_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                      progress: Progress | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write the text-only merged LLM ``theta_0 + tau_*`` in the base's own layout."""
    md = MergeDirectory(merge_dir)
    return write_merged_llm(out_dir, md.base, md.base.get, md.merged.get, overwrite, max_shard_bytes, progress,
                            protected=_merge_protected(md), marker=marker_bytes(merge_dir=str(md.path), entry="text"))

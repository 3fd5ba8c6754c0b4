"""Turning a merged vector and a mask back into a runnable checkpoint.

The functions here take *sources* (callables from a tensor name to a tensor),
so the same code exports from a merge directory, from the store, or from
memory. Tensors flow one at a time from the sources to the writer.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.checkpoints.dtypes import DTYPES
from mmer_cl.checkpoints.export_guard import Protected
from mmer_cl.runtime.interrupts import raise_if_interrupted
from mmer_cl.checkpoints.keymap import KeyMap
from mmer_cl.runtime.prefetch import prefetched
from mmer_cl.method.reconstruct import SparseMerged, reconstruct, reconstruct_sparse
from mmer_cl.runtime.threads import torch_single_threaded
from mmer_cl.checkpoints.writer import DEFAULT_SHARD_BYTES, ShardedWriter, TensorSpec, atomic_directory

TensorSource = Callable[[str], torch.Tensor]
Progress = Callable[[int, int, str], None]
SparseSource = Callable[[str], "SparseMerged | None"]


def reconstructed_tensors(
    keymap: KeyMap,
    base: TensorSource,
    merged: TensorSource,
    mask: TensorSource | None,
    own: TensorSource,
    scale: float = 1.0,
    sparse: SparseSource | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(checkpoint key, tensor)`` in the checkpoint's own order and dtypes.

    LLM tensors are ``base + scale * mask * merged`` (``mask=None`` means take
    all of ``merged``); resized ones get their own extra rows appended;
    modality tensors come verbatim from ``own``. ``sparse``, where given,
    offers ``merged`` and the mask in the store's sparse form (None where it
    has none for a key): the same bits without building the dense tensors.
    """
    helper = ThreadPoolExecutor(2, thread_name_prefix="mmer-read")

    def read(key: str) -> tuple:
        base_key = keymap.llm.get(key)
        if base_key is None:
            return key, own(key), None, None
        b = helper.submit(base, base_key)  # reading and checking the base overlaps decoding the rest
        fast = sparse(base_key) if sparse is not None else None
        if fast is not None:
            return key, b.result(), fast, None
        mk = helper.submit(mask, base_key) if mask is not None else None  # a chain of its own: decoded beside
        m = merged(base_key)
        return key, b.result(), m, mk.result() if mk is not None else None

    with helper:
        yield from _reconstructed(prefetched(read(k) for k in keymap.order), keymap, own, scale)


def _reconstructed(inputs: Iterable[tuple], keymap: KeyMap, own: TensorSource, scale: float
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    for key, b, m, mk in inputs:  # decoding runs a tensor ahead
        if m is None:
            yield key, b
            continue
        dtype = DTYPES.get(keymap.dtypes.get(key, ""))
        if isinstance(m, SparseMerged):
            t = reconstruct_sparse(b, m, scale, dtype=dtype)
        else:
            mk = mk if mk is not None else torch.ones_like(m, dtype=torch.bool)
            t = reconstruct(b, mk, m, scale, dtype=dtype)
        if key in keymap.resized:
            t = torch.cat([t, own(key).to(t.device, t.dtype)])
        yield key, t


def identity_keymap(base: Checkpoint) -> KeyMap:
    """The base read as its own 'fine-tune': every float tensor is LLM, in base order."""
    llm = {n: n for n, i in base.infos.items() if i.is_float}
    return KeyMap(llm=llm, modality=[n for n in base.infos if n not in llm], order=list(base.infos),
                  dtypes={n: i.dtype for n, i in base.infos.items()},
                  shapes={n: list(i.shape) for n, i in base.infos.items()},
                  files={n: i.file.name for n, i in base.infos.items()})


def write_merged_llm(out_dir: str | Path, base: Checkpoint, base_source: TensorSource, merged: TensorSource,
                     overwrite: bool = False, max_shard_bytes: int | None = None,
                     progress: Progress | None = None, metadata: dict[str, str] | None = None,
                     extra_files: Mapping[str, bytes] | None = None, **guard) -> Path:
    """Write the text-only merged LLM ``theta_0 + tau_*`` in the base's own layout and files."""
    keymap = identity_keymap(base)
    tensors = reconstructed_tensors(keymap, base=base_source, merged=merged, mask=None, own=base_source)
    aux = {p.name: p for p in base.aux_files()}
    aux.update(extra_files or {})
    return write_model(out_dir, tensors=tensors, aux_files=aux, overwrite=overwrite, progress=progress,
                       metadata=metadata, **layout_of(keymap, max_shard_bytes), **guard)


def layout_of(keymap: KeyMap, max_shard_bytes: int | None) -> dict:
    """:func:`write_model` arguments: the original shard layout, unless a shard size is asked for."""
    groups = None if max_shard_bytes else keymap.shard_groups()
    return {"specs": keymap.specs(), "groups": groups, "max_shard_bytes": max_shard_bytes or DEFAULT_SHARD_BYTES}


def write_model(
    out_dir: str | Path,
    specs: Sequence[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    aux_files: Mapping[str, bytes | Path],
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    metadata: dict[str, str] | None = None,
    marker: bytes | None = None,
    protected: Sequence[Protected] = (),
) -> Path:
    """Write a Hugging Face style checkpoint directory atomically, one tensor at a time.

    ``specs`` lists every tensor in the order ``tensors`` yields them;
    ``groups`` (tensor names per shard) reproduces a known shard layout;
    ``aux_files`` maps file name -> bytes or a path to copy (config.json,
    tokenizer files, ...); ``metadata`` goes into every shard's safetensors header. ``marker`` and
    ``protected``: see :mod:`mmer_cl.checkpoints.export_guard`.
    """
    with torch_single_threaded(), \
            atomic_directory(out_dir, overwrite=overwrite, marker=marker, protected=protected) as tmp:
        for name, content in aux_files.items():
            target = tmp / Path(name).name
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
        writer = ShardedWriter(tmp, specs, max_shard_bytes, groups, metadata)
        try:
            for i, (name, tensor) in enumerate(prefetched(tensors), start=1):  # next one read meanwhile
                raise_if_interrupted()
                writer.add(name, tensor)
                if progress:
                    progress(i, len(specs), name)
            writer.finish()
        finally:
            writer.abort()
    return Path(out_dir)

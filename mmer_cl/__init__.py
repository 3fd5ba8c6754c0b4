"""mmer-cl: give an LLM new modalities over time, without training, by MMER.

The pure math lives in :mod:`mmer_cl.task_vector`, :mod:`mmer_cl.merging`,
:mod:`mmer_cl.accumulators`, :mod:`mmer_cl.masks` and
:mod:`mmer_cl.reconstruct`; checkpoint I/O in :mod:`mmer_cl.checkpoint`,
:mod:`mmer_cl.keymap` and :mod:`mmer_cl.writer`; the register-free path in
:mod:`mmer_cl.pipeline`.

The names below are imported on first use, so ``import mmer_cl`` (and the
``mmer`` command's start-up, e.g. ``mmer --help``) does not load torch.
"""

from __future__ import annotations

import importlib
import os

# Large tensors on transparent huge pages: PyTorch's CPU allocator reads this once, before its first
# allocation, so it only takes effect when mmer_cl is imported before torch. Every elementwise pass over a
# fresh 100 MB tensor then costs a fraction of the page faults (about 3x faster on the benchmark machine).
# Set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from mmer_cl.errors import CheckpointError, ConfigError, KeyMappingError, MmerError  # noqa: E402

__version__ = "0.2.0"

_LAZY = {
    "Checkpoint": "mmer_cl.checkpoint", "KeyMap": "mmer_cl.keymap", "map_keys": "mmer_cl.keymap",
    "MergeParams": "mmer_cl.params", "export_merged_llm": "mmer_cl.pipeline", "export_modality": "mmer_cl.pipeline",
    "merge_checkpoints": "mmer_cl.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmer_cl' has no attribute {name!r}")


__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "KeyMap", "KeyMappingError", "MergeParams",
    "MmerError", "export_merged_llm", "export_modality", "map_keys", "merge_checkpoints",
]

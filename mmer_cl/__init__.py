"""mmer-cl: give an LLM new modalities over time, without training, by MMER.

The packages, one concern each (each ``__init__`` says what it may import):

* :mod:`mmer_cl.method`: the paper's math, pure functions on tensors (task vectors, merging, masks, accumulators,
  fused kernels, reconstruction, :class:`MergeParams`);
* :mod:`mmer_cl.checkpoints`: reading, mapping and writing checkpoints and adapters;
* :mod:`mmer_cl.store`: the versioned :class:`Store`, one module per verb (register, expand, versions, export,
  audit, report), and the register-free path (:mod:`mmer_cl.store.pipeline`);
* :mod:`mmer_cl.compose`: one LLM serving every entry; :mod:`mmer_cl.distributed`: expansions on Ray;
  :mod:`mmer_cl.integrations`: the Trainer callback;
* :mod:`mmer_cl.cli`: the ``mmer`` command; :mod:`mmer_cl.runtime`: process plumbing (threads, Ctrl-C, faults).

The names below are imported on first use, so ``import mmer_cl`` (and the
``mmer`` command's start-up, e.g. ``mmer --help``) does not load torch. Old
module paths (``mmer_cl.merging``, ...) still import, with a DeprecationWarning,
until 0.4 (see :mod:`mmer_cl._moved`).
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

from mmer_cl import _moved  # noqa: E402

_moved.install()  # old module paths (mmer_cl.merging, ...) until 0.4

__version__ = "0.3.0"

_LAZY = {  # public name -> the module it is imported from on first use
    "Checkpoint": "mmer_cl.checkpoints.checkpoint",
    "export_merged_llm": "mmer_cl.store.pipeline",
    "export_modality": "mmer_cl.store.pipeline",
    "KeyMap": "mmer_cl.checkpoints.keymap",
    "map_keys": "mmer_cl.checkpoints.keymap",
    "merge_checkpoints": "mmer_cl.store.pipeline",
    "MergeParams": "mmer_cl.method.params",
    "Store": "mmer_cl.store",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmer_cl' has no attribute {name!r}")


__all__ = ["Store", 
    "Checkpoint", "CheckpointError", "ConfigError", "KeyMap", "KeyMappingError", "MergeParams",
    "MmerError", "export_merged_llm", "export_modality", "map_keys", "merge_checkpoints",
]

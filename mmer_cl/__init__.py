"""mmer-cl: give an LLM new modalities over time, without training, by MMER.

The pure math lives in :mod:`mmer_cl.task_vector`, :mod:`mmer_cl.merging`,
:mod:`mmer_cl.accumulators`, :mod:`mmer_cl.masks` and
:mod:`mmer_cl.reconstruct`; checkpoint I/O in :mod:`mmer_cl.checkpoint`,
:mod:`mmer_cl.keymap` and :mod:`mmer_cl.writer`; the register-free path in
:mod:`mmer_cl.pipeline`.
"""

from mmer_cl.checkpoint import Checkpoint
from mmer_cl.errors import CheckpointError, ConfigError, KeyMappingError, MmerError
from mmer_cl.keymap import KeyMap, map_keys
from mmer_cl.params import MergeParams
from mmer_cl.pipeline import export_merged_llm, export_modality, merge_checkpoints

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "KeyMap", "KeyMappingError", "MergeParams",
    "MmerError", "export_merged_llm", "export_modality", "map_keys", "merge_checkpoints",
]

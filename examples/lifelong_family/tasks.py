"""The lifelong family's entries, in their fixed order of arrival.

The first three are today's family (``mmer_family.tasks.TASKS``, the shipped
``examples/checkpoints/seed{s}`` fine-tunes); five more arrive after them.
"""

from __future__ import annotations

from functools import lru_cache

from lifelong_family import data
from mmer_family.tasks import TASKS as FAMILY_TASKS
from mmer_family.tasks import Task

NEW = {
    "tabular_cancer": Task("tabular_cancer", "tabular", "tumour: ", ("malignant", "benign"), data.cancer_splits,
                           (30,)),
    "timeseries_wave": Task("timeseries_wave", "timeseries", "wave: ", data.WAVES, data.waveform_splits,
                            (data.WAVE_LENGTH, 1)),
    "pointcloud_shape": Task("pointcloud_shape", "pointcloud", "shape: ", data.SHAPES, data.pointcloud_splits,
                             (data.POINTS, 3)),
    "video_digit": Task("video_digit", "video", "mostly: ", tuple(FAMILY_TASKS["vision_digit"].labels),
                        data.video_splits, (data.FRAMES, 64)),
    "vision_parity": Task("vision_parity", "vision", "parity: ", ("even", "odd"), data.parity_splits, (64,)),
}
TASKS: dict[str, Task] = {**FAMILY_TASKS, **NEW}
ORDER = ("vision_digit", "audio_digit", "audio_speaker", "tabular_cancer", "timeseries_wave", "pointcloud_shape",
         "video_digit", "vision_parity")
# the new entries' encoders are narrower (64) than today's (128): smaller checkpoints
ENCODER_HIDDEN = {name: 64 for name in NEW}


@lru_cache(maxsize=None)
def splits(name: str) -> dict:
    """The task's fixed train / val / test splits (generated once per process)."""
    return TASKS[name].splits()


def majority(name: str, split: str = "test") -> float:
    """The share of the most frequent label on a split (the best constant answer)."""
    y = splits(name)[split].y
    return float(y.bincount().max()) / len(y)

"""Merging streams tensors: peak memory follows the largest tensor, not the model size."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

import peak_memory  # noqa: E402


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_tensors():
    # Both sizes are past the allocator's warm-up (a few tensors); the larger model
    # is 5x the smaller (128 MiB more per checkpoint, three checkpoints read).
    small = peak_memory.measure(layers=8, tensor_mb=4, models=2)
    large = peak_memory.measure(layers=40, tensor_mb=4, models=2)
    growth = large["peak_above_baseline_mib"] - small["peak_above_baseline_mib"]
    extra_model_size = large["model_mib"] - small["model_mib"]
    assert growth < 0.25 * extra_model_size, (small, large)

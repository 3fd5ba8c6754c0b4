"""Streaming checkpoint writing: planned shards, Hugging Face names, nothing half-written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mmer_cl.errors import MmerError
from mmer_cl.checkpoints.writer import ShardedWriter, TensorSpec, atomic_directory, plan_shards

SPECS = [TensorSpec("a", (4, 4), "F32"), TensorSpec("b", (8,), "BF16"), TensorSpec("c", (3,), "BOOL"),
         TensorSpec("d", (), "I64")]
TENSORS = {"a": torch.arange(16.0).reshape(4, 4), "b": torch.linspace(-1, 1, 8).bfloat16(),
           "c": torch.tensor([True, False, True]), "d": torch.tensor(7)}


def write(directory, max_shard_bytes):
    w = ShardedWriter(directory, SPECS, max_shard_bytes)
    for spec in SPECS:
        w.add(spec.name, TENSORS[spec.name])
    return w.finish()


def test_plan_cuts_shards_at_the_byte_limit():
    assert [[s.name for s in shard] for shard in plan_shards(SPECS, 64)] == [["a"], ["b", "c", "d"]]
    assert len(plan_shards(SPECS, 10**9)) == 1


def test_single_shard_is_model_safetensors_and_reads_back_bit_exact(tmp_path):
    files = write(tmp_path, 10**9)
    assert [f.name for f in files] == ["model.safetensors"]
    loaded = load_file(str(files[0]))
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in TENSORS.items())


def test_several_shards_get_an_index_like_save_pretrained(tmp_path):
    files = write(tmp_path, 64)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": files[0].name, "b": files[1].name, "c": files[1].name, "d": files[1].name}
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in SPECS)
    assert torch.equal(load_file(str(files[1]))["b"], TENSORS["b"])


def test_writer_refuses_unplanned_order_shape_or_dtype(tmp_path):
    w = ShardedWriter(tmp_path, SPECS)
    with pytest.raises(MmerError, match="out of order"):
        w.add("b", TENSORS["b"])
    with pytest.raises(MmerError, match="planned as F32"):
        w.add("a", TENSORS["a"].double())
    w.add("a", TENSORS["a"])
    with pytest.raises(MmerError, match="incomplete"):
        w.finish()
    w.abort()


def test_atomic_directory_leaves_nothing_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []

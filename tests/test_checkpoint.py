"""Reading checkpoints lazily, and refusing what must not be read."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.errors import CheckpointError


def test_sharded_checkpoint_lists_every_tensor_from_headers(family):
    ckpt = Checkpoint(family / "vision")
    index = json.loads((family / "vision" / "model.safetensors.index.json").read_text())
    assert len(ckpt.files) > 1
    assert set(ckpt.names()) == set(index["weight_map"])
    info = ckpt.infos["language_model.lm_head.weight"]
    assert info.shape == (96, 32) and info.dtype == "F32"
    assert ckpt.get("language_model.lm_head.weight").shape == (96, 32)


def test_aux_files_are_the_non_weight_files(family):
    names = [p.name for p in Checkpoint(family / "vision").aux_files()]
    assert "config.json" in names
    assert not any(n.endswith(".safetensors") or n.endswith(".index.json") for n in names)


def test_single_file_checkpoint(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    assert Checkpoint(tmp_path).names() == ["a"]
    assert Checkpoint(tmp_path / "model.safetensors").get("a").tolist() == [1.0, 1.0]


def test_missing_shard_is_named(family, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(family / "vision", copy)
    victim = sorted(copy.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(copy)


def test_pickle_weights_are_refused_with_conversion_advice(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        Checkpoint(tmp_path / "pytorch_model.bin")


def test_nan_and_inf_are_refused_when_read(tmp_path):
    save_file({"w": torch.tensor([1.0, float("nan")]), "v": torch.tensor([float("inf")])},
              str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        ckpt.get("w")
    with pytest.raises(CheckpointError, match="v in"):
        ckpt.get("v")


def test_empty_or_absent_directories_say_what_is_expected(tmp_path):
    with pytest.raises(CheckpointError, match="no weights found"):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")


def test_damaged_file_is_reported(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        Checkpoint(tmp_path)

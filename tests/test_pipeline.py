"""The register-free path on tiny real transformers models: merge, export, reload, run."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

import builders
from mmer_cl import MergeParams, export_merged_llm, export_modality, merge_checkpoints
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.errors import KeyMappingError, MmerError


def logits(model_dir, inputs):
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**inputs).logits


def test_single_model_full_density_export_reproduces_the_model_exactly(family, tmp_path):
    merged = merge_checkpoints(family / "base", [family / "vision"], tmp_path / "merge",
                               MergeParams(density=1.0, alpha=1.0, lam=1.0))
    out = export_modality(merged, "vision", tmp_path / "vision-out")
    original, rebuilt = Checkpoint(family / "vision"), Checkpoint(out)
    assert rebuilt.names() == original.names()
    for name in original.names():
        assert torch.equal(rebuilt.get(name), original.get(name)), name
    inputs = builders.llava_inputs()
    assert torch.equal(logits(out, inputs), logits(family / "vision", inputs))


def test_two_fine_tunes_merge_and_each_modality_exports_and_runs(family, tmp_path):
    merge_dir = merge_checkpoints(family / "base", [family / "vision", family / "audio"], tmp_path / "merge")
    manifest = json.loads((merge_dir / "mmer.json").read_text())
    assert [m["name"] for m in manifest["models"]] == ["vision", "audio"]
    assert all(0 < m["mask_density"] < 1 for m in manifest["models"])
    inputs = builders.llava_inputs(seed=3)
    base = LlamaForCausalLM.from_pretrained(family / "base").eval()
    for name in ("vision", "audio"):
        out = export_modality(merge_dir, name, tmp_path / f"{name}-out")
        assert len(list(out.glob("model-*.safetensors"))) > 1, "exported sharded like the original"
        assert (out / "config.json").read_bytes() == (family / name / "config.json").read_bytes()
        rebuilt = logits(out, inputs)
        original = logits(family / name, inputs)
        assert torch.isfinite(rebuilt).all()
        # The reconstruction is closer to its own model than the base LLM is.
        with torch.no_grad():
            base_logits = LlavaForConditionalGeneration.from_pretrained(family / name).eval()
            base_logits.model.language_model.load_state_dict(base.model.state_dict())
            base_logits.lm_head.load_state_dict(base.lm_head.state_dict())
            from_base = base_logits(**inputs).logits
        assert (rebuilt - original).abs().mean() < (from_base - original).abs().mean()


def test_merged_text_llm_exports_in_the_base_layout(family, tmp_path):
    merge_dir = merge_checkpoints(family / "base", [family / "vision", family / "audio"], tmp_path / "merge",
                                  MergeParams(method="average"))
    out = export_merged_llm(merge_dir, tmp_path / "text")
    model = LlamaForCausalLM.from_pretrained(out).eval()
    base = Checkpoint(family / "base")
    vision, audio = Checkpoint(family / "vision"), Checkpoint(family / "audio")
    got = model.state_dict()["model.norm.weight"]
    want = (vision.get("language_model.model.norm.weight") + audio.get("language_model.model.norm.weight")) / 2
    assert torch.allclose(got, want, atol=1e-6)
    assert set(Checkpoint(out).names()) == set(base.names())


@pytest.mark.parametrize("rule", ["emr", "consensus"])
def test_other_mask_rules_export_runnable_models(family, tmp_path, rule):
    merge_dir = merge_checkpoints(family / "base", [family / "vision", family / "audio", family / "video"],
                                  tmp_path / "merge", MergeParams(mask_rule=rule, method="dare_ties"))
    scale = json.loads((merge_dir / "mmer.json").read_text())["models"][0]["scale"]
    assert (scale != 1.0) if rule == "emr" else (scale == 1.0)
    out = export_modality(merge_dir, "video", tmp_path / "video-out")
    assert torch.isfinite(logits(out, builders.llava_inputs())).all()


def test_resized_vocabulary_is_merged_on_base_rows_and_keeps_its_own(tmp_path):
    base = builders.save_base(tmp_path / "base")
    builders.save_llava(base, tmp_path / "grown", seed=5, extra_tokens=3)
    merge_dir = merge_checkpoints(tmp_path / "base", [tmp_path / "grown"], tmp_path / "merge",
                                  MergeParams(density=1.0))
    km = json.loads((merge_dir / "mmer.json").read_text())["models"][0]["keymap"]
    assert km["resized"] == {"language_model.lm_head.weight": 96, "language_model.model.embed_tokens.weight": 96}
    out = export_modality(merge_dir, "grown", tmp_path / "out")
    original, rebuilt = Checkpoint(tmp_path / "grown"), Checkpoint(out)
    for name in km["resized"]:
        assert torch.equal(rebuilt.get(name), original.get(name))


def test_bfloat16_models_export_in_bfloat16(tmp_path):
    base = builders.save_base(tmp_path / "base", dtype=torch.bfloat16)
    builders.save_llava(base, tmp_path / "ft", seed=4)
    merge_dir = merge_checkpoints(tmp_path / "base", [tmp_path / "ft"], tmp_path / "merge", MergeParams(density=1.0))
    out = export_modality(merge_dir, "ft", tmp_path / "out")
    original, rebuilt = Checkpoint(tmp_path / "ft"), Checkpoint(out)
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    assert rebuilt.infos[name].dtype == "BF16"
    assert torch.equal(rebuilt.get(name), original.get(name))


def test_fine_tune_of_another_base_is_refused(family, tmp_path):
    other = builders.save_base(tmp_path / "other", hidden=48)
    builders.save_llava(other, tmp_path / "foreign", seed=1)
    with pytest.raises(KeyMappingError, match="another base"):
        merge_checkpoints(family / "base", [tmp_path / "foreign"], tmp_path / "merge")
    assert not (tmp_path / "merge").exists(), "nothing half-written"


def test_export_refuses_to_overwrite_without_force_and_force_replaces_only_an_export(family, tmp_path):
    merge_dir = merge_checkpoints(family / "base", [family / "vision"], tmp_path / "merge")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(MmerError, match="already exists"):
        export_modality(merge_dir, "vision", target)
    with pytest.raises(MmerError, match="not written by mmer"):
        export_modality(merge_dir, "vision", target, overwrite=True)
    assert (target / "keep.txt").read_text() == "mine"
    export_modality(merge_dir, "vision", tmp_path / "out2")
    (tmp_path / "out2" / "stale.txt").write_text("from an earlier export")
    export_modality(merge_dir, "vision", tmp_path / "out2", overwrite=True)
    assert not (tmp_path / "out2" / "stale.txt").exists() and (tmp_path / "out2" / "config.json").exists()

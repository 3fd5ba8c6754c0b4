"""peft LoRA adapters register like checkpoints, and their export equals peft's own merge_and_unload.

Building an adapter needs peft (the `peft` extra); reading one does not.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

import builders
from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.errors import CheckpointError
from mmer_cl.checkpoints.lora import LoraCheckpoint, _loose, lora_delta, lora_scaling
from mmer_cl.store import Store

peft = pytest.importorskip("peft", reason="the peft extra is not installed (pip install -e '.[peft]' in a clone of mmer-cl)")

EXACT = MergeParams(density=1.0)  # one entry, nothing trimmed: the export must be the adapter merged


def perturb_lora_(model, seed: int) -> None:
    """peft initialises B to zero (a no-op update); give every LoRA factor and saved module a real value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)


def make_adapter(model, out, seed=0, **config):
    lora = peft.get_peft_model(model, peft.LoraConfig(**config))
    perturb_lora_(lora, seed)
    lora.save_pretrained(out)
    return lora


def assert_export_matches(exported, merged_model, atol=1e-6):
    """Every tensor of peft's merged model equals the export's (saved names may drop or move `model.`)."""
    ours = Checkpoint(exported)
    theirs = {_loose(k): v for k, v in merged_model.state_dict().items()}
    compared = 0
    for key in ours.names():
        if _loose(key) in theirs:
            t = ours.get(key)
            assert torch.allclose(t, theirs[_loose(key)].to(t.dtype), atol=atol, rtol=0), key
            compared += 1
    assert compared >= len(theirs) - 1  # everything (a tied lm_head may be saved once)


def register_export(tmp_path, base_dir, adapter_dir, name="lora"):
    with Store.init(tmp_path / "store", base_dir, actor="t") as store:
        result = store.register(adapter_dir, name, "text", "chat")
        store.expand(EXACT)
        return result, store.export(name, tmp_path / "export")


def test_llama_adapter_with_rank_and_alpha_patterns_exports_as_peft_merges_it(tmp_path):
    base = builders.save_base(tmp_path / "base")
    lora = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        rank_pattern={"up_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 3})
    (tmp_path / "adapter" / "tokenizer_config.json").write_text("{}")
    result, exported = register_export(tmp_path, tmp_path / "base", tmp_path / "adapter")
    assert result.created and "LLM tensors merged" in result.keymap_summary
    assert_export_matches(exported, lora.merge_and_unload())
    assert (exported / "config.json").exists() and (exported / "tokenizer_config.json").exists()
    assert not (exported / "adapter_config.json").exists()


def test_rslora_scaling_and_patterns_follow_peft():
    cfg = {"r": 8, "lora_alpha": 16, "use_rslora": True}
    assert lora_scaling(cfg, "model.layers.0.self_attn.q_proj") == (8, 16 / 8 ** 0.5)
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers.1.self_attn.q_proj": 2}}
    assert lora_scaling(cfg, "model.layers.0.self_attn.q_proj") == (4, 4.0)
    assert lora_scaling(cfg, "model.layers.1.self_attn.q_proj") == (4, 0.5)
    assert lora_scaling(cfg, "model.layers.1.self_attn.v_proj") == (8, 2.0)


def test_rslora_adapter_task_vector_is_exactly_the_float32_update(tmp_path):
    base = builders.save_base(tmp_path / "base")
    make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=6, use_rslora=True, target_modules=["o_proj"])
    ckpt = LoraCheckpoint(tmp_path / "adapter", fallback_base=tmp_path / "base")
    key = "model.layers.0.self_attn.o_proj.weight"
    base_w = Checkpoint(tmp_path / "base").get(key)
    adapter = {k: v for k, v in peft.utils.load_peft_weights(str(tmp_path / "adapter")).items()}
    a = adapter["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"]
    expected = (b @ a) * (6 / 2.0)
    tau = ckpt.task_vector(key, base_w)
    assert tau.dtype == torch.float64 and torch.equal(tau.float(), expected)
    untouched = "model.layers.0.self_attn.q_proj.weight"
    assert ckpt.delta(untouched) is None
    assert not ckpt.task_vector(untouched, Checkpoint(tmp_path / "base").get(untouched)).any()


def test_qwen2_adapter_with_modules_to_save(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "base")
    lora = make_adapter(model, tmp_path / "adapter", seed=3, r=2, lora_alpha=4,
                        target_modules=["q_proj", "k_proj", "gate_proj"], modules_to_save=["lm_head"])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    _, exported = register_export(tmp_path, tmp_path / "base", tmp_path / "adapter", "qwen")
    assert_export_matches(exported, lora.merge_and_unload())


def test_gpt2_conv1d_adapter_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
                    ).save_pretrained(tmp_path / "base")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    lora = make_adapter(model, tmp_path / "adapter", seed=5, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                        fan_in_fan_out=True)
    _, exported = register_export(tmp_path, tmp_path / "base", tmp_path / "adapter", "gpt2")
    assert_export_matches(exported, lora.merge_and_unload())


def test_adapter_on_a_multimodal_model_keeps_its_encoder_and_saved_projector(tmp_path):
    base = builders.save_base(tmp_path / "base")
    builders.save_llava(base, tmp_path / "llava", seed=1, shard="200KB")
    from transformers import LlavaForConditionalGeneration

    # The MLLM's LLM is the base itself, here: only the adapter changes the LLM.
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    with torch.no_grad():
        llava.model.language_model.load_state_dict(
            {k[len("model."):]: v for k, v in base.state_dict().items() if k.startswith("model.")})
        llava.lm_head.weight.copy_(base.lm_head.weight)
    llava.save_pretrained(tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    lora = make_adapter(llava, tmp_path / "adapter", seed=7, r=4, lora_alpha=4,
                        target_modules=r".*language_model.*\.(q_proj|v_proj)",
                        modules_to_save=["multi_modal_projector"])
    result, exported = register_export(tmp_path, tmp_path / "base", tmp_path / "adapter", "vision")
    assert result.entry.stats["own_params"] > 0  # the vision tower and the saved projector
    merged = lora.merge_and_unload()
    assert_export_matches(exported, merged)
    reloaded = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    with torch.no_grad():
        inputs = builders.llava_inputs()
        assert torch.allclose(reloaded(**inputs).logits, merged.eval()(**inputs).logits, atol=1e-5)


def test_unsupported_adapters_say_how_to_merge_them_with_peft(tmp_path):
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"pip install -e '\.\[peft\]'.*merge_and_unload"):
        LoraCheckpoint(tmp_path / "dora")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="never unpickles"):
        LoraCheckpoint(tmp_path / "pickled")


def test_an_adapter_for_another_model_is_refused_with_advice(tmp_path):
    builders.save_base(tmp_path / "base")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "base_model_name_or_path": "org/elsewhere"}))
    save_file({"base_model.model.model.blocks.0.attn.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.model.blocks.0.attn.lora_B.weight": torch.zeros(32, 2)},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="base_model_name_or_path"):
        LoraCheckpoint(tmp_path / "adapter", fallback_base=tmp_path / "base")


def test_lora_delta_layouts():
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    assert lora_delta(a, b, 0.5).shape == (3, 5)
    assert torch.equal(lora_delta(a, b, 0.5, fan_in_fan_out=True), (b @ a * 0.5).T)


def test_the_adapter_weights_file_alone_gets_a_hint_to_pass_the_directory(tmp_path):
    from mmer_cl.errors import KeyMappingError

    base = builders.save_base(tmp_path / "base")
    make_adapter(base, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    with Store.init(tmp_path / "store", tmp_path / "base") as store:
        with pytest.raises(KeyMappingError, match="adapter's directory"):
            store.register(tmp_path / "adapter" / "adapter_model.safetensors", "lora", "text")

"""Every kind of adapter peft saves either exports as peft merges it, bit for bit, or is refused with advice.

The reference is always peft's own ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``
on the base read back from disk; an export of a one-entry store with density 1 must hold exactly
the merged model's tensors (the same bits) and nothing else. Adapters are saved by the installed
peft from tiny local models. CorDA and LoftQ need calibration data or bitsandbytes to initialise;
their unconverted adapters are built by hand here: a plain adapter directory whose config names
that init, which is exactly how peft saves them (same keys, same config fields).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.errors import CheckpointError
from mmer_cl.checkpoints.lora import LoraCheckpoint
from mmer_cl.store import Store

peft = pytest.importorskip("peft", reason="the peft extra is not installed (pip install -e '.[peft]' in a clone of mmer-cl)")
transformers = pytest.importorskip("transformers")

EXACT = MergeParams(density=1.0)  # one entry, nothing trimmed: the export must be the adapter merged


# ---- tiny models ---------------------------------------------------------------------------
def llama(tie: bool = False, bias: bool = False, dtype: torch.dtype = torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                   attention_bias=bias, mlp_bias=bias)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=32,
                                                                n_layer=2, n_head=4))


def phi3():
    """Fused attention and MLP projections (``qkv_proj``, ``gate_up_proj``)."""
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0))


def gemma2():
    """Gemma-2: tied embeddings, soft-capped logits."""
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))


def save_model(build, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    build().save_pretrained(path)
    return path


def train_(model, seed: int) -> None:
    """peft initialises B to zero (a no-op update); give every trainable tensor a real value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def make_adapter(base_dir: Path, out: Path, config, seed: int = 1, **save) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    lora = peft.get_peft_model(model, config)
    train_(lora, seed)
    lora.save_pretrained(out, **save)
    return out


def peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """What peft's merged model saves: its state dict as save_pretrained writes it (tied tensors once)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    merged = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = adapter_dir.parent / f"{adapter_dir.name}-peft-merged"
    merged.save_pretrained(out)
    saved = Checkpoint(out)
    return {k: saved.get(k) for k in saved.names()}


def store_export(tmp_path: Path, base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    with Store.init(tmp_path / "store", base_dir, actor="t") as store:
        store.register(adapter_dir, "lora", "text", max_relative_change=1e9)
        store.expand(EXACT)
        exported = store.export("lora", tmp_path / "export")
    ckpt = Checkpoint(exported)
    return {k: ckpt.get(k) for k in ckpt.names()}


def assert_bit_for_bit(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)  # no tensor missing, none extra
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype, key
        difference = float((ours[key].double() - t.double()).abs().max())
        assert torch.equal(ours[key], t), f"{key}: max difference {difference}"


def changed(base_dir: Path, merged: dict[str, torch.Tensor]) -> set[str]:
    base = Checkpoint(base_dir)
    return {k for k in merged if not torch.equal(base.get(k), merged[k])}


# ---- LoRA kinds the store merges itself ------------------------------------------------------
L = peft.LoraConfig
EXPORTED = {
    # name: (model builder, adapter config, tensors peft's merge must change (a sample that proves the case))
    "embedding": (llama, lambda: L(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
                  {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}),
    "embedding only": (llama, lambda: L(r=4, lora_alpha=4, target_modules=["embed_tokens"]),
                       {"model.embed_tokens.weight"}),
    "tied embedding": (lambda: llama(tie=True), lambda: L(r=2, lora_alpha=4, target_modules=["embed_tokens"]),
                       {"model.embed_tokens.weight"}),
    "tied lm_head": (lambda: llama(tie=True), lambda: L(r=2, lora_alpha=4, target_modules=["lm_head"]),
                     {"model.embed_tokens.weight"}),
    "tied embedding and lm_head": (lambda: llama(tie=True),
                                   lambda: L(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "v_proj"]),
                                   {"model.embed_tokens.weight"}),
    "Gemma-2 tied embedding and lm_head": (gemma2, lambda: L(r=2, target_modules=["embed_tokens", "lm_head", "q_proj"]),
                                            {"model.embed_tokens.weight"}),
    "ensure_weight_tying": (lambda: llama(tie=True),
                            lambda: L(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True),
                            {"model.embed_tokens.weight"}),
    "modules_to_save, tied, ensure_weight_tying": (
        lambda: llama(tie=True),
        lambda: L(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True),
        {"model.embed_tokens.weight"}),
    "untied lm_head": (llama, lambda: L(r=2, lora_alpha=4, target_modules=["lm_head", "o_proj"]),
                       {"lm_head.weight"}),
    "bias none": (lambda: llama(bias=True), lambda: L(r=2, target_modules=["q_proj", "up_proj"], bias="none"),
                  {"model.layers.1.mlp.up_proj.weight"}),
    "bias all": (lambda: llama(bias=True), lambda: L(r=2, target_modules=["q_proj", "up_proj"], bias="all"),
                 {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
                  "model.layers.1.mlp.down_proj.bias"}),
    "bias lora_only": (lambda: llama(bias=True), lambda: L(r=2, target_modules=["q_proj"], bias="lora_only"),
                       {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.weight"}),
    "modules_to_save": (llama, lambda: L(r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "norm"]),
                        {"lm_head.weight", "model.norm.weight"}),
    "rank and alpha patterns, rslora": (
        llama, lambda: L(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                         rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 3}),
        {"model.layers.1.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"}),
    "layers_to_transform": (llama, lambda: L(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                             layers_pattern="layers"),
                            {"model.layers.1.self_attn.q_proj.weight"}),
    "fused qkv_proj and gate_up_proj": (phi3, lambda: L(r=2, target_modules=["qkv_proj", "gate_up_proj"]),
                                        {"model.layers.0.self_attn.qkv_proj.weight",
                                         "model.layers.1.mlp.gate_up_proj.weight"}),
    "Conv1D with fan_in_fan_out": (gpt2, lambda: L(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
                                   {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"}),
    "Conv1D, flag left off (peft sets it)": (gpt2, lambda: L(r=2, target_modules=["c_attn", "c_proj", "c_fc"]),
                                             {"transformer.h.0.attn.c_proj.weight",
                                              "transformer.h.1.mlp.c_fc.weight"}),
    "GPT-2 tied lm_head and wte": (gpt2, lambda: L(r=2, target_modules=["lm_head", "wte"]),
                                   {"transformer.wte.weight"}),
    "bfloat16 model": (lambda: llama(dtype=torch.bfloat16),
                       lambda: L(r=2, target_modules=["q_proj", "embed_tokens", "lm_head"]),
                       {"model.embed_tokens.weight", "lm_head.weight"}),
    "trainable_token_indices": (llama, lambda: L(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5]),
                                {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}),
    "trainable_token_indices per module": (
        llama, lambda: L(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5],
                                                                                  "lm_head": [2, 3]}),
        {"model.embed_tokens.weight", "lm_head.weight"}),
    "trainable_token_indices, tied": (lambda: llama(tie=True, dtype=torch.bfloat16),
                                      lambda: L(r=2, target_modules=["v_proj"], trainable_token_indices=[0, 7]),
                                      {"model.embed_tokens.weight"}),
    "trainable tokens (peft_type TRAINABLE_TOKENS), tied": (
        lambda: llama(tie=True), lambda: peft.TrainableTokensConfig(target_modules=["embed_tokens"],
                                                                    token_indices=[1, 2]),
        {"model.embed_tokens.weight"}),
    "eva init (loads as plain LoRA)": (llama, lambda: L(r=2, target_modules=["q_proj"], init_lora_weights="eva"),
                                       {"model.layers.0.self_attn.q_proj.weight"}),
}


@pytest.mark.parametrize("case", list(EXPORTED))
def test_adapter_exports_exactly_as_peft_merges_it(tmp_path, case):
    build, config, must_change = EXPORTED[case]
    base_dir = save_model(build, tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter", config())
    theirs = peft_merged(base_dir, adapter)
    assert must_change <= changed(base_dir, theirs)  # the case really changes those tensors
    assert_bit_for_bit(store_export(tmp_path, base_dir, adapter), theirs)


def residual_adapter(base_dir: Path, init: str):
    """A peft model initialised with PiSSA, OLoRA or CorDA (CorDA calibrated on a few random tokens)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    if init != "corda":
        return peft.get_peft_model(model, L(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=init))
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = L(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"], init_lora_weights="corda",
               corda_config=CordaConfig(corda_method="ipm"))
    ids = torch.randint(0, 48, (1, 16), generator=torch.Generator().manual_seed(0))
    preprocess_corda(model, config, run_model=lambda: model(ids))
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("init", ["pissa", "olora", "corda"])
def test_residual_inits_converted_on_save_export_exactly(tmp_path, init):
    """Saved with ``path_initial_model_for_weight_conversion``, PiSSA/OLoRA/CorDA are plain LoRA on the original
    base (peft doubles the rank); the export equals peft's merge of the converted adapter."""
    base_dir = save_model(llama, tmp_path / "base")
    lora = residual_adapter(base_dir, init)
    lora.save_pretrained(tmp_path / "initial")
    lora.peft_config["default"].init_lora_weights = True  # as peft's docs say, before training
    train_(lora, 3)
    lora.save_pretrained(tmp_path / "adapter", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 4
    theirs = peft_merged(base_dir, tmp_path / "adapter")
    assert_bit_for_bit(store_export(tmp_path, base_dir, tmp_path / "adapter"), theirs)


@pytest.mark.parametrize("init", ["pissa", "olora", "corda"])
def test_residual_inits_saved_unconverted_are_refused_with_how_to_convert(tmp_path, init):
    base_dir = save_model(llama, tmp_path / "base")
    lora = residual_adapter(base_dir, init)
    train_(lora, 3)
    lora.save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"residual base weight.*path_initial_model_for_weight_conversion"):
        LoraCheckpoint(tmp_path / "adapter", fallback_base=base_dir)
    with Store.init(tmp_path / "store", base_dir) as store:
        with pytest.raises(CheckpointError):
            store.register(tmp_path / "adapter", init, "text")
        assert store.entries() == []


# ---- refused, with the way to convert or merge -----------------------------------------------
@pytest.mark.parametrize("init", ["loftq", "lora_ga", "pissa_niter_4", "PiSSA"])
def test_other_residual_inits_unconverted_are_refused(tmp_path, init):
    """Built by hand: LoftQ needs bitsandbytes and LoRA-GA gradients to initialise; peft saves their factors as
    for any LoRA, with the init named in the config, which is what is written here (also fast-SVD PiSSA, and a
    name's case)."""
    base_dir = save_model(llama, tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter", L(r=2, target_modules=["q_proj"]))
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["init_lora_weights"] = init
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="path_initial_model_for_weight_conversion.*merge_and_unload"):
        LoraCheckpoint(adapter, fallback_base=base_dir)


REFUSED = {
    "DoRA": (llama, lambda: L(r=2, target_modules=["q_proj"], use_dora=True), "use_dora"),
    "lora_bias": (lambda: llama(bias=True), lambda: L(r=2, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
    "LoHa": (llama, lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"]), "peft_type LOHA"),
    "LoKr": (llama, lambda: peft.LoKrConfig(r=2, target_modules=["q_proj"]), "peft_type LOKR"),
    "IA3": (llama, lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "peft_type IA3"),
    "AdaLoRA": (llama, lambda: peft.AdaLoraConfig(r=2, target_modules=["q_proj"], total_step=10), "peft_type ADALORA"),
    "VeRA": (llama, lambda: peft.VeraConfig(r=2, target_modules=["q_proj", "v_proj"]), "peft_type VERA"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_kinds_mmer_does_not_compute_are_refused_with_the_peft_merge(tmp_path, case):
    build, config, named = REFUSED[case]
    base_dir = save_model(build, tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter", config())
    with pytest.raises(CheckpointError, match=named) as info:
        LoraCheckpoint(adapter, fallback_base=base_dir)
    assert "merge_and_unload().save_pretrained(out, safe_serialization=True)" in str(info.value)


def test_an_unknown_config_key_is_refused_by_name(tmp_path):
    base_dir = save_model(llama, tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter", L(r=2, target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["future_variant_config"] = {"strength": 2}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="future_variant_config"):
        LoraCheckpoint(adapter, fallback_base=base_dir)


def test_an_unknown_tensor_in_the_adapter_is_an_error_naming_it(tmp_path):
    base_dir = save_model(llama, tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter", L(r=2, target_modules=["q_proj"]))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude"] = torch.ones(32)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_proj\.lora_magnitude, which is neither a LoRA factor"):
        LoraCheckpoint(adapter, fallback_base=base_dir)


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_modules_to_save_of_a_tied_embedding_is_refused_not_dropped(tmp_path, module):
    """peft's merge unties a trained copy of a tied embedding: its merged model saves an lm_head the base lacks."""
    base_dir = save_model(lambda: llama(tie=True), tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter", L(r=2, target_modules=["q_proj"],
                                                             modules_to_save=[module]))
    assert "lm_head.weight" in peft_merged(base_dir, adapter) and "lm_head.weight" not in Checkpoint(base_dir)
    with pytest.raises(CheckpointError, match=f"trained copy of .*{module}.weight.*tie_word_embeddings=False"):
        LoraCheckpoint(adapter, fallback_base=base_dir)


def test_a_square_conv1d_update_is_transposed_whatever_the_saved_flag_says(tmp_path):
    """peft decides by the module (GPT-2's Conv1D stores (in x out)), not by fan_in_fan_out; c_proj is square,
    so the shape cannot tell either: the module's class does."""
    base_dir = save_model(gpt2, tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter", L(r=2, target_modules=["c_proj"], fan_in_fan_out=True))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    theirs = peft_merged(base_dir, adapter)
    assert "transformer.h.0.attn.c_proj.weight" in changed(base_dir, theirs)
    assert_bit_for_bit(store_export(tmp_path, base_dir, adapter), theirs)


def test_prompt_learning_adapters_are_refused_as_having_no_weights_to_merge(tmp_path):
    base_dir = save_model(llama, tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter",
                           peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(CheckpointError, match="PROMPT_TUNING adapter.*changes no weight"):
        LoraCheckpoint(adapter, fallback_base=base_dir)


def test_an_embedding_lora_over_a_vocabulary_grown_before_training(tmp_path):
    """peft saves the grown embedding and lm_head beside their LoRA factors; the export holds them merged, the
    base rows as part of the LLM and the new rows as the entry's own, bit for bit as peft merges them."""
    base_dir = save_model(llama, tmp_path / "base")

    def grown():
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(5)
        model.resize_token_embeddings(52)
        return model

    lora = peft.get_peft_model(grown(), L(r=2, target_modules=["embed_tokens", "lm_head", "q_proj"]))
    train_(lora, 4)
    lora.save_pretrained(tmp_path / "adapter")
    merged = peft.PeftModel.from_pretrained(grown(), str(tmp_path / "adapter")).merge_and_unload().state_dict()
    ours = store_export(tmp_path, base_dir, tmp_path / "adapter")
    assert ours["model.embed_tokens.weight"].shape == (52, 32)
    assert sorted(ours) == sorted(merged)
    assert all(torch.equal(ours[k], merged[k]) for k in merged)


def test_a_lora_and_trainable_tokens_on_one_embedding_are_refused(tmp_path):
    """Built by hand (peft does not make this pair): which one peft would merge first is not defined."""
    base_dir = save_model(llama, tmp_path / "base")
    adapter = make_adapter(base_dir, tmp_path / "adapter", L(r=2, target_modules=["embed_tokens"]))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.zeros(2, 32)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [1, 2]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="both a LoRA update and trainable tokens on model.embed_tokens.weight"):
        LoraCheckpoint(adapter, fallback_base=base_dir)


def test_llava_adapter_on_embeddings_lm_head_and_biases_exports_exactly(tmp_path):
    """peft names LLaVA's modules as transformers 5 builds them (``lm_head``, ``model.language_model.*``); the
    checkpoint saves them in the legacy layout (``language_model.lm_head``, ``language_model.model.*``)."""
    import builders

    base = builders.save_base(tmp_path / "base")
    builders.save_llava(base, tmp_path / "llava", seed=1)
    assert "language_model.lm_head.weight" in Checkpoint(tmp_path / "llava")
    llava = transformers.LlavaForConditionalGeneration
    lora = peft.get_peft_model(llava.from_pretrained(tmp_path / "llava"),
                               L(r=2, target_modules=r".*language_model.*\.(embed_tokens|q_proj)|lm_head", bias="all"))
    train_(lora, 2)
    lora.save_pretrained(tmp_path / "adapter")
    merged = peft.PeftModel.from_pretrained(llava.from_pretrained(tmp_path / "llava"), str(tmp_path / "adapter"))
    merged.merge_and_unload().save_pretrained(tmp_path / "merged")
    saved = Checkpoint(tmp_path / "merged")
    theirs = {k: saved.get(k) for k in saved.names()}
    assert {"language_model.lm_head.weight", "language_model.model.embed_tokens.weight"} <= changed(
        tmp_path / "llava", theirs)
    assert_bit_for_bit(store_export(tmp_path, tmp_path / "base", tmp_path / "adapter"), theirs)

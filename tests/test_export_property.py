"""Seeded random stores: random tiny models, random fine-tunes and peft adapters, every export against float64.

Each case draws a transformers class (Llama, Mistral, Qwen2, GPT-2, Gemma with tied embeddings), a dtype,
two or three entries (full fine-tunes touching random tensors, or peft LoRA adapters with random targets,
ranks, alphas and rslora) and merge parameters; registers and expands them in a store; and checks every
entry's export, tensor by tensor, against the method of docs/method.md computed here in
float64 from the entries' own weights:

    tau_i = theta_i - theta_0            (a LoRA entry: B @ A * scaling as peft computes it, in float32)
    hat_i = tau_i at the round(density * n) largest |tau_i| (at least 1), else 0
    tau_m = disjoint mean of the hat_i agreeing with sign(sum hat_i);  tau_* = alpha * tau_m
    m_i   = |tau_i| >= lambda * |tau_i - tau_*|;   export_i = theta_0 + m_i * tau_*

Which of several magnitudes tied at a trim threshold are kept is a rule of its own (docs/method.md); positions
where such a tie decides, or where the mask inequality is an equality within the working precision, are
left out of the comparison (they are counted, and must be rare), so the test holds whatever the tie rule.
An export must lie within half a unit in the last place of its dtype (plus the working precision's
rounding) of the float64 value.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.store import Store

peft = pytest.importorskip("peft", reason="the peft extra is not installed (pip install -e '.[peft]' in a clone of mmer-cl)")
transformers = pytest.importorskip("transformers")

FAST_SEEDS = range(4)
SLOW_SEEDS = range(4, 24)
PRECISION = {torch.float32: 24, torch.bfloat16: 8}  # significand bits
WORKING_EPS = {torch.float32: 2.0 ** -53, torch.bfloat16: 2.0 ** -24}  # the store's working dtype, per weight dtype


# ---- random models ---------------------------------------------------------------------------
def llama_like(cls_name: str, config_name: str, **extra):
    def build(rng: random.Random):
        heads = rng.choice([2, 4])
        cfg = getattr(transformers, config_name)(
            vocab_size=rng.choice([40, 56]), hidden_size=8 * heads, intermediate_size=rng.choice([24, 40]),
            num_hidden_layers=rng.choice([1, 2]), num_attention_heads=heads, num_key_value_heads=heads // 2,
            **extra)
        return getattr(transformers, cls_name)(cfg)
    return build


def gpt2(rng: random.Random):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=rng.choice([40, 56]), n_positions=16, n_embd=rng.choice([16, 32]), n_layer=rng.choice([1, 2]),
        n_head=4))


FAMILIES = {
    # name: (builder, LoRA target candidates)
    "llama": (llama_like("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=False),
              ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]),
    "mistral": (llama_like("MistralForCausalLM", "MistralConfig", tie_word_embeddings=False, head_dim=8),
                ["q_proj", "v_proj", "gate_proj", "embed_tokens"]),
    "qwen2": (llama_like("Qwen2ForCausalLM", "Qwen2Config", tie_word_embeddings=False),
              ["q_proj", "k_proj", "down_proj", "lm_head"]),
    "gemma (tied embeddings)": (llama_like("GemmaForCausalLM", "GemmaConfig", tie_word_embeddings=True, head_dim=8),
                                ["q_proj", "o_proj", "gate_proj", "embed_tokens"]),
    "gpt2 (Conv1D, tied)": (gpt2, ["c_attn", "c_proj", "c_fc"]),
}


def fine_tune_(model, rng: random.Random, gen: torch.Generator) -> None:
    """Change a random subset of tensors, each at a random subset of positions, by a random amount."""
    with torch.no_grad():
        for p in model.parameters():
            if rng.random() < 0.35:
                continue
            where = torch.rand(p.shape, generator=gen) < rng.choice([0.1, 0.5, 1.0])
            noise = torch.randn(p.shape, generator=gen) * rng.choice([1e-3, 1e-2, 3e-2])
            p.add_((noise * where).to(p.dtype))


def lora_config(rng: random.Random, targets: list[str]):
    chosen = rng.sample(targets, rng.randint(1, min(3, len(targets))))
    return peft.LoraConfig(r=rng.choice([1, 2, 4]), lora_alpha=rng.choice([1, 2, 8]), use_rslora=rng.random() < 0.3,
                           target_modules=chosen)


def train_adapter_(model, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))


# ---- the reference -------------------------------------------------------------------------
def lora_task_vectors(adapter: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B @ A * scaling of every adapted weight, in float32 as peft computes it (an embedding's rounded to the
    weight's dtype, as peft's embedding merge does), laid out like the weight."""
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in factors.items():
        for part, embedding in ((".lora_A.weight", False), (".lora_embedding_A", True)):
            if not key.endswith(part):
                continue
            module = key[len("base_model.model."):-len(part)]
            b = factors[key[:-len(part)] + part.replace("A", "B")]
            r = a.shape[0]
            scaling = config["lora_alpha"] / (math.sqrt(r) if config["use_rslora"] else r)
            delta = (b.float() @ a.float()) * scaling
            weight = base.get(f"{module}.weight")
            tied = weight is None  # lm_head of a tied model: the update lands on the input embedding
            name = next(k for k in base if k.endswith(("embed_tokens.weight", "wte.weight"))) if tied \
                else f"{module}.weight"
            if embedding or (config["fan_in_fan_out"] and not tied):  # peft sets the flag for Conv1D targets
                delta = delta.T
            if embedding and base[name].dtype != torch.float32:
                delta = delta.to(base[name].dtype).float()
            assert name not in out, "two updates of one tensor: not drawn by this test"
            out[name] = delta.double()
    return out


def trimmed(tau: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``hat`` (ties at the threshold kept) and where a tie at the threshold makes the rule decide."""
    flat = tau.abs().reshape(-1)
    k = min(flat.numel(), max(1, round(density * flat.numel())))
    threshold = flat.sort(descending=True).values[k - 1]
    mags = tau.abs()
    keep = mags >= threshold
    undecided = (mags == threshold) & (threshold > 0) & (int(keep.sum()) > k)
    return tau * keep, undecided


def reference(base: torch.Tensor, taus: list[torch.Tensor], params: MergeParams
              ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """float64 merged vector, each entry's mask, and the positions the comparison leaves out."""
    hats, undecided = zip(*(trimmed(t, params.density) for t in taus))
    stacked = torch.stack(hats)
    gamma = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == gamma) & (stacked != 0)
    merged = params.alpha * (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    eps = WORKING_EPS[base.dtype] * 8
    masks, skip = [], torch.stack(undecided).any(0)
    for tau in taus:
        lhs, rhs = tau.abs(), params.lam * (tau - merged).abs()
        masks.append(lhs >= rhs)
        skip |= ((lhs - rhs).abs() <= eps * (lhs + rhs)) & (merged != 0)  # equal within the working precision
    return merged, masks, skip


def assert_close_to_reference(exported: torch.Tensor, base: torch.Tensor, expected: torch.Tensor,
                              taus: list[torch.Tensor], skip: torch.Tensor, where: str) -> None:
    p = PRECISION[base.dtype]
    _, exponent = torch.frexp(expected)
    half_ulp = torch.ldexp(torch.ones_like(expected), exponent - p - 1)
    half_ulp = torch.where(expected == 0, torch.full_like(expected, 2.0 ** -149), half_ulp)
    slack = 8 * WORKING_EPS[base.dtype] * (base.double().abs() + sum(t.abs() for t in taus))
    err = (exported.double() - expected).abs()
    bad = (err > half_ulp + slack) & ~skip
    assert not bad.any(), (f"{where}: {int(bad.sum())} of {bad.numel()} values off, e.g. exported "
                           f"{float(exported.double()[bad][0])} vs float64 {float(expected[bad][0])}")


# ---- the property --------------------------------------------------------------------------
def run_case(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    family = rng.choice(sorted(FAMILIES))
    build, targets = FAMILIES[family]
    dtype = rng.choice([torch.float32, torch.bfloat16])
    torch.manual_seed(seed)
    build(rng).to(dtype).save_pretrained(tmp_path / "base")
    base_ckpt = Checkpoint(tmp_path / "base")
    base = {k: base_ckpt.get(k) for k in base_ckpt.names()}
    entries: dict[str, dict[str, torch.Tensor]] = {}  # name -> float64 task vector per base key
    for i in range(rng.choice([1, 2, 3])):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
        name = f"e{i}"
        if rng.random() < 0.5:
            lora = peft.get_peft_model(model, lora_config(rng, targets))
            train_adapter_(lora, gen)
            lora.save_pretrained(tmp_path / name)
            updates = lora_task_vectors(tmp_path / name, base)
            entries[name] = {k: updates.get(k, torch.zeros(v.shape, dtype=torch.float64)) for k, v in base.items()}
        else:
            fine_tune_(model, rng, gen)
            model.save_pretrained(tmp_path / name)
            tuned = Checkpoint(tmp_path / name)
            entries[name] = {k: tuned.get(k).double() - v.double() for k, v in base.items()}
    params = MergeParams(density=rng.choice([1.0, 0.37, 0.6, 0.83]), alpha=rng.choice([1.0, 0.6]),
                         lam=rng.choice([1.0, 0.7]))
    case = f"seed {seed}: {family}, {dtype}, {len(entries)} entries, {params.density=} {params.alpha=} {params.lam=}"
    with Store.init(tmp_path / "store", tmp_path / "base", actor="t") as store:
        for name in entries:
            store.register(tmp_path / name, name, "text", max_relative_change=1e9)
        store.expand(params)
        exports = {name: Checkpoint(store.export(name, tmp_path / f"export-{name}")) for name in entries}
    skipped = total = 0
    for key, theta0 in base.items():
        taus = [entries[name][key] for name in entries]
        merged, masks, skip = reference(theta0, taus, params)
        skipped, total = skipped + int(skip.sum()), total + skip.numel()
        for (name, exported), mask in zip(exports.items(), masks):
            expected = theta0.double() + mask * merged
            got = exported.get(key)
            assert got.dtype == theta0.dtype, f"{case}: {name} {key}"
            assert_close_to_reference(got, theta0, expected, taus, skip, f"{case}: {name} {key}")
    for name, exported in exports.items():
        assert sorted(exported.names()) == sorted(base), f"{case}: {name} exports other tensors than the base's"
    assert skipped <= 0.05 * total, f"{case}: {skipped} of {total} positions undecided"


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_random_stores_export_the_float64_reference(tmp_path, seed):
    run_case(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_more_random_stores_export_the_float64_reference(tmp_path, seed):
    run_case(seed, tmp_path)

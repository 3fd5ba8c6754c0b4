"""Tiny, random, local models for tests: a Llama base and LLaVA-style fine-tunes of it.

Nothing is downloaded. A "fine-tune" here is the base LLM plus a seeded
perturbation, wrapped with its own tiny CLIP vision tower and projector, and
saved sharded in the layout transformers writes for LLaVA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration)

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1


def llama_config(vocab: int = VOCAB, hidden: int = 32, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=False)


def save_base(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **cfg) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**cfg)).to(dtype)
    model.save_pretrained(path)
    return model


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.005) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.add_(noise.to(p.dtype))


def llava_from_base(base: LlamaForCausalLM, seed: int, extra_tokens: int = 0) -> LlavaForConditionalGeneration:
    """A LLaVA wrapper whose LLM starts as ``base`` (vocabulary grown by ``extra_tokens``), then perturbed."""
    torch.manual_seed(1000 + seed)
    text_cfg = llama_config(vocab=base.config.vocab_size + extra_tokens, hidden=base.config.hidden_size,
                            layers=base.config.num_hidden_layers)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4, projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).to(base.dtype)
    lm_state = {k[len("model."):]: v for k, v in base.state_dict().items() if k.startswith("model.")}
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            p[: lm_state[name].shape[0]].copy_(lm_state[name])
        model.lm_head.weight[: base.config.vocab_size].copy_(base.lm_head.weight)
    perturb_(model.model.language_model, seed)
    perturb_(model.lm_head, seed + 1)
    return model


def save_llava(base: LlamaForCausalLM, path: Path, seed: int, extra_tokens: int = 0,
               shard: str = "20KB") -> LlavaForConditionalGeneration:
    model = llava_from_base(base, seed, extra_tokens)
    model.save_pretrained(path, max_shard_size=shard)
    return model


def llava_inputs(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    """Token ids with 4 image tokens (an 8x8 image in 4x4 patches) and pixel values."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, IMAGE_TOKEN - 1, (batch, 6), generator=gen)
    image = torch.full((batch, 4), IMAGE_TOKEN)
    return {"input_ids": torch.cat([text[:, :2], image, text[:, 2:]], dim=1),
            "pixel_values": torch.randn(batch, 3, 8, 8, generator=gen)}

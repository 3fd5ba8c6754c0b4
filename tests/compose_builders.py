"""Tiny random models of transformers' own classes sharing one Qwen2 base: LLaVA (vision) and Qwen2-Audio.

Nothing is downloaded. The fine-tunes copy the base LLM into the wrapper's
language model and perturb it, as builders.py does for the Llama family.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2AudioConfig,
                          Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM)

from builders import perturb_

VOCAB = 100
IMAGE_TOKEN = 98
AUDIO_TOKEN = 99
MELS, MEL_FRAMES = 8, 16  # -> 4 audio tokens


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def save_qwen2_base(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config()).to(dtype)
    model.save_pretrained(path)
    return model


def _copy_llm(base: Qwen2ForCausalLM, model, seed: int) -> None:
    lm_state = {k[len("model."):]: v for k, v in base.state_dict().items() if k.startswith("model.")}
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            p.copy_(lm_state[name])
        model.lm_head.weight.copy_(base.lm_head.weight)
    perturb_(model.model.language_model, seed)
    perturb_(model.lm_head, seed + 1)


def save_llava_qwen2(base: Qwen2ForCausalLM, path: Path, seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(2000 + seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4, projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=qwen2_config(), image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).to(base.dtype)
    _copy_llm(base, model, seed)
    model.save_pretrained(path, max_shard_size="20KB")
    return model


def save_qwen2_audio(base: Qwen2ForCausalLM, path: Path, seed: int) -> Qwen2AudioForConditionalGeneration:
    torch.manual_seed(3000 + seed)
    audio = Qwen2AudioEncoderConfig(num_mel_bins=MELS, encoder_layers=1, encoder_attention_heads=2,
                                    encoder_ffn_dim=32, d_model=16, max_source_positions=MEL_FRAMES // 2)
    cfg = Qwen2AudioConfig(audio_config=audio, text_config=qwen2_config(), audio_token_index=AUDIO_TOKEN)
    model = Qwen2AudioForConditionalGeneration(cfg).to(base.dtype)
    _copy_llm(base, model, seed)
    model.save_pretrained(path)
    return model


def image_inputs(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=gen)}


def audio_inputs(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    return {"input_features": torch.randn(batch, MELS, MEL_FRAMES, generator=gen),
            "feature_attention_mask": torch.ones(batch, MEL_FRAMES, dtype=torch.long)}


def text_ids(seed: int, batch: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(200 + seed)
    return torch.randint(3, IMAGE_TOKEN - 1, (batch, n), generator=gen)


def ids_with(*parts) -> torch.Tensor:
    """Concatenate id blocks: tensors, or ('image', batch) / ('audio', batch) placeholder runs of 4 tokens."""
    blocks = []
    for p in parts:
        if isinstance(p, tuple):
            kind, batch = p
            blocks.append(torch.full((batch, 4), IMAGE_TOKEN if kind == "image" else AUDIO_TOKEN))
        else:
            blocks.append(p)
    return torch.cat(blocks, dim=1)

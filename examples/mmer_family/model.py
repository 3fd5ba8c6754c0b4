"""The family's model classes: a char tokenizer, the base Llama, and TinyMLLM.

TinyMLLM is LLaVA-shaped: ``encoder`` (the modality's own, images or log-mel
frames) -> ``projector`` -> a few prefix embeddings in front of the text,
then ``language_model``, a ``LlamaForCausalLM`` fine-tuned from the base. Its
checkpoints therefore hold ``language_model.model.*`` /
``language_model.lm_head.weight`` (the LLM) beside ``encoder.*`` and
``projector.*`` (the modality side), as LLaVA checkpoints do.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models
from transformers import (AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast)

PAD, UNK = "<pad>", "<unk>"


def build_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """One token per character of ``text`` (plus pad/unk); saved in the standard HF layout."""
    vocab = {PAD: 0, UNK: 1}
    for c in sorted(set(text)):
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=PAD, unk_token=UNK)


def base_config(vocab_size: int, hidden: int = 64, layers: int = 4) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, tie_word_embeddings=False, rope_theta=10000.0,
                       pad_token_id=0, bos_token_id=None, eos_token_id=None)


class TinyMLLMConfig(PretrainedConfig):
    model_type = "tiny_mllm"
    sub_configs = {"text_config": LlamaConfig}

    def __init__(self, text_config=None, modality: str = "vision", feature_shape=(64,), encoder_hidden: int = 128,
                 prefix_tokens: int = 4, **kwargs):
        if isinstance(text_config, dict):
            text_config = LlamaConfig(**text_config)
        self.text_config = text_config or LlamaConfig()
        self.modality = modality
        self.feature_shape = list(feature_shape)
        self.encoder_hidden = encoder_hidden
        self.prefix_tokens = prefix_tokens
        super().__init__(**kwargs)


class VisionEncoder(nn.Module):
    """An MLP over the 8x8 pixels."""

    def __init__(self, cfg: TinyMLLMConfig):
        super().__init__()
        n = math.prod(cfg.feature_shape)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, cfg.encoder_hidden), nn.GELU(),
                                 nn.Linear(cfg.encoder_hidden, cfg.encoder_hidden), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AudioEncoder(nn.Module):
    """Two strided 1-D convolutions over log-mel frames, then mean and max pooling over time."""

    def __init__(self, cfg: TinyMLLMConfig):
        super().__init__()
        mels, h = cfg.feature_shape[1], cfg.encoder_hidden
        self.conv = nn.Sequential(nn.Conv1d(mels, h, 5, stride=2, padding=2), nn.GELU(),
                                  nn.Conv1d(h, h, 5, stride=2, padding=2), nn.GELU())
        self.out = nn.Linear(2 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, frames, mels)
        h = self.conv(x.transpose(1, 2))
        return torch.nn.functional.gelu(self.out(torch.cat([h.mean(-1), h.amax(-1)], dim=-1)))


class PointCloudEncoder(nn.Module):
    """A PointNet-style encoder: a shared MLP per point, then max and mean pooling over the points."""

    def __init__(self, cfg: TinyMLLMConfig):
        super().__init__()
        dims, h = cfg.feature_shape[-1], cfg.encoder_hidden
        self.point = nn.Sequential(nn.Linear(dims, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
        self.out = nn.Linear(2 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, points, dims)
        h = self.point(x)
        return torch.nn.functional.gelu(self.out(torch.cat([h.mean(1), h.amax(1)], dim=-1)))


class VideoEncoder(nn.Module):
    """A shared MLP per frame (frames are flattened images), then mean and max pooling over time."""

    def __init__(self, cfg: TinyMLLMConfig):
        super().__init__()
        pixels, h = math.prod(cfg.feature_shape[1:]), cfg.encoder_hidden
        self.frame = nn.Sequential(nn.Linear(pixels, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
        self.out = nn.Linear(2 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, frames, pixels)
        h = self.frame(x.flatten(2))
        return torch.nn.functional.gelu(self.out(torch.cat([h.mean(1), h.amax(1)], dim=-1)))


# the encoder class of each modality; any other modality (vision, tabular) gets the MLP over its flattened features
ENCODERS = {"audio": AudioEncoder, "timeseries": AudioEncoder, "pointcloud": PointCloudEncoder,
            "video": VideoEncoder}


class TinyMLLM(PreTrainedModel):
    config_class = TinyMLLMConfig
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: TinyMLLMConfig):
        super().__init__(config)
        self.encoder = ENCODERS.get(config.modality, VisionEncoder)(config)
        hidden = config.text_config.hidden_size
        self.projector = nn.Sequential(nn.Linear(config.encoder_hidden, hidden * config.prefix_tokens))
        self.language_model = LlamaForCausalLM(config.text_config)
        self.post_init()

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        b = features.shape[0]
        return self.projector(self.encoder(features)).view(b, self.config.prefix_tokens, -1)

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Logits for the text positions (the prefix positions are dropped)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        prefix = self.prefix(features).to(embeds.dtype)
        inputs = torch.cat([prefix, embeds], dim=1)
        mask = None
        if attention_mask is not None:
            ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
            mask = torch.cat([ones, attention_mask], dim=1)
        out = self.language_model(inputs_embeds=inputs, attention_mask=mask)
        return out.logits[:, prefix.shape[1]:]


AutoConfig.register("tiny_mllm", TinyMLLMConfig)
AutoModel.register(TinyMLLMConfig, TinyMLLM)


def load_mllm(path: str | Path) -> TinyMLLM:
    return TinyMLLM.from_pretrained(path).eval()


def load_base(path: str | Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path).eval()

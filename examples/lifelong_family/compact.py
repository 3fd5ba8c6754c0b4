"""The shipped form of the lifelong fine-tunes: one small safetensors file each.

A fine-tune's LLM is stored as its difference from the base, quantised to
int8 with one float32 scale per row (``delta = scale * q``, ``|q| <= 127``),
and its encoder and projector in float16; the model's config rides in the
file's metadata. The quantisation happens once, right after training: the
stored model IS the entry (every system, the originals included, is scored on
it, and the sequential chain continues training from it). 8 bits per LLM
parameter plus the row scales, against 32 for float32 safetensors.

``materialize`` writes a standard Hugging Face checkpoint directory
(``TinyMLLM.save_pretrained`` plus the tokenizer), which is what the store
registers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mmer_family.model import TinyMLLM, TinyMLLMConfig

LLM = "language_model."


def _base_state(base_dir: Path) -> dict[str, torch.Tensor]:
    return LlamaForCausalLM.from_pretrained(base_dir).state_dict()


def quantize_(model: TinyMLLM, base_dir: Path) -> dict[str, torch.Tensor]:
    """Round the model in place to what the compact file holds; returns the file's tensors."""
    base = _base_state(base_dir)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.startswith(LLM):
                key = name[len(LLM):]
                delta = (p.float() - base[key]).reshape(p.shape[0], -1) if p.dim() > 0 else None
                scale = delta.abs().amax(dim=1).clamp(min=1e-12) / 127.0
                q = torch.round(delta / scale[:, None]).clamp(-127, 127).to(torch.int8)
                tensors[f"q.{key}"] = q.reshape(p.shape).contiguous()
                tensors[f"s.{key}"] = scale.contiguous()
                p.copy_(base[key] + (q.float() * scale[:, None]).reshape(p.shape))
            else:
                half = p.to(torch.float16)
                tensors[f"h.{name}"] = half.contiguous()
                p.copy_(half.float())
    return tensors


def save_compact(model: TinyMLLM, base_dir: Path, path: Path) -> Path:
    """Quantise ``model`` in place and write it to ``path`` (a .safetensors file)."""
    tensors = quantize_(model, base_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")  # written whole, then renamed: a reader never sees half a file
    meta = {"config": model.config.to_json_string(), "format": "lifelong-int8-delta"}
    save_file(tensors, str(partial), metadata=meta)
    partial.replace(path)
    return path


def load_compact(path: Path, base_dir: Path, base: dict | None = None) -> TinyMLLM:
    """The fine-tune held in ``path``, in float32, in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    config.pop("model_type", None)
    model = TinyMLLM(TinyMLLMConfig(**config))
    base = base if base is not None else _base_state(base_dir)
    tensors = load_file(str(path))
    state = {}
    for name in model.state_dict():
        if name.startswith(LLM):
            key = name[len(LLM):]
            q, scale = tensors[f"q.{key}"], tensors[f"s.{key}"]
            state[name] = base[key] + (q.float().reshape(q.shape[0], -1) * scale[:, None]).reshape(q.shape)
        else:
            state[name] = tensors[f"h.{name}"].float()
    model.load_state_dict(state)
    return model.eval()


def materialize(path: Path, base_dir: Path, out_dir: Path, base: dict | None = None) -> Path:
    """Write the fine-tune in ``path`` as a standard checkpoint directory (config, safetensors, tokenizer)."""
    model = load_compact(path, base_dir, base)
    model.save_pretrained(out_dir)
    PreTrainedTokenizerFast.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir

"""Model-family adapters: how each MLLM family turns a modality input into LLM token embeddings.

A composed model (:mod:`mmer_cl.compose`) runs one LLM for every entry; what
differs per family is the modality side. An adapter, chosen by the entry's
``model_type`` (from its config.json), does two things:

* ``build(config, own)``: the entry's modality side as a module (its encoder
  and projector), from the entry's own tensors;
* ``features(module, config, inputs, dtype)``: the token embeddings of one
  modality input, and either ``placeholder(config)`` (the token id whose
  positions in ``input_ids`` the features fill, LLaVA style) or ``None``
  (the features are a prefix put in front of the text, TinyMLLM style).

Built in: ``llava`` (transformers' LLaVA, current and legacy checkpoint
layouts), ``qwen2_audio`` (Qwen2-Audio) and ``tiny_mllm`` (the examples'
family). Add a family with :func:`register_adapter`::

    from mmer_cl.compose.adapters import FamilyAdapter, register_adapter

    class MyAdapter(FamilyAdapter):
        input_names = ("pixel_values",)
        def placeholder(self, config): return config.image_token_id
        def features(self, module, config, inputs, dtype):
            return module.project(module.encoder(inputs["pixel_values"])).flatten(0, 1)

    register_adapter("my_model_type", MyAdapter())

``build`` has a generic default (the family's transformers class with its
LLM on the meta device, the entry's own tensors loaded, the LLM dropped).
"""

from __future__ import annotations

import json
from typing import Mapping

import torch
import torch.nn as nn

from mmer_cl.errors import MmerError


class AdapterError(MmerError):
    """No adapter for a model family, or an adapter that cannot build or run an entry."""


class FamilyAdapter:
    """Base class; see the module docstring. Subclasses set ``input_names`` and implement ``features``."""

    input_names: tuple[str, ...] = ()

    def placeholder(self, config) -> int | None:
        """The placeholder token id the features replace, or None for a prefix in front of the text."""
        return None

    def features(self, module: nn.Module, config, inputs: Mapping[str, torch.Tensor],
                 dtype: torch.dtype) -> torch.Tensor:
        """Placeholder families: (number of placeholder tokens, hidden); prefix families: (batch, prefix, hidden)."""
        raise NotImplementedError

    def model_class(self, config):
        import transformers

        for arch in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                return cls
        try:
            return transformers.AutoModel._model_mapping[type(config)]
        except KeyError:
            raise AdapterError(f"cannot find the model class of model_type {config.model_type!r}: import the module "
                               "that registers it with transformers' AutoModel, or override "
                               "FamilyAdapter.model_class") from None

    def build(self, config, own: Mapping[str, torch.Tensor]) -> nn.Module:
        """The entry's model with its own tensors loaded and every LLM-only part removed."""
        from mmer_cl.compose.routing import parameters_on_meta

        cls = self.model_class(config)
        with parameters_on_meta():
            model = cls(config)
        names = dict(model.named_parameters(remove_duplicate=False))
        targets = {}
        for key, t in own.items():
            for cand in (key, "model." + key, key[len("model."):] if key.startswith("model.") else None):
                if cand is not None and cand in names:
                    targets[cand] = t
                    break
        for name, t in targets.items():
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            if tuple(mod._parameters[attr].shape) != tuple(t.shape):
                raise AdapterError(f"own tensor {name} has shape {list(t.shape)}, the model expects "
                                   f"{list(mod._parameters[attr].shape)}; the entry's config.json does not match it")
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        _drop_meta(model)
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise AdapterError(f"the modality side of this {config.model_type} entry lacks tensors "
                               f"({', '.join(left[:4])}); register the complete checkpoint")
        return model.eval()


def _drop_meta(module: nn.Module) -> None:
    """Remove submodules whose parameters are all unloaded (the LLM parts): they are never run."""
    for name, child in list(module.named_children()):
        params = list(child.parameters())
        if params and all(p.is_meta for p in params):
            module._modules[name] = None
        else:
            _drop_meta(child)


def _inner(module: nn.Module) -> nn.Module:
    """The ``*Model`` inside a ``*ForConditionalGeneration`` (or the module itself when built as the bare model)."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


class LlavaAdapter(FamilyAdapter):
    """transformers' LLaVA (``LlavaForConditionalGeneration``): image features fill ``image_token_id`` positions."""

    input_names = ("pixel_values", "image_sizes")

    def placeholder(self, config) -> int:
        return config.image_token_id

    def features(self, module, config, inputs, dtype):
        out = _inner(module).get_image_features(pixel_values=inputs["pixel_values"],
                                              image_sizes=inputs.get("image_sizes"), return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0).to(dtype)


class Qwen2AudioAdapter(FamilyAdapter):
    """Qwen2-Audio: audio features fill ``audio_token_id`` positions (inputs already expanded, one per feature)."""

    input_names = ("input_features", "feature_attention_mask")

    def placeholder(self, config) -> int:
        return config.audio_token_id

    def features(self, module, config, inputs, dtype):
        from transformers.masking_utils import create_bidirectional_mask

        m = _inner(module)
        input_features = inputs["input_features"]
        feature_mask = inputs.get("feature_attention_mask")
        if feature_mask is None:
            feature_mask = torch.ones(input_features.shape[0], input_features.shape[-1], dtype=torch.long)
        feat_lengths, out_lengths = m.audio_tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        batch, _, max_mel = input_features.shape
        max_seq = (max_mel - 2) // 2 + 1
        seq_range = torch.arange(0, max_seq, dtype=feat_lengths.dtype).unsqueeze(0).expand(batch, max_seq)
        mask_2d = (~(seq_range >= feat_lengths.unsqueeze(1).expand(batch, max_seq))).to(torch.long)
        attn = create_bidirectional_mask(config=m.audio_tower.config,
                                         inputs_embeds=torch.zeros((batch, max_seq, 1), dtype=dtype),
                                         attention_mask=mask_2d)
        hidden = m.audio_tower(input_features, attention_mask=attn).last_hidden_state
        feats = m.multi_modal_projector(hidden)
        keep = torch.arange(feats.shape[1])[None, :] < out_lengths[:, None]
        return feats[keep].to(dtype)


class PrefixAdapter(FamilyAdapter):
    """Families whose model has ``prefix(features) -> (batch, tokens, hidden)``: the examples' TinyMLLM."""

    input_names = ("features",)

    def features(self, module, config, inputs, dtype):
        return module.prefix(inputs["features"]).to(dtype)


_ADAPTERS: dict[str, FamilyAdapter] = {
    "llava": LlavaAdapter(),
    "qwen2_audio": Qwen2AudioAdapter(),
    "tiny_mllm": PrefixAdapter(),
}


def register_adapter(model_type: str, adapter: FamilyAdapter) -> None:
    """Make entries whose config.json says ``"model_type": model_type`` composable with ``adapter``."""
    if not isinstance(adapter, FamilyAdapter):
        raise AdapterError("register_adapter needs a FamilyAdapter instance (subclass mmer_cl.compose.adapters.FamilyAdapter)")
    _ADAPTERS[model_type] = adapter


def adapter_for(model_type: str | None, entry: str = "") -> FamilyAdapter:
    adapter = _ADAPTERS.get(model_type or "")
    if adapter is None:
        raise AdapterError(
            f"entry {entry!r} is a {model_type!r} model and no adapter knows that family (known: "
            f"{', '.join(sorted(_ADAPTERS))}). Write one and register it with "
            "mmer_cl.compose.adapters.register_adapter(model_type, adapter) before composing; see the mmer_cl.compose.adapters "
            "docstring.")
    return adapter


def known_families() -> list[str]:
    return sorted(_ADAPTERS)


def config_of(config_json: bytes | str | dict):
    """A transformers config from an entry's config.json."""
    import transformers

    d = dict(config_json) if isinstance(config_json, dict) else json.loads(config_json)
    model_type = d.pop("model_type", None)
    try:
        return transformers.AutoConfig.for_model(model_type, **d)
    except ValueError as exc:
        raise AdapterError(f"transformers does not know model_type {model_type!r} ({exc}); import the module that "
                           "registers its config with AutoConfig first") from exc

"""The composed model: one LLM serving every entry's modality, mixed inputs routed per token."""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from mmer_cl.compose.adapters import FamilyAdapter, adapter_for, config_of
from mmer_cl.compose.routing import CompositionError, Router, parameters_on_meta, route_modules
from mmer_cl.compose.weights import BASE, MERGED, RoutedTensor, WeightCache
from mmer_cl.checkpoints.keymap import KeyMap

TensorSource = Callable[[str], torch.Tensor]
DEFAULT_CACHE_BYTES = 64 * 2**20  # dense copies of routes that cannot live in the working copy (emr scales, rows)
DEFAULT_TEXT_PARAMS = "merged"  # text tokens of a mixed input (measured: README, "Expansion")
DEFAULT_TEXT_ONLY = "base"  # inputs without any modality


@dataclass
class EntrySource:
    """What a composition needs of one entry, as tensor sources (from the store, or from memory)."""

    name: str
    modality: str
    config: bytes | str | dict  # the entry's config.json
    keymap: KeyMap
    own: TensorSource           # its own (modality-side) tensors, by checkpoint key
    mask: TensorSource | None   # its mask per base key; None = all of the merged vector
    scale: float = 1.0


class ComposedModel(nn.Module):
    """Base LLM once, merged vector once (compact), packed masks, and every entry's own encoder and projector.

    The LLM weights exist as ONE dense working copy (base dtype); every route
    (base, merged, each entry) is reached by switching it in place, exactly
    (:class:`mmer_cl.compose.weights.RoutedTensor`). A mixed input switches each
    layer's weights route by route as its tokens pass (no second dense copy)
    (the route a layer holds first, the text route last unless the layer held it at the start,
    so the tokens ``generate`` decodes next usually need no switch).

    ``inputs`` maps entry names to that entry's modality inputs (e.g.
    ``{"vision": {"pixel_values": px}, "audio": {"input_features": f, "feature_attention_mask": m}}``).
    An input with ONE modality runs entirely (text tokens too) on that entry's
    weights ``theta_0 + m_i * tau_*``: the same logits as ``Store.load(entry)``.
    An input with several modalities is routed per token: each modality's
    tokens through its entry's weights in every LLM layer, the text tokens
    through ``text_params`` ("base", "merged" or an entry name); attention
    spans the whole sequence. An input without modality inputs (text only) runs
    on ``text_only`` ("base" by default: the base LLM's own text skill, exactly).

    Defaults, from the examples' evidence (README, "Expansion"): text tokens of
    mixed inputs on "merged" (text on the base drops the mixed task to chance:
    the answer is predicted at text positions, by text-route weights), text-only
    inputs on "base" (the lowest held-out perplexity).
    """

    def __init__(self, llm: nn.Module, tensors: dict[str, RoutedTensor], entries: Sequence[EntrySource],
                 configs: list, adapters: list[FamilyAdapter], modules: list[nn.Module], router: Router,
                 text_params: str = DEFAULT_TEXT_PARAMS, text_only: str = DEFAULT_TEXT_ONLY):
        super().__init__()
        self.llm = llm
        self.tensors = tensors
        self.router = router
        self.cache = router.cache
        self.entry_names = [e.name for e in entries]
        self.modalities = {e.name: e.modality for e in entries}
        self.configs = dict(zip(self.entry_names, configs))
        self.adapters = dict(zip(self.entry_names, adapters))
        self.encoders = nn.ModuleDict(dict(zip(self.entry_names, modules)))
        self.route_of = {"base": BASE, "merged": MERGED}
        self.route_of.update({n: i + 2 for i, n in enumerate(self.entry_names)})
        self.text_params = self._check_text(text_params)
        self.text_only = self._check_text(text_only)
        self._pending: tuple[torch.Tensor, int] | None = None
        llm.register_forward_pre_hook(self._route_hook, with_kwargs=True)

    # ---- routes -----------------------------------------------------------------------------
    def _check_text(self, text_params: str) -> str:
        if text_params not in self.route_of:
            raise CompositionError(f"text_params must be 'base', 'merged' or an entry of this composition "
                                   f"({', '.join(self.entry_names)}), got {text_params!r}")
        return text_params

    def _route_hook(self, module, args, kwargs):
        """During generate: the prompt (given as embeddings) takes its routes, new tokens the text route."""
        if self._pending is None:
            return None
        routes, text_route = self._pending
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and tuple(embeds.shape[:2]) == tuple(routes.shape):
            self.router.set(routes, last=text_route)
        else:
            self.router.set(text_route)
        return None

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                inputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                text_params: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """``(inputs_embeds, routes, attention_mask, text_route)`` for the LLM: modality features spliced in."""
        inputs = dict(inputs or {})
        unknown = [n for n in inputs if n not in self.encoders]
        if unknown:
            raise CompositionError(f"no entry {', '.join(map(repr, unknown))} in this composition "
                                   f"(entries: {', '.join(self.entry_names)}); key inputs by entry name")
        text = self._check_text(text_params or self.text_params)
        names = [n for n in self.entry_names if n in inputs]
        if len(names) == 1:
            text_route = self.route_of[names[0]]
        else:
            text_route = self.route_of[text if names or text_params else self.text_only]
        routes = torch.full(input_ids.shape, text_route, dtype=torch.long)
        placeholders: dict[int, str] = {}
        for n in names:
            ph = self.adapters[n].placeholder(self.configs[n])
            if ph is None:
                continue
            if ph in placeholders:
                raise CompositionError(f"entries {placeholders[ph]!r} and {n!r} use the same placeholder token "
                                       f"{ph}; they cannot be told apart in one input")
            placeholders[ph] = n
            routes[input_ids == ph] = self.route_of[n]
        # the embedding rows of placeholder tokens are replaced by features below: look every token up on the
        # text route (placeholders as id 0), so a mixed input does not switch the embedding matrix
        self.router.set(text_route)
        lookup = input_ids.masked_fill(torch.isin(input_ids, torch.tensor(list(placeholders), dtype=input_ids.dtype)),
                                       0) if placeholders else input_ids
        embeds = self.llm.get_input_embeddings()(lookup)
        self.router.set(routes, last=text_route)
        prefixes = []
        for n in names:
            adapter, cfg = self.adapters[n], self.configs[n]
            feats = adapter.features(self.encoders[n], cfg, inputs[n], embeds.dtype)
            ph = adapter.placeholder(cfg)
            if ph is None:
                prefixes.append((feats, self.route_of[n]))
                continue
            where = (input_ids == ph).unsqueeze(-1)
            if int(where.sum()) * embeds.shape[-1] != feats.numel():
                raise CompositionError(f"entry {n!r}: {int(where.sum())} placeholder tokens ({ph}) in input_ids but "
                                       f"{feats.numel() // embeds.shape[-1]} feature tokens; expand the placeholders "
                                       "as the family's processor does")
            embeds = embeds.masked_scatter(where, feats)
        if prefixes:
            b = input_ids.shape[0]
            embeds = torch.cat([p for p, _ in prefixes] + [embeds], dim=1)
            routes = torch.cat([torch.full((b, p.shape[1]), r, dtype=torch.long) for p, r in prefixes] + [routes], 1)
            if attention_mask is not None:
                ones = [torch.ones((b, p.shape[1]), dtype=attention_mask.dtype) for p, _ in prefixes]
                attention_mask = torch.cat(ones + [attention_mask], dim=1)
        return embeds, routes, attention_mask, text_route

    # ---- running ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                inputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None, text_params: str | None = None,
                **llm_kwargs):
        """The LLM's output (``.logits`` over the whole sequence, prefix positions included)."""
        embeds, routes, attention_mask, text_route = self.prepare(input_ids, attention_mask, inputs, text_params)
        self.router.set(routes, last=text_route)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, **llm_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 inputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None, text_params: str | None = None,
                 **generate_kwargs) -> torch.Tensor:
        """transformers' ``generate`` on the composed model; returns the NEW tokens only (prompt given as embeddings).

        Generated tokens are text: they run on the text route (the entry's own
        weights for a single-modality input, ``text_params`` otherwise).
        """
        embeds, routes, attention_mask, text_route = self.prepare(input_ids, attention_mask, inputs, text_params)
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        self._pending = (routes, text_route)
        try:
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
        finally:
            self._pending = None

    def text_model(self, text_params: str | None = None) -> nn.Module:
        """The bare LLM, set to run on ``text_params`` (default: ``text_only``), e.g. for perplexity."""
        self.router.set(self.route_of[self._check_text(text_params or self.text_only)])
        return self.llm

    # ---- accounting -------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Bytes held, by part: ``llm_working`` (the ONE dense copy of the LLM weights, base dtype),
        ``merged`` (the merged vector: bitmap of where it changes a weight, XOR patterns there, tau for
        rescaled masks), ``masks`` (each entry's, packed), ``extras`` (rows entries append), ``encoders``
        (every entry's encoder and projector), ``cache`` (dense copies of routes that cannot live in the
        working copy), ``total``; ``merged_and_masks`` sums merged, masks and extras."""
        parts = {"working": 0, "merged": 0, "masks": 0, "extras": 0}
        for t in self.tensors.values():
            for k, v in t.sizes().items():
                parts[k] += v
        enc = sum(p.numel() * p.element_size() for p in self.encoders.parameters())
        compact = parts["merged"] + parts["masks"] + parts["extras"]
        return {"llm_working": parts["working"], "merged": parts["merged"], "masks": parts["masks"],
                "extras": parts["extras"], "merged_and_masks": compact, "encoders": enc, "cache": self.cache.bytes,
                "total": parts["working"] + compact + enc + self.cache.bytes}


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc); the per-tensor temporaries otherwise fragment the heap and
    hold resident memory that the composition no longer uses. A no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _model_type(config: bytes | str | dict) -> str | None:
    d = config if isinstance(config, dict) else json.loads(config)
    return d.get("model_type")


def _llm_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and arch.endswith("ForCausalLM"):
            return cls
    return lambda cfg: transformers.AutoModelForCausalLM.from_config(cfg)


def build_composed(base_config: bytes | str | dict, base_names: Sequence[str], base: TensorSource,
                   merged: TensorSource, entries: Sequence[EntrySource], text_params: str = DEFAULT_TEXT_PARAMS,
                   text_only: str = DEFAULT_TEXT_ONLY,
                   cache_bytes: int = DEFAULT_CACHE_BYTES, use_mask: bool = True,
                   progress: Callable[[int, int, str], None] | None = None) -> ComposedModel:
    """Assemble a :class:`ComposedModel`, reading one LLM tensor at a time from the sources.

    ``base_config`` is the base checkpoint's config.json (a causal LM);
    ``base_names`` its float tensors (the merged ones). ``use_mask=False``
    runs every entry on the whole merged LLM: the NaiveMC-style baseline.
    """
    if not entries:
        raise CompositionError("nothing to compose: name at least one entry")
    llm_cfg = config_of(base_config)
    with parameters_on_meta():
        llm = _llm_class(llm_cfg)(llm_cfg)
    llm.eval()
    adapters = [adapter_for(_model_type(e.config), e.name) for e in entries]
    base_set = set(base_names)
    params = dict(llm.named_parameters(remove_duplicate=False))
    by_param: dict[str, str] = {}
    for name in params:
        if name in base_set:
            by_param[name] = name
        elif getattr(llm_cfg, "tie_word_embeddings", False) and name.endswith("lm_head.weight"):
            by_param[name] = next(n for n in params if n.endswith("embed_tokens.weight"))
        else:
            raise CompositionError(f"the base checkpoint has no tensor {name}, which its config's model needs")
    ckpt_of = [e.keymap.base_to_ckpt() for e in entries]
    tensors: dict[str, RoutedTensor] = {}
    shapes = {name: p.shape for name, p in params.items()}
    # the largest tensors first: their full-size temporaries (decoded merged vector and masks) then exist
    # while the composition holds the least, which keeps the build's peak memory low
    keys = sorted(dict.fromkeys(by_param.values()), key=lambda k: -shapes[k].numel())
    keep_tau = use_mask and any(e.scale != 1.0 for e in entries)
    for step, key in enumerate(keys, start=1):
        merged_t = merged(key)
        rt = RoutedTensor(key, base(key), merged_t, keep_tau=keep_tau)
        del merged_t
        for e, to_ckpt in zip(entries, ckpt_of):
            ck = to_ckpt.get(key)
            extra = e.own(ck) if ck in e.keymap.resized else None
            mask = e.mask(key) if (use_mask and e.mask is not None) else None
            rt.add_route(mask, e.scale if use_mask else 1.0, extra)
            del mask
        tensors[key] = rt
        release_free_memory()
        if progress:
            progress(step, len(keys), key)
    router = Router(WeightCache(cache_bytes))
    route_modules(llm, {p: tensors[k] for p, k in by_param.items()}, router)
    configs, modules = [], []
    hidden = llm_cfg.hidden_size
    for e, adapter in zip(entries, adapters):
        cfg = config_of(e.config)
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(text_cfg, "hidden_size", hidden) != hidden:
            raise CompositionError(f"entry {e.name!r} has LLM hidden size {text_cfg.hidden_size}, the base "
                                   f"{hidden}; it was not fine-tuned from this base")
        own = {k: e.own(k) for k in e.keymap.modality}
        configs.append(cfg)
        modules.append(adapter.build(cfg, own))
    release_free_memory()
    return ComposedModel(llm, tensors, entries, configs, adapters, modules, router, text_params, text_only)

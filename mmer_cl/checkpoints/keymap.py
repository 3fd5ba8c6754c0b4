"""Which tensors of a multimodal checkpoint are the base LLM, and which are its own.

A key of the checkpoint is an LLM tensor when, after stripping an LLM prefix
(``language_model.``, ``model.language_model.``, ``llm.``, ... or an explicit
one) and a leading ``model.``, it names a base tensor, itself stripped the same
way (a base laid out under the prefix, such as Whisper's decoder under
``model.decoder.``, loses it too), with the same shape. Everything else (encoder, projector,
extra vocabulary rows) is the modality side, kept verbatim.

An embedding or ``lm_head`` that the fine-tune grew for new tokens (more rows,
same columns) is mapped with ``base_rows``: those rows take part in merging,
the extra rows stay the modality's own. Such resizes are listed in
:attr:`KeyMap.resized` and in :meth:`KeyMap.describe`, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from mmer_cl.checkpoints.dtypes import is_float_code
from mmer_cl.errors import KeyMappingError
from mmer_cl.checkpoints.writer import TensorSpec

KNOWN_LLM_PREFIXES: tuple[str, ...] = (
    "model.language_model.", "language_model.model.", "language_model.",
    "model.llm.", "llm.model.", "llm.",
    "model.text_model.", "text_model.", "model.text_decoder.", "text_decoder.",
)

Shape = tuple[int, ...]


def _core(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def _strip_prefix(key: str, prefixes: Sequence[str]) -> str | None:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return None


@dataclass
class KeyMap:
    """How one checkpoint's tensors relate to the base LLM.

    ``llm`` maps checkpoint key -> base key for every merged tensor;
    ``resized`` maps checkpoint key -> number of leading rows that belong to the
    base (the rest are the modality's own); ``modality`` lists keys kept
    verbatim; ``order`` is every checkpoint key in checkpoint order.
    """

    llm: dict[str, str]
    modality: list[str]
    order: list[str]
    resized: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def llm_part(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of a checkpoint LLM tensor that line up with the base."""
        rows = self.resized.get(key)
        return tensor if rows is None else tensor[:rows]

    def modality_part(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """What the modality keeps verbatim: a whole modality tensor, or a resized tensor's extra rows."""
        rows = self.resized.get(key)
        return tensor if rows is None else tensor[rows:]

    def own_keys(self) -> list[str]:
        """Keys with a modality-side part: modality tensors and resized LLM tensors."""
        return [k for k in self.order if k not in self.llm or k in self.resized]

    def specs(self) -> list[TensorSpec]:
        """What an export of this checkpoint writes, in order (needs dtypes and shapes)."""
        return [TensorSpec(k, tuple(self.shapes[k]), self.dtypes[k]) for k in self.order]

    def shard_groups(self) -> list[list[str]] | None:
        """Keys grouped by the shard file they came from, in key order (None if unknown)."""
        if not self.files or set(self.files) != set(self.order):
            return None
        groups: dict[str, list[str]] = {}
        for key in self.order:
            groups.setdefault(self.files[key], []).append(key)
        return list(groups.values())

    def base_to_ckpt(self) -> dict[str, str]:
        return {b: c for c, b in self.llm.items()}

    def describe(self) -> str:
        lines = [f"{len(self.llm)} LLM tensors merged, {len(self.modality)} modality tensors kept verbatim"]
        for key, rows in self.resized.items():
            lines.append(f"resized: {key} keeps base rows [0:{rows}) in the merge; the rows after are its own")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"llm": self.llm, "modality": self.modality, "order": self.order,
                           "resized": self.resized, "dtypes": self.dtypes, "shapes": self.shapes,
                           "files": self.files})

    @classmethod
    def from_json(cls, text: str) -> "KeyMap":
        d = json.loads(text)
        return cls(llm=d["llm"], modality=d["modality"], order=d["order"], resized=d.get("resized", {}),
                   dtypes=d.get("dtypes", {}), shapes=d.get("shapes", {}), files=d.get("files", {}))


def _prefix_stage(keys: Iterable[str], prefixes: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split keys into {core: key} for keys under an LLM prefix, and the rest."""
    cores: dict[str, str] = {}
    rest: list[str] = []
    for key in keys:
        stripped = _strip_prefix(key, prefixes)
        if stripped is None:
            rest.append(key)
            continue
        core = _core(stripped)
        if core in cores:
            raise KeyMappingError(
                f"tensors {cores[core]} and {key} both look like base tensor {core}; "
                "pass the LLM prefix explicitly (llm_prefix / --llm-prefix) to disambiguate"
            )
        cores[core] = key
    return cores, rest


def _base_cores(base_shapes: Mapping[str, Shape], prefixes: Sequence[str]) -> dict[str, str]:
    """{core: key} of the base, stripped the same way as the checkpoint's keys: an LLM prefix (when the base
    itself is laid out under one, e.g. Whisper's ``model.decoder.``), then a leading ``model.``."""
    cores: dict[str, str] = {}
    for key in base_shapes:
        stripped = _strip_prefix(key, prefixes)
        core = _core(key if stripped is None else stripped)
        if core in cores:
            raise KeyMappingError(
                f"base tensors {cores[core]} and {key} both reduce to {core} once the LLM prefix is stripped, so "
                "a checkpoint tensor could stand for either. Pass the prefix the LLM lives under (llm_prefix / "
                "--llm-prefix; a longer one if you gave one), or init the store from a base that holds the LLM alone.")
        cores[core] = key
    return cores


def map_keys(
    base_shapes: Mapping[str, Shape],
    ckpt_shapes: Mapping[str, Shape],
    llm_prefix: str | None = None,
    ckpt_dtypes: Mapping[str, str] | None = None,
) -> KeyMap:
    """Map a checkpoint's keys onto the base's, by name and shape.

    ``base_shapes`` / ``ckpt_shapes`` map tensor name -> shape, in file order.
    ``llm_prefix`` replaces the list of known prefixes.
    ``ckpt_dtypes`` (safetensors dtype codes such as ``BF16``) are recorded
    with the shapes for export; only float tensors are merged, integer
    buffers stay verbatim. Raises :class:`KeyMappingError` with advice when the shapes
    disagree, no LLM tensor is found, or base tensors are missing.
    """
    prefixes = (llm_prefix,) if llm_prefix else KNOWN_LLM_PREFIXES
    base_by_core = _base_cores(base_shapes, prefixes)
    order = list(ckpt_shapes)
    prefixed, unprefixed = _prefix_stage(order, prefixes)
    # Keys outside any LLM prefix still match a base tensor not matched yet
    # (LLaVA keeps lm_head.weight at top level), or when the checkpoint is a bare LLM.
    candidates = dict(prefixed)
    for key in unprefixed:
        core = _core(key)
        if core in base_by_core and core not in candidates:
            candidates[core] = key
    dtypes = dict(ckpt_dtypes or {})
    floats = {k for k, d in dtypes.items() if is_float_code(d)} if dtypes else None

    llm: dict[str, str] = {}
    resized: dict[str, int] = {}
    for core, key in candidates.items():
        base_key = base_by_core.get(core)
        if base_key is None or (floats is not None and key not in floats):
            continue
        b_shape, c_shape = tuple(base_shapes[base_key]), tuple(ckpt_shapes[key])
        if b_shape != c_shape:
            grown_rows = (len(b_shape) == len(c_shape) >= 1 and b_shape[1:] == c_shape[1:]
                          and c_shape[0] > b_shape[0])
            if not grown_rows:
                raise KeyMappingError(
                    f"tensor {key} has shape {list(c_shape)} but base tensor {base_key} has {list(b_shape)}. "
                    "The checkpoint was probably fine-tuned from another base model; register it against "
                    "the base it was trained from."
                )
            resized[key] = b_shape[0]
        llm[key] = base_key

    if not llm:
        tried = llm_prefix or ", ".join(KNOWN_LLM_PREFIXES)
        lora = any(".lora_A." in k or ".lora_B." in k for k in order)
        raise KeyMappingError(
            "no LLM tensors found: no checkpoint tensor matches a base tensor by name and shape "
            f"(prefixes tried: {tried}). "
            + ("These are peft LoRA factors: register the adapter's directory (the one holding "
               "adapter_config.json and adapter_model.safetensors), not the weights file."
               if lora else "Check that this is a fine-tune of this base, or pass the "
               "prefix its LLM lives under with llm_prefix / --llm-prefix.")
        )
    matched = set(llm.values())
    missing = [k for k in base_shapes if k not in matched]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise KeyMappingError(
            f"the checkpoint lacks {len(missing)} of the base's {len(base_shapes)} tensors ({shown}). "
            "It may be fine-tuned from another base, or its LLM lives under a prefix not tried; pass "
            "llm_prefix / --llm-prefix."
        )
    modality = [k for k in order if k not in llm]
    shapes = {k: list(v) for k, v in ckpt_shapes.items()}
    return KeyMap(llm=llm, modality=modality, order=order, resized=resized, dtypes=dtypes, shapes=shapes)

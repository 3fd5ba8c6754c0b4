"""peft LoRA adapters read as checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

A LoRA adapter changes a few linear (or embedding) layers of a model by a
low-rank update. For target module ``M`` with matrices ``A`` (r x in) and
``B`` (out x r) the weight becomes ``W + B @ A * scaling``, where
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``;
``rank_pattern`` and ``alpha_pattern`` override r and alpha per module, matched
the way peft matches them). That update, computed in float32, is the
adapter's task vector for ``M.weight``.

:class:`LoraCheckpoint` presents adapter + underlying model as the full
fine-tuned checkpoint would look, with the interface of
:class:`mmer_cl.checkpoint.Checkpoint` (``infos``, ``get``, ``aux_files``), so
``Store.register`` consumes it like any checkpoint. It adds
:meth:`LoraCheckpoint.task_vector`, which register uses to take the update
exactly rather than by subtracting weights.

The underlying model is the adapter's ``base_model_name_or_path`` when that
is a local directory (the base LLM, or an MLLM whose LLM is the base), else
the store's base. Full tensors the adapter saves (``modules_to_save``,
biases) replace the underlying model's tensors of the same name: when they are
LLM tensors of the base (``lm_head``, ``embed_tokens``) they are merged like
any fully fine-tuned tensor; otherwise (a projector, a classifier head) they
are the modality side, kept verbatim, like the underlying model's encoder.

Reading an adapter needs only safetensors; peft is needed to *make* one. Adapter
kinds this module does not compute itself (DoRA, LoHa, IA3, ...) are refused
with the way to merge them with peft first.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mmer_cl.checkpoint import Checkpoint, TensorInfo
from mmer_cl.errors import CheckpointError
from mmer_cl.precision import working_dtype

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_INSTALL = "pip install 'mmer-cl[peft]'"
_LORA_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                        r"(?:\.[A-Za-z0-9_]+)?\.weight$")
ADAPTER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin", "README.md"}


def _loose(key: str) -> str:
    """A key without its ``model`` path segments: ``model.language_model.layers.0`` and
    ``language_model.model.layers.0`` (how transformers 5 names a module and how it saves it) agree."""
    return ".".join(p for p in key.split(".") if p != "model")


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a peft adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def pattern_key(pattern_keys, module: str) -> str | None:
    """The key of ``rank_pattern`` / ``alpha_pattern`` that applies to ``module`` (peft's rule)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def lora_scaling(config: dict, module: str) -> tuple[int, float]:
    """``(r, scaling)`` of one target module under an adapter config."""
    r_key = pattern_key(config.get("rank_pattern") or {}, module)
    a_key = pattern_key(config.get("alpha_pattern") or {}, module)
    r = int((config.get("rank_pattern") or {}).get(r_key, config.get("r", 8)))
    alpha = float((config.get("alpha_pattern") or {}).get(a_key, config.get("lora_alpha", 8)))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, *, embedding: bool = False,
               fan_in_fan_out: bool = False) -> torch.Tensor:
    """The weight update ``B @ A * scaling`` in float32, laid out like the weight it updates.

    Linear: A (r x in), B (out x r) -> (out x in). Embedding (peft's
    ``lora_embedding_A`` (r x vocab), ``lora_embedding_B`` (dim x r)) ->
    (vocab x dim). ``fan_in_fan_out`` (GPT-2's Conv1D stores (in x out)) transposes.
    """
    delta = (b.to(torch.float32) @ a.to(torch.float32)) * scaling
    if embedding or fan_in_fan_out:
        delta = delta.T
    return delta.contiguous()


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: its key in the full model and its low-rank factors' adapter keys."""

    weight_key: str
    module: str
    a_key: str
    b_key: str
    r: int
    scaling: float
    embedding: bool


class LoraCheckpoint:
    """An adapter over its underlying model, read like the merged checkpoint (see the module docstring)."""

    def __init__(self, path: str | Path, fallback_base: str | Path | None = None):
        self.path = Path(path)
        try:
            self.config = json.loads((self.path / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {self.path / ADAPTER_CONFIG}: {exc}") from exc
        self._check_supported()
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.exists():
            if (self.path / "adapter_model.bin").exists():
                raise CheckpointError(
                    f"{self.path} holds a pickle adapter (adapter_model.bin); mmer-cl never unpickles files. "
                    "Re-save it with `model.save_pretrained(out, safe_serialization=True)` in an environment you "
                    "trust, then register the new directory.")
            raise CheckpointError(f"{self.path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
        self.weights_file = weights
        self.underlying_path = self._underlying(fallback_base)
        self.underlying = Checkpoint(self.underlying_path)
        self.files = [weights]
        self._read_adapter()

    # ---- reading -------------------------------------------------------------------------
    def _check_supported(self) -> None:
        c = self.config
        kind = c.get("peft_type", "LORA")
        unsupported = []
        if kind != "LORA":
            unsupported.append(f"peft_type {kind}")
        for flag in ("use_dora", "lora_bias", "use_qalora", "use_bdlora"):
            if c.get(flag):
                unsupported.append(flag)
        if c.get("trainable_token_indices"):
            unsupported.append("trainable_token_indices")
        if c.get("target_parameters"):
            unsupported.append("target_parameters")
        if unsupported:
            raise CheckpointError(
                f"{self.path} is a peft adapter with {', '.join(unsupported)}; mmer-cl computes plain LoRA updates "
                "(B @ A * scaling) itself and leaves other kinds to peft. Merge it with peft first "
                f"({PEFT_INSTALL}): `PeftModel.from_pretrained(model, '{self.path}').merge_and_unload()"
                ".save_pretrained(out, safe_serialization=True)`, then register `out`.")

    def _underlying(self, fallback_base: str | Path | None) -> Path:
        named = self.config.get("base_model_name_or_path")
        if named and Path(named).is_dir():
            return Path(named)
        if fallback_base is not None:
            return Path(fallback_base)
        raise CheckpointError(
            f"the adapter at {self.path} was made on {named!r}, which is not a local directory; set "
            f"base_model_name_or_path in its {ADAPTER_CONFIG} to the local model directory it was trained on")

    def _read_adapter(self) -> None:
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        parts: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}  # model key -> adapter key, for tensors saved in full
        with safe_open(str(self.weights_file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
        for key in keys:
            inner = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = _LORA_PART.match(inner)
            if m:
                parts.setdefault(m.group("module"), {})[m.group("part")] = key
            else:
                full[inner] = key
        self.modules: dict[str, LoraModule] = {}
        base_infos = self.underlying.infos
        loose: dict[str, str | None] = {}
        for k in base_infos:
            loose[_loose(k)] = None if _loose(k) in loose else k  # None: ambiguous, never guessed

        def model_key(name: str) -> str:
            """The underlying checkpoint's key for a module path + ``.weight`` (saved names may differ)."""
            return name if name in base_infos else (loose.get(_loose(name)) or name)

        full = {model_key(k): v for k, v in full.items()}
        for module, p in parts.items():
            embedding = "lora_embedding_A" in p
            a_key = p.get("lora_embedding_A" if embedding else "lora_A")
            b_key = p.get("lora_embedding_B" if embedding else "lora_B")
            if a_key is None or b_key is None:
                raise CheckpointError(f"{self.weights_file} has only one of the two LoRA factors of {module}; "
                                      "the adapter is incomplete, save it again")
            weight_key = model_key(f"{module}.weight")
            if weight_key not in base_infos:
                raise CheckpointError(
                    f"the adapter targets {module}, but {self.underlying_path} has no tensor {weight_key}. Register "
                    "the adapter against the model it was trained on: set base_model_name_or_path in "
                    f"{ADAPTER_CONFIG} to that model's local directory.")
            r, scaling = lora_scaling(self.config, module)
            if shapes[a_key][0] != r:
                raise CheckpointError(f"{module}: lora_A has rank {shapes[a_key][0]} but the config says r={r}; "
                                      f"the adapter's {ADAPTER_CONFIG} does not match its weights")
            out_in = (shapes[b_key][0], shapes[a_key][1])
            expected = out_in[::-1] if (embedding or fan_in_fan_out) else out_in
            if tuple(base_infos[weight_key].shape) != expected:
                raise CheckpointError(
                    f"the update of {module} has shape {list(expected)} but {weight_key} in "
                    f"{self.underlying_path} has {list(base_infos[weight_key].shape)}; the adapter was trained on "
                    "another model (or set fan_in_fan_out correctly)")
            self.modules[weight_key] = LoraModule(weight_key, module, a_key, b_key, r, scaling, embedding)
        if not self.modules and not full:
            raise CheckpointError(f"{self.weights_file} holds no LoRA factors and no saved modules")
        self.full = full
        self.fan_in_fan_out = fan_in_fan_out
        infos = dict(base_infos)
        for model_key, adapter_key in full.items():
            infos[model_key] = TensorInfo(model_key, shapes[adapter_key], dtypes[adapter_key],
                                          infos[model_key].file if model_key in infos else self.weights_file)
        self.infos: dict[str, TensorInfo] = infos

    # ---- the Checkpoint interface --------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self.path

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        with safe_open(str(self.weights_file), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def delta(self, key: str) -> torch.Tensor | None:
        """The LoRA update of model tensor ``key`` in float32, or None when the adapter does not touch it."""
        m = self.modules.get(key)
        if m is None:
            return None
        a, b = self._adapter_tensor(m.a_key), self._adapter_tensor(m.b_key)
        if m.embedding:
            return lora_delta(a, b, m.scaling, embedding=True)
        return lora_delta(a, b, m.scaling, fan_in_fan_out=self.fan_in_fan_out)

    def _raw(self, key: str) -> torch.Tensor:
        if key in self.full:
            return self._adapter_tensor(self.full[key])
        return self.underlying.get(key)

    def get(self, name: str, check_finite: bool = True) -> torch.Tensor:
        """The tensor as the merged model holds it: ``W + B @ A * scaling`` cast to W's dtype, for targets."""
        if name not in self.infos:
            raise CheckpointError(f"tensor {name} is not in adapter {self.path} or its model {self.underlying_path}")
        t = self._raw(name)
        d = self.delta(name)
        if d is not None:
            dt = working_dtype(t.dtype, d.dtype)
            t = (t.to(dt) + d.to(dt)).to(t.dtype)
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {name} of adapter {self.path} has NaN/Inf values; the fine-tune "
                                  "diverged, fix or re-train it before registering")
        return t

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """``theta - theta_0`` for LLM tensor ``name``: exact, with the LoRA update taken as computed.

        The update is computed in float32 (as peft merges it) and added to
        ``underlying - base`` (zero when the underlying LLM is the base) in the
        working dtype, so no rounding of ``W + delta`` enters the task vector.
        """
        raw = self._raw(name)
        dt = working_dtype(base.dtype, raw.dtype)
        tau = raw.to(base.device, dt) - base.to(dt)
        d = self.delta(name)
        if d is not None:
            tau = tau + d.to(base.device, dt)
        return tau

    def aux_files(self) -> list[Path]:
        """The underlying model's config and tokenizer files, overridden by the adapter's own tokenizer files."""
        files = {p.name: p for p in self.underlying.aux_files()}
        for p in sorted(self.path.iterdir()):
            if p.is_file() and p.name not in ADAPTER_FILES and p.suffix != ".safetensors" \
                    and not p.name.startswith(".") and p.suffix not in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
                files[p.name] = p
        return [files[n] for n in sorted(files)]

    def total_bytes(self) -> int:
        return self.weights_file.stat().st_size

    def describe(self) -> str:
        return (f"LoRA adapter: {len(self.modules)} low-rank updates, {len(self.full)} tensors saved in full, "
                f"over {self.underlying_path}")


def open_checkpoint(path: str | Path, fallback_base: str | Path | None = None):
    """A :class:`Checkpoint`, or a :class:`LoraCheckpoint` when ``path`` holds a peft adapter."""
    if is_adapter(path):
        return LoraCheckpoint(path, fallback_base)
    return Checkpoint(path)


__all__ = ["LoraCheckpoint", "is_adapter", "lora_delta", "lora_scaling", "open_checkpoint", "PEFT_INSTALL"]

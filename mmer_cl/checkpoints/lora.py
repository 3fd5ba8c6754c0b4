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
:class:`mmer_cl.checkpoints.checkpoint.Checkpoint` (``infos``, ``get``, ``aux_files``), so
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

peft saves an embedding's factors as ``lora_embedding_A`` / ``lora_embedding_B``
(no ``.weight``), a copy of a LoRA-wrapped embedding as ``X.base_layer.weight``
and the trained bias of a LoRA-wrapped layer (``bias="all"`` / ``"lora_only"``)
as ``X.base_layer.bias``: those are ``X.weight`` / ``X.bias`` of the model. With
tied embeddings the underlying checkpoint has no ``lm_head.weight``; an update
of ``lm_head`` then lands on the input embedding, after the embedding's own
update, each added and rounded in turn as peft's in-place merges do. Trainable
tokens (``trainable_token_indices``, or peft_type ``TRAINABLE_TOKENS``) replace
the rows of their token ids with the saved values, as peft's ``index_copy`` does.

Reading an adapter needs only safetensors; peft is needed to *make* one. Adapter
kinds this module does not compute itself (DoRA, LoHa, IA3, ..., and adapters
trained on a residual base such as unconverted PiSSA)
are refused with the way to convert or merge them with peft first, and so is
any configuration key or saved tensor this module does not understand: nothing
in an adapter directory is silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mmer_cl.checkpoints.checkpoint import Checkpoint, TensorInfo
from mmer_cl.checkpoints.confinement import list_aux_files
from mmer_cl.errors import CheckpointError
from mmer_cl.method.precision import working_dtype

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_INSTALL = "pip install -e '.[peft]' in a clone of mmer-cl"
_LORA_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")
# peft saves embedding factors as bare parameters: ``X.lora_embedding_A`` (or ``X.lora_embedding_A.<adapter>``)
_EMBEDDING_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)"
                             r"(?:\.(?!weight$)[A-Za-z0-9_]+)?$")
# peft's trainable tokens: the new values of a few embedding rows, ``X.token_adapter.trainable_tokens_delta``
# (with LoRA) or ``X.trainable_tokens_delta`` (peft_type TRAINABLE_TOKENS)
_TOKEN_ROWS = re.compile(r"^(?P<module>.+?)(?:\.token_adapter)?\.trainable_tokens_delta(?:\.[A-Za-z0-9_]+)?$")
# Output embeddings whose weight may be tied to (and saved only as) the input embedding.
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out", "output", "proj_out")
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "shared", "embed_in", "tok_embeddings")
# init_lora_weights values after which peft loads the adapter onto the base unchanged: B @ A * scaling is the update.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Inits that train on a residual base weight (W minus the initial B @ A, after an SVD, QR, gradient SVD or
# quantisation): B @ A alone is not the update until peft converts the adapter on save.
RESIDUAL_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")
# LoraConfig keys that do not change what merge_and_unload computes (or that this module applies itself).
_HANDLED_KEYS = frozenset({
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "lora_ga_config", "megatron_config",
    "megatron_core", "modules_to_save", "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern",
    "revision", "runtime_config", "target_modules", "task_type", "trainable_token_indices", "use_rslora"})
# TrainableTokensConfig keys (peft_type TRAINABLE_TOKENS): rows of an embedding replaced by trained values.
_TOKEN_KEYS = frozenset({"auto_mapping", "base_model_name_or_path", "inference_mode", "init_weights", "peft_type",
                         "peft_version", "revision", "target_modules", "task_type", "token_indices"})
ADAPTER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin"}  # an adapter's README.md is its card: kept


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


_UNKNOWN: frozenset[str] = frozenset({"<unknown>"})


def _conv1d_modules(model_dir: Path) -> frozenset[str]:
    """Names of the ``transformers.pytorch_utils.Conv1D`` modules of the model saved at ``model_dir``
    (built on the meta device from its config.json), or :data:`_UNKNOWN` when it cannot be built."""
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D

        config = json.loads((model_dir / "config.json").read_text())
        cls = getattr(transformers, (config.get("architectures") or [""])[0], None)
        if cls is None:
            return _UNKNOWN
        model_type = config.pop("model_type", None)
        with torch.device("meta"):
            model = cls(transformers.AutoConfig.for_model(model_type, **config))
        return frozenset(n for n, m in model.named_modules() if isinstance(m, Conv1D))
    except Exception:  # noqa: BLE001 - any model that cannot be built falls back to the config's flag
        return _UNKNOWN


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
    tied: bool = False  # an lm_head update landing on the tied input embedding
    transposed: bool = False  # B @ A is laid out (in x out): an embedding, or fan_in_fan_out (GPT-2's Conv1D)


@dataclass(frozen=True)
class TokenRows:
    """Trainable tokens: rows ``indices`` of ``weight_key`` replaced by the saved values (``values_key``)."""

    weight_key: str
    module: str
    values_key: str
    indices: tuple[int, ...]
    tied: bool = False


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
    def _refuse(self, what: str, advice: str | None = None) -> None:
        raise CheckpointError(
            f"{self.path} is a peft adapter with {what}; mmer-cl computes plain LoRA updates (B @ A * scaling) "
            "itself and leaves other kinds to peft. "
            + (advice or f"Merge it with peft first ({PEFT_INSTALL}): `PeftModel.from_pretrained(model, "
                         f"'{self.path}').merge_and_unload().save_pretrained(out, safe_serialization=True)`, "
                         "then register `out`."))

    def _check_supported(self) -> None:
        """Refuse every config whose merge this module would not reproduce exactly (see the module docstring)."""
        c = self.config
        kind = c.get("peft_type", "LORA")
        if kind in PROMPT_LEARNING:
            raise CheckpointError(
                f"{self.path} is a peft {kind} adapter: it adds virtual tokens or prompts to the input and changes "
                "no weight, so there is no task vector to merge. mmer-cl merges weight updates (LoRA, or a fully "
                "fine-tuned checkpoint); fine-tune with one of those to register the task.")
        if kind == "TRAINABLE_TOKENS":
            unknown = [k for k, v in c.items() if k not in _TOKEN_KEYS and v not in (None, False, {}, [], "", 0)]
            if unknown:
                self._refuse(", ".join(f"{k}={c[k]!r}" for k in sorted(unknown)))
            return
        if kind != "LORA":
            self._refuse(f"peft_type {kind}")
        init = c.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
            self._refuse(
                f"init_lora_weights={init!r}, saved without conversion: it was trained on a residual base weight "
                "(the original minus the initial B @ A), which peft rebuilds when it loads such an adapter, so "
                "B @ A alone is not the update",
                "Convert it to a plain LoRA adapter when saving: `model.save_pretrained(out, "
                "path_initial_model_for_weight_conversion=INIT_DIR)` (INIT_DIR: the adapter saved right after "
                "initialisation, before training), then register `out`. Or merge it with peft onto the base it "
                f"was initialised on ({PEFT_INSTALL}): `PeftModel.from_pretrained(model, '{self.path}')"
                ".merge_and_unload().save_pretrained(out, safe_serialization=True)`, and register `out`.")
        if init not in PLAIN_INITS:
            self._refuse(f"init_lora_weights={init!r}")
        unknown = [k for k, v in c.items() if k not in _HANDLED_KEYS and v not in (None, False, {}, [], "", 0)]
        if unknown:
            self._refuse(", ".join(f"{k}={c[k]!r}" for k in sorted(unknown)))

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
        """Sort every saved tensor into a LoRA factor or a full tensor of the model; anything else is an error."""
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        self._conv1d: frozenset[str] | None = None
        with safe_open(str(self.weights_file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
        self._base_infos = self.underlying.infos
        self._loose_keys: dict[str, str | None] = {}
        for k in self._base_infos:
            self._loose_keys[_loose(k)] = None if _loose(k) in self._loose_keys else k  # None: ambiguous
        self._ties = self._ties_embeddings()
        # the input embedding that also serves as lm_head (None: the model saves its own lm_head, or no tie)
        self._tied_embedding = self._tied_key("lm_head.weight") if self._model_key("lm_head.weight") is None else None
        parts: dict[str, dict[str, str]] = {}
        full: dict[str, list[str]] = {}  # model key -> adapter keys saved in full (two when embeddings are tied)
        self.token_rows: dict[str, list[TokenRows]] = {}  # model key -> trainable tokens, in peft's merge order
        for key in keys:
            inner = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = _LORA_PART.match(inner) or _EMBEDDING_PART.match(inner)
            rows = _TOKEN_ROWS.match(inner)
            if m:
                parts.setdefault(m.group("module"), {})[m.group("part")] = key
            elif rows:
                t = self._token_rows(rows.group("module"), key)
                self.token_rows.setdefault(t.weight_key, []).append(t)
            else:
                full.setdefault(self._full_key(key, inner), []).append(key)
        # a saved copy may have more rows than the underlying model (a vocabulary resized before training)
        self._weight_shapes = {k: self._shapes[v[0]] for k, v in full.items()}
        self.modules: dict[str, list[LoraModule]] = {}
        for module, p in parts.items():
            m = self._lora_module(module, p)
            self.modules.setdefault(m.weight_key, []).append(m)
        for updates in self.modules.values():
            updates.sort(key=lambda u: u.tied)  # the tied output embedding merges after the embedding's own
        for found in self.token_rows.values():
            found.sort(key=lambda u: u.tied)
        both = sorted(set(self.modules) & set(self.token_rows))
        if both:
            self._refuse(f"both a LoRA update and trainable tokens on {', '.join(both)}")
        if not self.modules and not full and not self.token_rows:
            raise CheckpointError(f"{self.weights_file} holds no LoRA factors and no saved modules")
        self.full = {k: v[0] for k, v in full.items()}
        self._check_copies_agree(full)
        infos = dict(self._base_infos)
        for model_key, adapter_key in self.full.items():
            infos[model_key] = TensorInfo(model_key, self._shapes[adapter_key], dtypes[adapter_key],
                                          infos[model_key].file)
        self.infos: dict[str, TensorInfo] = infos

    def _model_key(self, name: str) -> str | None:
        """The underlying checkpoint's key for a saved name. peft names modules as transformers builds them,
        which may differ from the keys the checkpoint was saved with in ``model.`` segments, or by a prefix
        one of them lacks (LLaVA's ``lm_head`` is saved as ``language_model.lm_head``; a Qwen2-VL saved by
        an older transformers has ``model.layers`` for ``model.language_model.layers``): a key that ends
        with the other is taken when it is the only one; none when ambiguous."""
        if name in self._base_infos:
            return name
        loose = _loose(name)
        if loose in self._loose_keys:
            return self._loose_keys[loose]
        found = [k for k, kl in ((k, _loose(k)) for k in self._base_infos)
                 if kl.endswith("." + loose) or loose.endswith("." + kl)]
        return found[0] if len(found) == 1 else None

    def _tied_key(self, name: str) -> str | None:
        """For ``lm_head.weight`` of a model with tied embeddings (not saved): the input embedding's key."""
        module, _, param = name.rpartition(".")
        if param != "weight" or module.rpartition(".")[2] not in OUTPUT_EMBEDDINGS or not self._ties:
            return None
        found = [k for k in self._base_infos
                 if k.endswith(".weight") and k[:-len(".weight")].rpartition(".")[2] in INPUT_EMBEDDINGS]
        return found[0] if len(found) == 1 else None

    def _ties_embeddings(self) -> bool:
        """Whether the underlying model's config.json may tie its output embedding to its input embedding."""
        try:
            config = json.loads((self.underlying_path / "config.json").read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(config, dict):
            return False
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        # transformers drops a tied lm_head when saving; a model that does not tie keeps it. A flag at either
        # level counts (composite models set it on the text config, the top level, or both).
        flags = [c["tie_word_embeddings"] for c in (config, text) if "tie_word_embeddings" in c]
        return any(flags) if flags else True  # transformers' default

    def _full_key(self, key: str, inner: str) -> str:
        """The model key a tensor saved in full replaces: ``X.base_layer.P`` (a LoRA-wrapped layer's own
        weight or bias) is ``X.P``; modules_to_save and other biases are saved under their own names."""
        name = inner.replace(".base_layer.", ".")
        found = self._model_key(name)
        if found is None:
            found = self._tied_key(name)
            if found is not None and ".base_layer." not in inner:
                self._refuse_untying(name)
        elif found == self._tied_embedding and ".base_layer." not in inner:
            self._refuse_untying(name)
        if found is None:
            raise CheckpointError(
                f"{self.weights_file} holds tensor {key}, which is neither a LoRA factor nor a tensor of the "
                f"model it applies to ({self.underlying_path} has no {name}). mmer-cl does not guess what it is: "
                "register the adapter against the model it was trained on (base_model_name_or_path in "
                f"{ADAPTER_CONFIG}), or merge it with peft first ({PEFT_INSTALL}: `PeftModel.from_pretrained(model, "
                f"'{self.path}').merge_and_unload().save_pretrained(out, safe_serialization=True)`) and register "
                "`out`.")
        return found

    def _refuse_untying(self, name: str) -> None:
        """A modules_to_save copy of one of two tied embeddings: peft's merge unties them (unless
        ``ensure_weight_tying``), so its merged model holds a tensor this base does not have."""
        if self.config.get("ensure_weight_tying"):
            return
        raise CheckpointError(
            f"{self.weights_file} saves a trained copy of {name} (modules_to_save), which {self.underlying_path} "
            "ties to the other embedding; peft's merge unties the two, which a store of this base cannot hold. "
            f"Merge it with peft ({PEFT_INSTALL}): `PeftModel.from_pretrained(model, '{self.path}')"
            ".merge_and_unload().save_pretrained(out, safe_serialization=True)`, then register `out` against a base "
            "saved with tie_word_embeddings=False (or train with ensure_weight_tying=True).")

    def _check_copies_agree(self, full: dict[str, list[str]]) -> None:
        """Tied embeddings are saved twice (embedding and lm_head copies); peft loads both into one tensor."""
        for model_key, saved in full.items():
            first = self._adapter_tensor(saved[0])
            for other in saved[1:]:
                if not torch.equal(first, self._adapter_tensor(other)):
                    raise CheckpointError(
                        f"{self.weights_file} saves {saved[0]} and {other}, which are one tied tensor "
                        f"({model_key}) of the model, with different values; re-save the adapter with peft")

    def _is_conv1d(self, module: str) -> bool:
        """Whether ``module`` is a transformers ``Conv1D`` (weight stored (in x out)), for which peft transposes
        the update whatever ``fan_in_fan_out`` says. Told by the underlying model's class, built on the meta
        device; the config's ``fan_in_fan_out`` when that class cannot be built."""
        if self._conv1d is None:
            self._conv1d = _conv1d_modules(self.underlying_path)
        if self._conv1d is _UNKNOWN:
            return self.fan_in_fan_out
        return module in self._conv1d or any(_loose(module) == _loose(m) for m in self._conv1d)

    def _token_indices(self, module: str) -> tuple[int, ...]:
        """The token ids whose rows ``module``'s trainable tokens replace, from the adapter config."""
        c = self.config
        found = c.get("token_indices") if c.get("peft_type") == "TRAINABLE_TOKENS" else c.get("trainable_token_indices")
        if isinstance(found, dict):
            keys = [k for k in found if module == k or module.endswith("." + k)]
            found = found[keys[0]] if len(keys) == 1 else None
        if not isinstance(found, list) or not all(isinstance(i, int) for i in found):
            self._refuse(f"trainable tokens on {module} whose token ids the config does not give")
        return tuple(found)

    def _token_rows(self, module: str, key: str) -> TokenRows:
        """One module's trainable tokens, checked against the weight whose rows they replace."""
        name = f"{module}.weight"
        weight_key = self._model_key(name)
        tied = weight_key is None
        if tied:
            weight_key = self._tied_key(name)
        if weight_key is None:
            raise CheckpointError(f"the adapter has trainable tokens of {module}, but {self.underlying_path} has no "
                                  f"tensor {name}; register it against the model it was trained on")
        indices = self._token_indices(module)
        rows, cols = self._base_infos[weight_key].shape
        if self._shapes[key] != (len(indices), cols) or any(not 0 <= i < rows for i in indices):
            raise CheckpointError(f"{self.weights_file}: the trainable tokens of {module} ({list(self._shapes[key])}"
                                  f", ids {list(indices)}) do not fit {weight_key} ({rows} x {cols}); the adapter "
                                  "does not match its config or its model")
        return TokenRows(weight_key, module, key, indices, tied)

    def _lora_module(self, module: str, p: dict[str, str]) -> LoraModule:
        """One module's factors, checked against the config and the weight they update."""
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key = p.get("lora_embedding_A" if embedding else "lora_A")
        b_key = p.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None or len(p) != 2:
            raise CheckpointError(f"{self.weights_file} has the LoRA factors {sorted(p)} of {module}, not one A "
                                  "and one B; the adapter is incomplete or mixed up, save it again")
        name = f"{module}.weight"
        weight_key = self._model_key(name)
        tied = False
        if weight_key is None:
            weight_key = self._tied_key(name)
            tied = weight_key is not None
        if weight_key is None:
            raise CheckpointError(
                f"the adapter targets {module}, but {self.underlying_path} has no tensor {name}. Register "
                "the adapter against the model it was trained on: set base_model_name_or_path in "
                f"{ADAPTER_CONFIG} to that model's local directory.")
        r, scaling = lora_scaling(self.config, module)
        shape_a, shape_b = self._shapes[a_key], self._shapes[b_key]
        if len(shape_a) != 2 or len(shape_b) != 2:
            self._refuse(f"LoRA factors of shapes {list(shape_a)} and {list(shape_b)} on {module} (a convolution "
                         "or another layer that is not linear or an embedding)")
        if shape_a[0] != r or shape_b[1] != r:
            raise CheckpointError(f"{module}: LoRA factors of shapes {list(shape_a)} and {list(shape_b)} do not "
                                  f"have the config's rank r={r}; the adapter's {ADAPTER_CONFIG} does not match "
                                  "its weights")
        weight_shape = tuple(self._weight_shapes.get(weight_key, self._base_infos[weight_key].shape))
        out_in = (shape_b[0], shape_a[1])
        if embedding:
            transposed = True
        elif out_in[0] != out_in[1]:  # peft lays the update out like the module's weight, whatever the flag says
            transposed = weight_shape == out_in[::-1]
        else:
            transposed = self._is_conv1d(module)
        expected = out_in[::-1] if transposed else out_in
        if weight_shape != expected:
            raise CheckpointError(
                f"the update of {module} has shape {list(expected)} but {weight_key} in "
                f"{self.underlying_path} has {list(weight_shape)}; the adapter was trained "
                "on another model (or set fan_in_fan_out correctly)")
        return LoraModule(weight_key, module, a_key, b_key, r, scaling, embedding, tied, transposed)

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

    def deltas(self, key: str, dtype: torch.dtype) -> list[torch.Tensor]:
        """The LoRA updates of model tensor ``key`` (of ``dtype``) in float32, in peft's merge order (none: not
        touched). peft rounds an embedding's update to the weight's dtype before adding it; a linear layer's it
        adds in float32."""
        found = []
        for m in self.modules.get(key, []):
            d = self._update(m)
            found.append(d.to(dtype).to(torch.float32) if m.embedding and dtype != torch.float32 else d)
        return found

    def delta(self, key: str) -> torch.Tensor | None:
        """The LoRA update of model tensor ``key`` in float32 (the sum, where a tied lm_head adds a second),
        or None when the adapter does not touch it."""
        found = self.deltas(key, self._raw(key).dtype) if key in self.modules else []
        return None if not found else found[0] if len(found) == 1 else torch.stack(found).sum(0)

    def _update(self, m: LoraModule) -> torch.Tensor:
        a, b = self._adapter_tensor(m.a_key), self._adapter_tensor(m.b_key)
        return lora_delta(a, b, m.scaling, fan_in_fan_out=m.transposed)

    def _raw(self, key: str) -> torch.Tensor:
        if key in self.full:
            return self._adapter_tensor(self.full[key])
        return self.underlying.get(key)

    def get(self, name: str, check_finite: bool = True) -> torch.Tensor:
        """The tensor as peft's merged model holds it: ``W + B @ A * scaling`` rounded to W's dtype, for targets
        (each update added and rounded in turn where a tied lm_head adds a second, as peft's in-place merges do)."""
        if name not in self.infos:
            raise CheckpointError(f"tensor {name} is not in adapter {self.path} or its model {self.underlying_path}")
        t = self._raw(name)
        for d in self.deltas(name, t.dtype):
            dt = working_dtype(t.dtype, d.dtype)
            t = (t.to(dt) + d.to(dt)).to(t.dtype)
        for rows in self.token_rows.get(name, []):  # peft: W.index_copy(0, indices, values.to(W))
            values = self._adapter_tensor(rows.values_key).to(t.dtype)
            t = t.index_copy(0, torch.tensor(rows.indices, dtype=torch.long), values)
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {name} of adapter {self.path} has NaN/Inf values; the fine-tune "
                                  "diverged, fix or re-train it before registering")
        return t

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """``theta - theta_0`` for LLM tensor ``name``: exact, with the LoRA update taken as computed.

        The update is computed in float32 (as peft merges it) and added to
        ``underlying - base`` (zero when the underlying LLM is the base) in the
        working dtype, so no rounding of ``W + delta`` enters the task vector.
        Where two updates land on one tensor (tied embeddings), peft rounds
        between them, and trainable tokens replace rows; the task vector is then
        ``merged - base``, the merged tensor computed as peft computes it.
        """
        raw = self._raw(name)
        deltas = self.deltas(name, raw.dtype)
        if len(deltas) > 1 or name in self.token_rows:
            raw, deltas = self.get(name, check_finite=False), []
        dt = working_dtype(base.dtype, raw.dtype)
        tau = raw.to(base.device, dt) - base.to(dt)
        if len(deltas) == 1:
            tau = tau + deltas[0].to(base.device, dt)
        return tau

    def aux_files(self) -> list[Path]:
        """The underlying model's config and tokenizer files, overridden by the adapter's own tokenizer files."""
        files = {p.name: p for p in self.underlying.aux_files()}
        for p in list_aux_files(self.path, ADAPTER_FILES).files:  # allow-listed, confined (mmer_cl.checkpoints.confinement)
            files[p.name] = p
        return [files[n] for n in sorted(files)]

    def total_bytes(self) -> int:
        return self.weights_file.stat().st_size

    def describe(self) -> str:
        updates = sum(len(u) for u in self.modules.values())
        tokens = sum(len(r.indices) for found in self.token_rows.values() for r in found)
        return (f"LoRA adapter: {updates} low-rank updates, {tokens} trainable token rows, "
                f"{len(self.full)} tensors saved in full, "
                f"over {self.underlying_path}")


def open_checkpoint(path: str | Path, fallback_base: str | Path | None = None):
    """A :class:`Checkpoint`, or a :class:`LoraCheckpoint` when ``path`` holds a peft adapter."""
    if is_adapter(path):
        return LoraCheckpoint(path, fallback_base)
    return Checkpoint(path)


__all__ = ["LoraCheckpoint", "is_adapter", "lora_delta", "lora_scaling", "open_checkpoint", "PEFT_INSTALL"]

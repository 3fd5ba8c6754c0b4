"""safetensors dtype codes (``F32``, ``BF16``, ...) and their torch dtypes and sizes.

Every dtype safetensors writes is known here. The merge math works on
``MERGEABLE`` floats only; the other codes (8-bit floats, unsigned and signed
integers, bool) are stored verbatim when they belong to the modality side
and refused, with a message, when they would be LLM tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from mmer_cl.errors import KeyMappingError
from storage import jit, kernels
from storage.codecs import int_view

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEM_BYTES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                              "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
                              "BOOL": 1}
MERGEABLE = ("F64", "F32", "F16", "BF16")


def is_float_code(code: str) -> bool:
    """Whether a safetensors dtype code is a floating-point type (merged) rather than an integer buffer."""
    return code in MERGEABLE or code.startswith("F8")


def is_mergeable_code(code: str) -> bool:
    """Whether task vectors, merges and masks can be computed in this dtype."""
    return code in MERGEABLE


def refuse_unmergeable(dtypes: dict[str, str], where: str) -> None:
    """Raise :class:`KeyMappingError` naming LLM tensors whose dtype the merge math cannot use."""
    bad = {name: code for name, code in dtypes.items() if not is_mergeable_code(code)}
    if bad:
        shown = ", ".join(f"{n} ({c})" for n, c in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise KeyMappingError(
            f"{where}: LLM tensor(s) {shown}{more} are stored as {sorted(set(bad.values()))}, which the merge "
            f"cannot use (task vectors need one of {', '.join(MERGEABLE)}). Dequantize the LLM to bf16/fp16/fp32 "
            "(e.g. load it and save_pretrained with torch_dtype=torch.bfloat16), then try again.")


_EXPONENT_FIELD = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000,
                   torch.float64: 0x7FF0000000000000}


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf (integer and bool tensors always pass; 8-bit floats are widened)."""
    if not t.is_floating_point():
        return True
    if t.element_size() == 1:
        t = t.float()
    if jit.enabled() and t.dtype in _EXPONENT_FIELD and t.device.type == "cpu" and t.numel():
        words = int_view(t.detach().reshape(-1))  # a NaN or Inf has every exponent bit set
        return bool(kernels.none_with_all_bits(words, np.array([_EXPONENT_FIELD[t.dtype]], dtype=words.dtype)))
    return bool(torch.isfinite(t).all())

"""safetensors dtype codes (``F32``, ``BF16``, ...) and their torch dtypes and sizes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEM_BYTES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                              "U8": 1, "BOOL": 1}


def is_float_code(code: str) -> bool:
    """Whether a safetensors dtype code is a floating-point type (merged) rather than an integer buffer."""
    return code in ("F64", "F32", "F16", "BF16") or code.startswith("F8")

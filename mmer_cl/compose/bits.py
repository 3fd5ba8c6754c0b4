"""Packing boolean tensors into bytes (1 bit per element) and back, in plain torch."""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 tensor holding ``mask`` (any shape, flattened) at 8 elements per byte, MSB first."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


# byte value -> its 8 bits as 0/1 bytes (MSB first), read as one int64 word: unpacking is one gather of words
_WORDS = ((torch.arange(256).view(-1, 1) >> torch.arange(7, -1, -1)) & 1).to(torch.uint8).view(torch.int64).view(-1)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` booleans held in ``packed`` (the inverse of :func:`pack_bits`), 1-D."""
    bytes_ = _WORDS.index_select(0, packed.reshape(-1).int()).view(torch.uint8)
    return bytes_[:numel].view(torch.bool)  # 0/1 bytes ARE valid booleans: a view, no copy


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer type of the same width, to treat float bit patterns as integers."""
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]

"""When a one-entry store gives its fine-tune back bit for bit (docs/method.md, "Precision").

``tau = theta - theta_0`` is computed one precision up (float32 for bf16/fp16 weights, float64 for
float32 weights). It is exact when the larger of the two magnitudes is less than 2^15 (bf16), 2^12
(fp16) or 2^28 (float32) times the smaller, or one of them is zero; an export at density 1 then equals
the fine-tune bit for bit. Outside that range the difference rounds: a weight fine-tuned from 1e30 to
1e-30 exports as 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.store import Store

RATIO_BITS = {torch.bfloat16: 15, torch.float16: 12, torch.float32: 28}  # the range docs/method.md documents
EXACT = MergeParams(density=1.0)


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def export_one(tmp_path: Path, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> Checkpoint:
    with Store.init(tmp_path / "store", save(tmp_path / "base", base), actor="t") as store:
        store.register(save(tmp_path / "tuned", tuned), "tuned", "text", max_relative_change=1e9)
        store.expand(EXACT)
        return Checkpoint(store.export("tuned", tmp_path / "export"))


def pairs_within_range(dtype: torch.dtype, n: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (base, tuned) values of every sign whose magnitudes are less than 2^RATIO_BITS apart, zeros
    included, and of magnitudes from tiny to huge."""
    gen = torch.Generator().manual_seed(seed)
    bits = RATIO_BITS[dtype]
    top = 60 if dtype != torch.float16 else 14
    exp_base = torch.randint(-top, top, (n,), generator=gen)
    exp_tuned = (exp_base + torch.randint(-bits + 1, bits, (n,), generator=gen)).clamp(-top - bits, top)
    def values(exponents: torch.Tensor) -> torch.Tensor:
        significands = (torch.rand(n, generator=gen) + 1) * torch.sign(torch.randn(n, generator=gen))
        return significands * torch.exp2(exponents.double())

    base, tuned = values(exp_base), values(exp_tuned)
    base, tuned = base.to(dtype), tuned.to(dtype)
    base[:16], tuned[16:32] = 0, 0
    ratio = torch.maximum(base.double().abs(), tuned.double().abs()) / torch.minimum(
        base.double().abs(), tuned.double().abs())
    assert bool(((ratio < 2.0 ** bits) | (base == 0) | (tuned == 0)).all())
    return base.reshape(64, -1), tuned.reshape(64, -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_single_entry_export_is_bit_for_bit_within_the_documented_range(tmp_path, dtype):
    base, tuned = pairs_within_range(dtype)
    exported = export_one(tmp_path, {"w": base}, {"w": tuned}).get("w")
    assert exported.dtype == dtype
    assert torch.equal(exported.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       tuned.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tiny_value_fine_tuned_from_a_huge_one_rounds_as_documented(tmp_path, dtype):
    """1e30 -> 1e-30: the difference is -1e30 after rounding, so the export holds 0, not 1e-30."""
    base = torch.tensor([[1e30, 1.0], [3.0, -2.0]], dtype=dtype)
    tuned = torch.tensor([[1e-30, 1.5], [3.0, -2.5]], dtype=dtype)
    exported = export_one(tmp_path, {"w": base}, {"w": tuned}).get("w")
    assert exported[0, 0] == 0 and tuned[0, 0] != 0
    assert torch.equal(exported.reshape(-1)[1:], tuned.reshape(-1)[1:])  # the rest is exact

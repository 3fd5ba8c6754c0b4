"""Float values are coded as byte planes in the layout that suits each tensor (storage.planes).

Merged vectors and version deltas (narrow exponents, low mantissa bytes
mostly zero) put their signs apart and keep the low planes sparse; dense
weights keep the legacy layout. Every layout returns the exact bits, in the
compiled and the plain path alike.
"""

import numpy as np
import pytest
import torch

from storage import codecs, planes
from storage.frames import CodecError

N = 70_013  # large enough for a layout and a sampled choice, and not a multiple of 8


def narrow(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Like merged values: one exponent band, a few mantissa bits (differences of bf16 weights), random signs."""
    g = torch.Generator().manual_seed(seed)
    mantissa = torch.randint(0, 128, (N,), generator=g).double() / 128
    signs = torch.randint(0, 2, (N,), generator=g).double() * 2 - 1
    values = (signs * (1 + mantissa) * 2.0**-11).to(dtype)
    values[5], values[17] = -0.0, float("nan")
    values[-1] = float("-inf")
    return values


def dense(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def round_trip(t: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    raw = t.contiguous().view(torch.uint8).numpy()
    payload, layout = planes.encode_planes(raw, t.element_size())
    back = planes.decode_planes(payload, t.element_size(), t.numel(), layout)
    return torch.from_numpy(back.copy()).view(t.dtype), layout


@pytest.mark.parametrize("jit", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_layout_returns_the_exact_bits_nan_inf_and_negative_zero_included(monkeypatch, jit, dtype):
    monkeypatch.setenv("MMER_JIT", jit)
    for t in (narrow(dtype), dense(dtype)):
        back, _ = round_trip(t)
        assert same_bits(back, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merged_like_values_put_signs_apart_and_their_low_planes_sparse(dtype):
    _, layout = round_trip(narrow(dtype))
    assert layout["signs"] is True
    assert [plane for plane, _ in layout["sparse"]][:2] == [0, 1]


def test_dense_weights_keep_the_legacy_layout():
    _, layout = round_trip(dense(torch.bfloat16))
    assert layout is None


def test_the_chosen_layout_codes_merged_like_values_smaller_than_the_legacy_one():
    t = narrow(torch.float32)
    raw = t.view(torch.uint8).numpy()
    chosen, layout = planes.encode_planes(raw, 4)
    legacy = planes.zstd(planes.split_planes(raw, 4).data)
    assert layout is not None and len(chosen) < 0.95 * len(legacy)


def test_both_paths_write_the_same_blob(monkeypatch):
    t = narrow(torch.float32)
    monkeypatch.setenv("MMER_JIT", "0")
    plain = codecs.encode(t)
    monkeypatch.setenv("MMER_JIT", "1")
    assert codecs.encode(t) == plain
    assert same_bits(codecs.decode(plain), t)


def test_small_tensors_keep_the_legacy_layout_and_no_header_field():
    small = narrow(torch.float32)[:1000]
    assert "layout" not in codecs.header_of(codecs.encode(small))


def test_a_sparse_plane_whose_count_disagrees_with_its_map_is_refused():
    t = narrow(torch.float32)
    raw = t.view(torch.uint8).numpy()
    payload, layout = planes.encode_planes(raw, 4)
    layout["sparse"][0][1] += 1
    with pytest.raises(CodecError):
        planes.decode_planes(payload, 4, t.numel(), layout)


def test_legacy_blobs_without_a_layout_still_decode():
    t = narrow(torch.float32)
    raw = t.view(torch.uint8).numpy()
    legacy = planes.zstd(planes.split_planes(raw, 4).data)
    back = planes.decode_planes(legacy, 4, t.numel(), None)
    assert np.array_equal(back, raw)


def test_tensors_just_above_the_threshold_are_chosen_from_all_their_values():
    t = narrow(torch.float32)[:planes.MIN_VALUES + 1]
    back, layout = round_trip(t)
    assert layout is not None and same_bits(back, t)

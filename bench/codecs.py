"""Compression of the store's codecs on realistic tensors: ratio and encode speed.

    python bench/codecs.py [--side 2048]

Weights are Gaussian (std 0.02, like an LLM's), stored bf16 or fp32; task
vectors are a small change of them (std 0.001, computed exactly); trimmed
vectors keep the top 20%; masks are random at several densities. Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from mmer_cl.method.masks import mmer_mask
from mmer_cl.method.merging import ties, trim
from mmer_cl.store.report_tables import binary_entropy
from mmer_cl.method.task_vector import task_vector
from storage.codecs import decode, encode, encode_with


def row(label: str, t: torch.Tensor, codec: str | None) -> str:
    start = time.perf_counter()
    blob = encode(t) if codec is None else encode_with(t, codec)
    seconds = time.perf_counter() - start
    assert torch.equal(decode(blob), t)
    raw = t.numel() * t.element_size()
    name = codec or "auto"
    return f"| {label} | {name} | {raw / len(blob):.2f}x | {8 * len(blob) / t.numel():.3f} | {raw / seconds / 1e6:.0f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=2048)
    n = ap.parse_args().side
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=gen) * 0.02
    tuned = w + torch.randn(n, n, generator=gen) * 0.001
    print("| tensor | codec | ratio | bits/param | MB/s |")
    print("|---|---|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        for codec in ("raw", "planes"):
            print(row(f"weights {str(dtype)[6:]}", w.to(dtype), codec))
    for dtype in (torch.bfloat16, torch.float32):
        tau = task_vector(w.to(dtype), tuned.to(dtype))
        for codec in ("raw", "planes", None):
            print(row(f"task vector of {str(dtype)[6:]} weights ({str(tau.dtype)[6:]})", tau, codec))
    tau = task_vector(w.bfloat16(), tuned.bfloat16())
    hat = trim(tau, 0.2)
    for codec in ("planes", "sparse"):
        print(row("trimmed task vector (20%)", hat, codec))
    for density in (0.1, 0.5, 0.9):
        mask = torch.rand(n, n, generator=gen) < density
        print(row(f"mask, density {density} (H = {binary_entropy(density):.3f})", mask, "bits"))
    taus = [tau] + [task_vector(w.bfloat16(), (w + torch.randn(n, n, generator=gen) * 0.001).bfloat16())
                    for _ in range(2)]
    mask = mmer_mask(tau, ties(taus, density=0.2))
    density = float(mask.float().mean())
    print(row(f"mmer mask, ties of 3 (density {density:.2f}, H = {binary_entropy(density):.3f})", mask, "bits"))


if __name__ == "__main__":
    main()

"""Peak memory of merging grows with the largest tensor, not with model size.

Builds a synthetic base and fine-tunes with L tensors of the same size (the
largest tensor fixed), merges them in a fresh process, and reports the peak
resident memory (VmHWM) above the process's own baseline. Run:

    python bench/peak_memory.py [--tensor-mb 16] [--layers 4 32] [--models 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = r"""
import json, sys
import torch  # noqa: F401  (imported before the baseline is read)
import mmer_cl
from mmer_cl import MergeParams, merge_checkpoints

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])

before = hwm_kib()
base, out, *models = sys.argv[1:]
merge_checkpoints(base, models, out, MergeParams(), device=torch.device("cpu"))
print(json.dumps({"baseline_mib": before / 1024, "peak_mib": hwm_kib() / 1024}))
"""


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor], shard_mb: int = 64) -> None:
    directory.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if size and size + t.numel() * 4 > shard_mb * 2**20:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 4
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname))
        weight_map.update({n: fname for n in shard})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build(root: Path, layers: int, tensor_mb: int, models: int) -> list[Path]:
    n = tensor_mb * 2**20 // 4
    side = int(n**0.5)
    gen = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.weight": torch.randn(side, side, generator=gen) for i in range(layers)}
    write_sharded(root / "base", base)
    paths = [root / "base"]
    for m in range(models):
        tuned = {f"language_model.{k}": v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        tuned["vision_tower.proj.weight"] = torch.randn(16, 16, generator=gen)
        write_sharded(root / f"ft{m}", tuned)
        paths.append(root / f"ft{m}")
        del tuned
    return paths


def measure(layers: int, tensor_mb: int, models: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, layers, tensor_mb, models)
        # A fixed mmap threshold makes glibc return every large tensor's memory when it is
        # freed, so peak RSS shows what was alive at once, not heap fragmentation.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}
        out = subprocess.run([sys.executable, "-c", CHILD, str(paths[0]), str(root / "merge"), *map(str, paths[1:])],
                             check=True, capture_output=True, text=True, env=env)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    model_mib = layers * tensor_mb
    return {"layers": layers, "tensor_mib": tensor_mb, "models": models, "model_mib": model_mib,
            "peak_above_baseline_mib": round(result["peak_mib"] - result["baseline_mib"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensor-mb", type=int, default=16)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--models", type=int, default=3)
    args = ap.parse_args()
    print("| tensors | largest tensor MiB | models | one model MiB | peak RSS above baseline MiB |")
    print("|---:|---:|---:|---:|---:|")
    for layers in args.layers:
        r = measure(layers, args.tensor_mb, args.models)
        print(f"| {r['layers']} | {r['tensor_mib']} | {r['models']} | {r['model_mib']} | {r['peak_above_baseline_mib']} |")


if __name__ == "__main__":
    main()

"""`register` against the number of tensors: linear, not quadratic (issue 20, item 5).

    python bench/register_scale.py                       # 200, 2,000, 20,000 tensors, 3 repeats each
    python bench/register_scale.py --counts 200 20000 50000 --repeats 1 --out bench/results/register_scale.json

A tiny LLaVA fine-tune of a tiny Llama base (tests/builders.py) gets an extra
shard of zero-size tensors, so the checkpoint holds about COUNT tensors while
its bytes stay the same: what grows is only the per-tensor work (header
reads, hashing, one blob and one registry row per tensor). Each count is
registered into a fresh store, in this process, and timed around
``Store.register`` alone; the load average is printed with it since the
machine may be shared. Before the fix, each tensor read reopened its shard and
parsed the shard's whole header (O(n) per tensor): 2,000 extra tensors doubled
the time and 20,000 did not finish in 300 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def build(root: Path, count: int) -> tuple[Path, Path]:
    """A base and a checkpoint of about ``count`` tensors (its own, plus zero-size ones in an extra shard)."""
    import torch
    from safetensors.torch import save_file

    import builders

    base = builders.save_base(root / "base")
    ckpt = root / "ck"
    builders.save_llava(base, ckpt, seed=1)
    index_path = ckpt / "model.safetensors.index.json"
    if not index_path.exists():  # one file: make it a one-shard index so an extra shard can join it
        from safetensors import safe_open

        (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
        with safe_open(str(ckpt / "model-00001-of-00001.safetensors"), "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in f.keys()}}
    else:
        index = json.loads(index_path.read_text())
    extra = max(0, count - len(index["weight_map"]))
    if extra:
        save_file({f"extra.t{i}": torch.zeros(0) for i in range(extra)}, str(ckpt / "model-extra.safetensors"),
                  metadata={"format": "pt"})
        index["weight_map"].update({f"extra.t{i}": "model-extra.safetensors" for i in range(extra)})
    index_path.write_text(json.dumps(index))
    return root / "base", ckpt


def time_register(base: Path, ckpt: Path, work: Path) -> float:
    from mmer_cl.store import Store

    shutil.rmtree(work, ignore_errors=True)
    with Store.init(work, base, actor="bench") as store:
        start = time.perf_counter()
        store.register(ckpt, "vision", "vision", actor="bench")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[200, 2000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmer-register-scale-") as tmp:
        for count in args.counts:
            root = Path(tmp) / str(count)
            base, ckpt = build(root, count)
            times = [time_register(base, ckpt, root / f"store{r}") for r in range(args.repeats)]
            load = os.getloadavg()[0]
            row = {"tensors": count, "min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3),
                   "per_tensor_ms": round(1000 * min(times) / count, 3), "load_1min": round(load, 2)}
            rows.append(row)
            print(f"{count:>7} tensors: min {row['min_s']:.2f} s, median {row['median_s']:.2f} s, "
                  f"{row['per_tensor_ms']:.3f} ms/tensor (load {load:.2f}, {os.cpu_count()} CPUs)", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(f"time ratio {last['tensors']}/{first['tensors']} tensors: {last['min_s'] / first['min_s']:.1f}x for "
              f"{last['tensors'] / first['tensors']:.0f}x the tensors")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=1) + "\n")


if __name__ == "__main__":
    main()

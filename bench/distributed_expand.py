"""Distributed expand on a local 2-worker Ray cluster against the local path.

Builds the synthetic bench family of bench/peak_memory.py (float32, L tensors
of one size, N fine-tunes), registers it into two fresh stores and expands
one locally and one with ``RayRunner`` on ``ray.init(num_cpus=W)``. Reports
wall time, bytes read and written through the blob store (which is what
crosses the network when blobs live in a bucket), checks that the versions
are bit-identical, and derives per-parameter costs for a larger model.
Run:

    python bench/distributed_expand.py [--layers 16] [--tensor-mb 16] [--models 3] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from peak_memory import build  # noqa: E402

from mmer_cl.distributed.ray_expand import CountingBlobStore, RayRunner  # noqa: E402
from mmer_cl.store import Store  # noqa: E402
from storage import TensorReader  # noqa: E402


def version_blobs(store: Store) -> list[tuple]:
    v = store.version()
    return sorted((r.role, r.key, r.entry_id, r.digest) for r in store.registry.version_blobs(v.id))


def registered(root: Path, paths: list[Path]) -> Store:
    store = Store.init(root, paths[0], device=torch.device("cpu"))
    for i, p in enumerate(paths[1:]):
        store.register(p, f"ft{i}", "vision")
    return store


def measure(layers: int, tensor_mb: int, models: int, workers: int, threads: int | None = None) -> dict:
    import ray

    if threads:
        torch.set_num_threads(threads)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root / "models", layers, tensor_mb, models)
        t = time.perf_counter()
        local = registered(root / "local", paths)
        register_s = time.perf_counter() - t
        distributed = registered(root / "ray", paths)

        counting = CountingBlobStore(local.blobs)  # count what the local path moves, through the same API
        local.blobs, local.reader = counting, TensorReader(counting)
        t = time.perf_counter()
        local.expand()
        local_s = time.perf_counter() - t

        ray.init(address="local", num_cpus=workers, object_store_memory=200 * 2**20, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
        try:
            runner = RayRunner()
            ray.get([ray.remote(lambda: 0).remote() for _ in range(workers)])  # start workers outside the timing
            t = time.perf_counter()
            distributed.expand(runner=runner)
            ray_s = time.perf_counter() - t
            moved = runner.summary()
        finally:
            ray.shutdown()
        identical = version_blobs(local) == version_blobs(distributed)
        params = sum(torch.Size(t.shape).numel() for t in local.registry.base_tensors(local.base().id))
        stored = sum(local.blobs.size(d) for d in {r[3] for r in version_blobs(local)})
        local.close(), distributed.close()
    return {
        "layers": layers, "tensor_mib": tensor_mb, "models": models, "workers": workers,
        "local_torch_threads": torch.get_num_threads(), "ray_torch_threads_per_task": 1,
        "params": params, "tensors": layers, "register_seconds_per_model": round(register_s / models, 2),
        "local": {"seconds": round(local_s, 2), "read_bytes": counting.read_bytes,
                  "written_bytes": counting.written_bytes, "blobs_read": counting.blobs_read,
                  "blobs_written": counting.blobs_written},
        "ray": {"seconds": round(ray_s, 2), **{k: v for k, v in moved.items() if k != "workers"},
                "worker_processes": len(moved["workers"])},
        "bit_identical": identical, "version_stored_bytes": stored,
    }


def per_param(r: dict) -> dict:
    n = r["params"]
    return {"local_ns_per_param": r["local"]["seconds"] / n * 1e9,
            "ray_task_ns_per_param": r["ray"]["task_seconds"] / n * 1e9,
            "read_bytes_per_param": r["ray"]["read_bytes"] / n,
            "written_bytes_per_param": r["ray"]["written_bytes"] / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tensor-mb", type=int, default=16)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch threads of the local path [torch's default]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = measure(args.layers, args.tensor_mb, args.models, args.workers, args.threads)
    r["per_param"] = {k: round(v, 3) for k, v in per_param(r).items()}
    if args.json:
        print(json.dumps(r, indent=2))
        return
    mib = 2**20
    print(f"local path: {r['local_torch_threads']} torch threads; Ray: 1 thread per task")
    print(f"{r['models']} fine-tunes of a {r['params'] / 1e6:.0f}M-parameter float32 model "
          f"({r['layers']} tensors of {r['tensor_mib']} MiB); bit-identical: {r['bit_identical']}")
    print("| path | wall s | read MiB | written MiB | blobs read | blobs written |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, key in (("local", "local"), (f"Ray, {r['workers']} workers", "ray")):
        x = r[key]
        print(f"| {name} | {x['seconds']} | {x['read_bytes'] / mib:.1f} | {x['written_bytes'] / mib:.1f} | "
              f"{x['blobs_read']} | {x['blobs_written']} |")
    print(json.dumps(r["per_param"]))


if __name__ == "__main__":
    main()

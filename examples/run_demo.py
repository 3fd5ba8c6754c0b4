"""The mmer-cl demo: MMER on a small real multimodal family, end to end.

    python examples/run_demo.py              # ready-made checkpoints, 3 seeds, a few minutes
    python examples/run_demo.py --retrain    # retrain everything from the data first
    python examples/run_demo.py --quick      # a tiny smoke run (what CI checks)

Writes results.md, results.json and results.png to --out (default
examples/results). Checkpoints missing from --checkpoints are trained first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mmer_family import train  # noqa: E402
from mmer_family.evaluate import ORDER, Grid, evaluate_seed  # noqa: E402
from mmer_family.report import chart, markdown  # noqa: E402
from mmer_family.tasks import TASKS  # noqa: E402

FULL = {"base_steps": 2000, "ft_steps": 600}
QUICK = {"base_steps": 40, "ft_steps": 30}


def ensure_checkpoints(root: Path, seeds: list[int], steps: dict, retrain: bool, log=print) -> None:
    """Train whatever is missing (or everything, with retrain)."""
    if retrain and root.exists():
        shutil.rmtree(root)
    base = root / "base"
    if not (base / "config.json").exists():
        log(f"training the base LLM ({steps['base_steps']} steps)")
        train.pretrain_base(base, steps=steps["base_steps"], log=log)
    for seed in seeds:
        d = root / f"seed{seed}"
        for name in ORDER:
            if not (d / name / "config.json").exists():
                log(f"fine-tuning {name}, seed {seed}")
                train.finetune(base, TASKS[name], d / name, steps=steps["ft_steps"], seed=seed, log=log)
        if not (d / "sequential" / "config.json").exists():
            log(f"sequential fine-tune (audio_digit -> audio_speaker), seed {seed}")
            train.finetune(base, TASKS["audio_speaker"], d / "sequential", steps=steps["ft_steps"], seed=seed,
                           init_from=d / "audio_digit", log=log)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, default=HERE / "checkpoints")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--retrain", action="store_true", help="Retrain the base and all fine-tunes from the data.")
    ap.add_argument("--quick", action="store_true", help="Tiny training and evaluation, for CI (numbers meaningless).")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    transformers.utils.logging.disable_progress_bar()
    start = time.time()
    steps = QUICK if args.quick else FULL
    ensure_checkpoints(args.checkpoints, args.seeds, steps, args.retrain)
    trained = time.time() - start
    grid, limit = (Grid.quick(), 60) if args.quick else (Grid(), None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            print(f"evaluating seed {seed}")
            results.append(evaluate_seed(args.checkpoints, seed, Path(tmp) / f"seed{seed}", grid, limit=limit))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python examples/run_demo.py" + (" --quick" if args.quick else "") + \
        ("" if args.seeds == [0, 1, 2] else " --seeds " + " ".join(map(str, args.seeds)))
    meta = {"command": command, "seconds_training": round(trained, 1),
            "seconds_total": round(time.time() - start, 1),
            "note": "QUICK SMOKE RUN: tiny training, numbers meaningless." if args.quick else "",
            # the stored bytes in the storage table depend on the compressor's version
            "libzstd": ".".join(map(str, zstandard.ZSTD_VERSION))}
    (args.out / "results.md").write_text(markdown(results, meta))
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    chart(results, args.out / "results.png")
    print((args.out / "results.md").read_text())
    print(f"done in {time.time() - start:.0f}s (training {trained:.0f}s); wrote {args.out}")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()

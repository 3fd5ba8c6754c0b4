"""The lifelong table: eight fine-tunes arrive one at a time; every way of keeping them, measured.

    python examples/run_lifelong.py              # shipped checkpoints, seeds 0 1 2 (a few minutes on 2 cores)
    python examples/run_lifelong.py --retrain    # retrain the lifelong fine-tunes and chains first (36 fine-tunes, ~20 CPU-minutes)
    python examples/run_lifelong.py --quick      # a smoke run: tiny training in a temporary folder

Writes lifelong.md, lifelong.json and lifelong.png to --out (default
examples/results). Checkpoints missing from --checkpoints are trained first;
--retrain retrains the lifelong ones (``<checkpoints>/lifelong``) and keeps
the base and today's three fine-tunes (``run_demo.py --retrain`` retrains
those; an empty --checkpoints folder gets everything trained).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import transformers
import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lifelong_family import evaluate, train  # noqa: E402
from lifelong_family.report import chart, markdown  # noqa: E402
from lifelong_family.tasks import ORDER  # noqa: E402

FULL = {"base_steps": 2000, "ft_steps": 600, "limit": None, "val_limit": 200}
QUICK = {"base_steps": 40, "ft_steps": 30, "limit": 40, "val_limit": 40}


class Progress:
    """One line per step: step / total, percent, seconds since the start (shared by worker processes)."""

    def __init__(self, total: int, start: float | None = None, counter=None):
        self.total, self.start, self.counter, self.done = max(total, 1), start or time.time(), counter, 0

    def step(self, message: str) -> None:
        if self.counter is None:
            self.done += 1
        else:
            with self.counter.get_lock():
                self.counter.value += 1
                self.done = self.counter.value
        self.line(message)

    def line(self, message: str) -> None:
        if self.counter is not None:
            self.done = self.counter.value
        pct = 100 * min(self.done, self.total) / self.total
        print(f"[{self.done:3d}/{self.total} {pct:3.0f}% {time.time() - self.start:6.0f}s] {message}", flush=True)


_WORKER: dict = {}


def _setup(threads: int, progress: Progress) -> None:
    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    _WORKER["progress"] = progress


def _validate(job: tuple) -> list[float]:
    ckpt, seed, order, limit, points, work, val_limit = job
    family = evaluate.Family(ckpt, seed, order, limit)
    return evaluate.validate(family, points, work, val_limit, _WORKER["progress"].step)


def _run_seed(job: tuple) -> dict:
    ckpt, seed, order, limit, chosen, work = job
    family = evaluate.Family(ckpt, seed, order, limit)
    return evaluate.run_seed(family, chosen, work, _WORKER["progress"].step)


def _map(fn, jobs: list[tuple], workers: int, progress: Progress, threads: int) -> list:
    """fn over jobs, in this process or in ``workers`` processes (each with ``threads`` torch threads)."""
    if workers <= 1:
        _setup(threads, progress)
        return [fn(job) for job in jobs]
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("i", progress.done)
    shared = Progress(progress.total, progress.start, counter)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_setup, initargs=(threads, shared)) as pool:
        out = list(pool.map(fn, jobs))
    progress.done = counter.value
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, help="[examples/checkpoints; --quick: a temporary folder]")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arrivals", type=int, default=len(ORDER), help="Stop after this many arrivals.")
    ap.add_argument("--retrain", action="store_true", help="Retrain the lifelong fine-tunes and chains first.")
    ap.add_argument("--quick", action="store_true", help="Tiny training and evaluation (numbers meaningless).")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each [2]")
    args = ap.parse_args(argv)
    # one thread per process everywhere: the figures then do not depend on the machine's core count
    _setup(1, None)
    start = time.time()
    sizes = QUICK if args.quick else FULL
    order = ORDER[:args.arrivals]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoints or (Path(tmp) / "checkpoints" if args.quick else HERE / "checkpoints")
        if args.retrain and (ckpt / "lifelong").exists():
            shutil.rmtree(ckpt / "lifelong")
        todo = train.missing(ckpt, args.seeds, len(order))
        grid = evaluate.Grid.quick() if args.quick else evaluate.Grid()
        n_select = sum(len(getattr(grid, m)) for m in ("mmer", *evaluate.MERGES))
        progress = Progress(len(todo) + int(not (ckpt / "base" / "config.json").exists()) + n_select +
                            len(args.seeds) * len(order) + 1)
        progress.line(f"{len(todo)} fine-tunes to train, {n_select} validation points, "
                      f"{len(args.seeds)} seed(s) x {len(order)} arrivals to score")
        train.ensure(ckpt, args.seeds, sizes["ft_steps"], sizes["base_steps"], progress.step,
                     log=lambda message: progress.line("  " + message.strip()),
                     arrivals=len(order))
        trained = time.time() - start

        # the merge parameters, once: seed 0's validation splits, every entry registered
        points = evaluate.grid_points(grid)
        chunks = [points[i::args.jobs] for i in range(min(args.jobs, len(points)))]
        work = Path(tmp)
        vals = _map(_validate, [(ckpt, args.seeds[0], order, sizes["limit"], c, work / f"select{i}", sizes["val_limit"])
                                for i, c in enumerate(chunks)], args.jobs, progress, 1)
        by_point = {id(p): v for c, vs in zip(chunks, vals) for (_, p), v in zip(c, vs)}
        selection = evaluate.choose(points, [by_point[id(p)] for _, p in points], args.seeds[0], sizes["val_limit"])
        progress.line("chosen on validation: " + "; ".join(f"{m} {evaluate._short(evaluate.MergeParams.from_dict(p))}"
                                                           for m, p in selection["chosen"].items()))
        results = _map(_run_seed, [(ckpt, seed, order, sizes["limit"], selection["chosen"], work / f"seed{seed}")
                                   for seed in args.seeds], min(args.jobs, len(args.seeds)), progress, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python examples/run_lifelong.py" + (" --quick" if args.quick else "") + \
        ("" if args.seeds == [0, 1, 2] else " --seeds " + " ".join(map(str, args.seeds))) + \
        ("" if len(order) == len(ORDER) else f" --arrivals {len(order)}")
    meta = {"command": command, "seconds_training": round(trained, 1), "seconds_total": round(time.time() - start, 1),
            "jobs": args.jobs, "selection": selection,
            "note": "QUICK SMOKE RUN: tiny training, numbers meaningless." if args.quick else "",
            "libzstd": ".".join(map(str, zstandard.ZSTD_VERSION))}
    stem = "lifelong-quick" if args.quick and args.out == HERE / "results" else "lifelong"
    (args.out / f"{stem}.md").write_text(markdown(results, meta))
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    chart(results, args.out / f"{stem}.png")
    progress.step(f"wrote {args.out / stem}.md / .json / .png")
    print((args.out / f"{stem}.md").read_text().split("## BWT after")[0])
    print(f"done in {time.time() - start:.0f}s (training {trained:.0f}s)")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()

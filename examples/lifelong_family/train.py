"""Training the lifelong family: the new entries and the sequential chain, per seed.

Reuses ``mmer_family.train``: the same base, the same full fine-tuning recipe
(LLM lr 3e-4, encoder and projector lr 3e-3, batch 64, cosine schedule),
seeded by the seed. Layout under ``<checkpoints>/lifelong/seed{s}/``:

* ``{entry}.safetensors``: the five new entries, each fine-tuned from the base
  (the first three entries are today's ``<checkpoints>/seed{s}/{entry}``);
* ``sequential/{t}_{entry}.safetensors``, t = 2..8: the sequential chain, step
  t fine-tuned from step t-1's LLM (a fresh encoder and projector for entry
  t); step 1 is ``vision_digit`` itself.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from lifelong_family.compact import load_compact, save_compact
from lifelong_family.tasks import ENCODER_HIDDEN, NEW, ORDER, TASKS
from mmer_family import train
from mmer_family.model import TinyMLLM, load_mllm


def lifelong_dir(root: Path, seed: int) -> Path:
    return root / "lifelong" / f"seed{seed}"


def chain_path(root: Path, seed: int, t: int) -> Path:
    """Step t (1-based) of the sequential chain; step 1 is the first entry's own fine-tune."""
    if t == 1:
        return entry_path(root, seed, ORDER[0])
    return lifelong_dir(root, seed) / "sequential" / f"{t}_{ORDER[t - 1]}.safetensors"


def entry_path(root: Path, seed: int, name: str) -> Path:
    if name in NEW:
        return lifelong_dir(root, seed) / f"{name}.safetensors"
    return root / f"seed{seed}" / name


def load_entry(path: Path, base_dir: Path, base: dict | None = None) -> TinyMLLM:
    """A fine-tune from a checkpoint directory or a compact file, float32, eval mode."""
    return load_compact(path, base_dir, base) if path.suffix == ".safetensors" else load_mllm(path)


def _finetune(start_llm: Path, name: str, seed: int, steps: int, log) -> TinyMLLM:
    with tempfile.TemporaryDirectory() as tmp:
        return train.finetune(start_llm, TASKS[name], Path(tmp) / "ft", steps=steps, seed=seed,
                              encoder_hidden=ENCODER_HIDDEN.get(name, 128), log=log)


def ensure(root: Path, seeds: list[int], steps: int, base_steps: int, progress, log=print,
           arrivals: int = len(ORDER)) -> None:
    """Train whatever is missing: the base, today's three entries, the new entries, the sequential chain
    (of the first ``arrivals`` entries)."""
    base = root / "base"
    if not (base / "config.json").exists():
        progress("training the base LLM")
        train.pretrain_base(base, steps=base_steps, log=log)
    todo = missing(root, seeds, arrivals)
    started = time.time()
    for i, (seed, name, t) in enumerate(todo):
        what = name if t is None else f"sequential step {t} ({name})"
        progress(f"training {i + 1}/{len(todo)}: seed {seed} {what}, {time.time() - started:.0f}s so far")
        if t is None and name not in NEW:  # today's family, saved as run_demo saves it
            train.finetune(base, TASKS[name], entry_path(root, seed, name), steps=steps, seed=seed, log=log)
        elif t is None:
            save_compact(_finetune(base, name, seed, steps, log), base, entry_path(root, seed, name))
        else:
            previous = load_entry(chain_path(root, seed, t - 1), base)
            with tempfile.TemporaryDirectory() as tmp:
                start = Path(tmp) / "llm"
                previous.language_model.save_pretrained(start)
                PreTrainedTokenizerFast.from_pretrained(base).save_pretrained(start)
                model = _finetune(start, name, seed, steps, log)
            save_compact(model, base, chain_path(root, seed, t))


def missing(root: Path, seeds: list[int], arrivals: int = len(ORDER)) -> list[tuple[int, str, int | None]]:
    """(seed, entry, chain step or None) of every fine-tune not yet on disk, in training order."""
    todo = []
    for seed in seeds:
        todo += [(seed, name, None) for name in ORDER[:arrivals] if not _exists(entry_path(root, seed, name))]
        todo += [(seed, ORDER[t - 1], t) for t in range(2, arrivals + 1) if not chain_path(root, seed, t).exists()]
    return todo


def _exists(path: Path) -> bool:
    return (path / "config.json").exists() if path.suffix != ".safetensors" else path.exists()


if __name__ == "__main__":  # a quick look at how each new task learns: python -m lifelong_family.train
    import sys

    from mmer_family.scoring import accuracy
    from lifelong_family.tasks import splits

    torch.set_num_threads(1)
    root, steps = Path(__file__).parents[1] / "checkpoints", int(sys.argv[1]) if len(sys.argv) > 1 else 150
    tok = PreTrainedTokenizerFast.from_pretrained(root / "base")
    for name in sys.argv[2:] or NEW:
        start = time.time()
        model = _finetune(root / "base", name, 0, steps, log=lambda *_: None).eval()
        v = splits(name)["val"]
        print(name, steps, "steps: val", round(accuracy(model, tok, TASKS[name], v.x, v.y), 3),
              f"{time.time() - start:.0f}s", flush=True)

"""Measuring the family through mmer-cl itself: register, expand, load, score.

For one seed's fine-tunes:

1. originals: each fine-tuned MLLM as trained;
2. merges (task arithmetic, ties, average): one merged LLM for every modality,
   each modality keeping its own encoder (NaiveMC-style), via
   ``Store.load(..., use_mask=False)``;
3. MMER: ``base + mask * merged`` per modality, via ``Store.load``;
4. text: held-out Shakespeare perplexity of the base, every fine-tuned LLM,
   every merged LLM and every reconstruction;
5. continual learning: entries registered one after another, an incremental
   expansion after each, the accuracy matrix and backward transfer; and the
   sequential fine-tune (audio digits, then speakers) for comparison.

Hyperparameters are chosen by mean validation accuracy over the tasks; the
test split is scored once, with the chosen ones.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from mmer_cl import MergeParams
from mmer_cl.store import Store
from mmer_family import expansion
from mmer_family.data import Split, shakespeare_heldout
from mmer_family.model import TinyMLLM, load_base, load_mllm
from mmer_family.scoring import accuracy, perplexity
from mmer_family.tasks import TASKS

ORDER = ("vision_digit", "audio_digit", "audio_speaker")
METHODS = ("task_arithmetic", "average", "ties", "mmer")


@dataclass
class Grid:
    """Candidate parameters per method, searched on the validation split."""

    task_arithmetic: list[MergeParams] = field(default_factory=lambda: [
        MergeParams(method="task_arithmetic", alpha=a) for a in (0.3, 0.5, 0.7, 1.0)])
    average: list[MergeParams] = field(default_factory=lambda: [MergeParams(method="average")])
    ties: list[MergeParams] = field(default_factory=lambda: [
        MergeParams(method="ties", density=d, alpha=a) for d in (0.2, 0.5, 1.0) for a in (0.7, 1.0, 1.5)])
    mmer: list[MergeParams] = field(default_factory=lambda: [
        MergeParams(method="ties", density=d, lam=lam) for d in (0.2, 0.5, 1.0) for lam in (0.5, 0.75, 1.0)])

    @classmethod
    def quick(cls) -> "Grid":
        return cls(task_arithmetic=[MergeParams(method="task_arithmetic", alpha=0.5)],
                   ties=[MergeParams(method="ties", density=0.5)],
                   mmer=[MergeParams(density=0.5, lam=lam) for lam in (0.75, 1.0)])


def _limit(split: Split, n: int | None) -> Split:
    return split if n is None else Split(split.x[:n], split.y[:n])


def evaluate_seed(ckpt: Path, seed: int, work: Path, grid: Grid, limit: int | None = None, log=print) -> dict:
    base_dir = ckpt / "base"
    seed_dir = ckpt / f"seed{seed}"
    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    text = shakespeare_heldout()
    windows = 200 if limit is None else 10
    splits = {n: {k: _limit(v, limit) for k, v in TASKS[n].splits().items()} for n in ORDER}

    def score(model, name: str, split: str) -> float:
        s = splits[name][split]
        return accuracy(model, tok, TASKS[name], s.x, s.y)

    out: dict = {"seed": seed, "original": {}, "test": {}, "val": {}, "chosen": {}, "ppl": {}, "mask_density": {}}
    out["ppl"]["base"] = perplexity(load_base(base_dir), tok, text, windows=windows)
    for name in ORDER:
        model = load_mllm(seed_dir / name)
        out["original"][name] = {"val": score(model, name, "val"), "test": score(model, name, "test")}
        out["ppl"][f"fine-tuned {name}"] = perplexity(model.language_model, tok, text, windows=windows)
    log(f"  seed {seed} originals: " + ", ".join(f"{n} {out['original'][n]['test']:.3f}" for n in ORDER))

    store = Store.init(work / "store", base_dir, actor="demo")
    for name in ORDER:
        store.register(seed_dir / name, name, TASKS[name].modality, name, actor="demo")

    def load(name: str, version: int, use_mask: bool):
        return store.load(name, version=version, model_class=TinyMLLM, device="cpu", use_mask=use_mask)

    versions: dict[str, int] = {}
    for method in METHODS:
        use_mask = method == "mmer"
        best = None
        for params in getattr(grid, method):
            v = store.expand(params, actor="demo").version.number
            val = statistics.mean(score(load(n, v, use_mask), n, "val") for n in ORDER)
            if best is None or val > best[0]:
                best = (val, v, params)
        val, v, params = best
        versions[method] = v
        out["chosen"][method] = params.to_dict()
        out["val"][method] = val
        out["test"][method] = {n: score(load(n, v, use_mask), n, "test") for n in ORDER}
        if use_mask:
            version = store.version(v)
            out["mask_density"] = {m.entry_name: m.mask_density for m in version.members}
            for n in ORDER:
                out["ppl"][f"MMER {n} reconstruction"] = perplexity(load(n, v, True).language_model, tok, text,
                                                                    windows=windows)
            out["storage"] = store.report(v, ranks=(8, 16, 64), svd=True)
            out["mmer_version"] = v
        else:
            out["ppl"][f"merged LLM ({method})"] = perplexity(load(ORDER[0], v, False).language_model, tok, text,
                                                              windows=windows)
        log(f"  seed {seed} {method:<15} val {val:.3f}  test " +
            ", ".join(f"{n} {out['test'][method][n]:.3f}" for n in ORDER))
    out["ppl"]["MMER text path (base)"] = out["ppl"]["base"]
    started = time.process_time()
    out["expansion"] = expansion.evaluate(store, versions, seed_dir, tok, text, windows, limit, log=log)
    out["expansion"]["cpu_seconds"] = round(time.process_time() - started, 1)
    store.close()

    out["continual"] = continual(seed_dir, base_dir, work, MergeParams.from_dict(out["chosen"]["mmer"]),
                                 MergeParams.from_dict(out["chosen"]["ties"]), score)
    seq = load_mllm(seed_dir / "sequential")
    out["sequential"] = {"audio_digit": score(seq, "audio_digit", "test"),
                         "audio_speaker": score(seq, "audio_speaker", "test")}
    out["ppl"]["fine-tuned sequential"] = perplexity(seq.language_model, tok, text, windows=windows)
    out["single_entry_exact"] = single_entry_exact(seed_dir, base_dir, work, score, out["original"])
    return out


def continual(seed_dir: Path, base_dir: Path, work: Path, mmer: MergeParams, ties: MergeParams, score) -> dict:
    """Accuracy matrices R[i][j]: task j after registering entries 0..i, for MMER and a plain ties merge."""
    result = {}
    for label, params, use_mask in (("mmer", mmer, True), ("ties_merge", ties, False)):
        store = Store.init(work / f"cl-{label}", base_dir, actor="demo")
        rows, incremental = [], []
        for i, name in enumerate(ORDER):
            store.register(seed_dir / name, name, TASKS[name].modality, name, actor="demo")
            res = store.expand(params, actor="demo")
            incremental.append(res.incremental)
            rows.append([score(store.load(n, model_class=TinyMLLM, device="cpu", use_mask=use_mask), n, "test")
                         for n in ORDER[:i + 1]])
        store.close()
        result[label] = {"R": rows, "bwt": backward_transfer(rows), "incremental": incremental}
    return result


def backward_transfer(rows: list[list[float]]) -> float:
    """BWT = mean over earlier tasks of (final accuracy - accuracy just after learning it); minus forgetting."""
    t = len(rows)
    if t < 2:
        return 0.0
    return statistics.mean(rows[-1][j] - rows[j][j] for j in range(t - 1))


def single_entry_exact(seed_dir: Path, base_dir: Path, work: Path, score, original: dict) -> bool:
    """A store holding one entry, at density 1 and lambda 1, reconstructs that model: same accuracy, same weights."""
    store = Store.init(work / "single", base_dir, actor="demo")
    store.register(seed_dir / ORDER[0], ORDER[0], TASKS[ORDER[0]].modality, actor="demo")
    store.expand(MergeParams(density=1.0, lam=1.0), actor="demo")
    rebuilt = store.load(ORDER[0], model_class=TinyMLLM, device="cpu")
    store.close()
    ref = load_mllm(seed_dir / ORDER[0])
    same_weights = all(a.equal(b) for a, b in zip(rebuilt.state_dict().values(), ref.state_dict().values()))
    return same_weights and score(rebuilt, ORDER[0], "test") == original[ORDER[0]]["test"]

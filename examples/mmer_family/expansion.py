"""Expansion evidence: one composed model answering from a digit image AND a spoken digit at once.

Each input carries an 8x8 digit image and a spoken digit of the SAME number
(pairs drawn at random, per split, from the two datasets' own splits), then
a prompt; the answer is the digit word, scored by answer likelihood as in
``scoring.accuracy``. Variants: clean; noisy (Gaussian noise of std
``NOISE`` on both inputs); image masked (all zeros); audio masked (all
zeros). Only the degraded variants can show whether two modalities together
beat either alone.

Compared, through the store's API:

* MMER composed (``Store.compose``; vision and audio tokens on their own
  ``theta_0 + m_i * tau_*``), for each text-token choice: base, merged, and
  each entry;
* one merged LLM with both encoders (NaiveMC style, ``compose(use_mask=False)``),
  for task arithmetic / ties / average at their validation-chosen parameters;
* each original fine-tune given only its own modality.

The prompt (one of the two tasks' prompts) and the text-token choice are
picked on the validation pairs (clean); the test pairs are scored once.
Text skill: held-out Shakespeare perplexity of the composed model's text path
for each text-token choice.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mmer_cl.runtime.progress import Progress
from mmer_family.model import load_mllm
from mmer_family.scoring import accuracy, answer_batch, perplexity
from mmer_family.tasks import TASKS

VISION, AUDIO = "vision_digit", "audio_digit"
NOISE = 0.35
VARIANTS = ("clean", "noisy", "image masked", "audio masked")
PROMPTS = (TASKS[VISION].prompt, TASKS[AUDIO].prompt)
CHOICES = ("base", "merged", VISION, AUDIO)
VAL_PAIRS = 100


def pairs(split: str, limit: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, audio features, labels): every spoken digit of ``split`` with a random image of the same digit."""
    images, audio = TASKS[VISION].splits()[split], TASKS[AUDIO].splits()[split]
    gen = torch.Generator().manual_seed(1000 + seed)
    idx = []
    for y in audio.y.tolist():
        same = (images.y == y).nonzero().squeeze(1)
        idx.append(int(same[torch.randint(len(same), (1,), generator=gen)]))
    n = len(audio.y) if limit is None else min(limit, len(audio.y))
    return images.x[idx][:n], audio.x[:n], audio.y[:n]


def variant(name: str, images: torch.Tensor, audio: torch.Tensor, seed: int = 0):
    gen = torch.Generator().manual_seed(2000 + seed)
    if name == "noisy":
        return (images + NOISE * torch.randn(images.shape, generator=gen),
                audio + NOISE * torch.randn(audio.shape, generator=gen))
    if name == "image masked":
        return torch.zeros_like(images), audio
    if name == "audio masked":
        return images, torch.zeros_like(audio)
    return images, audio


@torch.no_grad()
def mixed_accuracy(composed, tok, prompt: str, images, audio, labels, text_params: str | None = None,
                   chunk: int = 64) -> float:
    """Answer-likelihood accuracy of the composed model on image + audio + prompt."""
    words = list(TASKS[VISION].labels)
    ids, target = answer_batch(tok, prompt, words)
    c = len(words)
    correct = 0
    for s in range(0, len(labels), chunk):
        n = len(labels[s:s + chunk])
        inputs = {VISION: {"features": images[s:s + chunk].repeat_interleave(c, 0)},
                  AUDIO: {"features": audio[s:s + chunk].repeat_interleave(c, 0)}}
        batch_ids = ids.repeat(n, 1)
        logits = composed(batch_ids, inputs=inputs, text_params=text_params).logits[:, -ids.shape[1]:]
        logp = -F.cross_entropy(logits[:, :-1].transpose(1, 2), batch_ids[:, 1:], reduction="none")
        score = (logp * target.repeat(n, 1)[:, 1:]).sum(-1).view(n, c)
        correct += int((score.argmax(-1) == labels[s:s + chunk]).sum())
    return correct / len(labels)


def evaluate(store, versions: dict[str, int], seed_dir: Path, tok, text: str, windows: int, limit: int | None,
             log=print) -> dict:
    """Expansion results of one seed; ``versions`` maps method -> the store version chosen on validation."""
    val, test = pairs("val", VAL_PAIRS if limit is None else limit), pairs("test", limit)
    out: dict = {"noise": NOISE, "test": {}, "val": {}, "ppl": {}}
    composed = store.compose([VISION, AUDIO], version=versions["mmer"])
    out["default_text_params"] = composed.text_params
    systems = {f"MMER composed, text on {c}": (composed, c) for c in CHOICES}
    for method in ("task_arithmetic", "ties", "average"):
        systems[f"merged LLM + both encoders ({method})"] = (
            store.compose([VISION, AUDIO], version=versions[method], use_mask=False), "merged")
    # progress of the slow part (mixed inputs through each system): a bar in a terminal, a line every 15 s in a log
    done = [0]
    total = [len(systems) * (len(PROMPTS) + len(VARIANTS)) + len(VARIANTS) * 2 + len(CHOICES)]
    bar = Progress("  seed evaluation (mixed inputs, test and validation)", quiet=False, interval=15)

    def step(value):
        done[0] += 1
        bar(done[0], total[0])
        return value

    # validation: the prompt per system, and which text-token choice scores best
    prompts = {}
    for label, (model, text_params) in systems.items():
        accs = {p: step(mixed_accuracy(model, tok, p, *val, text_params=text_params)) for p in PROMPTS}
        prompts[label] = max(accs, key=accs.get)
        out["val"][label] = accs[prompts[label]]
    best = max(CHOICES, key=lambda c: out["val"][f"MMER composed, text on {c}"])
    out["val_best_text_params"] = best
    out["prompts"] = prompts
    full = {f"MMER composed, text on {c}" for c in {best, composed.text_params}} | \
        {label for label in systems if "merged LLM" in label}
    total[0] = done[0] + sum(len(VARIANTS) if label in full else 1 for label in systems) + len(VARIANTS) * 2 \
        + len(CHOICES)
    for label, (model, text_params) in systems.items():  # other text choices: clean test pairs only (cost)
        variants = VARIANTS if label in full else VARIANTS[:1]
        out["test"][label] = {v: step(mixed_accuracy(model, tok, prompts[label], *variant(v, test[0], test[1]),
                                                     test[2], text_params=text_params)) for v in variants}
    originals = {VISION: load_mllm(seed_dir / VISION), AUDIO: load_mllm(seed_dir / AUDIO)}
    for name, model in originals.items():
        row = {}
        for v in VARIANTS:
            images, audio = variant(v, test[0], test[1])
            row[v] = step(accuracy(model, tok, TASKS[name], images if name == VISION else audio, test[2]))
        out["test"][f"original {name}, its own modality only"] = row
    for c in CHOICES:
        out["ppl"][c] = step(perplexity(composed.text_model(c), tok, text, windows=windows))
    bar.__exit__(None, None, None)
    d = f"MMER composed, text on {composed.text_params}"
    log(f"  seed expansion: default text {composed.text_params}: test " +
        ", ".join(f"{v} {out['test'][d][v]:.3f}" for v in VARIANTS) + f"; validation's best text choice: {best}")
    return out


def markdown(results: list[dict]) -> list[str]:
    """The expansion section of results.md (mean ± std over seeds)."""
    from mmer_family.report import ms

    exp = [r["expansion"] for r in results]
    lines = ["", "## Expansion: one composed model, image and speech in one input", "",
             "Each input: a digit image AND a spoken digit of the same number, then a prompt; answer = the digit "
             f"word. Degraded variants: noise (std {exp[0]['noise']}) on both inputs, or one input zeroed. "
             "Accuracy in % on the test pairs, scored once; the prompt of each system was picked on validation "
             f"pairs (clean). Default text-token choice: {exp[0]['default_text_params']}.", "",
             "| system | " + " | ".join(VARIANTS) + " |", "|---|" + "---:|" * len(VARIANTS)]
    for label in exp[0]["test"]:
        cells = [ms([e["test"][label][v] for e in exp]) if v in exp[0]["test"][label] else "" for v in VARIANTS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Text-token parameters of the composed model: held-out Shakespeare perplexity of its text path, "
              "mixed accuracy on validation and test pairs (clean):", "",
              "| text tokens on | perplexity | mixed accuracy, val | mixed accuracy, test |", "|---|---:|---:|---:|"]
    for c in exp[0]["ppl"]:
        label = f"MMER composed, text on {c}"
        lines.append(f"| {c} | {ms([e['ppl'][c] for e in exp], pct=False)} | {ms([e['val'][label] for e in exp])} | "
                     f"{ms([e['test'][label]['clean'] for e in exp])} |")
    lines += ["", "Best text-token choice on validation, per seed: " +
              ", ".join(e["val_best_text_params"] for e in exp) + ". Prompts picked (per seed, MMER default row): " +
              ", ".join(repr(e["prompts"][f"MMER composed, text on {e['default_text_params']}"]) for e in exp) + "."]
    return lines

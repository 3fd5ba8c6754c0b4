"""Scoring: task accuracy by answer likelihood, and text perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from mmer_family.tasks import Task


def answer_batch(tok: PreTrainedTokenizerFast, prompt: str, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``prompt + answer + newline`` (right-padded) and a mask of the answer positions."""
    p = tok(prompt)["input_ids"]
    rows = [tok(a + "\n")["input_ids"] for a in answers]
    width = len(p) + max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    target = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        target[i, len(p):len(p) + len(r)] = 1.0
    return ids, target


@torch.no_grad()
def accuracy(model, tok: PreTrainedTokenizerFast, task: Task, features: torch.Tensor, labels: torch.Tensor,
             chunk: int = 128) -> float:
    """The model's answer is the label word it finds most likely (sum of token log-probs)."""
    ids, target = answer_batch(tok, task.prompt, list(task.labels))
    c = len(task.labels)
    correct = 0
    for s in range(0, len(labels), chunk):
        x = features[s:s + chunk]
        n = len(x)
        logits = model(x.repeat_interleave(c, 0), ids.repeat(n, 1))
        logp = -F.cross_entropy(logits[:, :-1].transpose(1, 2), ids.repeat(n, 1)[:, 1:], reduction="none")
        score = (logp * target.repeat(n, 1)[:, 1:]).sum(-1).view(n, c)
        correct += int((score.argmax(-1) == labels[s:s + chunk]).sum())
    return correct / len(labels)


@torch.no_grad()
def perplexity(llm, tok: PreTrainedTokenizerFast, text: str, seq: int = 128, windows: int = 200) -> float:
    """exp(mean next-character loss) over up to ``windows`` disjoint windows of held-out text."""
    ids = torch.tensor(tok(text)["input_ids"])
    n = min(windows, (len(ids) - 1) // seq)
    x = ids[: n * seq + 1]
    inputs = torch.stack([x[i * seq:(i + 1) * seq] for i in range(n)])
    targets = torch.stack([x[i * seq + 1:(i + 1) * seq + 1] for i in range(n)])
    total = 0.0
    for s in range(0, n, 50):
        logits = llm(input_ids=inputs[s:s + 50]).logits
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[s:s + 50].reshape(-1),
                                       reduction="sum"))
    return math.exp(total / (n * seq))

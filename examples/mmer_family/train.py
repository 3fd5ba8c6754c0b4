"""Training the family: the base on Shakespeare, then full fine-tunes per task.

Every run is seeded; checkpoints are saved with save_pretrained (safetensors)
next to the tokenizer, in the standard Hugging Face layout.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mmer_family import data
from mmer_family.model import TinyMLLM, TinyMLLMConfig, base_config, build_tokenizer
from mmer_family.scoring import answer_batch
from mmer_family.tasks import Task


def _cosine(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _save(model, tok: PreTrainedTokenizerFast, out_dir: Path):
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return model


def pretrain_base(out_dir: Path, steps: int = 2000, seed: int = 0, seq: int = 128, batch: int = 32,
                  lr: float = 3e-3, train_text: str | None = None, log=print) -> LlamaForCausalLM:
    """Pretrain the char-level Llama on the first 90% of tiny Shakespeare (or ``train_text``)."""
    torch.manual_seed(seed)
    train_text = train_text if train_text is not None else data.shakespeare_split()[0]
    tok = build_tokenizer(train_text + data.shakespeare_heldout())
    ids = torch.tensor(tok(train_text)["input_ids"])
    model = LlamaForCausalLM(base_config(len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, 100)
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq + 1] for s in starts])
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        _step(model, opt, loss)
        if step % 250 == 0 or step == steps - 1:
            log(f"  base step {step:5d}  loss {loss.item():.3f}  {time.time() - start:.0f}s")
    return _save(model, tok, out_dir)


def finetune(base_dir: Path, task: Task, out_dir: Path, steps: int = 600, seed: int = 0, batch: int = 64,
             lr_llm: float = 3e-4, lr_side: float = 3e-3, init_from: Path | None = None,
             encoder_hidden: int = 128, log=print) -> TinyMLLM:
    """Full fine-tuning of the LLM plus the task's encoder and projector (of width ``encoder_hidden``).

    ``base_dir`` holds the LLM to start from (and its tokenizer): the base, or any LLM saved beside a tokenizer.
    """
    torch.manual_seed(seed)
    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    if init_from is not None:
        model = TinyMLLM.from_pretrained(init_from)
    else:
        base = LlamaForCausalLM.from_pretrained(base_dir)
        cfg = TinyMLLMConfig(text_config=base.config, modality=task.modality, feature_shape=task.feature_shape,
                             encoder_hidden=encoder_hidden, architectures=["TinyMLLM"])
        model = TinyMLLM(cfg)
        model.language_model.load_state_dict(base.state_dict())
    train = task.splits()["train"]
    llm = list(model.language_model.parameters())
    side = [p for n, p in model.named_parameters() if not n.startswith("language_model.")]
    opt = torch.optim.AdamW([{"params": llm, "lr": lr_llm, "base": lr_llm},
                             {"params": side, "lr": lr_side, "base": lr_side}], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = g["base"] * _cosine(step, steps, 20)
        idx = torch.randint(0, len(train.y), (batch,), generator=gen)
        ids, target = answer_batch(tok, task.prompt, [task.labels[i] for i in train.y[idx]])
        logits = model(train.x[idx], ids)
        loss = (F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none") * target[:, 1:]).sum() \
            / target[:, 1:].sum()
        _step(model, opt, loss)
        if step % 100 == 0 or step == steps - 1:
            log(f"  {task.name} step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s")
    return _save(model, tok, out_dir)

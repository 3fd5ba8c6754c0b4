"""Fine-tune one more task with transformers' Trainer; MMERCallback puts it into the store.

    python examples/trainer_callback.py                    # about a minute on 2 CPU cores
    python examples/trainer_callback.py --steps 5 --limit 40   # a smoke run (what the tests do)

A store starts with the shipped fine-tunes (handwritten digits, spoken
digits; `examples/checkpoints/seed0`) merged as version 1. Then a new task,
the parity of a handwritten digit ("even" / "odd"), is fine-tuned from the
base with `Trainer`. `MMERCallback` saves, registers and expands when
training ends, so version 2 holds three entries. The table shows each
entry's test accuracy as trained, through version 1, and through version 2:
the earlier entries keep their scores while the store gains the new task.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mmer_family import data  # noqa: E402
from mmer_family.model import TinyMLLM, TinyMLLMConfig, load_mllm  # noqa: E402
from mmer_family.scoring import accuracy, answer_batch  # noqa: E402
from mmer_family.tasks import TASKS, Task  # noqa: E402

from mmer_cl import MergeParams  # noqa: E402
from mmer_cl.integrations import MMERCallback  # noqa: E402
from mmer_cl.store import Store  # noqa: E402
from mmer_cl.runtime.table import render_table  # noqa: E402

CHECKPOINTS = HERE / "checkpoints"
EARLIER = ("vision_digit", "audio_digit")


def parity_splits() -> dict[str, data.Split]:
    return {k: data.Split(s.x, s.y % 2) for k, s in data.digits_splits().items()}


PARITY = Task("vision_parity", "vision", "parity: ", ("even", "odd"), parity_splits, (64,))


class Examples(torch.utils.data.Dataset):
    def __init__(self, split: data.Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.y)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.split.x[i], "label": int(self.split.y[i])}


class AnswerTrainer(Trainer):
    """The family's loss: cross-entropy on the answer's characters only."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, target = inputs["input_ids"], inputs["target"]
        logits = model(inputs["features"], ids)
        token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (token_loss * target[:, 1:]).sum() / target[:, 1:].sum()
        return (loss, logits) if return_outputs else loss


def new_model(base_dir: Path, task: Task) -> TinyMLLM:
    """A TinyMLLM for ``task`` whose LLM starts as the base (as every entry of the family does)."""
    base = LlamaForCausalLM.from_pretrained(base_dir)
    cfg = TinyMLLMConfig(text_config=base.config, modality=task.modality, feature_shape=task.feature_shape,
                         architectures=["TinyMLLM"])
    model = TinyMLLM(cfg)
    model.language_model.load_state_dict(base.state_dict())
    return model


def limited(split: data.Split, n: int | None) -> data.Split:
    return split if n is None else data.Split(split.x[:n], split.y[:n])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="Store directory to create [a temporary one].")
    ap.add_argument("--steps", type=int, default=100, help="Trainer steps for the new task [100].")
    ap.add_argument("--batch", type=int, default=32, help="Batch size [32].")
    ap.add_argument("--limit", type=int, help="Score on the first N test examples only (smoke runs).")
    ap.add_argument("--checkpoints", type=Path, default=CHECKPOINTS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    base_dir = args.checkpoints / "base"
    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    tasks = {**{n: TASKS[n] for n in EARLIER}, PARITY.name: PARITY}
    tests = {n: limited(t.splits()["test"], args.limit) for n, t in tasks.items()}

    def score(model, name: str) -> float:
        return accuracy(model, tok, tasks[name], tests[name].x, tests[name].y)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.store or Path(tmp) / "store"
        with Store.init(root, base_dir, actor="trainer-example") as store:
            for name in EARLIER:
                store.register(args.checkpoints / "seed0" / name, name, tasks[name].modality, name)
            store.expand(MergeParams(density=0.5))
            original = {n: score(load_mllm(args.checkpoints / "seed0" / n), n) for n in EARLIER}
            before = {n: score(store.load(n, model_class=TinyMLLM, device="cpu"), n) for n in EARLIER}

            model = new_model(base_dir, PARITY)
            llm = list(model.language_model.parameters())
            side = [p for n, p in model.named_parameters() if not n.startswith("language_model.")]
            optimizer = torch.optim.AdamW([{"params": llm, "lr": 3e-4}, {"params": side, "lr": 3e-3}],
                                          weight_decay=0.0)

            def collate(batch: list[dict]) -> dict:
                ids, target = answer_batch(tok, PARITY.prompt, [PARITY.labels[b["label"]] for b in batch])
                return {"features": torch.stack([b["features"] for b in batch]), "input_ids": ids, "target": target}

            callback = MMERCallback(store, name=PARITY.name, modality="vision", task="parity")
            trainer = AnswerTrainer(
                model=model, train_dataset=Examples(PARITY.splits()["train"]), data_collator=collate,
                optimizers=(optimizer, None), callbacks=[callback],
                args=TrainingArguments(output_dir=str(Path(tmp) / "trainer"), max_steps=args.steps,
                                       per_device_train_batch_size=args.batch, lr_scheduler_type="cosine",
                                       warmup_steps=10,
                                       logging_steps=max(1, args.steps // 3), save_strategy="no", report_to="none",
                                       remove_unused_columns=False, use_cpu=True, seed=0, disable_tqdm=True,
                                       dataloader_num_workers=0))
            trainer.train()
            version = callback.expanded.version
            original[PARITY.name] = score(model.eval(), PARITY.name)
            after = {n: score(store.load(n, model_class=TinyMLLM, device="cpu"), n) for n in tasks}
            members = [m.entry_name for m in version.members]

    rows = [[n, f"{original[n]:.1%}", f"{before[n]:.1%}" if n in before else "-", f"{after[n]:.1%}"] for n in tasks]
    print()
    print(f"MMERCallback registered {PARITY.name!r} and expanded: version {version.number} holds {', '.join(members)}")
    print()
    print(render_table(["entry", "as trained", "store v1", f"store v{version.number}"], rows))
    print(f"\n(test accuracy{'' if args.limit is None else f' on {args.limit} examples'}; "
          f"{time.time() - start:.0f} s)")
    return {"version": version.number, "members": members, "original": original, "before": before, "after": after}


if __name__ == "__main__":
    main()

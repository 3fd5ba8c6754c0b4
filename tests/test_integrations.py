"""MMERCallback: a transformers Trainer puts what it trained into the store (full models and peft adapters)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import builders
from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.integrations import MMERCallback
from mmer_cl.store import Store

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=8):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, builders.VOCAB, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(model, callback, tmp_path, steps=2):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback]).train()


@pytest.fixture
def store(tmp_path):
    builders.save_base(tmp_path / "base")
    with Store.init(tmp_path / "store", tmp_path / "base") as s:
        yield s


def test_callback_registers_and_expands_a_fully_trained_model(store, tmp_path):
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    callback = MMERCallback(store, name="chat", modality="text", task="lm", params=MergeParams(density=1.0))
    train(model, callback, tmp_path)
    assert callback.registered.created and callback.expanded.version.number == 1
    assert [e.name for e in store.entries()] == ["chat"]
    exported = Checkpoint(store.export("chat", tmp_path / "out"))
    trained = model.state_dict()
    assert all(torch.equal(exported.get(k), trained[k].cpu()) for k in exported.names())


def test_callback_registers_a_peft_model_as_an_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    builders.save_base(tmp_path / "base")
    lora = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                               peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights="gaussian"))
    callback = MMERCallback(tmp_path / "store", name="lora", modality="text", expand=True,
                            params=MergeParams(density=1.0))
    with Store.init(tmp_path / "store", tmp_path / "base"):
        pass
    train(lora, callback, tmp_path, steps=3)
    assert "LLM tensors merged" in callback.registered.keymap_summary
    with Store.open(tmp_path / "store") as store:
        exported = Checkpoint(store.export("lora", tmp_path / "out"))
    merged = lora.merge_and_unload().state_dict()
    for key in exported.names():
        assert torch.allclose(exported.get(key), merged[key], atol=1e-6), key


@pytest.mark.slow
def test_examples_trainer_callback_and_lifelong_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import lifelong
    import trainer_callback

    out = trainer_callback.main(["--steps", "3", "--limit", "20", "--store", str(tmp_path / "t")])
    assert out["version"] == 2 and out["members"] == ["vision_digit", "audio_digit", "vision_parity"]
    for name, before in out["before"].items():  # the earlier entries were scored through both versions
        assert 0.0 <= out["after"][name] <= 1.0 and before > 0.5
    matrix = lifelong.main(["--limit", "20", "--store", str(tmp_path / "l")])
    assert len(matrix) == 3 and matrix[0][1] is None and all(a is not None for a in matrix[2])
    assert matrix[2][0] > 0.5
    sys.modules.pop("lifelong", None)
    sys.modules.pop("trainer_callback", None)

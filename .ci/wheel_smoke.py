"""Smoke test of an installed mmer-cl wheel: run from outside the clone, in a venv holding only the wheel.

Builds a tiny Llama base and two fine-tunes of it with transformers (random weights, a few seconds), then
runs `mmer --version`, `init`, `register`, `expand` and `export` as a user would, and checks that the code
that ran is the installed wheel's and that the export carries its model card and recipe.
Usage: python wheel_smoke.py WORKDIR
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mmer_cl

work = Path(sys.argv[1]).resolve()
assert "site-packages" in mmer_cl.__file__, f"mmer_cl comes from {mmer_cl.__file__}, not the installed wheel"
mmer = str(Path(sys.executable).parent / "mmer")


def run(*args: str) -> str:
    done = subprocess.run([mmer, "--store", str(work / "store"), "-q", *args], capture_output=True, text=True)
    print(f"$ mmer {' '.join(args)}\n{done.stdout}{done.stderr}", end="")
    assert done.returncode == 0, f"exit {done.returncode}"
    assert "Traceback" not in done.stderr
    return done.stdout


config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
base = LlamaForCausalLM(config)
base.save_pretrained(work / "base")
for seed, name in ((1, "chat"), (2, "code")):
    torch.manual_seed(seed)
    tuned = LlamaForCausalLM(config)
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.001 * torch.randn_like(p))  # a fine-tune-sized change (relative change about 0.05)
    tuned.save_pretrained(work / name)

version = run("--version")
assert mmer_cl.__version__ in version and "store format" in version
run("init", "--base", str(work / "base"))
run("register", str(work / "chat"), "--name", "chat", "--modality", "text")
run("register", str(work / "code"), "--name", "code", "--modality", "text", "--task", "code")
run("expand", "--density", "0.5")
run("export", "--entry", "chat", str(work / "out"))
out = work / "out"
assert (out / "mmer-recipe.yaml").is_file() and (out / "README.md").is_file()
assert json.loads(run("versions", "--json"))[0]["number"] == 1
reloaded = LlamaForCausalLM.from_pretrained(out)
assert torch.isfinite(reloaded(torch.tensor([[1, 2, 3]])).logits).all()
print(f"wheel smoke test passed: mmer-cl {mmer_cl.__version__} from {Path(mmer_cl.__file__).parent}")

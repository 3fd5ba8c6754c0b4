"""Helpers shared by the scale-out tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from mmer_cl.cli import cli
from scale.servers import REPO


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative name -> digest): equal dicts mean byte-identical trees."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


PROVENANCE = {"README.md", "MMER_CARD.md", ".mmer-export.json"}  # name their store: differ between two stores


def weights_digest(path: Path) -> dict[str, str]:
    """sha256 of every tensor (by name, across shards) and of every file but the provenance ones: equal dicts
    mean two exports of *different* stores hold the same model (their safetensors metadata names each store)."""
    from safetensors import safe_open

    out = {}
    for p in sorted(path.rglob("*")):
        if not p.is_file() or p.name in PROVENANCE:
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    out[f"tensor {key}"] = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()
                                                          .tobytes()).hexdigest() + str(t.dtype) + str(t.shape)
        else:
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli_runner(*global_args):
    """``run(*args, code=0) -> output`` for the CLI with fixed global options (in this process)."""
    runner = CliRunner()

    def run(*args, code=0):
        result = runner.invoke(cli, [*map(str, global_args), "--actor", "ci", "-q", *map(str, args)])
        assert result.exit_code == code, result.output + repr(result.exception)
        return result.output

    return run


def mmer_process(cwd: Path, *args, env: dict | None = None) -> subprocess.Popen:
    """``python -m mmer_cl.cli ARGS`` as a separate process in its own working directory (another "host")."""
    cwd.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p)}
    return subprocess.Popen([sys.executable, "-m", "mmer_cl.cli", "-q", *map(str, args)], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

"""Integrations with the tools mmer-cl's users train in: transformers' Trainer (and peft, see :mod:`mmer_cl.checkpoints.lora`).

``MMERCallback`` is imported on first use, so importing this package loads
neither transformers nor torch.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "MMERCallback":
        from mmer_cl.integrations.trainer import MMERCallback

        return MMERCallback
    raise AttributeError(f"module 'mmer_cl.integrations' has no attribute {name!r}")


__all__ = ["MMERCallback"]

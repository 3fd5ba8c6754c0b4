"""Fixtures of the reliability suite: one prepared store, copied for every trial."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import builders  # noqa: E402
from harness import copy_tree  # noqa: E402


@pytest.fixture(scope="session")
def prepared(family, tmp_path_factory):
    """A store with versions 1 (vision, audio) and 2 (+ video), some garbage blobs, and a 4th checkpoint."""
    from mmer_cl.store import Store

    root = tmp_path_factory.mktemp("reliability")
    base = builders.save_base(root / "base-again")  # same seed as the family's base: identical tensors
    builders.save_llava(base, root / "speech", seed=4)
    shutil.rmtree(root / "base-again")
    store = root / "template" / "store"
    s = Store.init(store, family / "base", actor="setup")
    s.register(family / "vision", "vision", "vision", actor="setup")
    s.register(family / "audio", "audio", "audio", actor="setup")
    s.expand(actor="setup")
    s.register(family / "video", "video", "video", actor="setup")
    s.expand(actor="setup")
    for i in range(3):  # what a crash leaves behind: blobs no row references
        s.blobs.put(f"garbage {i}".encode())
    s.close()
    return {"template": root / "template", "family": family, "speech": root / "speech"}


@pytest.fixture
def trial(prepared, tmp_path):
    """A fresh copy of the prepared store, with two earlier exports (vision, text) beside it."""
    from mmer_cl.store import Store

    work = copy_tree(prepared["template"], tmp_path / "t")
    with Store.open(work / "store") as s:
        s.export("vision", work / "exports" / "vision", actor="setup")
        s.export_text(work / "exports" / "text", actor="setup")
    return {"dir": work, "store": work / "store", "exports": work / "exports", **prepared}

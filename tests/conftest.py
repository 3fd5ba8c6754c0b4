import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import builders  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A base Llama and two LLaVA fine-tunes of it, saved sharded (float32)."""
    root = tmp_path_factory.mktemp("family")
    base = builders.save_base(root / "base")
    builders.save_llava(base, root / "vision", seed=1)
    builders.save_llava(base, root / "audio", seed=2)
    builders.save_llava(base, root / "video", seed=3)
    return root

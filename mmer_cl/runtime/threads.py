"""How many threads torch's own operators use while a store operation streams tensors.

``register``, ``expand`` and ``export`` already keep the cores busy with
their own threads (a read-ahead, a write-behind, compiled loops that release
the GIL). torch's intra-op pool on top of that only contends with them: on a
2-core machine an expand ran about 20% faster with torch single-threaded.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def torch_single_threaded() -> Iterator[None]:
    """torch's CPU operators on one thread inside the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""Checkpoints named by a Hugging Face Hub id (``org/name``), read from the local Hugging Face cache, offline.

mmer never downloads: a Hub id resolves to the snapshot already in the cache
(``huggingface_hub.snapshot_download(local_files_only=True)``), and when there
is none the message says how to download it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmer_cl.errors import CheckpointError

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text


def resolve_checkpoint(text: str | Path, what: str = "checkpoint") -> Path:
    """A local directory or file as given, else a Hub id's snapshot in the local cache; refused with the fix."""
    path = Path(text)
    if path.exists():
        return path
    text = str(text)
    if not looks_like_hub_id(text):
        raise CheckpointError(f"{what} {text} does not exist; give the directory of a safetensors checkpoint (or a "
                              "Hugging Face Hub id org/name that is in the local cache)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - a malformed id or cache: say what to do rather than fail
        raise CheckpointError(f"{what} {text} is not a local path, and reading it from the Hugging Face cache "
                              f"failed ({exc}); download it to a directory and give that") from None
    raise CheckpointError(f"{what} {text} is not a local path, nor in the local Hugging Face cache. mmer reads "
                          f"the cache but never downloads; fetch it first with `hf download {text}` (or "
                          f"`huggingface-cli download {text}`; add --local-dir DIR to choose where), then rerun")

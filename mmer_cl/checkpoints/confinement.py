"""A checkpoint is only what is inside its directory.

Every file mmer-cl reads from a checkpoint (weights, index, config, tokenizer,
...) must be a regular file whose real location is inside the checkpoint
directory. Refused, by name:

- a symlink whose target resolves outside the directory (``env.txt ->
  /proc/self/environ``, ``notes.txt -> /etc/passwd``); a symlink whose target
  stays inside the directory is followed there;
- anything that is not a regular file once followed: FIFOs, sockets, device
  files (a hard link to a device file is a device file), directories.

The one exception is the Hugging Face cache layout, where every file of
``.../models--NAME/snapshots/REV/`` is a symlink into
``.../models--NAME/blobs/``: targets there are accepted for a snapshot
directory, since they are that repository's own files.

Non-weight files are copied (into the store, and from it into every export)
only by an allow-list of known names and extensions: configs (``*.json``),
tokenizers (``tokenizer.model``, ``*.tiktoken``, vocabulary and merges files,
``*.txt``), processors, chat templates (``*.jinja``), model cards and
READMEs (``*.md``), licences, and the Python files of models with custom code
(``modeling_*.py``, ``configuration_*.py``, ...). Anything else is listed in
:attr:`Listing.skipped` (and logged) and never read.

Nothing here opens a file that could block: listing uses ``stat`` only, and
:func:`read_confined` opens with ``O_NONBLOCK`` and checks what it opened
before reading.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from mmer_cl.errors import CheckpointError

log = logging.getLogger("mmer_cl")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf", ".onnx")
ALLOWED_SUFFIXES = (".json", ".jinja", ".jinja2", ".txt", ".model", ".tiktoken", ".md", ".bpe", ".spm", ".vocab")
ALLOWED_NAMES = {"LICENSE", "LICENCE", "NOTICE", "COPYING", "vocab", "merges", "tokenizer", "tokenizer.model"}
CODE_FILE = re.compile(r"(configuration|modeling|tokenization|processing|image_processing|video_processing|"
                       r"feature_extraction)_[A-Za-z0-9_]+\.py")
MAX_AUX_BYTES = 2**30  # a config or tokenizer file larger than this is not one


@dataclass
class Listing:
    """The non-weight files of a checkpoint directory: those to copy, and those skipped with why."""

    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def allowed_name(name: str) -> bool:
    """Whether a non-weight file of this name is one mmer-cl copies (see the module docstring)."""
    return name in ALLOWED_NAMES or name.endswith(ALLOWED_SUFFIXES) or bool(CODE_FILE.fullmatch(name))


def _roots(directory: Path) -> list[Path]:
    """Where the files of ``directory`` may really live: itself, and for a Hugging Face cache snapshot
    (``models--NAME/snapshots/REV``) that repository's ``blobs/``."""
    real = Path(os.path.realpath(directory))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(real.parent.parent / "blobs")
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def confined(directory: Path, path: Path, what: str = "file") -> Path:
    """``path`` (an entry of checkpoint ``directory``) if it is a regular file really inside the directory.

    Raises :class:`CheckpointError` naming the file otherwise. Only ``stat`` calls: nothing is opened.
    """
    directory, path = Path(directory), Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        target = Path(os.path.realpath(path))
        if not _inside(target, _roots(directory)):
            written = os.readlink(path)
            shown = written if written == str(target) else f"{written} (resolving to {target})"
            raise CheckpointError(
                f"{what} {path.name} in checkpoint {directory} is a symlink to {shown}, outside the checkpoint "
                "directory; mmer-cl reads a checkpoint only from inside its directory. Replace the link with "
                "the file itself (or remove it), then try again.")
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CheckpointError(f"{what} {path.name} in checkpoint {directory} is a symlink that cannot be "
                                  f"followed ({exc.strerror or exc}); fix or remove it") from None
    elif not _inside(Path(os.path.realpath(path.parent)), _roots(directory)):
        raise CheckpointError(f"{what} {path} is not inside checkpoint directory {directory}")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(
            f"{what} {path.name} in checkpoint {directory} is {_kind(st.st_mode)}, not a regular file; "
            "mmer-cl reads only regular files from a checkpoint. Remove it (or replace it with the real file), "
            "then try again.")
    return path


def list_aux_files(directory: Path, skip: set[str] | frozenset[str] = frozenset()) -> Listing:
    """The non-weight files of ``directory`` to copy, each checked by :func:`confined`, and those skipped.

    ``skip``: names read elsewhere (the weights, their index, an adapter's config): not listed, but each
    one present is checked by :func:`confined` too. Hidden names, other weight files and subdirectories
    are left out silently; any other name off the allow-list is skipped with a warning. An allow-listed
    name that is a symlink out of the directory, a FIFO, a device file ... raises :class:`CheckpointError`.
    """
    directory = Path(directory)
    listing = Listing()
    for p in sorted(directory.iterdir()):
        name = p.name
        if name in skip:
            confined(directory, p, "file")
            continue
        if name.startswith(".") or name.endswith(WEIGHT_SUFFIXES):
            continue
        try:
            if stat.S_ISDIR(os.lstat(p).st_mode):
                continue
        except OSError:
            pass
        if not allowed_name(name):
            listing.skipped.append(name)
            continue
        listing.files.append(confined(directory, p, "file"))
    if listing.skipped:
        log.warning("not copied from %s (not a known config, tokenizer, processor, template or model card "
                    "file): %s", directory, ", ".join(listing.skipped))
    return listing


def read_confined(directory: Path, path: Path, limit: int = MAX_AUX_BYTES) -> bytes:
    """The bytes of ``path``, checked by :func:`confined` and again on the opened descriptor.

    Opened without following a final symlink (an allowed one is resolved first) and with ``O_NONBLOCK``,
    so a FIFO put in place after the listing cannot make this wait; the descriptor must be a regular file.
    """
    confined(directory, path)
    real = os.path.realpath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror or exc}); it changed while being read, or "
                              "is not a regular file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _inside(Path(real), _roots(directory)):
            raise CheckpointError(f"{path.name} in checkpoint {directory} is {_kind(st.st_mode)}, not a regular "
                                  "file; remove it, then try again")
        if st.st_size > limit:
            raise CheckpointError(f"{path.name} in checkpoint {directory} holds {st.st_size} bytes, more than a "
                                  f"config or tokenizer file ({limit}); move it out of the checkpoint directory")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise CheckpointError(f"{path.name} in checkpoint {directory} grew past {limit} bytes while "
                                      "being read; move it out of the checkpoint directory")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


__all__ = ["Listing", "allowed_name", "confined", "list_aux_files", "read_confined"]

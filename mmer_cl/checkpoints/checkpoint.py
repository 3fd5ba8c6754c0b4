"""Lazy, read-only access to a Hugging Face safetensors checkpoint.

A checkpoint is a directory holding ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, plus non-weight files (config, tokenizer).
Only headers are read up front; :meth:`Checkpoint.get` reads one tensor at a
time and closes the file again, so memory holds one tensor, never the model.
Each shard's header is parsed once, on opening: a read then seeks straight to
the tensor's bytes (parsing the header again for every tensor made reading a
checkpoint of n tensors cost n^2). Pickle weights (``*.bin``, ``*.pt``) are
refused: unpickling runs code. Every file read must be a regular file inside the checkpoint
directory, and non-weight files are taken only by an allow-list (see
:mod:`mmer_cl.checkpoints.confinement`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mmer_cl.checkpoints.confinement import confined, list_aux_files, read_confined
from mmer_cl.checkpoints.dtypes import DTYPES, all_finite, is_float_code
from mmer_cl.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header



@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, read from the header alone."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    span: tuple[int, int] | None = None  # where its bytes are in ``file`` (from the header), when known

    @property
    def is_float(self) -> bool:
        return is_float_code(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _pickle_error(path: Path, found: list[Path]) -> CheckpointError:
    names = ", ".join(p.name for p in found[:3])
    return CheckpointError(
        f"{path} holds pickle weights ({names}) and no safetensors. mmer-cl never unpickles files, "
        "because loading a pickle can run arbitrary code. Convert it once, in an environment you "
        "trust: `Model.from_pretrained(path).save_pretrained(out, safe_serialization=True)`, then "
        "pass the converted directory."
    )


def _plain_file_name(name: str) -> bool:
    """A shard name the index may use: one path component, no separators, not absolute, not a dot name."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name and not name.startswith("/") and Path(name).name == name


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint at ``path``."""
    if path.is_file():
        if path.suffix == ".safetensors":
            return [confined(path.parent, path, "weights file")]
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_error(path.parent, [path])
        raise CheckpointError(f"{path} is not a safetensors file or a checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a directory saved with save_pretrained")
    index = path / INDEX_NAME
    if index.exists() or index.is_symlink():
        try:
            weight_map = json.loads(read_confined(path, index, limit=2**28))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); re-save the checkpoint") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index (weight_map must map tensor names "
                                  "to shard file names); re-save the checkpoint")
        bad = sorted({f for f in weight_map.values() if not _plain_file_name(f)})
        if bad:
            raise CheckpointError(
                f"{index} names shard(s) outside the checkpoint directory: {', '.join(map(repr, bad[:3]))}. "
                "Shards must be plain file names beside the index; fix the index or re-save the checkpoint.")
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists() and not f.is_symlink()]
        if missing:
            raise CheckpointError(
                f"{index} lists shard(s) that are missing: {', '.join(missing)}. "
                "Copy or download the complete checkpoint, then try again."
            )
        for f in files:
            confined(path, f, "shard")
        unlisted = sorted(p.name for p in path.glob("*.safetensors") if p not in files)
        if unlisted:
            raise CheckpointError(
                f"{path} holds .safetensors file(s) that {INDEX_NAME} does not list: {', '.join(unlisted)}. "
                "Their tensors would be silently left out: fix the index (or re-save the checkpoint), or move "
                "the extra files out of the directory.")
        return files
    if (path / SINGLE_NAME).exists() or (path / SINGLE_NAME).is_symlink():
        return [confined(path, path / SINGLE_NAME, "weights file")]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return [confined(path, found[0], "weights file")]
    if len(found) > 1:
        raise CheckpointError(f"{path} has several .safetensors files but no {INDEX_NAME}; "
                              "re-save it with save_pretrained so the shards are indexed")
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_error(path, pickles)
    raise CheckpointError(f"no weights found in {path}: expected {SINGLE_NAME} or {INDEX_NAME}")


def _data_spans(file: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of every tensor of a safetensors file, from its header (safe_open checks it as well)."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= MAX_HEADER_BYTES:
            raise CheckpointError(f"cannot read {file}: its header length ({size}) is not valid. The file is "
                                  "damaged or not safetensors.")
        header = json.loads(fh.read(size))
    start = 8 + size
    spans = {}
    for name, meta in header.items():
        if name != "__metadata__":
            begin, end = meta["data_offsets"]
            spans[name] = (start + int(begin), start + int(end))
    return spans


def _read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor's bytes read straight from its span (one seek, one read: no header parsed again)."""
    begin, end = info.span
    dtype = DTYPES[info.dtype]
    if end == begin:
        return torch.empty(info.shape, dtype=dtype)
    buf = bytearray(end - begin)
    view = memoryview(buf)
    with open(info.file, "rb", buffering=0) as fh:
        fh.seek(begin)
        done = 0
        while done < len(buf):
            n = fh.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{info.file} ends before the bytes of tensor {info.name}: the file was "
                                      "truncated or changed while being read; re-save or restore it")
            done += n
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def _read_with_safetensors(info: TensorInfo) -> torch.Tensor:
    with safe_open(str(info.file), framework="pt", device="cpu") as f:
        return f.get_tensor(info.name)


class Checkpoint:
    """A safetensors checkpoint opened lazily: names, shapes and dtypes up front, data on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = _weight_files(self.path)
        self.infos: dict[str, TensorInfo] = {}
        self.skipped: list[str] = []  # non-weight files aux_files() left out (not on the allow-list)
        for file in self.files:
            try:
                spans = _data_spans(file)
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        if name in self.infos:
                            raise CheckpointError(f"tensor {name} appears in two shards of {self.path}; "
                                                  "re-save the checkpoint")
                        code = sl.get_dtype()
                        if code not in DTYPES:
                            raise CheckpointError(
                                f"tensor {name} in {file} has dtype {code}, which mmer-cl does not support "
                                f"(supported: {', '.join(DTYPES)}). Convert it (e.g. save_pretrained with "
                                "torch_dtype=torch.bfloat16) and try again.")
                        self.infos[name] = TensorInfo(name, tuple(sl.get_shape()), code, file, spans.get(name))
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot read {file}: {exc}. The file is damaged or not safetensors.") from exc
        if not self.infos:
            raise CheckpointError(f"{self.path} contains no tensors")

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str, check_finite: bool = True) -> torch.Tensor:
        """Read one tensor. Float tensors with NaN/Inf raise :class:`CheckpointError`."""
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is not in checkpoint {self.path}")
        tensor = _read_tensor(info) if info.span is not None else _read_with_safetensors(info)
        if check_finite and not all_finite(tensor):
            bad = int((~torch.isfinite(tensor.float())).sum())
            raise CheckpointError(
                f"tensor {name} in {info.file} has {bad} NaN/Inf value(s). The checkpoint is damaged or "
                "the fine-tune diverged; fix or re-export it before registering."
            )
        return tensor

    def aux_files(self) -> list[Path]:
        """Non-weight files beside the weights (config, tokenizer, ...), copied verbatim on export.

        Only allow-listed names, each a regular file inside the directory (see :mod:`mmer_cl.checkpoints.confinement`);
        the names left out are in :attr:`skipped`."""
        listing = list_aux_files(self.directory, {f.name for f in self.files} | {INDEX_NAME})
        self.skipped = listing.skipped
        return listing.files

    def read_aux(self, path: Path) -> bytes:
        """The bytes of one file :meth:`aux_files` listed, read without following links out of the directory
        and without ever blocking on a FIFO."""
        return read_confined(path.parent, path)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

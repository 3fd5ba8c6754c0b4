"""Tensor codecs: self-describing compressed blobs for float tensors, masks and sparse vectors.

Blob layout: ``MMT1`` | u32 header length | JSON header | payload. The header
names the codec, dtype and shape, so a blob decodes on its own.

* ``planes`` (floats): the tensor's bytes are split into byte planes (all
  first bytes, then all second bytes, ...) before zstd, which puts the
  slowly varying exponent bytes together. About 1.4x on bf16 against 1.29x
  for zstd on the plain bytes.
* ``bits`` (masks): one bit per entry (numpy ``packbits``), then zstd.
* ``sparse`` (mostly-zero tensors such as trimmed or merged vectors): a
  ``bits`` map of the nonzero positions plus the nonzero values as ``planes``.
* ``raw`` (anything else, e.g. integer counts): zstd on the plain bytes.

:func:`encode` picks ``bits`` for bool tensors, and for floats the smaller of
``planes`` and ``sparse`` when at least a third of the entries are zero.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
import zstandard

MAGIC = b"MMT1"
LEVEL = 3
SPARSE_TRY_ZERO_FRACTION = 1 / 3

_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CodecError(ValueError):
    """A blob's bytes are not a tensor this codec can decode."""


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=LEVEL).compress(data)


def _unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data)


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _from_bytes(data: bytes | np.ndarray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if buf.size == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(buf.copy()).view(dtype).reshape(shape)


def _planes(t: torch.Tensor) -> bytes:
    raw = _raw_bytes(t)
    return _zstd(raw.reshape(-1, t.element_size()).T.tobytes())


def _unplanes(payload: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    planes = np.frombuffer(_unzstd(payload), dtype=np.uint8).reshape(size, -1)
    return _from_bytes(np.ascontiguousarray(planes.T).reshape(-1), dtype, shape)


def _bits(mask: torch.Tensor) -> bytes:
    return _zstd(np.packbits(mask.detach().to("cpu").reshape(-1).numpy().astype(np.bool_)).tobytes())


def _unbits(payload: bytes, numel: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(_unzstd(payload), dtype=np.uint8), count=numel).astype(np.bool_)


def _pack(header: dict, *parts: bytes) -> bytes:
    header = dict(header, parts=[len(p) for p in parts])
    raw = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + b"".join(parts)


def encode_with(t: torch.Tensor, codec: str) -> bytes:
    """Encode ``t`` with a named codec."""
    if t.dtype not in _NAMES:
        raise CodecError(f"tensors of dtype {t.dtype} cannot be stored")
    header = {"codec": codec, "dtype": _NAMES[t.dtype], "shape": list(t.shape)}
    if codec == "raw":
        return _pack(header, _zstd(_raw_bytes(t).tobytes()))
    if codec == "planes":
        return _pack(header, _planes(t))
    if codec == "bits":
        return _pack(header, _bits(t))
    if codec == "sparse":
        flat = t.detach().to("cpu").reshape(-1)
        nonzero = flat != 0
        return _pack(header, _bits(nonzero), _planes(flat[nonzero]))
    raise CodecError(f"unknown codec {codec!r}")


def encode(t: torch.Tensor) -> bytes:
    """Encode with the codec that suits ``t`` (see module docstring)."""
    if t.dtype == torch.bool:
        return encode_with(t, "bits")
    if not t.is_floating_point() or t.element_size() == 1:  # integers and 8-bit floats: verbatim bytes
        return encode_with(t, "raw")
    dense = encode_with(t, "planes")
    if t.numel() and float((t == 0).float().mean()) >= SPARSE_TRY_ZERO_FRACTION:
        sparse = encode_with(t, "sparse")
        if len(sparse) < len(dense):
            return sparse
    return dense


def decode(blob: bytes) -> torch.Tensor:
    """Decode a blob made by :func:`encode` / :func:`encode_with`."""
    if blob[:4] != MAGIC:
        raise CodecError("not an mmer-cl tensor blob (bad magic)")
    (hlen,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8:8 + hlen])
    offsets, pos = [], 8 + hlen
    for n in header["parts"]:
        offsets.append(blob[pos:pos + n])
        pos += n
    dtype, shape, codec = _DTYPES[header["dtype"]], header["shape"], header["codec"]
    numel = int(np.prod(shape)) if shape else 1
    if codec == "raw":
        return _from_bytes(_unzstd(offsets[0]), dtype, shape)
    if codec == "planes":
        return _unplanes(offsets[0], dtype, shape)
    if codec == "bits":
        return torch.from_numpy(_unbits(offsets[0], numel)).reshape(shape)
    if codec == "sparse":
        nonzero = torch.from_numpy(_unbits(offsets[0], numel))
        out = torch.zeros(numel, dtype=dtype)
        out[nonzero] = _unplanes(offsets[1], dtype, [int(nonzero.sum())])
        return out.reshape(shape)
    raise CodecError(f"unknown codec {codec!r} in blob header")


def header_of(blob: bytes) -> dict:
    """The JSON header of a blob (codec, dtype, shape, part sizes) without decoding the payload."""
    if blob[:4] != MAGIC:
        raise CodecError("not an mmer-cl tensor blob (bad magic)")
    (hlen,) = struct.unpack("<I", blob[4:8])
    return json.loads(blob[8:8 + hlen])

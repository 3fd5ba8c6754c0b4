"""Tensor codecs: self-describing compressed blobs for float tensors, masks and sparse vectors.

Blob layout: ``MMT1`` | u32 header length | JSON header | payload parts. The
header names the codec, dtype and shape (and the byte length of each part).

Self-contained codecs (a blob decodes on its own):

* ``planes`` (floats): the tensor's bytes are split into byte planes (all
  first bytes, then all second bytes, ...) before zstd, which puts the
  slowly varying exponent bytes together.
* ``bits`` (masks): one bit per entry (numpy ``packbits``), then zstd.
* ``sparse`` (mostly-zero tensors such as trimmed or merged vectors): a
  ``bits`` map of the nonzero positions plus the nonzero values as ``planes``.
* ``raw`` (anything else, e.g. integer buffers): zstd on the plain bytes.

Codecs that refer to other blobs by digest (see :mod:`storage.delta`) are
decoded through a :class:`storage.reader.TensorReader`, which resolves them.

:func:`encode` picks ``bits`` for bool tensors; for floats ``sparse`` when at
least a quarter of the entries are zero, else ``planes``.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
import zstandard

MAGIC = b"MMT1"
LEVEL = 3
SPARSE_ZERO_FRACTION = 1 / 4
THREADED_BYTES = 8 * 1024**2  # above this, zstd compresses on every core
_BLOCK = 1 << 16

_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CodecError(ValueError):
    """A blob's bytes are not a tensor this codec can decode."""


def zstd(data: bytes | memoryview) -> bytes:
    threads = -1 if len(data) >= THREADED_BYTES else 0
    return zstandard.ZstdCompressor(level=LEVEL, threads=threads).compress(data)


def unzstd(data: bytes | memoryview) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CodecError(f"tensors of dtype {dtype} cannot be stored") from None


def dtype_of(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CodecError(f"unknown dtype {name!r} in blob header") from None


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _from_bytes(data: bytes | np.ndarray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    if buf.size == 0:
        return torch.empty(shape, dtype=dtype)
    if not buf.flags.writeable:
        buf = buf.copy()
    return torch.from_numpy(buf).view(dtype).reshape(shape)


def planes_payload(t: torch.Tensor) -> bytes:
    """zstd of the tensor's bytes regrouped as byte planes."""
    size = t.element_size()
    raw = _raw_bytes(t).reshape(-1, size)
    return zstd(np.ascontiguousarray(raw.T).data)


def _interleave(planes: np.ndarray) -> np.ndarray:
    """Inverse of the plane split: (size, n) -> n * size bytes, block by block (cache friendly)."""
    size, n = planes.shape
    out = np.empty((n, size), dtype=np.uint8)
    for start in range(0, n, _BLOCK):
        out[start:start + _BLOCK] = planes[:, start:start + _BLOCK].T
    return out.reshape(-1)


def unplanes(payload: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    planes = np.frombuffer(unzstd(payload), dtype=np.uint8).reshape(size, -1)
    return _from_bytes(_interleave(planes), dtype, shape)


def pack_bits(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.detach().to("cpu").reshape(-1).numpy().astype(np.bool_, copy=False))


def bits_payload(mask: torch.Tensor) -> bytes:
    return zstd(pack_bits(mask).data)


def unbits(payload: bytes, numel: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(np.frombuffer(unzstd(payload), dtype=np.uint8), count=numel)
                            .view(np.bool_))


def pack(header: dict, *parts: bytes) -> bytes:
    header = dict(header, parts=[len(p) for p in parts])
    raw = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + b"".join(parts)


def unpack(blob: bytes) -> tuple[dict, list[memoryview]]:
    """The header and the payload parts of a blob, without decoding the parts."""
    if blob[:4] != MAGIC:
        raise CodecError("not an mmer-cl tensor blob (bad magic)")
    try:
        (hlen,) = struct.unpack("<I", blob[4:8])
        header = json.loads(blob[8:8 + hlen])
    except (struct.error, ValueError) as exc:
        raise CodecError(f"damaged blob header: {exc}") from None
    view, pos, parts = memoryview(blob), 8 + hlen, []
    for n in header.get("parts", []):
        parts.append(view[pos:pos + n])
        pos += n
    return header, parts


def numel_of(shape: list[int]) -> int:
    return int(np.prod(shape)) if shape else 1


def encode_with(t: torch.Tensor, codec: str) -> bytes:
    """Encode ``t`` with a named self-contained codec."""
    header = {"codec": codec, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    if codec == "raw":
        return pack(header, zstd(_raw_bytes(t).data))
    if codec == "planes":
        return pack(header, planes_payload(t))
    if codec == "bits":
        return pack(header, bits_payload(t))
    if codec == "sparse":
        flat = t.detach().to("cpu").reshape(-1)
        nonzero = flat != 0
        return pack(header, bits_payload(nonzero), planes_payload(flat[nonzero]))
    raise CodecError(f"unknown codec {codec!r}")


def zero_fraction(t: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(t)) / t.numel() if t.numel() else 0.0


def encode(t: torch.Tensor) -> bytes:
    """Encode with the codec that suits ``t`` (see module docstring)."""
    if t.dtype == torch.bool:
        return encode_with(t, "bits")
    if not t.is_floating_point() or t.element_size() == 1:  # integers and 8-bit floats: verbatim bytes
        return encode_with(t, "raw")
    return encode_with(t, "sparse" if zero_fraction(t) >= SPARSE_ZERO_FRACTION else "planes")


def decode_parts(header: dict, parts: list[memoryview]) -> torch.Tensor:
    """Decode a self-contained blob from its unpacked header and parts."""
    dtype, shape, codec = dtype_of(header["dtype"]), header["shape"], header["codec"]
    numel = numel_of(shape)
    if codec == "raw":
        return _from_bytes(unzstd(parts[0]), dtype, shape)
    if codec == "planes":
        return unplanes(parts[0], dtype, shape)
    if codec == "bits":
        return unbits(parts[0], numel).reshape(shape)
    if codec == "sparse":
        nonzero = unbits(parts[0], numel)
        out = torch.zeros(numel, dtype=dtype)
        out[nonzero] = unplanes(parts[1], dtype, [int(torch.count_nonzero(nonzero))])
        return out.reshape(shape)
    raise CodecError(f"codec {codec!r} needs other blobs to decode; read it through a TensorReader")


def decode(blob: bytes) -> torch.Tensor:
    """Decode a self-contained blob made by :func:`encode` / :func:`encode_with`."""
    return decode_parts(*unpack(blob))


def header_of(blob: bytes) -> dict:
    """The JSON header of a blob (codec, dtype, shape, part sizes) without decoding the payload."""
    return unpack(blob)[0]

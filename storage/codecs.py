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

from storage import jit, kernels
from storage.frames import CodecError, unzstd, unzstd_array, zstd  # noqa: F401 (re-exported)
from storage.planes import decode_planes, encode_planes

MAGIC = b"MMT1"
SPARSE_ZERO_FRACTION = 1 / 4

_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


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


def values_payload(t: torch.Tensor) -> tuple[bytes, dict]:
    """zstd byte planes of a float tensor's values (:mod:`storage.planes`) and the header fields they need."""
    payload, layout = encode_planes(_raw_bytes(t), t.element_size())
    return payload, ({"layout": layout} if layout is not None else {})


def unplanes(payload: bytes | memoryview, dtype: torch.dtype, shape: list[int], layout: dict | None = None
             ) -> torch.Tensor:
    """Inverse of :func:`values_payload` (``layout``: the header's, None for the legacy layout)."""
    size = torch.empty((), dtype=dtype).element_size()
    return _from_bytes(decode_planes(payload, size, numel_of(shape), layout), dtype, shape)


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


Split = tuple[torch.Tensor, torch.Tensor]  # (where a flat tensor is nonzero, its values there): split_nonzero


def encode_with(t: torch.Tensor, codec: str, split: Split | None = None) -> bytes:
    """Encode ``t`` with a named self-contained codec (``sparse`` reuses ``split`` when given)."""
    header = {"codec": codec, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    if codec == "raw":
        return pack(header, zstd(_raw_bytes(t).data))
    if codec == "planes":
        payload, fields = values_payload(t)
        return pack(dict(header, **fields), payload)
    if codec == "bits":
        return pack(header, bits_payload(t))
    if codec == "sparse":
        nonzero, values = split if split is not None else split_nonzero(t.detach().to("cpu").reshape(-1))
        payload, fields = values_payload(values)
        return pack(dict(header, **fields), bits_payload(nonzero), payload)
    raise CodecError(f"unknown codec {codec!r}")


def int_view(t: torch.Tensor) -> np.ndarray:
    """A flat CPU tensor's elements as unsigned integers of the same width (every bit kept)."""
    return t.contiguous().view(torch.uint8).numpy().view(_UINTS[t.element_size()])


_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _magnitude_bits(words: np.ndarray, floating: bool) -> np.ndarray:
    """The bits that make a word nonzero: all of them, or all but a float's sign bit (``-0.0`` is zero)."""
    every = np.iinfo(words.dtype).max
    return np.array([every >> 1 if floating else every], dtype=words.dtype)


def split_nonzero(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a flat float tensor is nonzero (``-0.0`` counts as zero) and its values there, in order."""
    if not jit.enabled() or not flat.numel():
        nonzero = flat != 0
        return nonzero, flat[nonzero]
    words = int_view(flat)
    magnitude = _magnitude_bits(words, flat.is_floating_point())
    where = np.empty(flat.numel(), dtype=np.bool_)
    count = kernels.count_nonzero(words, magnitude)
    picked = np.empty(count + 1, dtype=words.dtype)  # one spare slot (see kernels.nonzero_values)
    kernels.nonzero_values(words, magnitude, where, picked)
    return torch.from_numpy(where), from_words(picked[:count], flat.dtype)


def from_words(words: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A flat unsigned-integer array as a tensor of ``dtype`` with the same bits."""
    if not words.size:
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(words).view(dtype)


def scatter_into(out: torch.Tensor, where: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[where] = values`` on flat CPU tensors (``values`` in position order); returns ``out``."""
    if jit.enabled() and out.numel() and out.element_size() in _UINTS:
        kernels.scatter(int_view(out), where.numpy(), int_view(values))
    else:
        out[where] = values
    return out


def count_true(mask: torch.Tensor) -> int:
    """How many entries of a CPU bool tensor are set (numpy's count: single-threaded and fast)."""
    return int(np.count_nonzero(mask.detach().reshape(-1).numpy()))


def zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat zero tensor from calloc'd memory (pages zeroed by the OS as they are first written)."""
    size = torch.empty((), dtype=dtype).element_size()
    if not numel or size not in _UINTS:
        return torch.zeros(numel, dtype=dtype)
    return torch.from_numpy(np.zeros(numel, dtype=_UINTS[size])).view(dtype)


def zero_fraction(t: torch.Tensor) -> float:
    """The fraction of entries equal to zero (``-0.0`` included)."""
    if not t.numel():
        return 0.0
    if jit.enabled() and t.device.type == "cpu" and t.element_size() in _UINTS:
        words = int_view(t.detach().reshape(-1))
        return 1.0 - kernels.count_nonzero(words, _magnitude_bits(words, t.is_floating_point())) / t.numel()
    return 1.0 - int(torch.count_nonzero(t)) / t.numel()


def encode(t: torch.Tensor, split: Split | None = None) -> bytes:
    """Encode with the codec that suits ``t`` (see module docstring).

    ``split``, where the caller has it already, is :func:`split_nonzero` of ``t``.
    """
    if t.dtype == torch.bool:
        return encode_with(t, "bits")
    if not t.is_floating_point() or t.element_size() == 1:  # integers and 8-bit floats: verbatim bytes
        return encode_with(t, "raw")
    zeros = 1.0 - split[1].numel() / t.numel() if split is not None and t.numel() else zero_fraction(t)
    return encode_with(t, "sparse" if zeros >= SPARSE_ZERO_FRACTION else "planes", split)


def decode_parts(header: dict, parts: list[memoryview]) -> torch.Tensor:
    """Decode a self-contained blob from its unpacked header and parts."""
    dtype, shape, codec = dtype_of(header["dtype"]), header["shape"], header["codec"]
    numel = numel_of(shape)
    if codec == "raw":
        return _from_bytes(unzstd_array(parts[0]), dtype, shape)
    if codec == "planes":
        return unplanes(parts[0], dtype, shape, header.get("layout"))
    if codec == "bits":
        return unbits(parts[0], numel).reshape(shape)
    if codec == "sparse":
        return decode_sparse(header, parts)
    raise CodecError(f"codec {codec!r} needs other blobs to decode; read it through a TensorReader")


def sparse_nonzero(header: dict, parts: list[memoryview]) -> torch.Tensor:
    """Where a ``sparse`` blob's tensor is nonzero (flat bool), without decoding its values."""
    return unbits(parts[0], numel_of(header["shape"]))


def sparse_parts(header: dict, parts: list[memoryview]) -> tuple[np.ndarray, torch.Tensor]:
    """A ``sparse`` blob's nonzero map as packed bits (np.packbits order) and its values, in position order."""
    packed = unzstd_array(parts[0])
    count = int(np.bitwise_count(packed).sum())
    return packed, unplanes(parts[1], dtype_of(header["dtype"]), [count], header.get("layout"))


def decode_sparse(header: dict, parts: list[memoryview], nonzero: torch.Tensor | None = None) -> torch.Tensor:
    """A ``sparse`` blob's tensor; ``nonzero``, where the caller has it already, is :func:`sparse_nonzero`."""
    dtype, shape = dtype_of(header["dtype"]), header["shape"]
    nonzero = sparse_nonzero(header, parts) if nonzero is None else nonzero
    values = unplanes(parts[1], dtype, [count_true(nonzero)], header.get("layout"))
    return scatter_into(zeros(nonzero.numel(), dtype), nonzero, values).reshape(shape)


def decode(blob: bytes) -> torch.Tensor:
    """Decode a self-contained blob made by :func:`encode` / :func:`encode_with`."""
    return decode_parts(*unpack(blob))


def header_of(blob: bytes) -> dict:
    """The JSON header of a blob (codec, dtype, shape, part sizes) without decoding the payload."""
    return unpack(blob)[0]

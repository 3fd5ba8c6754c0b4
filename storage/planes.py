"""Float values as byte planes before zstd, in the layout that codes each tensor smallest.

Every layout regroups the values' bytes as *planes* (byte 0 of every value,
then byte 1, ...), so that zstd sees the slowly varying exponent bytes
together. zstd's Huffman stage cannot spend less than one bit on a byte, so
two refinements help where a plane holds much less than a bit per value:

* **signs apart**: the sign bits packed eight to a byte after the planes.
  Where the exponents vary little (merged vectors, version deltas) the top
  byte is then nearly constant instead of a coin flip zstd pays 1.5 bits for.
* **sparse planes**: a plane whose bytes are mostly zero (the low mantissa
  bytes of differences of bf16 weights) is kept as a packed map of where it
  is nonzero plus those bytes.

Measured on the benchmark's tensors: merged values go from 7.1 to 6.4 bits
each and float32 task vectors from 7.39 to 7.34 bits; moving the signs out
of dense tensors, whose top byte carries 1.6 bits besides the sign, costs
0.3 bits instead. So a tensor of at least :data:`MIN_VALUES` values takes
each refinement where a fixed sample of it says it pays: signs apart where
the top byte without them has under :data:`SIGNS_APART_BITS` of entropy, a
plane sparse where under :data:`SPARSE_PLANE` of its bytes are nonzero
(deterministic, so equal tensors still make equal blobs).

Payloads: the *legacy* layout (``layout`` None) is zstd of all planes in byte
order. Any other is one zstd frame of the dense planes in byte order, then
the packed signs (if apart), then per sparse plane its packed map and its
nonzero bytes; the layout (``{"signs": bool, "sparse": [[byte, count], ...]}``)
goes into the blob header.
"""

from __future__ import annotations

import numpy as np

from storage import jit, kernels
from storage.frames import CodecError, unzstd_array, zstd

MIN_VALUES = 4096  # below this the legacy layout: the layout's header field would cost more than it saves
SAMPLE_CHUNKS, SAMPLE_CHUNK = 16, 2048
SPARSE_PLANE = 1 / 8  # a plane with fewer nonzero bytes than this is coded sparse
SIGNS_APART_BITS = 0.5  # signs go apart where the top byte without them holds less than this
_BLOCK = 1 << 16
_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_SPLIT = {2: kernels.split2, 4: kernels.split4}
_JOIN = {2: kernels.interleave2, 4: kernels.interleave4}

Layout = dict  # {"signs": bool, "sparse": [[byte, count], ...]}


def encode_planes(raw: np.ndarray, size: int) -> tuple[bytes, Layout | None]:
    """zstd payload of ``raw`` (the bytes of values ``size`` bytes wide) and its layout (None: legacy)."""
    n = raw.size // size
    choice = _choose(raw.view(_WORDS[size]), size) if size in _WORDS and n >= MIN_VALUES else None
    if choice is None:
        return zstd(split_planes(raw, size).data), None
    signs, sparse = choice
    payload, counts = _disassembled(raw.view(_WORDS[size]), size, signs, sparse)
    return zstd(payload.data), {"signs": signs, "sparse": [[b, int(c)] for b, c in zip(sparse, counts)]}


def decode_planes(payload: bytes | memoryview, size: int, n: int, layout: Layout | None) -> np.ndarray:
    """The ``n * size`` bytes of the values, from :func:`encode_planes`'s payload and layout."""
    buf = unzstd_array(payload)
    if layout is None:
        return _interleave(buf.reshape(size, -1))
    if size not in _WORDS:
        raise CodecError(f"a plane layout for {size}-byte values is not supported")
    return _assembled(buf, size, n, bool(layout.get("signs")), [(int(b), int(c)) for b, c in layout["sparse"]])


def split_planes(raw: np.ndarray, size: int) -> np.ndarray:
    """A tensor's bytes regrouped as byte planes: (n * size,) -> (size, n)."""
    n = raw.size // size
    if size in _SPLIT and jit.enabled():
        planes = np.empty((size, n), dtype=np.uint8)
        _SPLIT[size](raw.view(_WORDS[size]), planes)
        return planes
    return np.ascontiguousarray(raw.reshape(n, size).T)


def _interleave(planes: np.ndarray) -> np.ndarray:
    """Inverse of the plane split: (size, n) -> n * size bytes."""
    size, n = planes.shape
    if size in _JOIN and jit.enabled():
        words = np.empty(n, dtype=_WORDS[size])
        _JOIN[size](planes, words)
        return words.view(np.uint8)
    out = np.empty((n, size), dtype=np.uint8)
    for start in range(0, n, _BLOCK):  # block by block: cache friendly
        out[start:start + _BLOCK] = planes[:, start:start + _BLOCK].T
    return out.reshape(-1)


def _sample(words: np.ndarray) -> np.ndarray:
    if words.size <= SAMPLE_CHUNKS * SAMPLE_CHUNK:
        return words
    step = words.size // SAMPLE_CHUNKS
    return np.concatenate([words[i * step:i * step + SAMPLE_CHUNK] for i in range(SAMPLE_CHUNKS)])


def _sparse_candidates(words: np.ndarray, size: int, signs: bool) -> list[int]:
    if signs:
        words = words & ~(words.dtype.type(1) << words.dtype.type(8 * size - 1))
    limit = SPARSE_PLANE * words.size
    return [b for b in range(size) if np.count_nonzero((words >> words.dtype.type(8 * b)) & 0xFF) < limit]


def _choose(words: np.ndarray, size: int) -> tuple[bool, list[int]] | None:
    """The layout for ``words`` from a fixed sample: (signs apart?, sparse planes), or None for legacy."""
    sample = _sample(words)
    top = ((sample >> words.dtype.type(8 * size - 8)) & 0x7F).astype(np.uint8)
    signs = _entropy_bits(top) < SIGNS_APART_BITS
    sparse = _sparse_candidates(sample, size, signs)
    return (signs, sparse) if signs or sparse else None


def _entropy_bits(symbols: np.ndarray) -> float:
    p = np.bincount(symbols) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _disassembled(words: np.ndarray, size: int, signs: bool, sparse: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The uncompressed payload of a layout, and each sparse plane's nonzero count."""
    sign_shift = 8 * size - 1
    clear = words.dtype.type(1) << words.dtype.type(sign_shift) if signs else words.dtype.type(0)
    pieces = [_plane(words, 8 * b, clear) for b in range(size) if b not in sparse]
    if signs:
        pieces.append(_packed_bit(words, sign_shift))
    counts = []
    for b in sparse:
        where, picked = _sparse_plane(words, 8 * b, clear)
        pieces += [where, picked]
        counts.append(picked.size)
    return np.concatenate(pieces), np.array(counts, dtype=np.int64)


def _plane(words: np.ndarray, shift: int, clear) -> np.ndarray:
    if jit.enabled():
        out = np.empty(words.size, dtype=np.uint8)
        kernels.plane_of(words, shift, np.array([clear], dtype=words.dtype), out)
        return out
    return ((words & ~clear) >> words.dtype.type(shift)).astype(np.uint8)


def _packed_bit(words: np.ndarray, shift: int) -> np.ndarray:
    if jit.enabled():
        out = np.empty((words.size + 7) // 8, dtype=np.uint8)
        kernels.pack_bit(words, shift, out)
        return out
    return np.packbits(((words >> words.dtype.type(shift)) & 1).astype(np.uint8))


def _sparse_plane(words: np.ndarray, shift: int, clear) -> tuple[np.ndarray, np.ndarray]:
    """The packed map of where a plane is nonzero, and its nonzero bytes."""
    if jit.enabled():
        where = np.empty((words.size + 7) // 8, dtype=np.uint8)
        picked = np.empty(words.size + 1, dtype=np.uint8)  # one spare slot
        count = kernels.sparse_plane(words, shift, np.array([clear], dtype=words.dtype), where, picked)
        return where, picked[:count]
    plane = _plane(words, shift, clear)
    return np.packbits(plane != 0), plane[plane != 0]


def _assembled(buf: np.ndarray, size: int, n: int, signs: bool, sparse: list[tuple[int, int]]) -> np.ndarray:
    """Inverse of :func:`_disassembled`: the values' bytes."""
    nbytes = (n + 7) // 8
    dense = [8 * b for b in range(size) if b not in {p for p, _ in sparse}]
    expected = len(dense) * n + (nbytes if signs else 0) + sum(nbytes + c for _, c in sparse)
    if buf.size != expected:
        raise CodecError(f"plane payload holds {buf.size} bytes where its layout needs {expected}")
    if len(dense) == 2 and jit.enabled():  # the usual case (float32 with two sparse planes): one pass
        words = np.empty(n, dtype=_WORDS[size])
        kernels.join_two_planes(buf[:n], dense[0], buf[n:2 * n], dense[1], words)
    else:
        words = np.zeros(n, dtype=_WORDS[size])
        for j, shift in enumerate(dense):
            _or_plane(buf[j * n:(j + 1) * n], shift, words)
    pos = len(dense) * n
    if signs:
        _or_bits(buf[pos:pos + nbytes], 8 * size - 1, words)
        pos += nbytes
    for plane, count in sparse:
        where, picked = buf[pos:pos + nbytes], buf[pos + nbytes:pos + nbytes + count]
        if _or_sparse_plane(where, picked, 8 * plane, words) != count:
            raise CodecError("a sparse plane's map does not match its count")
        pos += nbytes + count
    return words.view(np.uint8)


def _or_plane(plane: np.ndarray, shift: int, words: np.ndarray) -> None:
    if jit.enabled():
        kernels.or_plane(plane, shift, words)
    else:
        words |= plane.astype(words.dtype) << words.dtype.type(shift)


def _or_bits(packed: np.ndarray, shift: int, words: np.ndarray) -> None:
    if jit.enabled():
        kernels.or_bits(packed, shift, words)
    else:
        words |= np.unpackbits(packed, count=words.size).astype(words.dtype) << words.dtype.type(shift)


def _or_sparse_plane(packed: np.ndarray, picked: np.ndarray, shift: int, words: np.ndarray) -> int:
    """OR a sparse plane into ``words``; returns how many bytes its map asks for (to check against its count)."""
    if jit.enabled():
        return kernels.or_sparse_plane(packed, picked, shift, words)
    where = np.unpackbits(packed, count=words.size).view(np.bool_)
    count = int(np.count_nonzero(where))
    if count == picked.size:
        words[where] |= picked.astype(words.dtype) << words.dtype.type(shift)
    return count

"""Byte and bit loops of the codecs, compiled by :mod:`storage.jit`.

Each works on flat numpy arrays; the integer views used for floats keep
every bit (``-0.0`` and NaN payloads included). Callers check
:func:`storage.jit.enabled` first and fall back to numpy otherwise.
"""

from __future__ import annotations

import numpy as np

from storage.jit import kernel


@kernel
def interleave2(planes: np.ndarray, out: np.ndarray) -> None:
    """(2, n) byte planes -> n little-endian uint16 words."""
    lo, hi = planes[0], planes[1]
    for i in range(out.size):
        out[i] = np.uint16(lo[i]) | (np.uint16(hi[i]) << np.uint16(8))


@kernel
def interleave4(planes: np.ndarray, out: np.ndarray) -> None:
    """(4, n) byte planes -> n little-endian uint32 words."""
    p0, p1, p2, p3 = planes[0], planes[1], planes[2], planes[3]
    for i in range(out.size):
        out[i] = (np.uint32(p0[i]) | (np.uint32(p1[i]) << np.uint32(8)) | (np.uint32(p2[i]) << np.uint32(16))
                  | (np.uint32(p3[i]) << np.uint32(24)))


@kernel
def split2(words: np.ndarray, planes: np.ndarray) -> None:
    """n uint16 words -> (2, n) byte planes."""
    for i in range(words.size):
        w = words[i]
        planes[0, i] = w & 0xFF
        planes[1, i] = w >> 8


@kernel
def split4(words: np.ndarray, planes: np.ndarray) -> None:
    """n uint32 words -> (4, n) byte planes."""
    for i in range(words.size):
        w = words[i]
        planes[0, i] = w & 0xFF
        planes[1, i] = (w >> 8) & 0xFF
        planes[2, i] = (w >> 16) & 0xFF
        planes[3, i] = w >> 24


@kernel
def count_nonzero(words: np.ndarray, magnitude: np.ndarray) -> int:
    """How many ``words & magnitude`` are nonzero (see :func:`nonzero_values`)."""
    bits = magnitude[0]
    count = 0
    for i in range(words.size):
        count += (words[i] & bits) != 0
    return count


@kernel
def nonzero_values(words: np.ndarray, magnitude: np.ndarray, where: np.ndarray, values: np.ndarray) -> int:
    """``where = (words & magnitude) != 0`` and those words, in order, into ``values``; returns their count.

    ``magnitude`` (one element) is every bit but a float's sign bit, so ``-0.0`` counts as zero.
    ``values`` needs one spare slot past the last kept word: every word is stored at the next free
    slot and only a kept one advances it (no branch to mispredict).
    """
    bits = magnitude[0]
    count = 0
    last = values.size - 1
    if last < 0:
        for i in range(words.size):
            where[i] = False
        return 0
    for i in range(words.size):
        w = words[i]
        keep = (w & bits) != 0
        where[i] = keep
        values[min(count, last)] = w
        count += keep
    return count


@kernel
def changed_values(new: np.ndarray, old: np.ndarray, where: np.ndarray, values: np.ndarray) -> int:
    """``where = new != old`` (bitwise) and the changed words of ``new``, in order; returns their count.

    ``values`` needs one spare slot past the last changed word (see :func:`nonzero_values`).
    """
    count = 0
    last = values.size - 1
    for i in range(new.size):
        w = new[i]
        differs = w != old[i]
        where[i] = differs
        values[min(count, last)] = w
        count += differs
    return count


@kernel
def scatter(out: np.ndarray, where: np.ndarray, values: np.ndarray) -> None:
    """``out[where] = values`` (values in position order)."""
    j = 0
    last = values.size - 1
    if last < 0:
        return
    for i in range(out.size):  # branch-free: select between the old word and the next value
        w = where[i]
        out[i] = values[min(j, last)] if w else out[i]
        j += w


@kernel
def select(comb: np.ndarray, where: np.ndarray, out: np.ndarray) -> None:
    """``out[:count] = comb[where]``; ``out`` has one spare slot (branch-free, as :func:`nonzero_values`)."""
    a = 0
    last = out.size - 1
    for i in range(comb.size):
        out[min(a, last)] = comb[i]
        a += where[i]


@kernel
def differs_outside(new: np.ndarray, old: np.ndarray, support: np.ndarray) -> bool:
    """Whether ``new != old`` anywhere ``support`` is false."""
    for start in range(0, new.size, 4096):
        bad = 0
        for i in range(start, min(start + 4096, new.size)):
            bad += (new[i] != old[i]) & (not support[i])
        if bad:
            return True
    return False


@kernel
def split_by(comb: np.ndarray, where: np.ndarray, out: np.ndarray) -> None:
    """``out`` = the bytes where ``where`` holds, then the others, each in order (branch-free)."""
    inside = 0
    for i in range(where.size):
        inside += where[i]
    a = 0
    b = inside
    for i in range(comb.size):
        w = where[i]
        out[a if w else b] = comb[i]
        a += w
        b += 1 - w


@kernel
def merge_by(inside: np.ndarray, outside: np.ndarray, where: np.ndarray, out: np.ndarray) -> None:
    """Inverse of :func:`split_by`: ``out[where] = inside``, ``out[~where] = outside``."""
    a = 0
    b = 0
    for i in range(out.size):  # branch-free: read both sides, keep one, advance that one
        w = where[i]
        x = inside[min(a, inside.size - 1)] if inside.size else 0
        y = outside[min(b, outside.size - 1)] if outside.size else 0
        out[i] = x if w else y
        a += w
        b += 1 - w


@kernel
def none_with_all_bits(words: np.ndarray, bits: np.ndarray) -> bool:
    """Whether no word has every bit of ``bits[0]`` set (floats: no NaN/Inf when ``bits`` is the exponent field)."""
    b = bits[0]
    for start in range(0, words.size, 4096):  # whole blocks without an early exit vectorise; exit between blocks
        bad = 0
        for i in range(start, min(start + 4096, words.size)):
            bad += (words[i] & b) == b
        if bad:
            return False
    return True


@kernel
def plane_of(words: np.ndarray, shift: int, clear: np.ndarray, out: np.ndarray) -> None:
    """``out[i]`` = byte ``shift // 8`` of ``words[i] & ~clear[0]``."""
    keep = ~np.uint64(clear[0])
    s = np.uint64(shift)
    for i in range(words.size):
        out[i] = np.uint8(((np.uint64(words[i]) & keep) >> s) & np.uint64(0xFF))


@kernel
def pack_bit(words: np.ndarray, shift: int, packed: np.ndarray) -> None:
    """``packed`` = bit ``shift`` of every word, eight to a byte, first word in the high bit (as np.packbits)."""
    s = np.uint64(shift)
    n = words.size
    for b in range(packed.size):
        byte = 0
        for k in range(8):
            i = 8 * b + k
            bit = (np.uint64(words[i]) >> s) & np.uint64(1) if i < n else np.uint64(0)
            byte |= int(bit) << (7 - k)
        packed[b] = byte


@kernel
def sparse_plane(words: np.ndarray, shift: int, clear: np.ndarray, packed: np.ndarray, picked: np.ndarray) -> int:
    """Where byte ``shift // 8`` of ``words & ~clear[0]`` is nonzero (packed, as np.packbits) and those bytes
    in order into ``picked`` (one spare slot); returns their count."""
    keep = ~np.uint64(clear[0])
    s = np.uint64(shift)
    n = words.size
    count = 0
    last = picked.size - 1
    for b in range(packed.size):
        byte = 0
        for k in range(8):
            i = 8 * b + k
            v = ((np.uint64(words[i]) & keep) >> s) & np.uint64(0xFF) if i < n else np.uint64(0)
            nonzero = v != 0
            picked[min(count, last)] = np.uint8(v)
            count += nonzero
            byte |= int(nonzero) << (7 - k)
        packed[b] = byte
    return count


@kernel
def join_two_planes(low: np.ndarray, low_shift: int, high: np.ndarray, high_shift: int, words: np.ndarray) -> None:
    """``words[i] = low[i] << low_shift | high[i] << high_shift``: every word written once, so fresh memory is
    faulted in by one pass instead of a zeroing pass and then one per plane."""
    a = np.uint64(low_shift)
    b = np.uint64(high_shift)
    for i in range(words.size):
        words[i] = (np.uint64(low[i]) << a) | (np.uint64(high[i]) << b)


@kernel
def or_plane(plane: np.ndarray, shift: int, words: np.ndarray) -> None:
    """``words[i] |= plane[i] << shift``."""
    s = np.uint64(shift)
    for i in range(words.size):
        words[i] = np.uint64(words[i]) | (np.uint64(plane[i]) << s)


@kernel
def or_bits(packed: np.ndarray, shift: int, words: np.ndarray) -> None:
    """``words[i] |= bit i of packed << shift`` (np.packbits order; branch-free: sign bits are coin flips)."""
    s = np.uint64(shift)
    for i in range(words.size):
        bit = np.uint64((packed[i >> 3] >> (7 - (i & 7))) & 1)
        words[i] = np.uint64(words[i]) | (bit << s)


@kernel
def or_sparse_plane(packed: np.ndarray, picked: np.ndarray, shift: int, words: np.ndarray) -> int:
    """``words[i] |= next picked byte << shift`` where bit i of ``packed`` is set; returns how many were read
    (reading stops at the end of ``picked``)."""
    s = np.uint64(shift)
    n = words.size
    j = 0
    for b in range(packed.size):
        byte = packed[b]
        if byte:
            for k in range(8):
                i = 8 * b + k
                if i < n and (byte >> (7 - k)) & 1:
                    if j >= picked.size:
                        return j + 1
                    words[i] = np.uint64(words[i]) | (np.uint64(picked[j]) << s)
                    j += 1
    return j

"""zstd frames: the one compressor every codec uses, and the error for bytes no codec can read."""

from __future__ import annotations

import numpy as np
import zstandard

LEVEL = 1  # measured on task vectors, merged values and masks: smaller than level 3 and twice as fast
THREADED_BYTES = 8 * 1024**2  # above this, zstd compresses on every core


class CodecError(ValueError):
    """A blob's bytes are not a tensor this codec can decode."""


def zstd(data: bytes | memoryview) -> bytes:
    threads = -1 if len(data) >= THREADED_BYTES else 0
    return zstandard.ZstdCompressor(level=LEVEL, threads=threads).compress(data)


def unzstd(data: bytes | memoryview) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data)


def unzstd_array(data: bytes | memoryview) -> np.ndarray:
    """Decompress into a fresh, writable uint8 array (no intermediate ``bytes`` copy where the frame says its size)."""
    size = zstandard.frame_content_size(data)
    if size < 0:  # the frame does not record its size
        return np.frombuffer(unzstd(data), dtype=np.uint8).copy()
    out = np.empty(size, dtype=np.uint8)
    view, done = memoryview(out), 0
    with zstandard.ZstdDecompressor().stream_reader(data) as reader:
        while done < size:
            got = reader.readinto(view[done:])
            if not got:
                raise CodecError("compressed data ends before the size its frame records")
            done += got
    return out

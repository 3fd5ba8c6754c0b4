"""Bits per parameter of a fine-tune's task vector as the store keeps it, against lossless codecs of the weights.

    bench/.venv-mergekit/bin/python bench/task_vector_codecs.py BASE_DIR FINETUNE_DIR

(``store_bench.py`` runs it with the venv it installs, which has ZipNN.) Per
tensor, streamed: the store's own blob of the exact task vector (what
``register`` writes), and of the fine-tuned weights themselves: zstd-3 on the
plain bytes, the store's byte-plane codec, and ZipNN (byte grouping +
Huffman/zstd, the published lossless codec for model weights). Prints JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import zstandard
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage.codecs import encode, encode_with  # noqa: E402


def main(base_dir: str, ft_dir: str) -> None:
    try:
        from zipnn import ZipNN
    except ImportError:
        ZipNN = None
    totals = {"params": 0, "task_vector_blob": 0, "weights_zstd3": 0, "weights_planes": 0, "weights_zipnn": 0}
    seconds = {k: 0.0 for k in totals if k != "params"}
    base_f = safe_open(str(Path(base_dir) / "model.safetensors"), "pt")
    ft_f = safe_open(str(Path(ft_dir) / "model.safetensors"), "pt")
    for name in ft_f.keys():
        w, b = ft_f.get_tensor(name), base_f.get_tensor(name)
        totals["params"] += w.numel()
        tau = w.float() - b.float() if w.dtype != torch.float32 else w.double() - b.double()
        for key, fn in (("task_vector_blob", lambda: encode(tau)),
                        ("weights_zstd3", lambda: zstandard.ZstdCompressor(level=3).compress(
                            w.contiguous().view(-1).view(torch.uint8).numpy().tobytes())),
                        ("weights_planes", lambda: encode_with(w, "planes"))):
            start = time.perf_counter()
            totals[key] += len(fn())
            seconds[key] += time.perf_counter() - start
        if ZipNN is not None:
            dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[w.dtype]
            start = time.perf_counter()
            totals["weights_zipnn"] += len(ZipNN(input_format="torch", bytearray_dtype=dtype).compress(w.contiguous()))
            seconds["weights_zipnn"] += time.perf_counter() - start
    n = totals["params"]
    print(json.dumps({k: {"bits_per_param": 8 * v / n, "seconds": seconds[k]} for k, v in totals.items()
                      if k != "params" and (v or k != "weights_zipnn")}))


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""The composed runtime against separately loaded models: peak RSS and generate tokens/s.

Builds (once, under --work) a bf16 Llama base and k = 3 LLaVA fine-tunes of
it (their own tiny CLIP towers, distinct image tokens, every LLM weight
perturbed), registers them in a store and expands (ties, density 0.2, masks
mmer). Then every case runs in its own fresh process and reports its peak
resident memory (VmHWM):

* ``libs``: python + torch + transformers (with its LLaVA and Llama classes) + mmer_cl imported, nothing loaded;
* ``separate k``: k plain transformers models (``from_pretrained``), k = 1..3;
* ``composed k``: ``Store.compose`` over k entries, k = 1..3.

* ``speed``: the plain model of entry 0 and a k = 3 composition in ONE process:
  greedy ``generate`` tokens/s, each in steady state (a warm-up run first),
  on a single-modality input of entry 0, on a mixed input carrying images of
  entries 0 and 1 (text tokens on the default), and on the single-modality
  input right after a mixed one (the weights switch back).

Memory is reported two ways: the raw peak RSS ratio (composed / k plain
models), and the ratio of the models' own memory, each peak minus the
``libs`` baseline measured in the same run (the issue's budget counts model
bytes; the libraries are a constant that a small model cannot amortise).

Run by hand (minutes on 2 cores; sizes via --hidden etc.; each size needs its
own --work). The README's two rows:

    python bench/compose_bench.py --work /tmp/mmer-compose-bench --threads 1
    python bench/compose_bench.py --work /tmp/mmer-compose-bench-1b --hidden 2048 --layers 16 --intermediate 5632 --vocab 16000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mmer_cl, not an installed one
K = 3


def status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mib() -> float:
    """Peak resident memory of this process so far (VmHWM), MiB."""
    return status_mib("VmHWM")


def build(work: Path, hidden: int, layers: int, inter: int, vocab: int, log=print) -> None:
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration)

    from mmer_cl.store import Store

    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(text).to(torch.bfloat16)
    base.save_pretrained(work / "base")
    lm_state = {k[len("model."):]: v for k, v in base.state_dict().items() if k.startswith("model.")}
    for i in range(K):
        log(f"building entry {i}")
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=64)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1 - i,
                          vision_feature_layer=-1, vision_feature_select_strategy="default")
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(cfg)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("model.language_model."):
                    src = lm_state[name[len("model.language_model."):]]
                elif name == "lm_head.weight":
                    src = base.lm_head.weight
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                    continue
                p.copy_(src.float() + torch.randn(p.shape, generator=gen) * 0.002)
        for mod in model.modules():  # buffers (position ids) of the vision tower
            if hasattr(mod, "position_ids") and isinstance(mod.position_ids, torch.Tensor):
                mod.position_ids.copy_(torch.arange(mod.position_ids.shape[-1]).expand_as(mod.position_ids))
        model.save_pretrained(work / f"entry{i}")
        del model
    del base
    store = Store.init(work / "store", work / "base", actor="bench")
    for i in range(K):
        log(f"registering entry {i}")
        store.register(work / f"entry{i}", f"entry{i}", f"modality{i}", actor="bench")
    log("expanding")
    store.expand(actor="bench")
    store.close()


def inputs(vocab: int, entries: list[int], text: int = 8):
    import torch

    gen = torch.Generator().manual_seed(0)
    t = torch.randint(10, vocab - 10, (1, text), generator=gen)
    blocks, pixels = [t[:, :text // 2]], {}
    for i in entries:
        blocks.append(torch.full((1, 16), vocab - 1 - i))  # 32x32 image in 8x8 patches -> 16 tokens
        pixels[i] = torch.randn(1, 3, 32, 32, generator=gen)
    blocks.append(t[:, text // 2:])
    return torch.cat(blocks, dim=1), pixels


def tokens_per_s(fn, n: int) -> float:
    fn(2)  # warm-up
    start = time.perf_counter()
    out = fn(n)
    elapsed = time.perf_counter() - start
    assert out.shape[-1] >= n
    return n / elapsed


def case(name: str, k: int, work: Path, tokens: int, threads: int = 0) -> dict:
    import torch
    import transformers
    from transformers import LlavaForConditionalGeneration

    import mmer_cl  # noqa: F401
    from mmer_cl.store import Store

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    cfg = json.loads((work / "entry0" / "config.json").read_text())
    vocab = cfg["text_config"]["vocab_size"]
    result: dict = {"case": name, "k": k}
    bf16 = torch.bfloat16
    with torch.no_grad():
        if name == "separate":  # k plain models, one forward each
            models = [LlavaForConditionalGeneration.from_pretrained(work / f"entry{i}", dtype=bf16).eval()
                      for i in range(k)]
            for i, m in enumerate(models):
                ids_i, px_i = inputs(vocab, [i])
                m(input_ids=ids_i, pixel_values=px_i[i].to(bf16))
        elif name == "composed":  # one composition of k entries, a forward per entry, and a mixed one
            store = Store.open(work / "store")
            t0 = time.perf_counter()
            composed = store.compose([f"entry{i}" for i in range(k)])
            result["build_s"] = time.perf_counter() - t0
            result["peak_rss_build_mib"] = hwm_mib()  # the build's peak (its temporaries included)
            result["rss_built_mib"] = status_mib("VmRSS")
            for i in range(k):
                ids_i, px_i = inputs(vocab, [i])
                composed(ids_i, inputs={f"entry{i}": {"pixel_values": px_i[i].to(bf16)}})
            result["cache_after_single_bytes"] = composed.cache.bytes
            if k >= 2:
                mids, mpx = inputs(vocab, [0, 1])
                composed(mids, inputs={f"entry{i}": {"pixel_values": p.to(bf16)} for i, p in mpx.items()})
            result["held_bytes"] = composed.memory()
            result["rss_end_mib"] = status_mib("VmRSS")
        elif name == "speed":  # the plain model of entry 0 and a k-entry composition, in ONE process, alternated
            plain = LlavaForConditionalGeneration.from_pretrained(work / "entry0", dtype=bf16).eval()
            composed = Store.open(work / "store").compose([f"entry{i}" for i in range(k)])
            ids, px = inputs(vocab, [0])
            mids, mpx = inputs(vocab, [0, 1])
            single = {"entry0": {"pixel_values": px[0].to(bf16)}}
            mixed = {f"entry{i}": {"pixel_values": p.to(bf16)} for i, p in mpx.items()}
            kw = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "pad_token_id": 0}
            runs = {"plain": lambda: plain.generate(input_ids=ids, pixel_values=px[0].to(bf16), **kw),
                    "composed_single": lambda: composed.generate(ids, inputs=single, **kw),
                    "composed_mixed": lambda: composed.generate(mids, inputs=mixed, **kw)}
            best = {n: float("inf") for n in runs}
            for n, fn in runs.items():  # each in steady state: its first run warms (and switches weights) untimed
                fn()
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn()
                    best[n] = min(best[n], time.perf_counter() - t0)
            t0 = time.perf_counter()
            runs["composed_single"]()  # right after mixed inputs: the weights switch back first
            result["tok_s_composed_single_after_mixed"] = tokens / (time.perf_counter() - t0)
            result.update({f"tok_s_{n}": tokens / t for n, t in best.items()})
            for label, ids_, inp in (("single", ids, single), ("mixed", mids, mixed)):
                composed(ids_, inputs=inp)
                t0 = time.perf_counter()
                composed(ids_, inputs=inp)
                result[f"forward_s_{label}_repeat"] = time.perf_counter() - t0
            composed(ids, inputs=single)
            t0 = time.perf_counter()
            composed(mids, inputs=mixed)  # the switch from one-modality weights to a mixed input
            result["forward_s_mixed_after_single"] = time.perf_counter() - t0
    result["peak_rss_mib"] = hwm_mib()
    return result


def run_case(name: str, k: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--k", str(k), "--work", str(args.work),
           "--tokens", str(args.tokens), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"case {name} k={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmer-compose-bench"))
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in every case (0: torch's default); 1 keeps timings sane on a busy machine")
    ap.add_argument("--out", type=Path, default=None, help="Also write the results as JSON here.")
    ap.add_argument("--case", choices=["libs", "separate", "composed", "speed"], help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case == "libs":  # what every other case imports before loading anything
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM, LlavaForConditionalGeneration  # noqa: F401

        import mmer_cl.store  # noqa: F401
        print(json.dumps({"case": "libs", "k": 0, "peak_rss_mib": hwm_mib()}))
        return
    if args.case:
        print(json.dumps(case(args.case, args.k, args.work, args.tokens, args.threads)))
        return
    if not (args.work / "store" / "registry.db").exists():
        args.work.mkdir(parents=True, exist_ok=True)
        build(args.work, args.hidden, args.layers, args.intermediate, args.vocab)
    results = [run_case("libs", 0, args)]
    for k in range(1, K + 1):
        results.append(run_case("separate", k, args))
        results.append(run_case("composed", k, args))
    results.append(run_case("speed", K, args))
    libs = results[0]["peak_rss_mib"]
    sep = {r["k"]: r for r in results if r["case"] == "separate"}
    comp = {r["k"]: r for r in results if r["case"] == "composed"}
    speed = results[-1]
    params = comp[1]["held_bytes"]["llm_working"] // 2  # bf16
    print(f"LLM parameters: {params / 1e6:.0f}M (bf16: {params * 2 / 2**20:.0f} MiB per copy); python + torch + "
          f"transformers (LLaVA, Llama) + mmer_cl alone: {libs:.0f} MiB peak RSS (measured in this run)")
    print("| k | k plain models (MiB) | composed (MiB) | raw RSS ratio | model's own memory: RSS - libraries (MiB) "
          "| model's own ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in range(1, K + 1):
        s, c = sep[k]["peak_rss_mib"], comp[k]["peak_rss_mib"]
        print(f"| {k} | {s:.0f} | {c:.0f} | {c / s:.2f} | {s - libs:.0f} vs {c - libs:.0f} | "
              f"{(c - libs) / (s - libs):.2f} |")
    for k in range(1, K + 1):
        c = comp[k]
        print(f"composed k={k}: build {c['build_s']:.1f} s, peak during the build {c['peak_rss_build_mib']:.0f} MiB, "
              f"RSS after the build {c['rss_built_mib']:.0f} MiB, at the end {c['rss_end_mib']:.0f} MiB; cache after "
              f"the single-modality forwards {c['cache_after_single_bytes']} B")
    mem = comp[K]["held_bytes"]
    print(f"held by the composition (k={K}), bytes per LLM parameter: " +
          ", ".join(f"{k} {v / params:.3f}" for k, v in mem.items()) + f"; raw: {json.dumps(mem)}")
    p = speed["tok_s_plain"]
    print(f"generate tokens/s ({args.tokens} new, best of 3, one process): plain entry0 {p:.2f}; composed k={K} "
          f"single-modality {speed['tok_s_composed_single']:.2f} ({speed['tok_s_composed_single'] / p:.2f}x); "
          f"mixed two-image input {speed['tok_s_composed_mixed']:.2f} ({speed['tok_s_composed_mixed'] / p:.2f}x); "
          f"single right after mixed {speed['tok_s_composed_single_after_mixed']:.2f} "
          f"({speed['tok_s_composed_single_after_mixed'] / p:.2f}x)")
    print(f"one forward: single {speed['forward_s_single_repeat'] * 1e3:.0f} ms, mixed (repeat) "
          f"{speed['forward_s_mixed_repeat'] * 1e3:.0f} ms, mixed right after a single-modality input "
          f"{speed['forward_s_mixed_after_single'] * 1e3:.0f} ms")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=1))


if __name__ == "__main__":
    main()

"""Expansion: one composed model serving several entries, single-modality inputs exactly as Store.load, mixed
inputs routed per token, generate, and the bounded memory of the weights it holds."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import builders
import compose_builders as cb
from mmer_cl import MergeParams
from mmer_cl.compose.adapters import AdapterError, LlavaAdapter, register_adapter
from mmer_cl.compose import CompositionError
from mmer_cl.compose.bits import pack_bits, unpack_bits
from mmer_cl.compose.weights import BASE, MERGED, RoutedTensor, WeightCache, expand
from mmer_cl.method.reconstruct import reconstruct
from mmer_cl.store import Store

EXAMPLES = Path(__file__).parents[1] / "examples"


def logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


# ---- the weight representation --------------------------------------------------------------
def test_bits_round_trip_for_lengths_that_are_not_multiples_of_eight():
    m = torch.rand(1003) > 0.3
    packed = pack_bits(m)
    assert packed.numel() == 126 and torch.equal(unpack_bits(packed, 1003), m)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_routed_tensor_serves_every_route_bit_for_bit_as_reconstruct(dtype, chunk, monkeypatch):
    monkeypatch.setattr("mmer_cl.compose.weights.CHUNK", chunk)  # 64: many chunk boundaries inside the tensor
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, 24, generator=gen).to(dtype)
    base[0, :4] = -0.0
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    merged = (torch.randn(40, 24, generator=gen) * 1e-2).to(wide) * (torch.rand(40, 24, generator=gen) > 0.5)
    masks = [torch.rand(40, 24, generator=gen) > p for p in (0.3, 0.6)]
    rt = RoutedTensor("w", base, merged, masks, scales=[1.0, 1.37])
    cache = WeightCache(1 << 20)
    expected = {BASE: base, MERGED: reconstruct(base, torch.ones_like(masks[0]), merged),
                2: reconstruct(base, masks[0], merged), 3: reconstruct(base, masks[1], merged, 1.37)}
    for order in ([2, 0, 1, 2, 3], [1, 3, 0, 2]):
        for r in order:
            got = rt.make_resident(r) if rt.can_reside(r) else rt.get(r, cache)
            assert torch.equal(got, expected[r]), r  # (reconstruct turns -0.0 + 0 into +0.0: equal values)
    assert not rt.can_reside(3)  # scale != 1: always a materialised copy, exact float math


def test_expand_places_values_at_the_true_positions_like_masked_scatter():
    gen = torch.Generator().manual_seed(1)
    for n, p in ((1000, 0.5), (37, 0.0), (64, 1.0), (4099, 0.03)):
        where = torch.rand(n, generator=gen) < p
        values = torch.randint(-2**15, 2**15, (int(where.sum()) or 1,), generator=gen, dtype=torch.int16)
        values = values[:int(where.sum())] if where.any() else values
        expected = torch.zeros(n, dtype=torch.int16).masked_scatter_(where, values)
        assert torch.equal(expand(where, values), expected), (n, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_tensor_keeps_only_positions_the_merge_changes_and_stays_exact(dtype, monkeypatch):
    """tau_* of every magnitude: sub-ulp values (the weight does not change: not stored), small ones (only the
    low half of the bit pattern changes) and large ones (sign and exponent change: the sparse high half)."""
    monkeypatch.setattr("mmer_cl.compose.weights.CHUNK", 256)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(64, 48, generator=gen).to(dtype)
    magnitude = 10 ** (torch.rand(64, 48, generator=gen) * 9 - 8)  # 1e-8 .. 1e1
    merged = torch.randn(64, 48, generator=gen) * magnitude * (torch.rand(64, 48, generator=gen) > 0.3)
    masks = [torch.rand(64, 48, generator=gen) > p for p in (0.2, 0.5, 0.7)]
    rt = RoutedTensor("w", base.clone(), merged, masks, scales=[1.0, 1.0, 1.0])  # its working copy changes
    changed = reconstruct(base, torch.ones_like(masks[0]), merged) != base
    assert rt.nnz == int((changed & (merged != 0)).sum()) < int((merged != 0).sum())  # sub-ulp tau not stored
    assert 0 < rt.high.numel() < rt.nnz  # high halves only where sign/exponent moved
    for r in [2, 3, 1, 4, 0, 3, 2]:
        assert torch.equal(rt.make_resident(r), reconstruct(base, masks[r - 2], merged) if r >= 2 else
                           (base if r == BASE else reconstruct(base, torch.ones_like(masks[0]), merged))), r
    sizes = rt.sizes()
    assert sizes["masks"] == 3 * ((rt.nnz + 7) // 8)  # entry masks only, 1 bit per stored position
    # the halves cost less than one full-width XOR per position (the high half is mostly zero)
    assert sizes["merged"] < base.element_size() * rt.nnz + base.numel() // 8 + rt.nnz // 8


def test_cache_never_exceeds_its_byte_budget():
    cache = WeightCache(100)
    for i in range(5):
        cache.put((i, 0), torch.zeros(10))  # 40 bytes each
    assert cache.bytes <= 100 and cache.get((4, 0)) is not None and cache.get((0, 0)) is None


# ---- single modality: exactly Store.load ----------------------------------------------------
@pytest.fixture(scope="module")
def llama_store(family, tmp_path_factory):
    s = Store.init(tmp_path_factory.mktemp("compose") / "store", family / "base", actor="t")
    for name in ("vision", "audio", "video"):
        s.register(family / name, name, name, actor="t")
    s.expand(actor="t")
    yield s
    s.close()


def test_llava_current_layout_single_modality_logits_equal_store_load(llama_store):
    composed = llama_store.compose()
    inp = builders.llava_inputs()
    for name in ("vision", "audio", "video"):
        ref = logits(llama_store.load(name), **inp)
        got = logits(composed, input_ids=inp["input_ids"], inputs={name: {"pixel_values": inp["pixel_values"]}})
        assert torch.equal(got, ref), name


def test_mask_scale_other_than_one_is_reproduced_exactly(family, tmp_path):
    with Store.init(tmp_path / "s", family / "base", actor="t") as s:
        s.register(family / "vision", "vision", "vision", actor="t")
        s.register(family / "audio", "audio", "audio", actor="t")
        v = s.expand(MergeParams(mask_rule="emr"), actor="t").version
        assert any(m.scale != 1.0 for m in v.members)
        composed = s.compose()
        inp = builders.llava_inputs(seed=3)
        for name in ("vision", "audio"):
            got = logits(composed, input_ids=inp["input_ids"], inputs={name: {"pixel_values": inp["pixel_values"]}})
            assert torch.equal(got, logits(s.load(name), **inp)), name


def test_bf16_weights_single_modality_logits_equal_store_load(tmp_path):
    base = builders.save_base(tmp_path / "base", dtype=torch.bfloat16)
    builders.save_llava(base, tmp_path / "v", seed=1)
    builders.save_llava(base, tmp_path / "a", seed=2)
    with Store.init(tmp_path / "s", tmp_path / "base", actor="t") as s:
        s.register(tmp_path / "v", "v", "vision", actor="t")
        s.register(tmp_path / "a", "a", "audio", actor="t")
        s.expand(actor="t")
        composed = s.compose()
        assert all(t.working.dtype == torch.bfloat16 for t in composed.tensors.values())
        inp = builders.llava_inputs(seed=5)
        for name in ("v", "a"):
            got = logits(composed, input_ids=inp["input_ids"], inputs={name: {"pixel_values": inp["pixel_values"]}})
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, logits(s.load(name), **inp)), name


def save_legacy_llava(model, path: Path) -> None:
    """The pre-transformers-5 LLaVA checkpoint layout: language_model.model.*, vision_tower.*, ..."""
    from safetensors.torch import save_file

    renamed = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("model."):
            k = k[len("model."):]
        renamed[k] = v.contiguous()
    path.mkdir(parents=True)
    save_file(renamed, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)


def test_llava_legacy_layout_composes_to_the_same_model(family, tmp_path):
    base = builders.save_base(tmp_path / "base", seed=7)
    current = builders.llava_from_base(base, seed=4)
    save_legacy_llava(current, tmp_path / "legacy")
    with Store.init(tmp_path / "s", tmp_path / "base", actor="t") as s:
        s.register(tmp_path / "legacy", "vision", "vision", actor="t")
        s.expand(MergeParams(density=1.0), actor="t")  # one entry at density 1: the model itself
        composed = s.compose()
        inp = builders.llava_inputs(seed=1)
        got = logits(composed, input_ids=inp["input_ids"], inputs={"vision": {"pixel_values": inp["pixel_values"]}})
        assert torch.equal(got, logits(current.eval(), **inp))


# ---- LLaVA + Qwen2-Audio on one Qwen2 base --------------------------------------------------
@pytest.fixture(scope="module")
def qwen_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    base = cb.save_qwen2_base(root / "base")
    cb.save_llava_qwen2(base, root / "vision", seed=1)
    cb.save_qwen2_audio(base, root / "audio", seed=2)
    s = Store.init(root / "store", root / "base", actor="t")
    s.register(root / "vision", "vision", "vision", actor="t")
    s.register(root / "audio", "audio", "audio", actor="t")
    s.expand(actor="t")
    yield s
    s.close()


def test_qwen2_audio_and_llava_on_a_qwen2_base_match_store_load(qwen_store):
    composed = qwen_store.compose()
    t = cb.text_ids(0, 2, 3)
    audio_ids = cb.ids_with(t, ("audio", 2), t)
    ref = logits(qwen_store.load("audio"), input_ids=audio_ids, **cb.audio_inputs())
    assert torch.equal(logits(composed, input_ids=audio_ids, inputs={"audio": cb.audio_inputs()}), ref)
    image_ids = cb.ids_with(t, ("image", 2), t)
    ref = logits(qwen_store.load("vision"), input_ids=image_ids, **cb.image_inputs())
    assert torch.equal(logits(composed, input_ids=image_ids, inputs={"vision": cb.image_inputs()}), ref)


def reference_mixed_logits(store, ids, routes, image, audio):
    """Per-token routing computed independently of the composed runtime: one plain LLM whose every per-token
    module evaluates ALL routes' weights (from Store.load and the base checkpoint) on ALL tokens, each token
    keeping its own route's output. ``routes``: 0 base, 1 vision, 2 audio per token."""
    from transformers import Qwen2ForCausalLM

    from mmer_cl.compose.adapters import Qwen2AudioAdapter

    vision, audio_model = store.load("vision"), store.load("audio")
    plain = Qwen2ForCausalLM.from_pretrained(store.base().source_path)
    weights = {0: dict(plain.named_parameters()),
               1: {k.replace("model.language_model.", "model."): v for k, v in vision.named_parameters()},
               2: {k.replace("model.language_model.", "model."): v for k, v in audio_model.named_parameters()}}
    with torch.no_grad():
        img = vision.model.get_image_features(pixel_values=image["pixel_values"], return_dict=True).pooler_output
        aud = Qwen2AudioAdapter().features(audio_model, audio_model.config, audio, torch.float32)
    busy = []

    def hook(mod, args, out, name, own):
        if busy:  # the functional calls below run the same module again
            return out
        x, r = args[0], routes[:, -args[0].shape[1]:]
        result = out.clone()
        busy.append(1)
        for route, w in weights.items():
            y = functional_call(mod, {n: w[f"{name}.{n}"] for n in own}, (x,))
            result[r == route] = y[r == route]
        busy.pop()
        return result

    for name, module in plain.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            module.register_forward_hook(lambda m, a, o, name=name, own=own: hook(m, a, o, name, own))
    with torch.no_grad():
        emb = plain.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == cb.IMAGE_TOKEN).unsqueeze(-1), torch.cat(list(img)))
        emb = emb.masked_scatter((ids == cb.AUDIO_TOKEN).unsqueeze(-1), aud)
        return plain(inputs_embeds=emb).logits


def test_mixed_input_routes_each_token_through_its_own_modality_in_every_layer(qwen_store):
    composed = qwen_store.compose(text_params="base")
    t = cb.text_ids(1, 2, 3)
    ids = cb.ids_with(t, ("image", 2), t, ("audio", 2), t)
    routes = (ids == cb.IMAGE_TOKEN).long() + 2 * (ids == cb.AUDIO_TOKEN).long()
    image, audio = cb.image_inputs(seed=1), cb.audio_inputs(seed=1)
    expected = reference_mixed_logits(qwen_store, ids, routes, image, audio)
    got = logits(composed, input_ids=ids, inputs={"vision": image, "audio": audio})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the routing matters: running every token on the base weights gives clearly different logits
    all_base = reference_mixed_logits(qwen_store, ids, torch.zeros_like(routes), image, audio)
    assert (all_base - expected).abs().max() > 1e-3


@pytest.mark.parametrize("text", ["base", "merged", "vision"])
def test_text_tokens_of_a_mixed_input_run_on_the_chosen_parameters(qwen_store, tmp_path, text):
    from transformers import Qwen2ForCausalLM

    composed = qwen_store.compose(text_params=text)
    t = cb.text_ids(2, 1, 4)
    ids = cb.ids_with(t, ("image", 1), ("audio", 1))
    got = logits(composed, input_ids=ids, inputs={"vision": cb.image_inputs(batch=1), "audio": cb.audio_inputs(batch=1)})
    if text == "base":
        plain = Qwen2ForCausalLM.from_pretrained(qwen_store.base().source_path)
    elif text == "merged":
        plain = Qwen2ForCausalLM.from_pretrained(qwen_store.export_text(tmp_path / "merged"))
    else:
        plain = qwen_store.load("vision")
    expected = logits(plain, input_ids=t)
    torch.testing.assert_close(got[:, :4], expected, rtol=1e-6, atol=1e-6)  # causal: the text prefix saw only text


def test_generate_on_a_vision_plus_audio_input_is_greedy_decoding_of_the_routed_forward(qwen_store):
    composed = qwen_store.compose(text_params="base", cache_bytes=0)
    t = cb.text_ids(3, 2, 3)
    ids = cb.ids_with(t, ("image", 2), ("audio", 2), t)
    inputs = {"vision": cb.image_inputs(seed=2), "audio": cb.audio_inputs(seed=2)}
    new = composed.generate(ids, inputs=inputs, max_new_tokens=6, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
    assert new.shape == (2, 6)
    seq = ids
    for step in range(6):  # generated tokens are text: the forward routes them to text_params too
        nxt = logits(composed, input_ids=seq, inputs=inputs)[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(nxt[:, 0], new[:, step]), step
        seq = torch.cat([seq, nxt], dim=1)


def test_single_modality_generate_equals_the_store_loaded_model(qwen_store):
    composed = qwen_store.compose()
    t = cb.text_ids(4, 1, 3)
    ids = cb.ids_with(t, ("audio", 1), t)
    new = composed.generate(ids, inputs={"audio": cb.audio_inputs(batch=1)}, max_new_tokens=5, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    ref = qwen_store.load("audio").generate(input_ids=ids, **cb.audio_inputs(batch=1), max_new_tokens=5,
                                             do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(new[0], ref[0, ids.shape[1]:])


def test_a_zero_byte_cache_still_composes_and_holds_no_dense_copy(qwen_store):
    composed = qwen_store.compose(cache_bytes=0)
    t = cb.text_ids(5, 1, 3)
    ids = cb.ids_with(t, ("image", 1), ("audio", 1), t)
    inputs = {"vision": cb.image_inputs(batch=1), "audio": cb.audio_inputs(batch=1)}
    a = logits(composed, input_ids=ids, inputs=inputs)
    assert composed.cache.bytes == 0
    b = logits(qwen_store.compose(cache_bytes=1 << 24), input_ids=ids, inputs=inputs)
    assert torch.equal(a, b)


def test_a_mixed_input_switches_the_working_weights_in_place_and_ends_on_the_text_route(qwen_store):
    composed = qwen_store.compose(cache_bytes=1 << 30)  # a cache that could hold every route: still unused
    t = cb.text_ids(7, 1, 3)
    ids = cb.ids_with(t, ("image", 1), ("audio", 1), t)
    inputs = {"vision": cb.image_inputs(batch=1), "audio": cb.audio_inputs(batch=1)}
    logits(composed, input_ids=ids, inputs=inputs)
    assert composed.cache.bytes == 0 and composed.cache.misses == 0  # no dense copy of any route was made
    merged = composed.route_of["merged"]
    assert all(rt.resident == merged for rt in composed.tensors.values())  # decoding text needs no switch
    before = {k: rt.working.clone() for k, rt in composed.tensors.items()}
    composed.generate(ids, inputs=inputs, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert all(torch.equal(rt.working, before[k]) for k, rt in composed.tensors.items())


def test_a_mixed_input_switches_each_weight_once_per_extra_route_and_never_the_embedding(qwen_store, monkeypatch):
    composed = qwen_store.compose()  # text tokens on merged
    t = cb.text_ids(8, 1, 3)
    ids = cb.ids_with(t, ("image", 1), ("audio", 1), t)
    inputs = {"vision": cb.image_inputs(batch=1), "audio": cb.audio_inputs(batch=1)}
    logits(composed, input_ids=ids, inputs=inputs)  # now every weight holds the text route
    switches = []
    original = RoutedTensor._toggle
    monkeypatch.setattr(RoutedTensor, "_toggle", lambda self, target, src, dst: (
        switches.append((self.name, src, dst)) if src != dst else None, original(self, target, src, dst))[1])
    logits(composed, input_ids=ids, inputs=inputs)
    names = [n for n, _, _ in switches]
    embed = next(k for k in composed.tensors if k.endswith("embed_tokens.weight"))
    assert embed not in names  # placeholder rows are replaced by features: looked up on the text route
    assert all(names.count(k) == 2 for k in composed.tensors if k != embed)  # text -> vision -> audio


def test_memory_parts_add_up_and_masks_cost_one_bit_per_stored_position(qwen_store):
    composed = qwen_store.compose()
    mem = composed.memory()
    assert mem["total"] == sum(mem[k] for k in ("llm_working", "merged", "masks", "extras", "encoders", "cache"))
    assert mem["merged_and_masks"] == mem["merged"] + mem["masks"] + mem["extras"]
    assert mem["masks"] == sum(2 * ((t.nnz + 7) // 8) for t in composed.tensors.values())  # 2 entries
    assert mem["cache"] == 0


def test_the_build_reads_the_largest_tensors_first(qwen_store):
    steps = []
    composed = qwen_store.compose(progress=lambda i, n, key: steps.append(key))
    sizes = [composed.tensors[k].numel for k in steps]
    assert len(steps) == len(composed.tensors) and sizes == sorted(sizes, reverse=True)


def test_memory_holds_one_dense_llm_plus_compact_merged_and_masks(qwen_store):
    composed = qwen_store.compose()
    mem = composed.memory()
    dense = sum(t.working.numel() * t.working.element_size() for t in composed.tensors.values())
    assert mem["llm_working"] == dense
    # merged values + bitmaps + 2 packed masks: well under one more dense LLM
    assert mem["merged_and_masks"] < 0.6 * dense


# ---- errors -----------------------------------------------------------------------------------
def test_defaults_text_of_mixed_inputs_on_merged_and_text_only_inputs_on_the_base(qwen_store):
    from transformers import Qwen2ForCausalLM

    composed = qwen_store.compose()
    assert (composed.text_params, composed.text_only) == ("merged", "base")
    t = cb.text_ids(6, 1, 5)
    plain = Qwen2ForCausalLM.from_pretrained(qwen_store.base().source_path)
    assert torch.equal(logits(composed, input_ids=t), logits(plain, input_ids=t))


def test_text_params_must_name_base_merged_or_a_member(qwen_store):
    with pytest.raises(CompositionError, match="text_params"):
        qwen_store.compose(text_params="speech")


def test_an_entry_of_an_unknown_family_names_the_function_to_write(qwen_store, tmp_path):
    from mmer_cl.compose.model import EntrySource, build_composed

    with pytest.raises(AdapterError, match="register_adapter"):
        build_composed({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, [], None, None,
                       [EntrySource("x", "smell", json.dumps({"model_type": "nose_llm"}), None, None, None)])


def test_a_registered_adapter_replaces_the_built_in_one(qwen_store):
    calls = []

    class Counting(LlavaAdapter):
        def features(self, module, config, inputs, dtype):
            calls.append(1)
            return super().features(module, config, inputs, dtype)

    register_adapter("llava", Counting())
    try:
        composed = qwen_store.compose(entries=["vision"])
        t = cb.text_ids(0, 1, 2)
        logits(composed, input_ids=cb.ids_with(t, ("image", 1)), inputs={"vision": cb.image_inputs(batch=1)})
    finally:
        register_adapter("llava", LlavaAdapter())
    assert calls == [1]


def test_inputs_must_be_keyed_by_entries_of_the_composition(qwen_store):
    composed = qwen_store.compose(entries=["audio"])
    with pytest.raises(CompositionError, match="no entry 'vision'"):
        composed(cb.text_ids(0, 1, 2), inputs={"vision": cb.image_inputs(batch=1)})


# ---- the examples' TinyMLLM -----------------------------------------------------------------
@pytest.mark.slow
def test_tiny_mllm_single_modality_logits_equal_store_load(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    from mmer_family.model import TinyMLLM

    ck = EXAMPLES / "checkpoints"
    with Store.init(tmp_path / "s", ck / "base", actor="t") as s:
        s.register(ck / "seed0" / "vision_digit", "vision_digit", "vision", actor="t")
        s.register(ck / "seed0" / "audio_digit", "audio_digit", "audio", actor="t")
        s.expand(actor="t")
        composed = s.compose()
        ids = torch.randint(2, 60, (3, 7), generator=torch.Generator().manual_seed(0))
        feats = {"vision_digit": torch.rand(3, 64), "audio_digit": torch.rand(3, 48, 24)}
        for name, x in feats.items():
            ref = s.load(name, model_class=TinyMLLM, device="cpu")
            with torch.no_grad():
                expected = ref(x, ids)
                got = composed(ids, inputs={name: {"features": x}}).logits
            assert torch.equal(got[:, ref.config.prefix_tokens:], expected), name
        mixed = logits(composed, input_ids=ids, inputs={n: {"features": x} for n, x in feats.items()})
        assert mixed.shape[1] == ids.shape[1] + 8  # both prefixes in front of the text

"""Finding the base LLM's tensors inside a multimodal checkpoint."""

import pytest

from mmer_cl.errors import KeyMappingError
from mmer_cl.checkpoints.keymap import KeyMap, map_keys

BASE = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.mlp.up_proj.weight": (8, 4),
    "model.norm.weight": (4,),
    "lm_head.weight": (10, 4),
}


def test_legacy_llava_layout():
    ckpt = {
        "language_model.lm_head.weight": (10, 4),
        "language_model.model.embed_tokens.weight": (10, 4),
        "language_model.model.layers.0.mlp.up_proj.weight": (8, 4),
        "language_model.model.norm.weight": (4,),
        "multi_modal_projector.linear_1.weight": (4, 3),
        "vision_tower.embeddings.patch_embedding.weight": (3, 3),
    }
    km = map_keys(BASE, ckpt)
    assert km.llm["language_model.model.embed_tokens.weight"] == "model.embed_tokens.weight"
    assert km.llm["language_model.lm_head.weight"] == "lm_head.weight"
    assert km.modality == ["multi_modal_projector.linear_1.weight", "vision_tower.embeddings.patch_embedding.weight"]
    assert km.order == list(ckpt)


def test_new_transformers_layout_with_top_level_lm_head():
    ckpt = {
        "model.vision_tower.encoder.w": (3, 3),
        "model.language_model.embed_tokens.weight": (10, 4),
        "model.language_model.layers.0.mlp.up_proj.weight": (8, 4),
        "model.language_model.norm.weight": (4,),
        "lm_head.weight": (10, 4),
    }
    km = map_keys(BASE, ckpt)
    assert km.llm["lm_head.weight"] == "lm_head.weight"
    assert km.llm["model.language_model.norm.weight"] == "model.norm.weight"
    assert km.modality == ["model.vision_tower.encoder.w"]


def test_explicit_prefix_for_unknown_layouts():
    ckpt = {f"decoder_stack.{k}": v for k, v in BASE.items()} | {"ears.w": (2,)}
    with pytest.raises(KeyMappingError, match="no LLM tensors found"):
        map_keys(BASE, ckpt)
    km = map_keys(BASE, ckpt, llm_prefix="decoder_stack.")
    assert len(km.llm) == 4 and km.modality == ["ears.w"]


def test_resized_vocabulary_keeps_extra_rows_as_the_modalitys_own():
    ckpt = {f"language_model.{k}": v for k, v in BASE.items()}
    ckpt["language_model.model.embed_tokens.weight"] = (13, 4)
    ckpt["language_model.lm_head.weight"] = (13, 4)
    km = map_keys(BASE, ckpt)
    assert km.resized == {"language_model.model.embed_tokens.weight": 10, "language_model.lm_head.weight": 10}
    assert "resized" in km.describe()
    assert set(km.own_keys()) == set(km.resized)


def test_other_shape_mismatch_says_it_is_probably_another_base():
    ckpt = {f"language_model.{k}": v for k, v in BASE.items()}
    ckpt["language_model.model.layers.0.mlp.up_proj.weight"] = (8, 5)
    with pytest.raises(KeyMappingError, match="another base"):
        map_keys(BASE, ckpt)


def test_missing_base_tensors_are_listed():
    ckpt = {f"language_model.{k}": v for k, v in BASE.items() if "norm" not in k}
    with pytest.raises(KeyMappingError, match="model.norm.weight"):
        map_keys(BASE, ckpt)


def test_two_candidates_for_one_base_tensor_is_ambiguous():
    ckpt = {f"language_model.{k}": v for k, v in BASE.items()}
    ckpt["llm.model.norm.weight"] = (4,)
    with pytest.raises(KeyMappingError, match="disambiguate"):
        map_keys(BASE, ckpt)


def test_integer_buffers_stay_verbatim():
    ckpt = {f"language_model.{k}": v for k, v in BASE.items()}
    dtypes = {k: "F32" for k in ckpt}
    km = map_keys(BASE, ckpt | {"position_ids": (4,)}, ckpt_dtypes=dtypes | {"position_ids": "I64"})
    assert km.modality == ["position_ids"]


def test_keymap_round_trips_through_json():
    km = map_keys(BASE, {f"llm.{k}": v for k, v in BASE.items()}, ckpt_dtypes={f"llm.{k}": "BF16" for k in BASE})
    again = KeyMap.from_json(km.to_json())
    assert again == km


# ---- an LLM under a prefix in the base too: encoder-decoder layouts (Whisper, T5) --------------
WHISPER_DECODER = {  # WhisperForCausalLM: the decoder alone, saved under model.decoder.
    "model.decoder.embed_tokens.weight": (10, 4),
    "model.decoder.embed_positions.weight": (6, 4),
    "model.decoder.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.decoder.layers.0.encoder_attn.q_proj.weight": (4, 4),
    "model.decoder.layer_norm.weight": (4,),
}


def test_whisper_layout_strips_the_explicit_prefix_from_base_and_checkpoint_keys_alike():
    ckpt = dict(WHISPER_DECODER) | {"model.encoder.conv1.weight": (4, 8, 3),
                                    "model.encoder.layers.0.self_attn.q_proj.weight": (4, 4)}
    km = map_keys(WHISPER_DECODER, ckpt, llm_prefix="model.decoder.")
    assert km.llm == {k: k for k in WHISPER_DECODER}
    assert km.modality == ["model.encoder.conv1.weight", "model.encoder.layers.0.self_attn.q_proj.weight"]
    assert map_keys(WHISPER_DECODER, ckpt).llm == km.llm  # found without the prefix as well


def test_t5_layout_with_a_top_level_shared_embedding():
    base = {"shared.weight": (10, 4), "decoder.block.0.layer.0.SelfAttention.q.weight": (4, 4),
            "decoder.final_layer_norm.weight": (4,)}
    ckpt = {"shared.weight": (10, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4),
            "encoder.final_layer_norm.weight": (4,)} | {k: v for k, v in base.items() if k.startswith("decoder.")}
    km = map_keys(base, ckpt, llm_prefix="decoder.")
    assert km.llm == {k: k for k in base}
    assert km.modality == ["encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight"]


def test_a_prefix_that_makes_two_base_tensors_one_is_refused_with_advice():
    base = {"decoder.norm.weight": (4,), "norm.weight": (4,)}
    with pytest.raises(KeyMappingError, match="both reduce to norm.weight"):
        map_keys(base, {"decoder.norm.weight": (4,), "norm.weight": (4,)}, llm_prefix="decoder.")


def test_a_whisper_fine_tune_registered_with_llm_prefix_exports_bit_for_bit(tmp_path):
    """A store whose base is Whisper's decoder (WhisperForCausalLM) holds a fine-tuned Whisper's decoder as the
    LLM and its encoder as the audio side; density 1 gives the fine-tune back exactly."""
    import torch
    from transformers import WhisperConfig, WhisperForCausalLM, WhisperForConditionalGeneration

    from mmer_cl import MergeParams
    from mmer_cl.checkpoints.checkpoint import Checkpoint
    from mmer_cl.store import Store

    config = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
                           max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=3)
    torch.manual_seed(0)
    WhisperForCausalLM(config).save_pretrained(tmp_path / "base")
    tuned = WhisperForConditionalGeneration(config)
    decoder = WhisperForCausalLM.from_pretrained(tmp_path / "base").model.decoder
    with torch.no_grad():
        tuned.model.decoder.load_state_dict(decoder.state_dict())
        for p in tuned.model.decoder.parameters():
            p.add_(torch.randn(p.shape) * 1e-3)
    tuned.save_pretrained(tmp_path / "asr")
    with Store.init(tmp_path / "store", tmp_path / "base") as store:
        result = store.register(tmp_path / "asr", "asr", "audio", llm_prefix="model.decoder.")
        assert "modality tensors kept verbatim" in result.keymap_summary
        store.expand(MergeParams(density=1.0))
        exported = Checkpoint(store.export("asr", tmp_path / "export"))
    original = Checkpoint(tmp_path / "asr")
    assert sorted(exported.names()) == sorted(original.names())
    assert all(torch.equal(exported.get(k), original.get(k)) for k in original.names())

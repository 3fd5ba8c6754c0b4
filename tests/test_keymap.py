"""Finding the base LLM's tensors inside a multimodal checkpoint."""

import pytest

from mmer_cl.errors import KeyMappingError
from mmer_cl.keymap import KeyMap, map_keys

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

"""Every export says where it came from: safetensors metadata and a Hugging Face model card."""

import json

import yaml
from safetensors import safe_open

from mmer_cl import MergeParams, __version__
from mmer_cl.store import Store


def header(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_export_metadata_and_model_card(family, tmp_path):
    with Store.init(tmp_path / "store", family / "base") as store:
        store.register(family / "vision", "vision", "vision", "caption")
        store.register(family / "audio", "audio", "audio")
        store.expand(MergeParams(density=0.5), recipe="density: 0.5\n")
        out = store.export("vision", tmp_path / "vision")
        text_out = store.export_text(tmp_path / "text")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1  # the registered layout is kept, and every shard carries the provenance
    for shard in shards:
        meta = header(shard)
        assert meta["format"] == "pt" and meta["mmer.entry"] == "vision" and meta["mmer.version"] == "1"
        assert meta["mmer.mmer_cl_version"] == __version__ and json.loads(meta["mmer.params"])["density"] == 0.5
        assert meta["mmer.entry_revision"] == "1" and len(meta["mmer.base_fingerprint"]) == 64
    card = (out / "README.md").read_text()
    fm = front_matter(card)
    assert fm["base_model"] == "base" and fm["library_name"] == "transformers"
    assert fm["tags"][:2] == ["merge", "mmer"]
    assert "## Recipe" in card and "density: 0.5" in card and "| audio |" in card
    text_meta = header(text_out / "model.safetensors")
    assert "mmer.entry" not in text_meta and text_meta["mmer.reconstruction"] == "base + merged (text)"
    assert front_matter((text_out / "README.md").read_text())["tags"][:2] == ["merge", "mmer"]


def test_a_readme_the_checkpoint_shipped_is_kept_and_the_card_goes_beside_it(family, tmp_path):
    import shutil

    shutil.copytree(family / "vision", tmp_path / "vision")
    (tmp_path / "vision" / "README.md").write_text("# my own card\n")
    with Store.init(tmp_path / "store", family / "base") as store:
        store.register(tmp_path / "vision", "vision", "vision")
        store.expand()
        out = store.export("vision", tmp_path / "out")
    assert (out / "README.md").read_text() == "# my own card\n"
    assert front_matter((out / "MMER_CARD.md").read_text())["tags"][:2] == ["merge", "mmer"]


def tensors_of(directory):
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_an_exported_recipe_rebuilds_its_version_bit_for_bit(family, tmp_path):
    """The recipe an export carries (per-entry lambdas included) is accepted by `mmer expand --config` and
    rebuilds the same merged vector and masks: the re-export equals the export, tensor for tensor."""
    import shutil

    from click.testing import CliRunner

    from mmer_cl.cli import cli
    from mmer_cl.store.recipe import RECIPE_FILE, parse_recipe
    from registry import SCHEMA_VERSION

    store_dir = tmp_path / "store"
    with Store.init(store_dir, family / "base") as store:
        store.register(family / "vision", "vision", "vision")
        store.register(family / "audio", "audio", "audio")
        store.expand(MergeParams(density=0.5, lam=0.8, lam_per_entry={"audio": 0.6}), description="first")
        store.register(family / "video", "video", "video")
        store.expand(MergeParams(density=0.3))  # another current version: the recipe must say everything
        first = store.export("vision", tmp_path / "v1-vision", version=1)
        first_text = store.export_text(tmp_path / "v1-text", version=1)
    recipe_text = (first / RECIPE_FILE).read_text()
    assert recipe_text == (first_text / RECIPE_FILE).read_text()
    recipe = parse_recipe(recipe_text)
    assert recipe.params.lam_per_entry == {"audio": 0.6} and recipe.members == ["vision", "audio"]
    assert recipe_text in (first / "README.md").read_text()  # the card quotes it
    assert f"store_format: {SCHEMA_VERSION}" in recipe_text and f"mmer_cl_version: {__version__}" in recipe_text
    assert header(next(first.glob("*.safetensors")))["mmer.store_format"] == str(SCHEMA_VERSION)

    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    result = CliRunner().invoke(cli, ["--store", str(copy), "-q", "expand", "--config", str(first / RECIPE_FILE)])
    assert result.exit_code == 0 and "version 3" in result.output, result.output
    with Store.open(copy) as store:
        again = store.export("vision", tmp_path / "v3-vision", version=3)
        again_text = store.export_text(tmp_path / "v3-text", version=3)
        assert store.version(3).params == store.version(1).params
    foreign = tmp_path / "foreign.yaml"
    foreign.write_text(recipe_text.replace(recipe.info["base_fingerprint"], "f" * 64))
    result = CliRunner().invoke(cli, ["--store", str(copy), "-q", "expand", "--config", str(foreign)])
    assert result.exit_code == 2 and "was made for base" in result.output, result.output
    for a, b in ((first, again), (first_text, again_text)):
        ta, tb = tensors_of(a), tensors_of(b)
        assert ta.keys() == tb.keys()
        assert all(torch_equal(ta[k], tb[k]) for k in ta)


def torch_equal(a, b) -> bool:
    """The same dtype, shape and bits (NaN-safe, -0.0 distinct from 0.0)."""
    import torch

    bits = (lambda t: t.contiguous().reshape(-1).view(torch.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def test_every_merge_parameter_is_a_recipe_key_and_round_trips():
    """Generic over MergeParams' fields: a field added there is written and read without a change to recipes."""
    import dataclasses

    from mmer_cl.store.recipe import param_keys, parse_recipe, version_recipe

    params = MergeParams(method="dare_ties", density=0.4, alpha=0.9, mask_rule="consensus", lam=0.7, k=3, seed=5,
                         lam_per_entry={"b": 0.5})

    class Version:
        number, description = 4, "a test"
        members = [type("M", (), {"entry_name": n}) for n in ("a", "b")]

    Version.params = params.to_dict()
    text = version_recipe(Version)
    assert len(param_keys()) == len(dataclasses.fields(MergeParams))
    for key in param_keys():
        assert f"\n{key}:" in text
    back = parse_recipe(text)
    assert back.params == params and back.members == ["a", "b"] and back.description == "a test"


def test_a_text_only_lora_keeps_its_own_readme_counts_what_it_changes_and_its_card_speaks_of_the_llm_only(
        tmp_path):
    """peft writes a README.md (the adapter's own card) beside its weights: the export keeps it, mmer's card goes
    to MMER_CARD.md, and a LoRA with no encoder or projector is not described as keeping one."""
    import pytest

    peft = pytest.importorskip("peft", reason="the peft extra is not installed (pip install -e '.[peft]')")
    import builders

    base = builders.save_base(tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "README.md").write_text("# my adapter\n")
    with Store.init(tmp_path / "store", tmp_path / "base") as store:
        result = store.register(tmp_path / "adapter", "chat", "text")
        store.expand(MergeParams(density=1.0))
        out = store.export("chat", tmp_path / "out")
    assert (out / "README.md").read_text() == "# my adapter\n"
    card = (out / "MMER_CARD.md").read_text()
    assert "encoder" not in card.split("## Recipe")[0].replace("no encoder or projector", "")
    assert "changes the LLM only" in card
    # 2 layers x (q_proj, v_proj): the tensors the adapter changes, not every LLM tensor of the base
    assert result.keymap_summary.startswith("4 LLM tensors merged (changed by the adapter")

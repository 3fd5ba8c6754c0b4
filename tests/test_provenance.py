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

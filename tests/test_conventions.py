"""Registry conventions: aliases, tags, descriptions, entry revisions, show/diff, recipes, per-entry lambda."""

import pytest
import torch

from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.errors import ConfigError
from mmer_cl.method.expansion import expand_tensor
from mmer_cl.store.recipe import parse_recipe
from mmer_cl.store import Store, StoreError
from mmer_cl.store.version_tables import format_show
from registry import RegistryError


@pytest.fixture
def store(family, tmp_path):
    s = Store.init(tmp_path / "store", family / "base", actor="alice")
    s.register(family / "vision", "vision", "vision", "caption", actor="alice", description="LLaVA-style",
               tags={"owner": "alice"})
    s.register(family / "audio", "audio", "audio", "asr", actor="bob")
    s.expand(MergeParams(density=0.5))
    yield s
    s.close()


def actions(store):
    return [(e.action, e.subject, e.before, e.after) for e in store.history()]


def test_aliases_move_and_are_logged_and_current_stays(store):
    assert store.set_alias("production", "v1") == ("none", "v1")
    store.expand(MergeParams(density=0.7))
    assert store.version("production").number == 1 and store.version().number == 2
    assert store.set_alias("production", "current") == ("v1", "v2")
    assert store.aliases() == {"current": 2, "production": 2}
    assert store.remove_alias("production") == "v2"
    with pytest.raises(RegistryError, match="no version or alias 'production'"):
        store.version("production")
    with pytest.raises(RegistryError, match="cannot be removed"):
        store.remove_alias("current")
    with pytest.raises(StoreError, match="reads as a version number"):
        store.set_alias("v7", 1)
    assert [a for a in actions(store) if a[0] == "alias"] == [
        ("alias", "production", "none", "v1"), ("alias", "production", "v1", "v2"),
        ("alias", "production", "v2", "none")]


def test_versions_are_named_as_number_v_number_or_alias_everywhere(store, tmp_path):
    store.expand(MergeParams(density=0.7))
    store.set_alias("stable", 1)
    for ref in (1, "1", "v1", "stable"):
        assert store.version(ref).number == 1
    assert store.rollback("v1") == ("v2", "v1")
    assert store.rollback("2") == ("v1", "v2")
    a = Checkpoint(store.export("vision", tmp_path / "a", version="stable"))
    b = Checkpoint(store.export("vision", tmp_path / "b", version="v1"))
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())


def test_tags_and_descriptions_on_versions_and_entries(store):
    assert store.entries()[0].tags == {"owner": "alice"} and store.entries()[0].description == "LLaVA-style"
    assert store.tag({"stage": "staging", "ticket": "42"}) == {"stage": "staging", "ticket": "42"}
    assert store.tag({"stage": "prod"}, remove=["ticket"], version="v1") == {"stage": "prod"}
    store.describe("first merge", version=1)
    store.tag({"quality": "checked"}, entry="audio")
    v = store.version()
    assert v.tags == {"stage": "prod"} and v.description == "first merge"
    assert store.entries()[1].tags == {"quality": "checked"}
    with pytest.raises(RegistryError, match="has no tag 'nope'"):
        store.tag(remove=["nope"])
    assert [a[0] for a in actions(store)][-4:] == ["tag", "tag", "describe", "tag"]


def test_update_supersedes_an_entry_and_old_versions_still_export_it(store, family, tmp_path):
    before = Checkpoint(store.export("audio", tmp_path / "v1-audio"))
    with pytest.raises(RegistryError, match="--update"):
        store.register(family / "video", "audio", "audio", "asr")
    r = store.register(family / "video", "audio", "audio", "asr", update=True)
    assert r.created and r.entry.revision == 2 and r.entry.name == "audio"
    assert [e.name for e in store.entries()] == ["vision", "audio"]
    assert "audio@1" in [e.name for e in store.entries(include_removed=True)]
    v2 = store.expand().version
    assert [(m.entry_name, m.revision) for m in v2.members] == [("vision", 1), ("audio", 2)]
    old = Checkpoint(store.export("audio", tmp_path / "again", version=1))
    assert all(torch.equal(before.get(n), old.get(n)) for n in before.names())
    new = Checkpoint(store.export("audio", tmp_path / "new"))
    assert not all(torch.equal(before.get(n), new.get(n)) for n in before.names())
    d = store.diff(1, 2)
    assert d["updated"] == [{"entry": "audio", "from_revision": 1, "to_revision": 2}]
    assert ("update", "entry audio", "r1", "r2") in actions(store)


def test_show_and_diff(store, family):
    store.register(family / "video", "video", "video", "qa")
    store.expand(MergeParams(density=0.5, lam=0.8))
    store.remove("audio")
    shown = store.show(2)
    assert [m["entry"] for m in shown["members"]] == ["vision", "audio", "video"]
    assert shown["params"]["lam"] == 0.8 and shown["sizes"]["merged_bytes"] > 0
    assert all(0 < m["mask_density"] <= 1 for m in shown["members"])
    # mmer masks are computed on read from each entry's task vector: none stored, shown as derived
    assert all(m["mask_bytes"] == 0 and m["mask_storage"] == "derived" for m in shown["members"])
    assert "derived" in format_show(shown)
    d = store.diff("v1", "v2")
    assert d["added"] == ["video"] and d["removed"] == [] and d["params"] == {"lam": [1.0, 0.8]}
    assert set(d["mask_density"]) == {"vision", "audio"}
    d = store.diff(2, "current")
    assert d["removed"] == ["audio"] and d["added"] == []


def test_recipe_sets_parameters_members_and_per_entry_lambda(store, family):
    store.register(family / "video", "video", "video", "qa")
    text = ("method: ties\ndensity: 0.5\nlambda: 1.0\nmembers: [vision, video]\n"
            "lambda_per_entry: {video: 0.5}\ndescription: no audio\ntags: {stage: test}\n")
    recipe = parse_recipe(text)
    v = store.expand(recipe.params, members=recipe.members, recipe=recipe.text, description=recipe.description,
                     tags=recipe.tags).version
    assert [m.entry_name for m in v.members] == ["vision", "video"]
    assert v.params["lam_per_entry"] == {"video": 0.5} and v.recipe == text and v.tags == {"stage": "test"}
    plain = store.expand(MergeParams(density=0.5), members=["vision", "video"]).version
    # a smaller lambda keeps more of the merged vector for that entry only
    assert v.member("video").mask_density > plain.member("video").mask_density
    assert v.member("vision").mask_density == plain.member("vision").mask_density
    assert store.show(v.number)["recipe"] == text
    with pytest.raises(StoreError, match="not among the members"):
        store.expand(MergeParams(lam_per_entry={"nobody": 0.5}))


def test_recipe_errors_say_what_to_fix():
    with pytest.raises(ConfigError, match="unknown key.*densty"):
        parse_recipe("densty: 0.5")
    with pytest.raises(ConfigError, match="density must be"):
        parse_recipe("density: 2")
    with pytest.raises(ConfigError, match="members must be a list"):
        parse_recipe("members: vision")
    with pytest.raises(ConfigError, match="must be a number"):
        parse_recipe("lambda_per_entry: {a: -1}")


def test_per_entry_lambda_in_the_mask_step():
    taus = [torch.tensor([1.0, 0.2, -0.5]), torch.tensor([1.0, -0.4, -0.5])]
    params = MergeParams(density=1.0, mask_rule="mmer", lam=1.0)
    same = expand_tensor(taus, params, lams=[1.0, 1.0])
    default = expand_tensor(taus, params)
    assert all(torch.equal(a, b) for a, b in zip(same.masks, default.masks))
    loose = expand_tensor(taus, params, lams=[1.0, 0.0])
    assert loose.masks[1].all() and torch.equal(loose.masks[0], default.masks[0])


def test_load_of_a_class_transformers_does_not_know_says_to_pass_model_class(family, tmp_path):
    import json
    import shutil

    shutil.copytree(family / "vision", tmp_path / "custom")
    cfg = json.loads((tmp_path / "custom" / "config.json").read_text())
    cfg["model_type"] = "my_private_mllm"
    (tmp_path / "custom" / "config.json").write_text(json.dumps(cfg))
    with Store.init(tmp_path / "store", family / "base") as store:
        store.register(tmp_path / "custom", "custom", "vision")
        store.expand()
        with pytest.raises(StoreError, match="model_class=YourModel"):
            store.load("custom")

"""The bad-input table: every input a user may type is checked at the door.

Each row is a command a user could run; each must end in a message with exit 1 or 2 (never a
traceback), and must leave every directory it names as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from harness import log_trial, snapshot_files
from mmer_cl.cli import cli
from mmer_cl.errors import MmerError
from mmer_cl.checkpoints.export_guard import MARKER_NAME, check_target


def run(store, *args):
    return CliRunner().invoke(cli, ["--store", str(store), "--actor", "t", "-q", *map(str, args)])


def refused(result, *needles, codes=(1, 2)):
    assert result.exit_code in codes, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for n in needles:
        assert n in result.output, result.output
    return result.output


# ---- export --force never replaces what mmer did not write ------------------------------------------
def export_targets(t: dict) -> dict[str, Path]:
    user = t["dir"] / "my-notes"
    user.mkdir(exist_ok=True)
    (user / "notes.txt").write_text("mine")
    return {"the store": t["store"], "inside the store": t["store"] / "objects",
            "a new dir inside the store": t["store"] / "newdir", "the base": t["family"] / "base",
            "an entry's source": t["family"] / "vision", "a dir containing the store": t["dir"],
            "a dir containing the base": t["family"], "a user directory": user,
            "a file": t["store"] / "registry.db"}


@pytest.mark.parametrize("what", ["the store", "inside the store", "a new dir inside the store", "the base",
                                  "an entry's source", "a dir containing the store", "a dir containing the base",
                                  "a user directory", "a file"])
@pytest.mark.parametrize("kind", ["entry", "text"])
def test_export_force_refuses_anything_mmer_did_not_write(trial, what, kind):
    target = export_targets(trial)[what]
    watched = [trial["store"], trial["family"] / "base", trial["family"] / "vision", trial["dir"] / "my-notes"]
    before = {str(p): snapshot_files(p) for p in watched}
    args = ["--entry", "vision"] if kind == "entry" else ["--text"]
    out = refused(run(trial["store"], "export", *args, "--force", target))
    assert "refusing" in out or "not written by mmer" in out
    assert {str(p): snapshot_files(p) for p in watched} == before
    assert not (trial["store"] / "newdir").exists()
    log_trial("inputs", f"export --force {what} ({kind})", True)


def test_export_force_dot_from_the_directory_holding_the_store(trial, monkeypatch):
    monkeypatch.chdir(trial["dir"])
    before = snapshot_files(trial["dir"])
    refused(run("store", "export", "--entry", "vision", "--force", "."), "refusing")
    assert snapshot_files(trial["dir"]) == before
    log_trial("inputs", "export --force .", True)


def test_export_force_refuses_root_and_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for target in (Path("/"), home, tmp_path):
        with pytest.raises(MmerError, match="refusing"):
            check_target(target, overwrite=True)
    check_target(home / "work" / "out", overwrite=True)  # inside HOME is fine
    log_trial("inputs", "export --force / and $HOME", True)


def test_export_force_replaces_an_earlier_export_and_leftovers_go(trial):
    target = trial["exports"] / "vision"
    assert (target / MARKER_NAME).exists()
    marker = json.loads((target / MARKER_NAME).read_text())
    assert marker["entry"] == "vision" and marker["version"] == 2 and marker["store_id"]
    leftover = trial["exports"] / ".vision.abc123.partial"
    leftover.mkdir()
    (leftover / MARKER_NAME).write_text(json.dumps({"mmer_export": 1}))
    foreign = trial["exports"] / ".vision.mine.partial"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not mmer's")
    assert run(trial["store"], "export", "--entry", "vision", "--force", target).exit_code == 0
    assert not leftover.exists() and (foreign / "keep.txt").exists()
    mode = os.stat(target).st_mode & 0o777
    assert mode == 0o777 & ~_umask(), oct(mode)
    for f in target.iterdir():
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~_umask(), f
    log_trial("inputs", "export --force over an export; leftovers removed; modes", True)


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


# ---- checkpoints ---------------------------------------------------------------------------------
def sharded_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    assert (dst / "model.safetensors.index.json").exists()
    return dst


def test_index_that_leaves_out_a_shard_on_disk_is_refused(trial, tmp_path):
    ckpt = sharded_copy(trial["family"] / "vision", tmp_path / "ck")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    dropped = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != dropped}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(run(trial["store"], "register", ckpt, "--name", "v2", "--modality", "vision"), dropped)
    log_trial("inputs", "index leaves out a shard", True)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/x.safetensors", ".."])
def test_index_shards_must_be_plain_names_inside_the_checkpoint(trial, tmp_path, shard):
    ckpt = sharded_copy(trial["family"] / "vision", tmp_path / "ck")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(run(trial["store"], "register", ckpt, "--name", "v2", "--modality", "vision"), "outside")
    log_trial("inputs", f"index shard {shard}", True)


def _with_extra_tensors(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    ckpt = sharded_copy(src, dst)
    save_file(extra, str(ckpt / "model-extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-extra.safetensors" for k in extra})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return ckpt


def test_unusual_dtypes_on_the_modality_side_are_stored_verbatim(trial, tmp_path):
    g = torch.Generator().manual_seed(0)
    extra = {"extra.f8_e4m3": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
             "extra.f8_e5m2": torch.randn(3, generator=g).to(torch.float8_e5m2),
             "extra.u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
             "extra.u32": torch.arange(6, dtype=torch.int64).to(torch.uint32),
             "extra.u64": torch.arange(7, dtype=torch.int64).to(torch.uint64)}
    ckpt = _with_extra_tensors(trial["family"] / "vision", tmp_path / "ck", extra)
    assert run(trial["store"], "register", ckpt, "--name", "odd", "--modality", "vision").exit_code == 0
    assert run(trial["store"], "expand").exit_code == 0
    assert run(trial["store"], "export", "--entry", "odd", tmp_path / "out").exit_code == 0
    got = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        got.update({k: v for k, v in load_file(str(f)).items() if k.startswith("extra.")})
    for k, t in extra.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k
    log_trial("inputs", "F8/U16/U32/U64 modality tensors round trip", True)


def test_an_8bit_float_llm_tensor_is_refused_with_a_message(trial, tmp_path):
    ckpt = sharded_copy(trial["family"] / "vision", tmp_path / "ck")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = next(k for k in index["weight_map"] if "language_model" in k and k.endswith("q_proj.weight"))
    shard = ckpt / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    refused(run(trial["store"], "register", ckpt, "--name", "f8", "--modality", "vision"), "F8_E4M3", "Dequantize")
    log_trial("inputs", "F8 LLM tensor", True)


def test_nan_in_an_8bit_float_tensor_is_a_message_not_a_crash(trial, tmp_path):
    bad = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    ckpt = _with_extra_tensors(trial["family"] / "vision", tmp_path / "ck", {"extra.f8": bad})
    refused(run(trial["store"], "register", ckpt, "--name", "nan8", "--modality", "vision"), "NaN")
    log_trial("inputs", "NaN in F8", True)


def test_config_json_that_is_not_json_is_a_clear_error_in_load(trial, tmp_path):
    from mmer_cl.store import Store

    ckpt = sharded_copy(trial["speech"], tmp_path / "ck")
    (ckpt / "config.json").write_text("{not json")
    with Store.open(trial["store"]) as s:
        s.register(ckpt, "badcfg", "vision", actor="t")
        s.expand(actor="t")
        with pytest.raises(MmerError, match="config.json"):
            s.load("badcfg")
    log_trial("inputs", "config.json not JSON in load", True)


# ---- parameters and names --------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--lambda", "nan"], ["--lambda", "inf"], ["--lambda", "-1"],
                                  ["--alpha", "-1"], ["--alpha", "0"], ["--alpha", "nan"], ["--alpha", "inf"],
                                  ["--density", "0"], ["--density", "1.5"], ["--density", "nan"],
                                  ["--k", "0"], ["--density", "-inf"]])
def test_merge_parameters_must_be_finite_and_in_range(trial, args):
    before = run(trial["store"], "versions", "--json").output
    refused(run(trial["store"], "expand", *args), codes=(2,))
    assert run(trial["store"], "versions", "--json").output == before
    log_trial("inputs", f"expand {' '.join(args)}", True)


@pytest.mark.parametrize("name", ["vis\n", "vis\r", " vis", "../vis", "a/b", "", ".hidden", "-x", "x" * 65,
                                  "vis\x00", "ṽis"])
def test_names_must_fully_match_the_allowed_pattern(trial, name):
    refused(run(trial["store"], "register", trial["speech"], "--name", name, "--modality", "speech"), codes=(2,))
    log_trial("inputs", f"name {name!r}", True)


def test_json_output_is_strict(trial):
    for args in (["versions", "--json"], ["entries", "--all", "--json"], ["history", "--json"],
                 ["audit", "--json"]):
        out = run(trial["store"], *args).output

        def no_constants(c):
            raise AssertionError(f"{args} printed {c}")
        json.loads(out, parse_constant=no_constants)
    log_trial("inputs", "strict JSON", True)


# ---- the database URL -----------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["not a url", "sqlite:////nonexistent-dir/x/registry.db",
                                 "postgresql://u@127.0.0.1:1/db", "nosuchdb://x"])
def test_an_unusable_db_url_is_a_message(trial, url):
    result = CliRunner().invoke(cli, ["--store", str(trial["store"]), "--db-url", url, "-q", "versions"])
    refused(result)
    log_trial("inputs", f"--db-url {url}", True)


def test_debug_shows_the_traceback_for_bug_reports(trial, monkeypatch):
    import mmer_cl.store as store_mod

    def broken(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(store_mod.Store, "versions", broken)
    plain = CliRunner().invoke(cli, ["--store", str(trial["store"]), "versions"])
    out = refused(plain, "internal error", "--debug", codes=(1,))
    assert "ZeroDivisionError" in out
    debug = CliRunner().invoke(cli, ["--store", str(trial["store"]), "--debug", "versions"])
    assert debug.exit_code == 1 and "Traceback" in debug.output


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_max_change_must_be_finite_and_positive(trial, value):
    refused(run(trial["store"], "register", trial["speech"], "--name", "speech", "--modality", "speech",
                "--max-change", value), "max-change", codes=(2,))
    log_trial("inputs", f"register --max-change {value}", True)


# ---- issue 20 item 4: numbers from every source, passwords, concurrent init, free text ---------------
@pytest.mark.parametrize("recipe", ["lambda_per_entry: {vision: .nan}", "lambda_per_entry: {vision: .inf}",
                                    "lambda_per_entry: {vision: true}", "lambda_per_entry: {vision: -1}",
                                    "density: .nan", "alpha: .inf", "density: true", "lambda: .nan",
                                    "k: true", "seed: -1", "seed: 1.5"])
def test_a_recipe_number_must_be_finite_and_in_range(trial, tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe + "\n")
    before = run(trial["store"], "versions", "--json").output
    out = refused(run(trial["store"], "expand", "--config", path), codes=(2,))
    field = recipe.split(":")[0].replace("lambda_per_entry", "vision")
    assert field.split("_")[0] in out or "lambda" in out, out
    assert run(trial["store"], "versions", "--json").output == before
    assert run(trial["store"], "show", "--json").exit_code == 0
    log_trial("inputs", f"recipe {recipe}", True)


@pytest.mark.parametrize("kwargs, named", [({"lam_per_entry": {"vision": float("nan")}}, "vision"),
                                           ({"lam_per_entry": {"vision": True}}, "vision"),
                                           ({"lam_per_entry": {"vision": float("inf")}}, "vision"),
                                           ({"lam_per_entry": [0.5]}, "lambda_per_entry"),
                                           ({"density": float("nan")}, "density"), ({"alpha": True}, "alpha"),
                                           ({"lam": float("-inf")}, "lambda"), ({"k": 2.0}, "k"),
                                           ({"seed": -3}, "seed"), ({"density": "0.5"}, "density")])
def test_merge_params_from_the_python_api_are_checked(kwargs, named):
    from mmer_cl.errors import ConfigError
    from mmer_cl.method.params import MergeParams

    with pytest.raises(ConfigError) as info:
        MergeParams(**kwargs)
    assert named in str(info.value), str(info.value)


def test_the_registry_never_stores_nan(tmp_path):
    from registry import Registry, RegistryError

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(RegistryError, match="finite"):
        reg.record("t", "note", "x", "", "", {"value": float("nan")})
    reg.close()


SECRET_URLS = ["postgresql+nodriver://u:pw1secret@h/db", "mysql://root:pw2secret@127.0.0.1:1/db",
               "postgresql://u:pw3secret@h:notaport/db", "postgresql://u:pw4secret@[::1/db",
               "postgresql://u:pw5%40secret@127.0.0.1:1/db", "foo://u:pw6secret@h/db",
               "postgresql://u:p@pw7secret@127.0.0.1:1/db", "postgresql://127.0.0.1:1/db?password=pw8secret",
               "postgresql://u:pw9/secret@127.0.0.1:1/db", "sqlite:///u:pw10secret@/nonexistent/x.db"]


@pytest.mark.parametrize("url", SECRET_URLS)
@pytest.mark.parametrize("command", [["versions"], ["init", "--base", "BASE"]])
def test_no_password_in_any_message_for_any_url(family, tmp_path, url, command):
    from registry.urls import shown_url

    secret = next(part for part in url.replace("%40", "@").replace("/", "@").replace("=", "@").split("@")
                  if "secret" in part).split(":")[-1]
    args = [str(family / "base") if a == "BASE" else a for a in command]
    out = refused(CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "--db-url", url, "-q", *args]))
    assert "internal error" not in out, out
    assert secret not in out and "secret" not in out.replace("secret_key", ""), out
    assert "secret" not in shown_url(url)
    log_trial("inputs", f"password masked: {url.split('://')[0]} ({command[0]})", True)


def test_shown_url_masks_what_sqlalchemy_cannot_parse():
    from registry.urls import scrub, secrets_of, shown_url

    assert shown_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert shown_url("postgresql://u:p@ss/w@h:x/db") == "postgresql://u:***@h:x/db"
    assert shown_url("sqlite:////tmp/a@b/registry.db") == "sqlite:////tmp/a@b/registry.db"
    assert shown_url("postgresql://h/db?sslmode=require&password=abc") == \
        "postgresql://h/db?sslmode=require&password=***"
    assert "hunter22" in secrets_of("postgresql://u:hunter22@h/db")
    assert scrub("failed to resolve host 'xyzzy99@h'", ("postgresql://u:p@xyzzy99@h/db",)) == \
        "failed to resolve host '***@h'"


def test_two_first_inits_of_one_store_at_once(family, tmp_path):
    """Both start together, several rounds: each either creates the store or joins it (exit 0), or fails
    with a true message; never "cannot reach the registry ... already exists"."""
    import subprocess
    import sys

    from harness import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "MMER_ACTOR": "t"}
    for round_ in range(4):
        store = tmp_path / f"s{round_}"
        gate = tmp_path / f"go{round_}"
        code = ("import os,sys,time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.001)\n"
                "from mmer_cl.cli import main\nsys.argv=['mmer','--store',sys.argv[2],'-q','init','--base',"
                "sys.argv[3]]\nmain()")
        procs = [subprocess.Popen([sys.executable, "-c", code, str(gate), str(store), str(family / "base")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
        import time
        time.sleep(6)  # both have imported mmer-cl and wait at the gate
        gate.touch()
        outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
        for rc, out in outs:
            assert "already exists" not in out and "cannot reach" not in out and "Traceback" not in out, out
        assert [rc for rc, _ in outs].count(0) >= 1, outs
        from mmer_cl.store import Store

        with Store.open(store) as s:
            assert len(s.registry.bases()) == 1 and s.audit().ok
    log_trial("concurrency", "two first inits of one store", True)


@pytest.mark.parametrize("how", ["--actor", "MMER_ACTOR", "tag", "description", "tag key"])
@pytest.mark.parametrize("text", ["ana\n2026-01-01 00:00:00  root  remove  entry vision", "ana\x1b[2J",
                                  "ana\r", "ana\u202e", "x" * 129])
def test_free_text_cannot_forge_history_or_drive_the_terminal(trial, how, text):
    if how == "tag" and len(text) == 129:
        text = "x" * 1001
    if how == "description" and len(text) == 129:
        text = "x" * 10_001
    before = run(trial["store"], "history", "--json").output
    store = str(trial["store"])
    if how == "--actor":
        result = CliRunner().invoke(cli, ["--store", store, "--actor", text, "-q", "tag", "stage=x"])
    elif how == "MMER_ACTOR":
        result = CliRunner().invoke(cli, ["--store", store, "-q", "tag", "stage=x"], env={"MMER_ACTOR": text})
    elif how == "tag":
        result = run(store, "tag", f"stage={text}")
    elif how == "tag key":
        result = run(store, "tag", f"{text}=x")
    else:
        result = run(store, "describe", text)
    out = refused(result, codes=(2,))
    assert "\x1b" not in out and "\u202e" not in out
    assert run(trial["store"], "history", "--json").output == before
    log_trial("inputs", f"{how} {text[:12]!r}", True)


def test_printable_text_is_still_accepted(trial):
    assert run(trial["store"], "--actor", "Ana María (ops)", "tag", "stage=prod ready: yes").exit_code == 0
    assert run(trial["store"], "describe", "Vision + audio, λ=0.8 — «reviewed»").exit_code == 0
    hist = json.loads(run(trial["store"], "history", "--json").output)
    assert any(e["actor"] == "Ana María (ops)" for e in hist)

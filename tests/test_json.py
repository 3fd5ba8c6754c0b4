"""`--json` on every command: each prints one JSON document with the keys docs/json.md documents for it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmer_cl.cli import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "json.md"


def documented() -> dict[str, list[str]]:
    """{'register': ['created', ...], 'alias set': [...]} from the page's '## `mmer X`' sections."""
    out, command = {}, None
    for line in DOC.read_text().splitlines():
        heading = re.fullmatch(r"## `mmer ([a-z ]+)`", line)
        if heading:
            command = heading.group(1)
            out[command] = []
        elif command and "Keys:" in line:
            out[command] = re.findall(r"`([a-z_]+)`", line.split("Keys:", 1)[1])
    return out


@pytest.fixture(scope="module")
def outputs(family, tmp_path_factory):
    """Every command run once with --json (the flag before or after the command), in a workflow's order."""
    tmp = tmp_path_factory.mktemp("json")
    runner = CliRunner()
    got: dict[str, object] = {}

    def run(name: str, *args, flag_first: bool = False):
        base = ["--store", str(tmp / "store"), "-q", "--actor", "ci"]
        argv = [*base, "--json", *map(str, args)] if flag_first else [*base, *map(str, args), "--json"]
        result = runner.invoke(cli, argv)
        assert result.exit_code == 0, (name, result.output, result.exception)
        got[name] = json.loads(result.stdout)  # nothing but the document on stdout

    run("init", "init", "--base", family / "base")
    run("register", "register", family / "vision", "--name", "vision", "--modality", "vision")
    runner.invoke(cli, ["--store", str(tmp / "store"), "-q", "register", str(family / "audio"), "--name", "audio",
                        "--modality", "audio"])
    run("expand", "expand", "--density", "0.5")
    runner.invoke(cli, ["--store", str(tmp / "store"), "-q", "expand", "--density", "0.3"])
    run("versions", "versions", flag_first=True)
    run("entries", "entries")
    run("show", "show", "v1")
    run("diff", "diff", "v1", "v2")
    run("rollback", "rollback", "1")
    run("alias set", "alias", "set", "production", "v1")
    run("alias", "alias")
    run("alias rm", "alias", "rm", "production")
    run("tag", "tag", "stage=dev")
    run("describe", "describe", "--entry", "vision", "the digits one")
    run("export", "export", "--entry", "vision", tmp / "out")
    run("report", "report", "--ranks", "4", "--no-svd")
    run("audit", "audit")
    run("remove", "remove", "audio")
    run("gc", "gc")
    run("history", "history", "--limit", "5")
    return got


def test_every_command_is_documented():
    commands = {"init", "register", "expand", "versions", "entries", "show", "diff", "rollback", "remove", "export",
                "report", "audit", "gc", "history", "alias", "alias set", "alias rm", "tag", "describe"}
    assert set(cli.commands) | {"alias set", "alias rm"} <= set(documented()) | {"alias set", "alias rm"}
    assert commands == set(documented())


def test_each_command_prints_json_with_its_documented_keys(outputs):
    doc = documented()
    assert set(outputs) == set(doc)
    for command, keys in doc.items():
        value = outputs[command]
        if command == "alias":
            assert value == {"current": 1, "production": 1}, value
            continue
        items = value if isinstance(value, list) else [value]
        assert items, command
        for item in items:
            missing = [k for k in keys if k not in item]
            assert not missing, f"mmer {command} --json lacks {missing}: {sorted(item)}"
    assert outputs["export"]["files"] and "mmer-recipe.yaml" in outputs["export"]["files"]
    assert outputs["remove"]["version"]["number"] == 3 and outputs["rollback"]["after"] == "v1"

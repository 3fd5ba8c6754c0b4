"""The packages' import rules (issue 24): the method imports nothing above it, no circles between packages.

Every module's imports are read with ``ast`` (all of them: top level, inside functions, under TYPE_CHECKING),
so a lazy import breaks a rule as much as an eager one. Layers, bottom up: runtime and method; checkpoints;
compose; store; distributed and integrations; cli. A package may import only those in ALLOWED.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mmer_cl"
PACKAGES = ["method", "checkpoints", "store", "cli", "runtime", "compose", "distributed", "integrations"]
TOP_LEVEL = {"__init__", "errors", "_moved"}  # the only modules directly in mmer_cl/

# package -> the mmer_cl packages it may import (besides mmer_cl itself: __version__, errors)
ALLOWED = {
    "runtime": set(),
    "method": set(),
    "checkpoints": {"method", "runtime"},
    "compose": {"method", "checkpoints", "runtime"},
    "store": {"method", "checkpoints", "runtime", "compose"},
    "distributed": {"method", "checkpoints", "runtime", "store"},
    "integrations": {"method", "checkpoints", "runtime", "store"},
    "cli": {"method", "checkpoints", "runtime", "compose", "store", "distributed", "integrations"},
}
# The method is pure math on tensors: of storage it may use the pure kernels only (compiled loops and the
# bytes <-> tensor codecs, e.g. storage.codecs.int_view), never blob stores, backends or readers.
METHOD_STORAGE = {"storage.jit", "storage.kernels", "storage.codecs"}
METHOD_FORBIDDEN = {"os", "io", "pathlib", "shutil", "json", "pickle", "sqlite3", "subprocess", "tempfile", "socket",
                    "glob", "safetensors", "sqlalchemy", "transformers", "huggingface_hub", "yaml", "click", "rich",
                    "zstandard", "registry", "fsspec", "s3fs", "ray", "requests", "peft"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module a file imports (``from X import y`` counts X.y when that is a module)."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            subs = {f"{module}.{a.name}" for a in node.names if is_module(f"{module}.{a.name}")}
            out |= subs or {module}
            if len(subs) < len(node.names):
                out.add(module)
    return out


def package_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "mmer_cl" or len(parts) < 2 or parts[1] not in PACKAGES:
        return None
    return parts[1]


MODULES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_lives_in_a_package():
    loose = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in TOP_LEVEL)
    assert not loose, f"modules directly in mmer_cl/: {loose}; put each in the package of its concern"
    assert sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()) == sorted(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_says_what_lives_there(package):
    init = PKG / package / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 12, f"mmer_cl/{package}/__init__.py needs a docstring saying what lives there"


def violations() -> list[str]:
    bad = []
    for path in MODULES:
        this = module_name(path)
        own = package_of(this)
        for target in sorted(imports_of(path)):
            top = target.split(".")[0]
            other = package_of(target)
            where = f"{this} imports {target}"
            if own == "method":
                if top == "storage" and not any(target == s or target.startswith(s + ".") for s in METHOD_STORAGE):
                    bad.append(f"{where}: the method may use storage's pure kernels only ({sorted(METHOD_STORAGE)})")
                if top in METHOD_FORBIDDEN:
                    bad.append(f"{where}: the method does no I/O")
                if top == "mmer_cl" and other is None and target not in ("mmer_cl", "mmer_cl.errors"):
                    bad.append(f"{where}: the method imports only mmer_cl.errors and itself")
            if other is not None and own is not None and other != own and other not in ALLOWED[own]:
                bad.append(f"{where}: {own} may import only {sorted(ALLOWED[own])}")
            if other == "cli" and own != "cli":
                bad.append(f"{where}: nothing outside mmer_cl/cli imports the command line")
    return bad


def test_the_layers_hold():
    bad = violations()
    assert not bad, "\n".join(bad)


def test_storage_and_registry_use_only_mmer_cls_errors_and_runtime():
    bad = []
    for path in sorted((ROOT / "storage").rglob("*.py")) + sorted((ROOT / "registry").rglob("*.py")):
        for target in imports_of(path):
            if target.startswith("mmer_cl") and target != "mmer_cl.errors" and package_of(target) != "runtime":
                bad.append(f"{module_name(path)} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_circles_between_packages():
    graph = {p: set() for p in PACKAGES}
    for path in MODULES:
        own = package_of(module_name(path))
        for target in imports_of(path):
            other = package_of(target)
            if own and other and other != own:
                graph[own].add(other)
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle between packages: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for p in PACKAGES:
        if p not in state:
            visit(p, [])

"""The documentation holds together: every relative link resolves, and the README stays a guide.

Checks README.md, CONTRIBUTING.md and docs/*.md: each relative link (``[text](path)``, ``![alt](path)``) names a
file or directory that exists, and a ``#fragment`` on a Markdown target names one of its headings (GitHub's
anchors). Links inside code blocks and code spans are not links and are skipped.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 320
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+).*?\1")


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line with code spans removed) for every line outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, CODE_SPAN.sub("", line)))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in prose_lines(path.read_text(encoding="utf-8"))
            for m in LINK.finditer(line)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8").replace("`", "")):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto: ...


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    broken = []
    for number, target in links(doc):
        if not relative(target):
            continue
        path_part, _, fragment = target.partition("#")
        dest = doc if not path_part else (doc.parent / path_part).resolve()
        where = f"{doc.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{where} (outside the repository)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{where} (no heading with that anchor in {dest.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_docs_link_to_each_other():
    """The README points into docs/ (each page), and no page is an orphan nobody links to."""
    linked = set()
    for doc in documents():
        for _, target in links(doc):
            path_part = target.partition("#")[0]
            if relative(target) and path_part:
                linked.add((doc.parent / path_part).resolve())
    orphans = [p.relative_to(ROOT) for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs pages no other page links to: {orphans}"
    readme_targets = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md") if relative(t)}
    assert (ROOT / "CONTRIBUTING.md").resolve() in readme_targets


def test_readme_is_a_guide_not_a_notebook():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details into docs/"


def test_the_link_checker_catches_what_it_should(tmp_path):
    """The checker's own parts: a link in prose is found, one in code is not, anchors follow GitHub."""
    doc = tmp_path / "a.md"
    doc.write_text("# The runtime's XOR form: why\nsee [b](b.md#x) and ![p](p.png)\n`[c](c.md)`\n"
                   "```\n[d](d.md)\n```\n## Twice\n## Twice\n", encoding="utf-8")
    assert [t for _, t in links(doc)] == ["b.md#x", "p.png"]
    assert anchors(doc) == {"the-runtimes-xor-form-why", "twice", "twice-1"}
    assert not relative("https://example.org/x.md") and relative("docs/x.md")

"""The recipes cite the repository's own docs/reference-zoos.md; recipes/, docs/ and the README cite nothing outside it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).parent.parent
REFERENCE = REPO / "docs" / "reference-zoos.md"
CITE = re.compile(r"docs/reference-zoos\.md(?:#([\w-]+))?")
FIGURE = re.compile(r"[~≈](0\.\d+)(?:-(0\.\d+))?")  # ~0.91, ~0.905-0.917


def _cited_files() -> list[Path]:
    files = [p for d in ("recipes", "docs") for p in (REPO / d).rglob("*") if p.is_file()]
    return sorted([*files, REPO / "README.md"])


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as '-', repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _expected_paragraph(path: Path) -> str:
    """The header's 'Expected:' paragraph (up to the next empty comment line)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if lines and line.strip() == "#":
            break
        if lines or line.startswith("# Expected"):
            lines.append(line)
    return "\n".join(lines)


def test_no_file_cites_shared() -> None:
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in _cited_files()
                 for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
                 if re.search(r"(?<![\w-])shared/", line)]
    assert not offenders, f"cite docs/reference-zoos.md, not shared/ (outside the repository): {offenders}"


def test_citations_resolve_and_figures_are_in_the_reference() -> None:
    reference = REFERENCE.read_text(encoding="utf-8")
    anchors = _anchors(reference)
    citing = [p for p in sorted((REPO / "recipes").rglob("*.yaml")) if CITE.search(p.read_text(encoding="utf-8"))]
    assert len(citing) >= 29, "every classic recipe, the twins recipe and vit_reference.yaml cite the reference"
    checked = 0
    for path in citing:
        text = path.read_text(encoding="utf-8")
        for anchor in CITE.findall(text):
            assert not anchor or anchor in anchors, f"{path.name}: no section #{anchor} in {REFERENCE.name}"
        for figure in FIGURE.findall(_expected_paragraph(path)):
            for value in filter(None, figure):
                assert value in reference, f"{path.name}: expected figure {value} is not in {REFERENCE.name}"
                checked += 1
    assert checked >= 10, f"only {checked} published figures found in the recipes' Expected lines"


def test_phase_recipes_cite_sections_that_exist() -> None:
    """recipes/phase cite docs/phase-zoos.md (the phase-transition zoos' facts and vitzoo's choices)."""
    doc = REPO / "docs" / "phase-zoos.md"
    anchors = _anchors(doc.read_text(encoding="utf-8"))
    cite = re.compile(r"docs/phase-zoos\.md(?:#([\w-]+))?")
    recipes = sorted((REPO / "recipes" / "phase").glob("*.yaml"))
    assert recipes
    for path in [*recipes, REPO / "recipes" / "phase_demo.yaml"]:
        if not path.exists():
            continue
        found = cite.findall(path.read_text(encoding="utf-8"))
        assert found or path.name == "phase_demo.yaml", f"{path.name} does not cite docs/phase-zoos.md"
        for anchor in found:
            assert not anchor or anchor in anchors, f"{path.name}: no section #{anchor} in phase-zoos.md"

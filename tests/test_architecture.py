"""Guards for the shape of the package (issue 8), read from the source with ``ast`` (nothing is imported).

Why: an import cycle (reader <-> weights), a second epoch loop, a reach into another module's
``_private`` names, or the zoo reader pulling in the training code each crept in one small edit at a
time; the engine refactor removes them and these tests keep them out (what import-linter contracts
do in larger code bases). An import counts at any level (a function-level import is still a
dependency) except under ``if TYPE_CHECKING:``. The two lists below are today's debt: they may only
shrink (a test fails when an entry is gone, so it gets removed) and must never grow.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# debt of issue 8; remove entries as the engine lands, never add
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()
# the one epoch loop (issue 8): never add
EPOCH_LOOP_MODULES = {"vitzoo/train/engine.py"}


def modules(root: Path, pkg: str = "vitzoo") -> dict[str, Path]:
    """Dotted name -> file of every module of the package ``root/pkg``."""
    out = {}
    for f in sorted((root / pkg).rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _nodes(tree: ast.AST):
    """Every node, except the bodies of ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in [child, *_nodes(child)])
            continue
        yield node
        yield from _nodes(node)


def imports(root: Path, pkg: str = "vitzoo") -> list[tuple[str, str, str | None]]:
    """(importer, imported module, name or None) for every import of a package module."""
    mods, out = modules(root, pkg), []
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in _nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(name, a.name, None) for a in node.names if a.name in mods]
            elif isinstance(node, ast.ImportFrom):
                parent = here[: len(here) - node.level + 1] if node.level else []
                base = ".".join(parent + ([node.module] if node.module else []))
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        out.append((name, f"{base}.{a.name}", None))
                    elif base in mods:
                        out.append((name, base, a.name))
    return out


def chain(edges: list[tuple[str, str, str | None]], starts: set[str], is_target) -> list[str] | None:
    """An import chain ``[start, ..., target]`` from a module in ``starts`` to one ``is_target`` accepts, or None."""
    todo, seen = [[m] for m in sorted(starts)], set()
    while todo:
        path = todo.pop()
        for a, b, _ in edges:
            if a == path[-1] and a != b:
                if is_target(b):
                    return [*path, b]
                if b not in seen:
                    seen.add(b)
                    todo.append([*path, b])
    return None


def find_cycle(edges: list[tuple[str, str, str | None]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or None."""
    return next((c for m in sorted({a for a, _, _ in edges}) if (c := chain(edges, {m}, m.__eq__))), None)


def _inside(module: str, pkg: str) -> bool:
    return module == pkg or module.startswith(pkg + ".")


def private_imports(edges: list[tuple[str, str, str | None]]) -> set[tuple[str, str, str]]:
    """(importer, module, name) of every ``from module import _name`` of another module."""
    return {(a, b, n) for a, b, n in edges if n and n.startswith("_") and not n.startswith("__") and a != b}


def epoch_loop_modules(root: Path, under: str = "vitzoo/train") -> set[str]:
    """Files under ``root/under`` with a ``for epoch in range(...)`` loop."""
    return {f.relative_to(root).as_posix() for f in sorted((root / under).rglob("*.py"))
            if any(isinstance(n, ast.For) and ast.unparse(n.target) == "epoch" and isinstance(n.iter, ast.Call)
                   and ast.unparse(n.iter.func) == "range" for n in ast.walk(ast.parse(f.read_text())))}


def test_no_import_cycle():
    cycle = find_cycle(imports(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_readers_never_import_training():
    edges = imports(ROOT)
    for part in ("vitzoo.zoo", "vitzoo.hub", "vitzoo.cards"):
        found = chain(edges, {a for a, _, _ in edges if _inside(a, part)}, lambda m: _inside(m, "vitzoo.train"))
        assert found is None, f"{part} reaches the training code: " + " -> ".join(found)


def test_no_new_private_imports():
    found = private_imports(imports(ROOT))
    assert not found - KNOWN_PRIVATE_IMPORTS, f"imports of another module's private names: {found - KNOWN_PRIVATE_IMPORTS}"
    assert not KNOWN_PRIVATE_IMPORTS - found, f"gone, remove from KNOWN_PRIVATE_IMPORTS: {KNOWN_PRIVATE_IMPORTS - found}"


def test_epoch_loop_only_shrinks():
    found = epoch_loop_modules(ROOT)
    assert len(found) <= len(EPOCH_LOOP_MODULES), f"epoch loops in {sorted(found - EPOCH_LOOP_MODULES)}: use the engine"
    assert not EPOCH_LOOP_MODULES - found, f"no loop any more, remove from EPOCH_LOOP_MODULES: {EPOCH_LOOP_MODULES - found}"


def test_checkers_catch_violations(tmp_path):
    files = {
        "__init__.py": "", "zoo/__init__.py": "", "train/__init__.py": "",
        "a.py": "from pkg import b\nfrom pkg.b import _x\n",
        "b.py": "_x = 1\ndef f():\n    from . import a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        "zoo/r.py": "from .. import c\ndef g():\n    import pkg.train.loop\n",
        "train/loop.py": "def run():\n    for epoch in range(3):\n        pass\n",
    }
    for rel, text in files.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(text)
    edges = imports(tmp_path, "pkg")
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.a"]
    assert ("pkg.c", "pkg.a", None) not in edges  # TYPE_CHECKING imports do not count
    assert chain(edges, {"pkg.zoo.r"}, lambda m: _inside(m, "pkg.train")) == ["pkg.zoo.r", "pkg.train.loop"]
    assert private_imports(edges) == {("pkg.a", "pkg.b", "_x")}
    assert epoch_loop_modules(tmp_path, "pkg/train") == {"pkg/train/loop.py"}
    (tmp_path / "pkg/b.py").write_text("_x = 1\n")
    assert find_cycle(imports(tmp_path, "pkg")) is None

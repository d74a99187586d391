"""Every ```python block of README.md runs as pasted, against a tiny local zoo.

Each block runs alone, in a fresh namespace (no block may rely on names another defined), with the
README's example zoo folder ``zoos/demo`` replaced by the session's ``tiny_zoo``. A block that cannot
run here (a GPU, the Hub, the network) is marked with ``<!-- no-test -->`` on the line before its
opening fence; ``NO_TEST_ALLOWED`` caps how many may be, so the list stays short on purpose.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
ZOO_PLACEHOLDER = "zoos/demo"  # the folder every README example loads
NO_TEST = "<!-- no-test -->"
NO_TEST_ALLOWED = 0

_FENCE = re.compile(r"^```(\w*)\s*$")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number of the opening fence, code, skipped)`` for each ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if lang == "python":
            prev = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
            blocks.append((start + 1, "\n".join(lines[start + 1:j]) + "\n", prev == NO_TEST))
        i = j + 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "README.md: the python examples were not found (fence format changed?)"
    assert sum(skip for *_, skip in BLOCKS) <= NO_TEST_ALLOWED, "more README blocks marked no-test than allowed"


def test_python_blocks_parser():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n<!-- no-test -->\n\n```python\nb = 2\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n", False), (10, "b = 2\n", True)]


@pytest.mark.parametrize("line,code,skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, skip, tiny_zoo, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"README.md:{line} is marked {NO_TEST}")
    monkeypatch.chdir(tmp_path)  # no block may depend on the working directory
    source = code.replace(ZOO_PLACEHOLDER, Path(tiny_zoo).as_posix())
    namespace = {"__name__": "__readme__"}
    try:
        exec(compile(source, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the test's purpose
    except Exception as e:  # say which block, with the pasted code, then fail
        pytest.fail(f"README.md block at line {line} raised {type(e).__name__}: {e}\n--- block ---\n{code}")

"""docs/RELIABILITY.md stays true to the tests: every test it names exists, and its summary line
counts its table rows."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "RELIABILITY.md"
OUTCOMES = {"clear error": "clear errors", "clean recovery": "clean recoveries", "not handled": "not handled"}


def _rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("|") or line.startswith("| case |") or line.startswith("| ---"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 3, line
        rows.append(tuple(cells))
    return rows


def _outcome(cell: str) -> str:
    matches = [name for name in OUTCOMES if cell.startswith(name)]
    assert len(matches) == 1, f"outcome {cell!r} is not one of {sorted(OUTCOMES)}"
    return matches[0]


def _test_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


def test_every_named_test_exists():
    rows = _rows()
    assert len(rows) > 50
    defined: dict[Path, set[str]] = {}
    for case, outcome, test in rows:
        if _outcome(outcome) == "not handled":
            assert test == "none", (case, test)
            continue
        file, _, name = test.partition("::")
        path = REPO / file
        assert file.startswith("tests/") and path.is_file(), (case, test)
        assert name.startswith("test_") and name in defined.setdefault(path, _test_functions(path)), (case, test)


def test_the_summary_counts_the_rows():
    counts = Counter(_outcome(outcome) for _, outcome, _ in _rows())
    summary = re.search(r"^cases tried: .*$", DOC.read_text(), re.M).group(0)
    stated = {key.strip(): int(value) for key, value in (part.split(":") for part in summary.split(";"))}
    assert stated["cases tried"] == sum(counts.values())
    for outcome, key in OUTCOMES.items():
        assert stated[key] == counts[outcome], (key, stated[key], counts[outcome])
    assert stated["tracebacks"] == stated["silent corruptions"] == stated["lost results"] == 0


def test_the_readme_links_the_page():
    assert "docs/RELIABILITY.md" in (REPO / "README.md").read_text()

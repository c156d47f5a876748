"""docs/ARCHITECTURE.md stays true: the files it names exist, and its data-side tour is short and complete.

The tour is the numbered list under "## Data side": each step starts with the file it is
about. It may take at most five pipeline files, it must end where a `Batch` is made, and every
pipeline module its files import at module level must be one of them; inside a function they
may also import a module the section names as off the tour (the torch fallback, which
`build_loader` imports only when asked for it).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
MAX_DATA_FILES = 5
PATH = re.compile(r"`((?:pipeline|model|train|tools|tests|docs|configs)/[\w./-]+\.(?:py|md|yaml|sh))")
STEP = re.compile(r"^\d+\. `(pipeline/\w+\.py)", re.MULTILINE)


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _pipeline_imports(path: Path, module_level: bool = False) -> set[str]:
    """The pipeline modules `path` imports (anywhere, or at module level only), as file paths."""
    tree = ast.parse(path.read_text())
    modules = set()
    for node in tree.body if module_level else ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {m.replace(".", "/") + ".py" for m in modules if m.startswith("pipeline.")}


def test_every_file_the_architecture_doc_names_exists():
    named = set(PATH.findall(DOC.read_text()))
    assert named, "the doc names no files"
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


def test_the_data_side_tour_takes_at_most_five_files_and_ends_at_a_batch():
    tour = STEP.findall(_section(DOC.read_text(), "Data side"))
    assert 1 <= len(tour) <= MAX_DATA_FILES, tour
    assert len(set(tour)) == len(tour), tour
    assert tour[0] == "pipeline/loader.py"  # the trainer's entry point
    assert "class Batch" in (REPO / tour[-1]).read_text()


def test_every_pipeline_module_imported_on_the_way_is_on_the_tour():
    section = _section(DOC.read_text(), "Data side")
    tour = set(STEP.findall(section))
    off_tour = set(PATH.findall(section.split("Off this tour", 1)[1])) if "Off this tour" in section else set()
    for path in sorted(tour):
        outside = _pipeline_imports(REPO / path, module_level=True) - tour
        assert not outside, f"{path} imports {sorted(outside)}, which the data-side tour does not name"
        outside = _pipeline_imports(REPO / path) - tour - off_tour
        assert not outside, f"{path} imports {sorted(outside)}, which docs/ARCHITECTURE.md does not name"
    assert "pipeline/dali_pipeline.py" in tour and "pipeline/dali_pipeline.py" in _pipeline_imports(REPO / "pipeline/loader.py")

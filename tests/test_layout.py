"""One place for each mechanism, read from the source (ast) of the packages and the tools.

The training step's backward, CUDA-graph capture and waiting for the device each live in one
module; benchmarks live in tools/, not in the packages the trainer imports; and no code
reaches into another object's private attributes (torch's or torchvision's), which change
without notice between releases.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "model", "train")
SCANNED = (*PACKAGES, "tools")

# Private attributes used on purpose, as (module, expression).
ALLOWED_PRIVATE = {
    ("*", "os._exit"),  # leave a process at once, without running its exit handlers
}


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(ROOT)): ast.parse(path.read_text(), filename=str(path))
        for package in SCANNED
        for path in sorted((ROOT / package).rglob("*.py"))
    }


MODULES = _modules()


def _calls(tree: ast.Module) -> list[str]:
    """The called expressions of `tree`, as source text (`torch.cuda.synchronize`, `total.backward`)."""
    return [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _modules_calling(matches) -> list[str]:
    return sorted(name for name, tree in MODULES.items() if any(matches(call) for call in _calls(tree)))


def test_the_scan_sees_the_modules():
    assert {"train/engine.py", "model/maskrcnn.py", "train/throughput.py", "tools/bench_model.py"} <= set(MODULES)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_benchmark_module_inside_the_packages(package):
    benchmarks = [p.name for p in (ROOT / package).rglob("*.py") if "bench" in p.stem]
    assert not benchmarks, f"benchmarks belong in tools/ (tools/bench_*.py), found {benchmarks} in {package}/"


def test_backward_is_called_in_one_module():
    assert _modules_calling(lambda call: call.endswith(".backward")) == ["train/engine.py"]


def test_cuda_graphs_are_captured_in_one_module():
    captures = ("make_graphed_callables", "torch.cuda.graph", "torch.cuda.CUDAGraph")
    assert _modules_calling(lambda call: call.endswith(captures)) == ["model/maskrcnn.py"]


def test_only_the_throughput_clocks_wait_for_the_device():
    assert _modules_calling(lambda call: call == "torch.cuda.synchronize") == ["train/throughput.py"]


def _private_attributes(tree: ast.Module) -> list[str]:
    """`x._name` where x is neither self nor cls (dunders such as `__version__` are public)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") and node.attr.endswith("__"):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        found.append(ast.unparse(node))
    return found


def test_no_private_attribute_of_another_object():
    offending = {
        name: accesses
        for name, tree in MODULES.items()
        if (accesses := [a for a in _private_attributes(tree) if ("*", a) not in ALLOWED_PRIVATE and (name, a) not in ALLOWED_PRIVATE])
    }
    assert not offending, f"private attributes of other objects (use the public API): {offending}"


def test_the_private_access_check_finds_one():
    tree = ast.parse("scale = scaler._scale\nself._rows = []\nversion = torch.__version__\n")
    assert _private_attributes(tree) == ["scaler._scale"]

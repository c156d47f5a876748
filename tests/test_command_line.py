"""The README's commands as a new user types them, in the environment `make` builds.

Every script the README runs with `python` exists and answers `--help` after `source
.venv/bin/activate` (the README's instruction), and it answers before the heavy imports: the
interpreter's own import log (`python -X importtime`) shows no torch and no DALI. A config
error of the trainer answers the same way. (How long that takes is measured in the README, not
asserted here.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACTIVATE = Path(sys.executable).parent / "activate"
HEAVY = ("torch", "torchvision", "nvidia.dali")


def _readme_scripts() -> list[str]:
    text = (REPO / "README.md").read_text()
    return sorted(set(re.findall(r"python (tools/\w+\.py|train/main\.py)", text)))


def _in_the_environment(command: str) -> subprocess.CompletedProcess:
    """`command` in bash after the README's `source .venv/bin/activate`, from the repository, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != ACTIVATE.parent)
    return subprocess.run(["bash", "-c", f"source {ACTIVATE} && {command}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _imported(importtime_log: str) -> set[str]:
    """The modules `python -X importtime` reports (its lines: 'import time: self | cumulative | name')."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


def test_the_readme_names_the_scripts():
    scripts = _readme_scripts()
    assert {"train/main.py", "tools/shard_coco.py", "tools/predict.py", "tools/evaluate.py", "tools/export.py",
            "tools/download_weights.py", "tools/time_to_train.py", "tools/visualize.py"} <= set(scripts)
    missing = [script for script in scripts if not (REPO / script).is_file()]
    assert not missing, f"README.md runs scripts that do not exist: {missing}"


@pytest.mark.skipif(not ACTIVATE.is_file(), reason="the tests run outside a virtual environment")
@pytest.mark.parametrize("script", [s for s in _readme_scripts() if not s.startswith("tools/bench_")])
def test_every_readme_script_answers_help_in_the_environment_before_the_heavy_imports(script):
    result = _in_the_environment(f"python -X importtime {script} --help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ")
    heavy = sorted(m for m in _imported(result.stderr) if m.split(".")[0] in HEAVY or m.startswith(HEAVY))
    assert not heavy, f"{script} --help imports {heavy[:5]}"


@pytest.mark.skipif(not ACTIVATE.is_file(), reason="the tests run outside a virtual environment")
def test_a_config_error_answers_before_the_heavy_imports(tmp_path):
    result = _in_the_environment(f"python -X importtime train/main.py output_dir={tmp_path / 'run'} solver.momentum=1.5")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == ["error: solver.momentum=1.5 (from override solver.momentum=1.5) is not allowed: "
                      "solver.momentum must be a number in [0, 1)"]
    assert not {m for m in _imported(result.stderr) if m.split(".")[0] in HEAVY}
    assert not (tmp_path / "run").exists()

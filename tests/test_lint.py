"""Linters for what cannot be built or run here: the Dockerfile and the shell scripts."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing; `make test` installs it from the dev extra in setup.cfg")
    return path


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "tools").glob("*.sh")))
def test_shell_scripts_pass_shellcheck(script):
    result = subprocess.run([_tool("shellcheck"), str(ROOT / "tools" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

"""tools/gpu_check.sh: what can be checked without a GPU (shellcheck runs in test_lint.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_refuses_without_cuda_in_one_sentence(tmp_path):
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")],
        capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "tools/gpu_check.sh needs a CUDA GPU; run it on a GPU machine"


def test_usage_without_arguments():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode != 0 and "usage: tools/gpu_check.sh OUT_DIR [WHEELS_DIR]" in result.stderr

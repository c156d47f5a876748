"""Bad config values through the real command lines: one sentence on stderr, exit code 2, nothing written.

Each tool runs in-process through its command-line entry (`train.main.run`, each tool's
`main(get_args_parser().parse_intermixed_args(argv))`, whose value the script exits with).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from train.main import run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _error_line(stderr: str) -> str:
    err = stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.backend=tourch", "data.backend='tourch' (from override data.backend=tourch) is not allowed: "
                                "data.backend must be one of dali, torch"),
        ("train.precision=fp8", "train.precision must be one of auto, fp32, bf16, fp16"),
        ("solver.ims_per_batch=0", "solver.ims_per_batch must be an integer >= 1"),
        ("solver.base_lr=-0.02", "solver.base_lr must be a number > 0"),
        ("eval.every_epochs=-1", "eval.every_epochs must be an integer >= 0"),
        ("model=3", "model is a section, not a value (from override model=3); set one of its keys"),
        ("data.buckets=[[128, 160]", "override 'data.buckets=[[128, 160]' is not valid YAML"),
        ("model.num_classes=81", "unknown config key 'model.num_classes'"),
    ],
)
def test_train_main_stops_before_writing_anything(override, message, train_shards, val_shards, synthetic_coco, tmp_path, capsys):
    output_dir = tmp_path / "run"
    argv = ["--config", str(DEMO), "--data", str(train_shards), "--val-data", str(val_shards),
            "--val-annotations", str(synthetic_coco.val_json), f"output_dir={output_dir}", override]
    assert run(argv) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: ") and message in err and len(err) < 300
    assert not output_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_sentence(train_shards, val_shards, synthetic_coco, tmp_path, capsys):
    argv = ["--config", str(DEMO), "--data", str(train_shards), "--val-data", str(val_shards),
            "--val-annotations", str(synthetic_coco.val_json), f"output_dir={tmp_path / 'run'}", "train.device=cuda"]
    assert run(argv) == 2
    assert "train.device=cuda but CUDA is not available on this machine" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "tool, args",
    [
        ("evaluate", ["--weights", "w.pt", "--data", "shards", "--annotations", "a.json", "--config", str(DEMO)]),
        ("predict", ["--weights", "w.pt", "--images", ".", "--out", "out", "--config", str(DEMO)]),
        ("bench_model", ["--config", str(DEMO)]),
        ("bench_pipeline", ["--data", "shards", "--config", str(DEMO)]),
    ],
)
def test_every_tool_validates_its_config(tool, args, tmp_path, val_shards, synthetic_coco, capsys):
    # Real inputs where a tool reads them before its config: the bad value must still be what it reports.
    weights = tmp_path / "w.pt"
    torch.save({"static_part.x": torch.zeros(1)}, weights)
    replaced = {"w.pt": str(weights), "shards": str(val_shards), "a.json": str(synthetic_coco.val_json),
                "out": str(tmp_path / "out"), ".": str(tmp_path / "photos")}
    argv = [replaced.get(a, a) for a in args] + ["solver.momentum=1.5"]
    module = importlib.import_module(f"tools.{tool}")
    assert module.main(module.get_args_parser().parse_intermixed_args(argv)) == 2  # what the script exits with
    assert "solver.momentum=1.5 (from override solver.momentum=1.5) is not allowed: solver.momentum must be a number in [0, 1)" \
        in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()

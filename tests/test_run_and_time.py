"""tools/run_and_time.sh: --help, --dry, its refusals, and the demo recipe end to end on the test shards.

The time to train it prints is checked against the MLPerf log's own run_start and run_stop
timestamps; its RESULT line's wall-clock seconds against the interval they span.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from train_runs import ENV, PYTHON, REPO, TINY

SCRIPT = REPO / "tools" / "run_and_time.sh"
REACH_AT_ONCE = ["eval.box_ap_target=0.0", "eval.mask_ap_target=0.0"]


def _run(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], env={**ENV, "PYTHON": PYTHON, **env},
                          capture_output=True, text=True)


def _one_sentence(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_help_says_how():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for word in ("RECIPE", "--dry", "SHARDS", "DATA_DIR", "WEIGHTS", "VAL_ANNOTATIONS", "NPROC", "TORCHRUN_ARGS",
                 "OUTPUT_DIR", "KEY=VALUE", "RESULT,OBJECT_DETECTION", "run_start to run_stop"):
        assert word in result.stdout, word


def test_dry_prints_the_command_from_the_environment_and_the_flags(tmp_path):
    out = tmp_path / "out"
    result = _run("batch96_8gpu", "--dry", "--weights", "/w/R-50.pkl", "solver.max_iter=10",
                  SHARDS="/s", DATA_DIR="/d", NPROC="8", OUTPUT_DIR=str(out))
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", str(REPO / "train" / "main.py"),
        "--config", str(REPO / "configs" / "batch96_8gpu.yaml"), "--data", "/s/train", "--val-data", "/s/val",
        "--val-annotations", "/d/annotations/instances_val2017.json", "train.weights=/w/R-50.pkl",
        f"output_dir={out}", "solver.max_iter=10",
    ]
    assert not out.exists()  # a dry run writes nothing
    nodes = _run("batch256_32gpu", "--dry", "--nproc", "8", "--shards", "/s", "--output-dir", out,
                 TORCHRUN_ARGS="--nnodes=4 --rdzv_backend=c10d --rdzv_endpoint=host:29500")
    assert shlex.split(nodes.stdout)[:7] == [
        PYTHON, "-m", "torch.distributed.run", "--nnodes=4", "--rdzv_backend=c10d", "--rdzv_endpoint=host:29500",
        "--nproc_per_node=8",
    ]
    single = shlex.split(_run("--dry", "--weights", "none", NPROC="1").stdout)
    assert single[:4] == [PYTHON, str(REPO / "train" / "main.py"), "--config", str(REPO / "configs" / "batch8_1gpu.yaml")]
    assert not any(word.startswith("train.weights=") for word in single)


def test_dry_uses_the_environment_make_builds_and_warns_when_the_recipe_wants_more_gpus():
    env = {k: v for k, v in ENV.items() if k != "PYTHON"}
    result = subprocess.run(["bash", str(SCRIPT), "batch96_8gpu", "--dry"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    venv_python = REPO / ".venv" / "bin" / "python"
    assert shlex.split(result.stdout)[0] == (str(venv_python) if venv_python.exists() else "python3")
    (warning,) = result.stderr.strip().splitlines()  # no GPU here: the recipe's 8 GPUs become one process
    assert warning.startswith("warning: recipe batch96_8gpu is meant for 8 GPUs, but this command starts 1 process(es)")
    assert "pass --nproc N (or NPROC)" in warning
    assert _run("batch96_8gpu", "--dry", NPROC="8").stderr == ""  # as many processes as the recipe's GPUs
    nodes = _run("batch256_32gpu", "--dry", "--nproc", "8", "--output-dir", "o", TORCHRUN_ARGS="--nnodes=4 --rdzv_backend=c10d")
    assert nodes.stderr == ""  # 4 nodes x 8
    assert "meant for 32 GPUs, but this command starts 16" in _run(
        "batch256_32gpu", "--dry", "--nproc", "8", "--output-dir", "o", TORCHRUN_ARGS="--nnodes 2").stderr


def test_missing_inputs_end_in_one_sentence_naming_the_option(train_shards, tmp_path):
    assert "--shards DIR (or SHARDS)" in _one_sentence(_run("--shards", tmp_path / "none", NPROC="1").stderr)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train").symlink_to(train_shards)
    (shards / "val").symlink_to(train_shards)
    err = _one_sentence(_run("--shards", shards, "--data-dir", tmp_path, NPROC="1").stderr)
    assert f"{tmp_path}/annotations/instances_val2017.json does not exist; pass --val-annotations FILE" in err
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    err = _one_sentence(_run("--shards", shards, "--data-dir", tmp_path, NPROC="1").stderr)
    assert f"{tmp_path}/R-50.pkl does not exist; pass --weights FILE (or WEIGHTS)" in err
    assert "name one in configs/ (batch256_32gpu batch8_1gpu batch96_8gpu demo" in _one_sentence(_run("nope").stderr)
    assert "must be a positive number" in _one_sentence(_run("--nproc", "0", "--dry").stderr)
    result = _run("--dry", "--nproc", "2", TORCHRUN_ARGS="--nnodes=2")
    assert result.returncode == 2 and "the same on every node" in _one_sentence(result.stderr)


def _logged(log: Path, key: str):
    """The value of the first `key` event of an MLPerf log."""
    for line in log.read_text().splitlines():
        event = json.loads(line.split(" ", 1)[1])
        if event["key"] == key:
            return event["value"]
    raise AssertionError(f"{log} has no {key}")


def _run_interval_s(log: Path) -> float:
    stamps = {}
    for line in log.read_text().splitlines():
        event = json.loads(line.split(" ", 1)[1])
        stamps.setdefault(event["key"], event["time_ms"])
    return (stamps["run_stop"] - stamps["run_start"]) / 1000


def test_the_demo_recipe_end_to_end_prints_the_time_to_train_and_the_result_line(
    train_shards, val_shards, synthetic_coco, tmp_path
):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train").symlink_to(train_shards)
    (shards / "val").symlink_to(val_shards)
    common = ["demo", "--shards", shards, "--val-annotations", synthetic_coco.val_json, "--weights", "none", *TINY,
              "solver.max_iter=2"]

    def recipe_run(name: str, *extra: str, **env: str) -> tuple[Path, str, str, float, str, str]:
        """The run's folder, its stdout and stderr, the log's run_start..run_stop seconds, that span and the AP as printed."""
        out = tmp_path / name
        result = _run(*common, "--output-dir", out, *extra, NPROC="1", **env)
        assert result.returncode == 0, result.stderr
        seconds = _run_interval_s(out / "mlperf.log")
        summary = json.loads((out / "summary.json").read_text())
        span = f"{seconds:.1f} s ({seconds / 60:.2f} min) from run_start to run_stop in {out}/mlperf.log"
        ap = f"box AP {summary['box_ap']:.4f}, mask AP {summary['mask_ap']:.4f}"
        return out, result.stdout, result.stderr, seconds, span, ap

    drop_caches = tmp_path / "drop_caches"  # stands in for /proc/sys/vm/drop_caches, which only root may write
    out, stdout, _, seconds, span, ap = recipe_run("reached", *REACH_AT_ONCE, DROP_CACHES=str(drop_caches))
    assert drop_caches.read_text() == "3\n" and _logged(out / "mlperf.log", "cache_clear") is True
    assert f"time to train: {span}; status success; epoch 1: {ap}" in stdout.splitlines()
    assert "STARTING TIMING RUN AT " in stdout and "ENDING TIMING RUN AT " in stdout
    (line,) = [line for line in stdout.splitlines() if line.startswith("RESULT,")]
    match = re.fullmatch(r"RESULT,OBJECT_DETECTION,,(\d+),reference,(\d{4}-\d\d-\d\d .+)", line)
    assert match, line
    assert int(match[1]) >= int(seconds)  # the command's wall-clock span holds run_start..run_stop

    # no quality target (1.0): training its schedule is the whole job, not MLPerf's abort; the cache kept
    out, stdout, stderr, _, span, ap = recipe_run("fine-tune", "eval.box_ap_target=1.0", DROP_CACHES="none")
    assert (f"training time: {span}; the run trained its whole schedule (it has no quality target); "
            f"last result epoch 1: {ap}") in stdout.splitlines()
    assert "aborted" not in stdout and "RESULT," not in stdout
    assert _logged(out / "mlperf.log", "cache_clear") is False and "the page cache was not dropped" in stderr

    cut = tmp_path / "cut.log"  # an attempt stopped before run_stop
    lines = (out / "mlperf.log").read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[: next(i for i, line in enumerate(lines) if '"key": "epoch_start"' in line)]))
    stopped = subprocess.run([PYTHON, str(REPO / "tools" / "time_to_train.py"), str(cut)], env=ENV,
                             capture_output=True, text=True)
    assert stopped.returncode == 2
    assert _one_sentence(stopped.stderr) == f"error: {cut} has no run_stop: the attempt did not finish (it was stopped or killed)"

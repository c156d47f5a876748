"""The second round of hostile cases (docs/RELIABILITY.md): faults as a real user and a real machine bring them.

Real signals to real processes (SIGHUP to a whole process group as a dropped SSH session sends it,
SIGKILL to a DataLoader worker as the OOM killer sends it, SIGTERM to a sharder and its workers), a
real full disk (a small tmpfs, skipped where mounting is not permitted), annotation files the way
tools export them, and absurd values typed on the command line, each through the real command
line: a subprocess where a process must be signalled, the tool's `main(argv)` in-process where the
case stops before any work. Each ends in one sentence (stderr's last line, no traceback) with the
documented exit code, or in a clean recovery, and nothing finished is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from faults import children, floats, grow, small_disk
from pipeline.shard_format import read_manifest
from pipeline.sharding import shard_coco
from tests.model_helpers import random_checkpoint
from tests.train_runs import ENV, PYTHON, REPO, TINY, command, losses
from train import main as train_main
from train.checkpoint import list_checkpoints, read_checkpoint
from train.config import ConfigError, load_config
from train.config_schema import SCHEMA, Number

DEMO = REPO / "configs" / "demo.yaml"
UNBUFFERED = {**ENV, "PYTHONUNBUFFERED": "1"}
TWO_POINTS = [[10.0, 10.0, 30.0, 30.0]]  # a two-point polygon: pycocotools reads it as a box, then fails


def _tool(name: str, *argv) -> list[str]:
    return [PYTHON, str(REPO / "tools" / name), *map(str, argv)]


def _one_sentence(returncode: int, stdout: str, stderr: str, code: int, *parts: str) -> str:
    """The exit code, no traceback anywhere, and stderr's last line holding every part."""
    assert returncode == code, (returncode, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stdout + stderr, stderr
    last = stderr.strip().splitlines()[-1]
    for part in parts:
        assert part in last, (part, last)
    return last


def _run(argv: list[str]) -> tuple[int, str, str]:
    result = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


def _in_process(tool: str, argv: list, capsys) -> tuple[int, str, str]:
    """A tool's `main(get_args_parser().parse_args(argv))` here, argparse's refusals included."""
    module = __import__(f"tools.{tool}", fromlist=["main"])
    try:
        code = module.main(module.get_args_parser().parse_intermixed_args([str(a) for a in argv]))
    except SystemExit as e:  # argparse's one-line usage error
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train(argv: list, capsys) -> tuple[int, str, str]:
    code = train_main.run([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _with_annotation(source: Path, target: Path, **fields) -> int:
    """A copy of COCO file `source` at `target` whose first non-crowd annotation takes `fields`; returns its id."""
    data = json.loads(source.read_text())
    ann = next(a for a in data["annotations"] if not a["iscrowd"])
    ann.update(fields)
    target.write_text(json.dumps(data))
    return ann["id"]


# --- sharding ------------------------------------------------------------------------------------


def _blocked_images(synthetic_coco, folder: Path) -> Path:
    """The val images with the last one a FIFO: reading it blocks, so the run is surely going when signalled."""
    shutil.copytree(synthetic_coco.val_images, folder)
    blocking = sorted(folder.iterdir())[-1]
    blocking.unlink()
    os.mkfifo(blocking)
    return folder


@pytest.mark.parametrize("signum, to_group", [
    (signal.SIGTERM, True),
    (signal.SIGHUP, False),
    pytest.param(signal.SIGINT, True, marks=pytest.mark.slow),
    pytest.param(signal.SIGHUP, True, marks=pytest.mark.slow),
    pytest.param(signal.SIGTERM, False, marks=pytest.mark.slow),
])
def test_sharding_stopped_by_a_signal_removes_its_staging_folder(signum, to_group, synthetic_coco, tmp_path):
    """To the sharder, or to its whole process group (a terminal's Ctrl-C or hang-up, `kill -TERM -PGID`),
    with two workers: one sentence, no worker's traceback, no worker left, no staging folder left."""
    images, out = _blocked_images(synthetic_coco, tmp_path / "images"), tmp_path / "out"
    process = subprocess.Popen(
        _tool("shard_coco.py", "--images", images, "--annotations", synthetic_coco.val_json, "--out", out,
              "--mode", "eval", "--workers", "2", "--samples-per-shard", "2"),
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    staging = out.with_name(f".out.incoming-{process.pid}")
    deadline = time.monotonic() + 120
    while len(children(process.pid)) < 2 or not any(staging.glob("*.tar")):  # workers up, shards being written
        assert time.monotonic() < deadline and process.poll() is None, "the sharder did not start its workers"
        time.sleep(0.05)
    workers = children(process.pid)
    os.killpg(process.pid, signum) if to_group else process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    _one_sentence(process.returncode, stdout, stderr, 128 + signum,
                  f"shard_coco: stopped by {name}; {out} is as it was before this run: run the same command again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no staging folder, no --out
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_a_sharding_worker_killed_by_the_oom_killer_is_one_sentence(synthetic_coco, tmp_path):
    images, out = _blocked_images(synthetic_coco, tmp_path / "images"), tmp_path / "out"
    process = subprocess.Popen(
        _tool("shard_coco.py", "--images", images, "--annotations", synthetic_coco.val_json, "--out", out,
              "--mode", "eval", "--workers", "2", "--samples-per-shard", "2"),
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while len(children(process.pid)) < 2:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    workers = children(process.pid)
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    _one_sentence(process.returncode, stdout, stderr, 2, "a worker process died while sharding", "fewer --workers",
                  "nothing was left behind")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


@pytest.mark.parametrize("case, says", [
    ("another size", "the RLE's size [3, 4] is not its image's [height, width]"),
    ("counts short of the image", "the RLE's counts cover 5 pixels, not its"),
    ("a damaged compressed string", "the RLE's counts hold characters outside COCO's compressed alphabet"),
])
def test_an_rle_that_does_not_fit_its_image_is_refused_naming_it(case, says, synthetic_coco, tmp_path, capsys):
    annotations = tmp_path / "instances_train.json"
    data = json.loads(synthetic_coco.train_json.read_text())
    ann = next(a for a in data["annotations"] if not a["iscrowd"])
    image = next(i for i in data["images"] if i["id"] == ann["image_id"])
    size = [image["height"], image["width"]]
    ann["segmentation"] = {
        "another size": {"size": [3, 4], "counts": [12]},
        "counts short of the image": {"size": size, "counts": [0, 5]},
        "a damaged compressed string": {"size": size, "counts": "0\u00e9"},
    }[case]
    annotations.write_text(json.dumps(data))
    result = _in_process("shard_coco", ["--images", synthetic_coco.train_images, "--annotations", annotations,
                                        "--out", tmp_path / "out", "--mode", "train"], capsys)
    _one_sentence(*result, 2, f"shard_coco: {annotations}: annotation {ann['id']} has an unusable RLE segmentation", says,
                  "fix the file")
    assert not (tmp_path / "out").exists()


def test_an_eval_set_that_cocoeval_cannot_score_is_refused_when_sharding(synthetic_coco, tmp_path, capsys):
    annotations = tmp_path / "instances_val.json"
    ann_id = _with_annotation(synthetic_coco.val_json, annotations, segmentation=TWO_POINTS)
    result = _in_process("shard_coco", ["--images", synthetic_coco.val_images, "--annotations", annotations,
                                        "--out", tmp_path / "out", "--mode", "eval"], capsys)
    _one_sentence(*result, 2, f"annotation {ann_id} has a first polygon of 2 points",
                  "COCO's evaluation cannot score it: fix or remove it in the file, then shard it again")
    assert not (tmp_path / "out").exists()


def _deep_json(path: Path) -> Path:
    path.write_text('{"images": ' + "[" * 200_000 + "]" * 200_000 + "}")
    return path


def test_a_json_nested_200000_deep_is_one_sentence(synthetic_coco, tmp_path, capsys):
    deep = _deep_json(tmp_path / "instances_deep.json")
    result = _in_process("shard_coco", ["--images", synthetic_coco.val_images, "--annotations", deep,
                                        "--out", tmp_path / "out", "--mode", "eval"], capsys)
    _one_sentence(*result, 2, f"{deep} nests arrays or objects too deeply to be COCO instances")
    result = _in_process("visualize", ["--annotations", deep, "--images", synthetic_coco.val_images,
                                       "--out", tmp_path / "pictures"], capsys)
    _one_sentence(*result, 2, f"error: {deep} is not a COCO instances JSON (maximum recursion depth exceeded")
    predictions = _deep_json(tmp_path / "deep_results.json")
    result = _in_process("visualize", ["--annotations", synthetic_coco.val_json, "--images", synthetic_coco.val_images,
                                       "--predictions", predictions, "--out", tmp_path / "pictures"], capsys)
    _one_sentence(*result, 2, f"error: {predictions} is not a readable COCO results JSON")


def test_make_synthetic_coco_refuses_a_gigantic_image_size_at_once(tmp_path):
    start = time.monotonic()
    result = _run(_tool("make_synthetic_coco.py", "--out", tmp_path / "data", "--image-size", "100000", "100000"))
    _one_sentence(*result, 1, "make_synthetic_coco: image_size must be within 32..8192 on each side, got (100000, 100000)")
    assert not (tmp_path / "data").exists() and time.monotonic() - start < 60


# --- outputs over inputs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(val_shards, tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("run"), load_config(DEMO), read_manifest(val_shards)["categories"])


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but a run folder's .lock (each trainer writes its pid there)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_outputs_onto_inputs_are_refused_and_the_inputs_stay(checkpoint, synthetic_coco, train_shards, val_shards,
                                                             tmp_path, capsys):
    annotations = tmp_path / "instances_val.json"
    shutil.copy(synthetic_coco.val_json, annotations)
    images = tmp_path / "val2017"
    shutil.copytree(synthetic_coco.val_images, images)
    pictures = tmp_path / "predicted" / "pictures"  # photos kept where predict would write its pictures
    shutil.copytree(synthetic_coco.val_images, pictures)
    before = _snapshot(tmp_path)
    cases = [
        ("evaluate", ["--weights", checkpoint, "--data", val_shards, "--annotations", annotations, "--json", annotations],
         f"error: --json {annotations} is the --annotations file {annotations}: writing it would overwrite that input"),
        ("evaluate", ["--weights", checkpoint, "--data", val_shards, "--annotations", annotations,
                      "--results", val_shards / "results.json"], f"lies inside the --data folder {val_shards}"),
        ("visualize", ["--annotations", annotations, "--images", images, "--out", images],
         f"error: --out {images} is the --images folder {images}: writing it would overwrite that input"),
        ("predict", ["--weights", checkpoint, "--images", images, "--out", images / "predicted"],
         f"error: --out {images / 'predicted'} lies inside the --images folder {images}"),
        ("predict", ["--weights", checkpoint, "--images", pictures, "--out", pictures.parent],
         f"error: --out (its pictures/) {pictures} is the --images folder {pictures}"),
        ("shard_coco", ["--images", images, "--annotations", annotations, "--out", images / "shards", "--mode", "eval"],
         f"shard_coco: --out {images / 'shards'} lies inside the --images folder {images}"),
    ]
    for tool, argv, says in cases:
        _one_sentence(*_in_process(tool, argv, capsys), 2, says)
    result = _train(["--config", DEMO, "--data", train_shards, "eval.every_epochs=0",
                     f"output_dir={train_shards / 'run'}"], capsys)
    _one_sentence(*result, 2, f"output_dir {train_shards / 'run'} lies inside the data.train_shards folder {train_shards}")
    assert _snapshot(tmp_path) == before and not (train_shards / "run").exists()


def test_predict_refuses_to_overwrite_an_earlier_run_unless_asked(checkpoint, synthetic_coco, tmp_path, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    for source in sorted(synthetic_coco.val_images.glob("*.jpg"))[:2]:
        shutil.copy(source, images)
    out = tmp_path / "out"
    argv = ["--weights", checkpoint, "--images", images, "--out", out, "--device", "cpu"]
    assert _in_process("predict", argv, capsys)[0] == 0
    earlier = _snapshot(out)
    assert "detections.json" in earlier and len(earlier) == 3
    _one_sentence(*_in_process("predict", argv, capsys), 2,
                  f"error: --out {out} already holds detections.json and 2 pictures from an earlier run; pass --overwrite")
    assert _snapshot(out) == earlier
    (images / sorted(os.listdir(images))[0]).unlink()
    code, stdout, _ = _in_process("predict", [*argv, "--overwrite"], capsys)
    assert code == 0 and f"--overwrite: removed the earlier run's 3 files from {out}" in stdout
    assert sorted(_snapshot(out)) == sorted(["detections.json", f"pictures/{sorted(os.listdir(images))[0][:-4]}.png"])


@pytest.mark.parametrize("tool, argv, says", [
    ("predict", ["--score-threshold", "nan"], "argument --score-threshold: 'nan' is not a number in [0, 1]"),
    ("predict", ["--batch-size", "0"], "argument --batch-size: '0' is not an integer >= 1"),
    ("visualize", ["--num", "-1"], "argument --num: '-1' is not an integer >= 1"),
    ("visualize", ["--score-threshold", "inf"], "argument --score-threshold: 'inf' is not a number in [0, 1]"),
    ("shard_coco", ["--seed", "-1"], "shard_coco: --seed must be a non-negative integer, got -1"),
])
def test_absurd_values_are_refused_before_any_work(tool, argv, says, checkpoint, synthetic_coco, tmp_path, capsys):
    inputs = {
        "predict": ["--weights", checkpoint, "--images", synthetic_coco.val_images, "--out", tmp_path / "out"],
        "visualize": ["--annotations", synthetic_coco.val_json, "--images", synthetic_coco.val_images, "--out", tmp_path / "out"],
        "shard_coco": ["--images", synthetic_coco.val_images, "--annotations", synthetic_coco.val_json,
                       "--out", tmp_path / "out", "--mode", "eval"],
    }[tool]
    _one_sentence(*_in_process(tool, [*inputs, *argv], capsys), 2, says)
    assert not (tmp_path / "out").exists()


class RunsCode:
    """What a malicious weights file holds: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_weights_file_that_could_run_code_is_not_loaded(synthetic_coco, tmp_path, capsys):
    marker, weights = tmp_path / "ran", tmp_path / "weights.pt"
    torch.save({"model": {}, "extra": RunsCode(marker)}, weights)
    result = _in_process("predict", ["--weights", weights, "--images", synthetic_coco.val_images, "--out", tmp_path / "out"],
                         capsys)
    last = _one_sentence(*result, 2, f"error: {weights} is not a loadable torch weights file (unpickling it would call "
                         "posix.system, so it could run code on this machine; it was not loaded)")
    assert "weights_only" not in last and not marker.exists() and not (tmp_path / "out").exists()


# --- configuration -------------------------------------------------------------------------------


def test_config_files_and_values_that_used_to_end_in_tracebacks(train_shards, tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text("base: b.yaml\nseed: 1\n")
    loop_b.write_text("base: a.yaml\nseed: 2\n")
    cases = [
        (["--config", binary], f"error: {binary} is not a text file (it does not decode as UTF-8)"),
        (["--config", loop_a], f"error: the base: chain of {loop_a} comes back to a file it started from "
                               f"({loop_a} -> {loop_b} -> {loop_a}); remove the loop"),
        (["--config", DEMO, "seed=4294967296"], "seed must be an integer in [0, 4294967295]"),
        (["--config", DEMO, "data.buckets=[[32,32],[32,32]]"], "data.buckets (from override data.buckets=[[32,32],"
                                                               "[32,32]]) holds [32, 32], smaller than the largest"),
        (["--config", DEMO, "data.buckets=[[128,160],[128,160]]"], "data.buckets (from override data.buckets="
                                                                   "[[128,160],[128,160]]) lists [128, 160] twice"),
    ]
    for argv, says in cases:
        _one_sentence(*_train([*argv, "--data", train_shards, f"output_dir={tmp_path / 'run'}"], capsys), 2, says)
    assert not (tmp_path / "run").exists()


NUMERIC_KEYS = sorted(key for key, rule in SCHEMA.items() if isinstance(rule, Number))


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(NUMERIC_KEYS), value=st.one_of(
    st.integers(-(2**70), 2**70), floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.booleans(),
))
def test_any_value_typed_for_a_numeric_key_is_taken_or_refused_in_one_sentence(key, value):
    override = f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
    try:
        cfg = load_config(DEMO, [override])
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and key in message, message
        return
    kept = cfg
    for part in key.split("."):
        kept = kept[part]
    rule = SCHEMA[key]
    assert rule.low is None or kept >= rule.low
    assert rule.high is None or kept <= rule.high
    if key == "seed":
        assert 0 <= kept < 2**32


# --- training: signals, workers, full disks, annotations ------------------------------------------


def _train_until(argv: list[str], iteration: int, act) -> tuple[int, str, str]:
    """Run train/main.py in its own session; `act(process)` once it logs iteration `iteration`."""
    process = subprocess.Popen(argv, cwd=REPO, env=UNBUFFERED, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if f"iter {iteration}/" in line:
            act(process)
            break
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, "".join(seen) + stdout, stderr


LONG = ["solver.max_iter=40", "eval.every_epochs=0", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def hung_up_run(train_shards, val_shards, synthetic_coco, tmp_path_factory):
    """A run whose terminal hung up at iteration 3: SIGHUP to its whole process group (its loader worker too)."""
    out = tmp_path_factory.mktemp("hung_up") / "run"
    argv = [*command(train_shards, val_shards, synthetic_coco, out, *LONG, "data.backend=torch")]
    result = _train_until(argv, 3, lambda process: os.killpg(process.pid, signal.SIGHUP))
    return out, result


def test_sighup_is_handled_as_sigterm(hung_up_run):
    out, result = hung_up_run
    last = _one_sentence(*result, 129, "stopped by SIGHUP after iteration ", "continue with --resume")
    newest = list_checkpoints(out)[-1]
    assert f"its newest checkpoint is {newest}" in last
    assert read_checkpoint(newest)["iteration"] == max(losses(out))  # every logged step is in the checkpoint
    attempt = json.loads((out / "run.json").read_text())["attempts"][-1]
    assert attempt["ended"].startswith("stopped by SIGHUP")


def test_a_killed_writers_temporary_checkpoint_is_removed_on_the_next_start(hung_up_run, train_shards, tmp_path, capsys):
    """A kill -9 during a checkpoint write leaves `.ckpt-<it>.pt.tmp-<pid>`, a whole checkpoint's bytes:
    the next trainer on the folder removes it (here a --resume that finds the run already finished)."""
    source, _ = hung_up_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    newest = list_checkpoints(out)[-1]
    stale = newest.with_name(f".{newest.name}.tmp-{os.getpid() + 999_999}")
    shutil.copy(newest, stale)
    iteration = read_checkpoint(newest)["iteration"]
    argv = ["--config", DEMO, "--data", train_shards, *TINY, *LONG, "data.backend=torch", f"output_dir={out}",
            "--resume", f"solver.max_iter={iteration}"]
    code, stdout, stderr = _train(argv, capsys)
    assert code == 0, stderr
    assert f"removed {stale}, a checkpoint write that a killed trainer left unfinished" in stdout
    assert not stale.exists() and newest.is_file()


def test_a_dataloader_worker_killed_by_the_oom_killer_stops_with_a_checkpoint(train_shards, val_shards, synthetic_coco,
                                                                               tmp_path):
    out = tmp_path / "run"
    argv = command(train_shards, val_shards, synthetic_coco, out, *LONG, "data.backend=torch")
    result = _train_until(argv, 3, lambda process: os.kill(children(process.pid)[0], signal.SIGKILL))
    last = _one_sentence(*result, 1, "error: a worker process of the torch loader died (",
                         "lower data.torch_workers or data.prefetch; its newest checkpoint is ", "continue with --resume")
    newest = list_checkpoints(out)[-1]
    assert str(newest) in last
    assert read_checkpoint(newest)["iteration"] == max(losses(out)) >= 3  # the steps done are kept
    assert read_checkpoint(newest)["loader"] is not None  # mid-epoch: a resume continues after them


@pytest.mark.slow
def test_a_run_resumed_after_its_loader_worker_was_killed_equals_an_uninterrupted_one(
        train_shards, val_shards, synthetic_coco, reference_runs, tmp_path):
    out = tmp_path / "run"
    # One batch prefetched by one worker: killed after the first step, it is missed at the fourth of six.
    argv = command(train_shards, val_shards, synthetic_coco, out, "data.backend=torch", "data.prefetch=1")
    code, _, stderr = _train_until(argv, 1, lambda process: os.kill(children(process.pid)[0], signal.SIGKILL))
    assert code == 1, stderr
    assert _run([*argv, "--resume"])[0] == 0
    reference = losses(reference_runs("torch"))
    assert {i: losses(out)[i]["loss"] for i in reference} == {i: r["loss"] for i, r in reference.items()}


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_sentence_and_the_run_resumes(train_shards, val_shards, synthetic_coco,
                                                                              tmp_path):
    """A real tmpfs with room for one checkpoint of the tiny model (8.7 MB) and the logs, not two."""
    with small_disk(tmp_path / "disk", 14) as disk:
        out = disk / "run"
        argv = command(train_shards, val_shards, synthetic_coco, out, "eval.every_epochs=0")
        code, stdout, stderr = _run(argv)
        last = _one_sentence(code, stdout, stderr, 2, f"error: cannot write checkpoint {out / 'checkpoints'}",
                             "MB free on its disk); the newest checkpoint, ", "is kept: free some space")
        kept = list_checkpoints(out)
        assert len(kept) == 1 and str(kept[0]) in last and read_checkpoint(kept[0])["iteration"] == 2
        assert not list((out / "checkpoints").glob(".*.tmp-*"))  # no partial file
        grow(disk, 64)  # space freed
        code, _, stderr = _run([*argv, "--resume"])
        assert code == 0, stderr
        assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


def test_a_val_file_cocoeval_cannot_score_stops_a_run_before_training_and_every_resume(
        hung_up_run, train_shards, synthetic_coco, tmp_path, capsys):
    """Made before this check existed (the sharder now refuses it with --mode eval), such a val set
    would fail every epoch-end evaluation and every --resume: it is refused up front, naming the
    annotation, with the run's files untouched."""
    annotations = tmp_path / "instances_val.json"
    ann_id = _with_annotation(synthetic_coco.val_json, annotations, segmentation=[])
    val_shards = tmp_path / "val_shards"
    shard_coco(synthetic_coco.val_images, annotations, val_shards, mode="train", samples_per_shard=4)
    says = (f"error: {annotations}: annotation {ann_id} has an empty segmentation (no polygon and no RLE); COCO's "
            "evaluation cannot score it: fix or remove it in the file, then shard the val set again")
    fresh = tmp_path / "fresh"
    base = ["--config", DEMO, "--data", train_shards, "--val-data", val_shards, "--val-annotations", annotations]
    _one_sentence(*_train([*base, f"output_dir={fresh}"], capsys), 2, says)
    assert not fresh.exists()
    source, _ = hung_up_run
    resumed = tmp_path / "resumed"
    shutil.copytree(source, resumed)
    before = _snapshot(resumed)
    _one_sentence(*_train([*base, *TINY, *LONG, "data.backend=torch", "eval.every_epochs=1", f"output_dir={resumed}",
                           "--resume"], capsys), 2, says)
    assert _snapshot(resumed) == before
    checkpoint = list_checkpoints(resumed)[-1]
    result = _in_process("evaluate", ["--weights", checkpoint, "--data", val_shards, "--annotations", annotations], capsys)
    _one_sentence(*result, 2, says)


def test_visualize_names_an_annotation_it_cannot_draw(synthetic_coco, tmp_path, capsys):
    annotations = tmp_path / "instances_val.json"
    ann_id = _with_annotation(synthetic_coco.val_json, annotations, segmentation=[[10.0, 10.0, float("nan"), 4.0, 5.0, 6.0]])
    result = _in_process("visualize", ["--annotations", annotations, "--images", synthetic_coco.val_images,
                                       "--out", tmp_path / "pictures", "--num", "100"], capsys)
    _one_sentence(*result, 2, f"error: {annotations}: annotation {ann_id} has a polygon coordinate that is not finite",
                  "fix or remove it in the file")

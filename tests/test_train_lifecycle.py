"""A run's life through the real command line: run folders, resume, locks, signals, ranks.

Each test drives `python train/main.py` (a subprocess, or `train.main.run` in this process for
the cases that stop before training) on the tiny settings of tests/train_runs.py, and compares
what a run leaves with an independent record: the files before and after, the uninterrupted
reference run's losses and final weights (bit for bit), the MLPerf compliance checker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.sharding import shard_coco
from pipeline.synthetic_coco import make_synthetic_coco
from train.checkpoint import list_checkpoints
from train.distributed import DistributedContext, LivenessWatch
from train.interrupts import StopRequest
from train.main import parse_args, run

from train_runs import DEMO, ENV, PYTHON, REPO, TINY, check_compliance, command, losses

DEADLINE_S = 300  # a wait that lasts longer is a hang, not a slow machine
MAIN = [PYTHON, str(REPO / "train" / "main.py")]


def _files(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (the lock file aside)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def _one_sentence(err: str) -> str:
    err = err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def _error(capsys, argv) -> str:
    assert run([str(a) for a in argv]) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert err.startswith("error: "), err
    return err


def _wait_for(condition, process: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert process is None or process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {DEADLINE_S} s"
        time.sleep(0.02)


def _run_state(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def _trainer_pid(folder: Path) -> int:
    """The pid in the lock file: the process that holds the folder (rank 0)."""
    return int((folder / ".lock").read_text().split()[1])


def _copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


@pytest.fixture
def base(train_shards, val_shards, synthetic_coco):
    """output_dir -> the tiny run's argv after `python train/main.py`."""
    return lambda output_dir, *extra: command(train_shards, val_shards, synthetic_coco, output_dir, *extra)[2:]


# --- run folders -----------------------------------------------------------------------------------


def test_a_fresh_run_into_a_used_folder_stops_before_writing(capsys, reference_run, base, tmp_path):
    out = _copy_run(reference_run, tmp_path)
    before = _files(out)
    err = _error(capsys, ["train.checkpoint_every=4", *base(out)])  # an override before the flags
    assert f"output_dir={out} already holds a run" in err and "--resume" in err and "new folder" in err
    assert _files(out) == before


def test_resuming_a_finished_run_or_failing_to_resume_it_touches_nothing(capsys, reference_run, base, tmp_path):
    out = _copy_run(reference_run, tmp_path)
    before = _files(out)
    assert run([*base(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"the run in {out} already finished at iteration 6 (epoch 1)" in said
    assert "resume with a larger solver.max_iter (now 6)" in said
    err = _error(capsys, [*base(out), "--resume", "model.fpn_channels=16"])  # a failed attempt
    assert "written by another config (model.fpn_channels: 32 -> 16)" in err
    assert _files(out) == before  # the finished run's MLPerf log, results and records as they were
    code, output = check_compliance(out / "mlperf.log", tmp_path)
    assert code == 0, output


def test_a_checkpoint_of_another_run_does_not_resume_into_this_runs_folder(capsys, reference_run, base, tmp_path):
    out = _copy_run(reference_run, tmp_path)
    state = _run_state(out)
    state["run_id"] = "another-run"
    (out / "run.json").write_text(json.dumps(state))
    before = _files(out)
    checkpoint = reference_run / "checkpoints" / "ckpt-00000004.pt"
    err = _error(capsys, [*base(out), "--resume", checkpoint])
    assert f"checkpoint {checkpoint} belongs to run " in err and f"output_dir={out} holds run another-run" in err
    assert _files(out) == before


def test_a_damaged_run_record_is_one_sentence(capsys, reference_run, base, tmp_path):
    out = _copy_run(reference_run, tmp_path)
    (out / "run.json").write_text('{"format": "maskrcnn-train-run/1", "run_id": ')  # cut short by hand
    before = _files(out)
    err = _error(capsys, [*base(out), "--resume"])
    assert f"{out / 'run.json'} cannot be read" in err and "move it away" in err
    assert _files(out) == before


def test_extending_a_finished_run_trains_exactly_as_the_longer_run(reference_run, base, tmp_path):
    out = tmp_path / "run"
    subprocess.run([*MAIN, *base(out, "solver.max_iter=4")], check=True, env=ENV, capture_output=True)
    assert json.loads((out / "summary.json").read_text())["iterations"] == 4
    # The README's resume: the run folder alone (its config.yaml has the config and the data paths); what the
    # command line changes is recorded. A `--resume RUN KEY=VALUE`: the override is not taken for a path.
    result = subprocess.run([*MAIN, "--resume", str(out), "solver.max_iter=6", "data.prefetch=1"],
                            env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "the schedule's end moves on resume: solver.max_iter: 4 -> 6" in result.stdout
    assert "changed on resume: data.prefetch: 2 -> 1" in result.stdout
    resumed, reference = losses(out), losses(reference_run)
    assert {i: resumed[i] for i in reference} == reference
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, reference_run)]
    assert summaries[0]["parameter_digests"] == summaries[1]["parameter_digests"]
    attempts = _run_state(out)["attempts"]
    assert [(a["attempt"], a["notes"], a["ended"]) for a in attempts] == [
        (1, [], "finished"), (2, ["solver.max_iter: 4 -> 6", "data.prefetch: 2 -> 1"], "finished"),
    ]
    for log in ("mlperf.log", "mlperf-attempt-2.log"):  # each attempt's own, complete log
        code, output = check_compliance(out / log, tmp_path)
        assert code == 0, output
    assert '"key": "init_checkpoint_step", "value": 4' in (out / "mlperf-attempt-2.log").read_text()


@pytest.fixture(scope="module")
def other_shards(synthetic_coco, tmp_path_factory):
    """Training shards of other data: (other categories, the same data sharded otherwise)."""
    root = tmp_path_factory.mktemp("other_shards")
    annotations = make_synthetic_coco(root, "train", 4, seed=5, image_size=(64, 80), num_classes=2)
    shard_coco(root / "train2017", annotations, root / "two-classes", mode="train", samples_per_shard=4, seed=0)
    shard_coco(synthetic_coco.train_images, synthetic_coco.train_json, root / "resharded", mode="train",
               samples_per_shard=8, seed=0)
    return root / "two-classes", root / "resharded"


@pytest.mark.parametrize("case", ["image size", "categories", "shard set"])
def test_resume_refuses_what_changes_the_computation_naming_both_values(case, capsys, reference_run, other_shards, tmp_path):
    out = _copy_run(reference_run, tmp_path)
    before = _files(out)
    two_classes, resharded = other_shards
    checkpoint = out / "checkpoints" / "ckpt-00000006.pt"
    if case == "image size":
        argv, expected = ["data.min_size=56"], f"checkpoint {checkpoint} was written by another config (data.min_size: 64 -> 56)"
    elif case == "categories":  # another class count: one sentence, not a load_state_dict traceback
        argv, expected = ["--data", two_classes], (
            f"checkpoint {checkpoint} was trained on 8 categories (person, stop sign, giraffe, baseball bat ...), but "
            f"data.train_shards={two_classes} holds 2 categories (person, toothbrush); resume with the shards it was "
            f"trained on, or fine-tune it on these in a new output_dir with train.weights={checkpoint}"
        )
    else:
        argv, expected = ["--data", resharded], f"checkpoint {checkpoint} was trained on another shard set than data.train_shards={resharded}"
    assert expected in _error(capsys, ["--resume", out, *argv])
    assert _files(out) == before


def test_overrides_mix_with_flags_and_resume_never_swallows_one():
    args = parse_args(["solver.max_iter=8", "--data", "d", "--resume", "output_dir=X", "train.max_epochs=3", "--val-data", "v"])
    assert (args.data, args.val_data, args.resume) == ("d", "v", "auto")
    assert args.overrides == ["solver.max_iter=8", "output_dir=X", "train.max_epochs=3"]
    assert parse_args(["--resume", "runs/x/checkpoints/ckpt-00000004.pt"]).resume == "runs/x/checkpoints/ckpt-00000004.pt"


@pytest.mark.parametrize(
    "case",
    ["output_dir is a file", "output_dir under a file", "output_dir unwritable", "device cuda", "precision fp8", "backend",
     "no val data"],
)
def test_bad_lifecycle_values_end_in_one_sentence_before_anything_is_written(case, capsys, base, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    out, extra, expected = tmp_path / "run", [], ""
    if case == "output_dir is a file":
        out, expected = a_file, f"output_dir={a_file} cannot be a folder: {a_file} is a file"
    elif case == "output_dir under a file":
        out, expected = a_file / "run", f"output_dir={a_file}/run cannot be a folder: {a_file} is a file"
    elif case == "output_dir unwritable":
        out, expected = Path("/proc/maskrcnn-run"), "output_dir=/proc/maskrcnn-run cannot be written"
    elif case == "device cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra, expected = ["train.device=cuda"], "train.device=cuda but CUDA is not available"
    elif case == "precision fp8":  # the config's validation pass (train/config_schema.py) names the allowed values
        extra, expected = ["train.precision=fp8"], "train.precision must be one of auto, fp32, bf16, fp16"
    elif case == "no val data":  # evaluation needs val shards, or none is asked for
        extra, expected = ["data.val_shards="], (
            "data.val_shards (--val-data) is empty; pass a shard folder written by tools/shard_coco.py, "
            "or train without evaluation with eval.every_epochs=0"
        )
    else:
        extra, expected = ["data.backend=tourch"], "data.backend must be one of dali, torch"
    assert expected in _error(capsys, [*base(out), *extra])
    assert not (tmp_path / "run").exists() and a_file.read_text() == "not a folder"


def test_no_evaluation_needs_no_val_data_and_says_the_run_has_no_ap(train_shards, tmp_path):
    out = tmp_path / "run"
    argv = [*MAIN, "--config", DEMO, "--data", train_shards, *TINY, f"output_dir={out}", "eval.every_epochs=0", "solver.max_iter=2"]
    result = subprocess.run([str(a) for a in argv], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no evaluation (eval.every_epochs=0): the run ends without box and mask AP" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["iterations"], summary["box_ap"], summary["mask_ap"], summary["evaluated"]) == (2, None, None, False)
    assert not (out / "detections.json").exists()


# --- locks, signals and interrupted work -------------------------------------------------------------


def test_a_second_trainer_is_refused_and_sigterm_saves_then_resume_is_exact(capsys, reference_run, base, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([*MAIN, *base(out)], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "checkpoints" / "ckpt-00000002.pt").exists(), first, "first checkpoint")
    first.send_signal(signal.SIGSTOP)  # it holds the folder while a second trainer tries
    err = _error(capsys, [*base(out), "--resume"])
    assert f"output_dir={out} is in use by another trainer (pid {first.pid} on" in err
    first.send_signal(signal.SIGTERM)  # delivered when it continues
    first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=DEADLINE_S)
    assert first.returncode == 143, stderr
    last_line = _one_sentence(stderr.strip().splitlines()[-1])
    stopped_at = max(losses(out))
    assert stopped_at < 6, "the run finished before the signal"
    newest = out / "checkpoints" / f"ckpt-{stopped_at:08d}.pt"
    assert last_line == f"stopped by SIGTERM after iteration {stopped_at}; its newest checkpoint is {newest}: continue with --resume"
    assert list_checkpoints(out)[-1] == newest
    assert _run_state(out)["attempts"][-1]["ended"] == last_line

    subprocess.run([*MAIN, *base(out), "--resume"], check=True, env=ENV, capture_output=True)
    resumed, reference = losses(out), losses(reference_run)
    assert resumed == reference
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, reference_run)]
    assert summaries[0]["parameter_digests"] == summaries[1]["parameter_digests"]
    # each attempt's MLPerf log reads as what it is: the stopped one has no result, the resumed one does
    assert len(_run_state(out)["attempts"]) == 2  # the refused trainer began no attempt
    code, output = check_compliance(out / "mlperf.log", tmp_path)
    failures = [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR")) and "FAILED" not in line]
    assert code == 1 and failures == ["WARNING -  Required AT_LEAST_ONE occurrence of 'eval_accuracy' but found 0"], output
    run_stop = json.loads((out / "mlperf.log").read_text().splitlines()[-1].split(" ", 1)[1])
    assert (run_stop["key"], run_stop["metadata"]["status"], run_stop["metadata"]["ended"]) == ("run_stop", "aborted", "stopped")
    code, output = check_compliance(out / "mlperf-attempt-2.log", tmp_path)
    assert code == 0, output
    # tools/time_to_train.py says how each ended: stopped early; then the schedule's end before the (demo's) target
    for log, how in (("mlperf.log", "the attempt stopped early"), ("mlperf-attempt-2.log", "the schedule ended before the quality target")):
        result = subprocess.run([PYTHON, str(REPO / "tools" / "time_to_train.py"), str(out / log)], env=ENV,
                                capture_output=True, text=True)
        assert result.returncode == 1 and f"; status aborted; {how}; " in result.stdout, result.stdout + result.stderr


def test_ctrl_c_stops_with_a_checkpoint_and_no_traceback(base, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([*MAIN, *base(out, "solver.max_iter=100", "train.checkpoint_every=50")],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 1, process, "first step")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    stopped_at = max(losses(out))
    assert stderr.strip().splitlines()[-1].startswith(f"stopped by SIGINT after iteration {stopped_at}; its newest checkpoint is")
    assert list_checkpoints(out)[-1].name == f"ckpt-{stopped_at:08d}.pt"


def test_a_second_ctrl_c_stops_at_once_without_a_traceback_but_torchruns_copy_does_not(monkeypatch, capsys):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # an earlier in-process run's may write to a closed capture
    stop = StopRequest(DistributedContext(0, 1, 0, torch.device("cpu")), readback_every=50)
    clock = iter([100.0, 100.2, 101.5])  # the first press, torchrun's forwarded copy, a second press
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)
    assert stop.agreed(at_readback=False) == (signal.SIGINT, [0])
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("train.main.main", interrupted)
    assert run([]) == 130
    said = capsys.readouterr().err.strip().splitlines()
    assert "SIGINT received: stopping after this step with a checkpoint" in said[0]
    assert "stopped at once, without saving" in _one_sentence(said[-1])


def test_killed_during_an_evaluation_resume_runs_it(reference_run, base, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([*MAIN, *base(out)], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for(lambda: (out / "run.json").exists() and _run_state(out)["evaluations_due"], process, "due evaluation")
    process.send_signal(signal.SIGSTOP)
    due = _run_state(out)["evaluations_due"]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert due == [{"epoch": 1, "iteration": 6, "checkpoint": "ckpt-00000006.pt"}], "the evaluation ended before the kill"
    assert not (out / "summary.json").exists()

    result = subprocess.run([*MAIN, *base(out), "--resume"], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "running the evaluation of epoch 1 that the previous attempt did not finish" in result.stdout
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (out, reference_run))
    assert summary["box_ap"] is not None
    assert (summary["box_ap"], summary["mask_ap"]) == (reference["box_ap"], reference["mask_ap"])
    assert _run_state(out)["evaluations_due"] == []
    code, output = check_compliance(out / "mlperf-attempt-2.log", tmp_path)
    assert code == 0, output


def test_a_damaged_newest_checkpoint_resumes_from_the_newest_readable_one(capsys, reference_run, base, tmp_path):
    out = _copy_run(reference_run, tmp_path)
    damaged = out / "checkpoints" / "ckpt-00000006.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    err = _error(capsys, [*base(out), "--resume", damaged])  # named explicitly: an error
    assert f"checkpoint {damaged} cannot be read" in err
    result = subprocess.run([*MAIN, *base(out), "--resume"], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    older = out / "checkpoints" / "ckpt-00000004.pt"
    assert f"resuming from {older}, the newest readable checkpoint (damaged: ckpt-00000006.pt)" in result.stdout
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, reference_run)]
    assert summaries[0]["parameter_digests"] == summaries[1]["parameter_digests"]


def test_the_nonfinite_stop_names_the_checkpoint_it_kept_and_where_to_look(base, tmp_path):
    diverging = ["solver.base_lr=1000.0", "solver.warmup_iters=0", "train.max_nonfinite_in_a_row=1"]
    out = tmp_path / "run"
    result = subprocess.run([*MAIN, *base(out, *diverging)], env=ENV, capture_output=True, text=True)
    assert result.returncode == 2
    err = _one_sentence(result.stderr.strip().splitlines()[-1])
    newest = list_checkpoints(out)[-1]
    assert f"the run stopped; its newest checkpoint, {newest}, holds finite weights" in err
    assert "tools/shard_coco.py --verify --out" in err and "lower solver.base_lr" in err
    assert "last good checkpoint" not in err  # with no checkpoint yet it says so: tests/test_train_engine.py


# --- ranks and torchrun --------------------------------------------------------------------------------


def _workers(agent: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (children of the agent with RANK in their environment)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [e[5:] for e in environ if e.startswith(b"RANK=")]
        if parent == agent.pid and rank:
            found[int(rank[0])] = int(proc.name)
    return found


def _torchrun(*options: str) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", *options, MAIN[1]]


def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_exactly(reference_run, base, tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen([*_torchrun("--nproc_per_node=1", "--max-restarts=1"), *base(out)], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (out / "checkpoints" / "ckpt-00000002.pt").exists(), job, "first checkpoint")
    os.kill(_trainer_pid(out), signal.SIGKILL)  # the worker dies once; torchrun starts it again
    assert job.wait(timeout=DEADLINE_S) == 0
    resumed, reference = losses(out), losses(reference_run)
    assert resumed == reference
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, reference_run)]
    assert summaries[0]["parameter_digests"] == summaries[1]["parameter_digests"]
    attempts = _run_state(out)["attempts"]
    assert len(attempts) == 2 and attempts[0]["ended"] is None and attempts[1]["ended"] == "finished"
    assert attempts[1]["resumed_from"].startswith(str(out / "checkpoints" / "ckpt-"))


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(base, tmp_path):
    out = tmp_path / "run"
    extra = ["solver.ims_per_batch=4", "eval.ims_per_batch=4", "solver.max_iter=50", "train.checkpoint_every=100"]
    job = subprocess.Popen([*_torchrun("--nproc_per_node=2"), *base(out, *extra)], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 1, job, "first step")
    os.kill(_workers(job)[1], signal.SIGTERM)  # rank 1 only, as when a scheduler signals one process
    _, stderr = job.communicate(timeout=DEADLINE_S)
    stopped_at = max(losses(out))
    sentence = f"stopped by SIGTERM (received by rank 1) after iteration {stopped_at}"
    assert stderr.count(sentence) == 2, stderr  # the same step on both ranks
    assert "exitcode: 143" in stderr
    newest = list_checkpoints(out)[-1]
    assert newest.name == f"ckpt-{stopped_at:08d}.pt"
    positions = torch.load(newest, weights_only=True)["loader"]
    assert len(positions) == 2 and positions[0]["position"] == positions[1]["position"]


def test_the_liveness_watch_names_the_rank_whose_beat_stopped():
    store, said = dist.HashStore(), []
    cpu = torch.device("cpu")
    watches = [  # ranks 0 and 2 of 3 beat; rank 1 never starts (frozen from the beginning)
        LivenessWatch(DistributedContext(rank, 3, rank, cpu), store, timeout_s=1.0, on_silent=said.append) for rank in (0, 2)
    ]
    _wait_for(lambda: said, what="verdict")
    time.sleep(0.3)  # rank 2 watches rank 0, which beats: it stays quiet
    for watch in watches:
        watch.stop()
    assert said == [
        "rank 0: rank 1 stopped answering (no sign of life for 0.5 s: frozen, stopped, or its host unreachable), "
        "so the job ends; train.collective_timeout_s=1 sets this limit"
    ]


def test_a_frozen_rank_ends_the_job_naming_it(base, tmp_path):
    out = tmp_path / "run"
    extra = ["solver.ims_per_batch=4", "eval.ims_per_batch=4", "solver.max_iter=50", "train.collective_timeout_s=20"]
    job = subprocess.Popen([*_torchrun("--nproc_per_node=2"), *base(out, *extra)], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "checkpoints" / "ckpt-00000002.pt").exists(), job, "first checkpoint")
    workers = _workers(job)
    os.kill(workers[1], signal.SIGSTOP)
    _wait_for(lambda: not Path(f"/proc/{workers[0]}").exists() or
              Path(f"/proc/{workers[0]}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", job, "rank 0's exit")
    os.kill(workers[1], signal.SIGKILL)  # what torchrun does 30 s after its SIGTERM to a stopped process
    _, stderr = job.communicate(timeout=DEADLINE_S)
    assert job.returncode != 0
    assert "error: rank 0: rank 1 stopped answering (no sign of life for 10 s" in stderr, stderr
    assert "train.collective_timeout_s=20 sets this limit" in stderr


def test_the_demo_run_twice_starts_afresh_and_says_so(tmp_path):
    out = tmp_path / "demo"
    demo = [PYTHON, str(REPO / "tools" / "demo.py"), "--out", str(out), "--train-images", "8", "--val-images", "4",
            "--image-size", "64", "80", "--pictures", "1", *TINY, "solver.max_iter=2"]
    first = subprocess.run(demo, env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(demo, env=ENV, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert f"demo: starting afresh in {out}: removed the previous demo run (run.json, checkpoints," in second.stdout
    assert [a["attempt"] for a in _run_state(out)["attempts"]] == [1]
    assert json.loads((out / "demo.json").read_text())["iterations"] == 2
    (out / "demo.json").unlink()  # now the run there is not the demo's: the demo leaves it alone
    third = subprocess.run(demo, env=ENV, capture_output=True, text=True)
    assert third.returncode == 2 and "holds a training run that the demo did not make" in _one_sentence(third.stderr)

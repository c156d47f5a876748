"""Checkpoints: atomic writes, newest-readable resume, rotation of the run's own, RNG round trip, foreign configs."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from train.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    newest_readable_checkpoint,
    remove_abandoned_temporaries,
    restore_rng_states,
    save_checkpoint,
)
from train.config import load_config
from train.run_folder import RunFolder
from train.solver import build_optimizer

from faults import fill, small_disk
from train_standins import TinyLossModel

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"


def _save(tmp_path, model, optimizer, cfg, iteration, **kw):
    return save_checkpoint(
        tmp_path, model=model, optimizer=optimizer, scaler=None, iteration=iteration, epoch=1,
        loader_state={"consumed": iteration}, config=cfg, **kw,
    )


def test_round_trip_restores_model_optimizer_and_position(tmp_path):
    cfg = load_config(REFERENCE)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, cfg.solver, torch.device("cpu"))
    sum(model(torch.ones(2, 4)).values()).backward()
    optimizer.step()  # creates momentum buffers
    path = _save(tmp_path, model, optimizer, cfg, 7)
    state = load_checkpoint(path, cfg)
    assert (state["iteration"], state["epoch"], state["loader"]) == (7, 1, {"consumed": 7})
    fresh = TinyLossModel()
    fresh.load_state_dict(state["model"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    fresh_opt, _ = build_optimizer(fresh, cfg.solver, torch.device("cpu"))
    fresh_opt.load_state_dict(state["optimizer"])
    assert torch.equal(
        fresh_opt.state[fresh.trunk.weight]["momentum_buffer"], optimizer.state[model.trunk.weight]["momentum_buffer"]
    )


def test_a_failed_write_leaves_the_previous_checkpoint_newest(tmp_path):
    """On a real full disk (a tmpfs filled up): torch's zip writer fails ("unexpected pos"), the
    sentence names the checkpoint kept, and no temporary file is left."""
    cfg = load_config(REFERENCE)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, cfg.solver, torch.device("cpu"))
    with small_disk(tmp_path / "disk", 4) as disk:
        good = _save(disk, model, optimizer, cfg, 10)
        fill(disk)
        with pytest.raises(CheckpointWriteError, match=rf"cannot write checkpoint .*ckpt-00000020.pt .*the newest "
                                                       rf"checkpoint, {good}, is kept: free some space"):
            _save(disk, model, optimizer, cfg, 20)
        assert list_checkpoints(disk) == [good]
        assert sorted(p.name for p in good.parent.iterdir()) == [good.name]  # no temporary file left
        assert newest_readable_checkpoint(disk, cfg)[0] == good


def test_a_killed_writers_temporary_file_is_removed_by_the_next_trainer(tmp_path):
    """A kill -9 during a write leaves `.ckpt-*.pt.tmp-PID` (a whole checkpoint's bytes); the next trainer
    on the folder removes it, whatever its PID: holding the folder's lock, it is the only writer."""
    folder = checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    stale = [folder / f".ckpt-00000004.pt.tmp-{pid}" for pid in (os.getpid(), 999999)]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    kept = folder / "ckpt-00000002.pt"
    kept.write_bytes(b"a checkpoint")
    assert remove_abandoned_temporaries(tmp_path) == sorted(stale)
    assert sorted(folder.iterdir()) == [kept]


def test_rotation_keeps_the_newest_and_deletes_only_this_runs_checkpoints(tmp_path):
    cfg = load_config(REFERENCE)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, cfg.solver, torch.device("cpu"))
    foreign = _save(tmp_path, model, optimizer, cfg, 100)  # another run's file, copied in by hand
    folder = RunFolder(tmp_path).lock()
    folder.begin_attempt(run_id=None, resumed_from=None, notes=[])
    for iteration in (5, 10, 15, 20):
        folder.checkpoint_coming(f"ckpt-{iteration:08d}.pt")
        _save(tmp_path, model, optimizer, cfg, iteration, run_id=folder.run_id)
        folder.rotate(checkpoint_dir(tmp_path), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000015.pt", "ckpt-00000020.pt", foreign.name]
    folder.release()


def test_a_checkpoint_with_a_due_evaluation_is_not_rotated_away(tmp_path):
    cfg = load_config(REFERENCE)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, cfg.solver, torch.device("cpu"))
    folder = RunFolder(tmp_path).lock()
    folder.begin_attempt(run_id=None, resumed_from=None, notes=[])
    for iteration in (5, 10, 15):
        if iteration == 5:
            folder.evaluation_due(1, 5, "ckpt-00000005.pt")
        folder.checkpoint_coming(f"ckpt-{iteration:08d}.pt")
        _save(tmp_path, model, optimizer, cfg, iteration)
        folder.rotate(checkpoint_dir(tmp_path), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000005.pt", "ckpt-00000015.pt"]
    folder.evaluation_done(1, 5, {"bbox": {"AP": 0.1}, "segm": {"AP": 0.1}})
    folder.checkpoint_coming("ckpt-00000020.pt")
    _save(tmp_path, model, optimizer, cfg, 20)
    folder.rotate(checkpoint_dir(tmp_path), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000020.pt"]
    folder.release()


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, caplog):
    cfg = load_config(REFERENCE)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, cfg.solver, torch.device("cpu"))
    good = _save(tmp_path, model, optimizer, cfg, 10)
    damaged = _save(tmp_path, model, optimizer, cfg, 20)
    damaged.write_bytes(damaged.read_bytes()[:1000])  # cut short, as by a full disk or an interrupted copy
    path, state = newest_readable_checkpoint(tmp_path, cfg)
    assert path == good and state["iteration"] == 10
    assert f"resuming from {good}, the newest readable checkpoint (damaged: {damaged.name})" in caplog.text
    good.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints in .* can be read"):
        newest_readable_checkpoint(tmp_path, cfg)
    assert newest_readable_checkpoint(tmp_path / "elsewhere", cfg) is None
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(damaged, cfg)  # a checkpoint named explicitly stays an error


def test_rng_states_round_trip(tmp_path):
    cfg = load_config(REFERENCE)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, cfg.solver, torch.device("cpu"))
    path = _save(tmp_path, model, optimizer, cfg, 1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_states(load_checkpoint(path, cfg)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_a_checkpoint_from_another_config_is_one_clear_sentence(tmp_path):
    cfg = load_config(REFERENCE)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, cfg.solver, torch.device("cpu"))
    path = _save(tmp_path, model, optimizer, cfg, 3)
    other = load_config(REFERENCE, ["model.backbone.width=32"])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, other)
    message = str(error.value)
    assert "written by another config (model.backbone.width: 64 -> 32)" in message
    assert str(path) in message and "\n" not in message
    load_checkpoint(path, load_config(REFERENCE, ["output_dir=elsewhere", "eval.backend=faster"]))  # allowed
    load_checkpoint(path, load_config(REFERENCE, ["solver.max_iter=100000", "train.max_epochs=30"]))  # a moved end too


def test_missing_and_foreign_files_are_refused(tmp_path):
    cfg = load_config(REFERENCE)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", cfg)
    foreign = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint written by train/main.py"):
        load_checkpoint(foreign, cfg)

"""Checkpoints: atomic writes, newest-complete resume, RNG round trip, foreign configs."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from train.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from train.config import load_config
from train.solver import build_optimizer

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


def test_a_failed_write_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch):
    cfg = load_config(REFERENCE)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, cfg.solver, torch.device("cpu"))
    good = _save(tmp_path, model, optimizer, cfg, 10)

    def crash_halfway(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError):
        _save(tmp_path, model, optimizer, cfg, 20)
    assert list_checkpoints(tmp_path) == [good]
    assert sorted(p.name for p in good.parent.iterdir()) == [good.name]  # no temporary file left
    assert find_resume_checkpoint("auto", tmp_path) == good


def test_only_the_newest_are_kept_and_auto_picks_the_newest(tmp_path):
    cfg = load_config(REFERENCE)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, cfg.solver, torch.device("cpu"))
    for iteration in (5, 10, 15, 20):
        _save(tmp_path, model, optimizer, cfg, iteration, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000015.pt", "ckpt-00000020.pt"]
    assert find_resume_checkpoint("auto", tmp_path).name == "ckpt-00000020.pt"
    assert find_resume_checkpoint("", tmp_path) is None
    assert find_resume_checkpoint("auto", tmp_path / "elsewhere") is None


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


def test_missing_and_foreign_files_are_refused(tmp_path):
    cfg = load_config(REFERENCE)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", cfg)
    foreign = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint written by train/main.py"):
        load_checkpoint(foreign, cfg)

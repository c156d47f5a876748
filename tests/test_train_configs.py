"""The shipped configs: same keys and types as the reference; the recipes keep the closed division; what the demo changes."""

import re
from pathlib import Path

import pytest
import yaml

from train.config import Config, load_config
from train.solver import closed_division_violations, decay_step_multiple, lr_multiple

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Closed-division recipes, each from an accepted run or an MLPerf reference convergence point.
RECIPES = ["batch8_1gpu.yaml", "batch96_8gpu.yaml", "batch256_32gpu.yaml"]


def _leaves(cfg: Config, prefix: str = "") -> dict[str, type]:
    leaves = {}
    for key, value in cfg.items():
        if isinstance(value, Config):
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[prefix + key] = float if isinstance(value, int) and not isinstance(value, bool) else type(value)
    return leaves


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_has_the_reference_keys_and_types(path):
    reference = _leaves(load_config(CONFIGS / "reference.yaml"))
    # ints and floats are interchangeable where the reference holds a number
    assert _leaves(load_config(path)) == reference


def test_demo_keeps_the_base_lr_rule_and_says_what_it_breaks():
    problems = closed_division_violations(load_config(CONFIGS / "demo.yaml"))
    assert any(p.startswith("model.backbone.depth=14") for p in problems)
    assert any(p.startswith("solver.steps=") for p in problems)  # a 1,000-iteration schedule
    assert not [p for p in problems if p.startswith("solver.base_lr")], problems


def test_every_config_is_the_reference_the_demo_or_a_recipe():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(["reference.yaml", "demo.yaml", *RECIPES])


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_derives_from_the_reference_and_keeps_the_closed_division(name):
    path = CONFIGS / name
    text = path.read_text()
    own = yaml.safe_load(text)
    assert own["base"] == "reference.yaml"
    reference = load_config(CONFIGS / "reference.yaml")
    cfg = load_config(path, ["train.weights=R-50.pkl"])
    for key, value in _own_leaves(own):  # lists only what it changes
        assert value != _lookup(reference, key), f"{name} repeats the reference's {key}"
    assert closed_division_violations(cfg) == []
    # The provenance comment names the K1 and K2 the schedule implies.
    k1, k2 = (int(re.search(rf"{k} = (\d+)", text)[1]) for k in ("K1", "K2"))
    assert lr_multiple(cfg.solver.base_lr, cfg.solver.ims_per_batch) == k1
    assert decay_step_multiple(cfg.solver.steps, cfg.solver.ims_per_batch) == k2
    assert "training_results_v3.0" in text or "rcps_maskrcnn.json" in text


def _own_leaves(data: dict, prefix: str = ""):
    for key, value in data.items():
        if key == "base":
            continue
        if isinstance(value, dict):
            yield from _own_leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _lookup(cfg: Config, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, tuple) else cfg

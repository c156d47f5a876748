"""The shipped configs: same keys and types as the reference; what the demo changes."""

from pathlib import Path

import pytest

from train.config import Config, load_config
from train.solver import closed_division_violations

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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

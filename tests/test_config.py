"""The config loader: overrides keep types, unknown keys name the closest valid key, frozen."""

from pathlib import Path

import pytest

from train.config import ConfigError, load_config

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"


def test_overrides_apply_in_order_and_keep_types():
    cfg = load_config(REFERENCE, ["solver.base_lr=1", "solver.base_lr=0.04", "data.static_shapes=false"])
    assert cfg.solver.base_lr == 0.04 and isinstance(cfg.solver.base_lr, float)
    assert cfg.data.static_shapes is False
    assert cfg.model.rpn.anchor_sizes == (32, 64, 128, 256, 512)


def test_int_override_becomes_float_where_the_file_has_a_float():
    assert load_config(REFERENCE, ["solver.momentum=1"]).solver.momentum == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("solver.base_l=0.1", "did you mean 'solver.base_lr'"),
        ("solver.base_lr=fast", "must be a float"),
        ("data.static_shapes=1", "must be a bool"),
        ("solver", "KEY=VALUE"),
        ("model.rpn=3", "must be a"),
    ],
)
def test_bad_overrides_say_what_to_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REFERENCE, [override])


def test_config_is_frozen_and_round_trips_through_yaml(tmp_path):
    cfg = load_config(REFERENCE, ["seed=7"])
    with pytest.raises(AttributeError):
        cfg.seed = 3
    saved = tmp_path / "resolved.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved).to_dict() == cfg.to_dict()


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_config_holds_only_what_it_changes_over_its_base(tmp_path):
    child = tmp_path / "small.yaml"
    child.write_text(f"base: {REFERENCE}\nsolver:\n  base_lr: 0.01\nmodel:\n  rpn:\n    anchor_sizes: [16, 32, 64, 128, 256]\n")
    cfg = load_config(child, ["seed=3"])
    reference = load_config(REFERENCE)
    assert cfg.solver.base_lr == 0.01 and cfg.seed == 3
    assert cfg.model.rpn.anchor_sizes == (16, 32, 64, 128, 256)
    assert cfg.model.roi_heads.to_dict() == reference.model.roi_heads.to_dict()
    assert "base" not in cfg


def test_a_typo_in_a_derived_config_names_the_file_and_the_closest_key(tmp_path):
    child = tmp_path / "typo.yaml"
    child.write_text(f"base: {REFERENCE}\nsolver:\n  base_rl: 0.01\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'solver.base_rl'; did you mean 'solver.base_lr'"):
        load_config(child)

"""The config loader: overrides keep types, unknown keys name the closest valid key, one validation
pass names the key, what it may hold and where a bad value came from; frozen."""

import re
from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, load_config, load_saved_config
from train.config_schema import SCHEMA

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"


def test_overrides_apply_in_order_and_keep_types():
    cfg = load_config(REFERENCE, ["solver.base_lr=1", "solver.base_lr=0.04", "data.static_shapes=false"])
    assert cfg.solver.base_lr == 0.04 and isinstance(cfg.solver.base_lr, float)
    assert cfg.data.static_shapes is False
    assert cfg.model.rpn.anchor_sizes == (32, 64, 128, 256, 512)


def test_int_override_becomes_float_where_the_file_has_a_float():
    cfg = load_config(REFERENCE, ["solver.base_lr=1", "solver.weight_decay=1e-4"])
    assert cfg.solver.base_lr == 1.0 and isinstance(cfg.solver.base_lr, float)
    assert cfg.solver.weight_decay == 1e-4  # PyYAML reads 1e-4 as a string; the schema takes it as a number


@pytest.mark.parametrize(
    "override, message",
    [
        ("solver.base_l=0.1", "did you mean 'solver.base_lr'"),
        ("solver.base_lr=fast", "solver.base_lr must be a number > 0"),
        ("data.static_shapes=1", "data.static_shapes must be true or false"),
        ("solver", "KEY=VALUE"),
        ("model.rpn=3", r"model.rpn is a section, not a value \(from override model.rpn=3\)"),
        ("data.backend=tourch", r"data.backend='tourch' \(from override data.backend=tourch\) is not allowed: "
                                r"data.backend must be one of dali, torch$"),
        ("train.precision=fp8", "train.precision must be one of auto, fp32, bf16, fp16$"),
        ("solver.ims_per_batch=0", "solver.ims_per_batch must be an integer >= 1$"),
        ("solver.base_lr=-0.02", "solver.base_lr must be a number > 0$"),
        ("solver.weight_decay=-1.0", "solver.weight_decay must be a number >= 0$"),
        ("eval.every_epochs=-1", "eval.every_epochs must be an integer >= 0$"),
        ("data.flip_prob=1.5", r"data.flip_prob must be a number in \[0, 1\]$"),
        ("solver.steps=[80000, 60000]", "solver.steps must be a list of increasing values, each an integer >= 0$"),
        ("model.rpn.anchor_sizes=[32, 64]", "must be a list of 5 increasing values"),
        ("data.buckets=[[800, 1344], [1344]]", "data.buckets must be a list of 1\\+ values, each a list of 2 values"),
        ("data.min_size=2000", r"data.min_size=2000 \(from override data.min_size=2000\) must be at most data.max_size, "
                               r"which is 1333 \(from .*reference.yaml\)$"),
        ("seed={a: 1}", r"seed takes a value, not a section of keys \(from override seed=\{a: 1\}\)$"),
        ("data.buckets=[[800, 1344]", r"override 'data.buckets=\[\[800, 1344\]' is not valid YAML \(expected ',' or ']'"),
    ],
)
def test_bad_overrides_say_what_to_fix(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(REFERENCE, [override])
    assert "\n" not in str(error.value) and len(str(error.value)) < 250


def test_a_section_overridden_by_a_scalar_is_one_short_sentence():
    with pytest.raises(ConfigError) as error:
        load_config(REFERENCE, ["model=3"])
    assert str(error.value) == "model is a section, not a value (from override model=3); set one of its keys, e.g. model.convention=..."


def test_no_evaluation_is_a_valid_setting():
    assert load_config(REFERENCE, ["eval.every_epochs=0"]).eval.every_epochs == 0


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    child = tmp_path / "bad.yaml"
    child.write_text(f"base: {REFERENCE}\ndata:\n  backend: tourch\n")
    with pytest.raises(ConfigError, match=rf"data.backend='tourch' \(from {child}\) is not allowed"):
        load_config(child)
    broken = tmp_path / "broken.yaml"
    broken.write_text("solver:\n  base_lr: [0.02\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML \(.* at line \d+, column \d+\); fix the file$"):
        load_config(broken)


def test_every_reference_key_has_a_rule_and_every_rule_a_key():
    def leaves(data, prefix=""):
        for key, value in data.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]

    assert sorted(leaves(yaml.safe_load(REFERENCE.read_text()))) == sorted(SCHEMA)


def test_the_shipped_configs_pass_the_validation():
    for path in REFERENCE.parent.glob("*.yaml"):
        load_config(path)


def test_a_saved_config_comes_back_with_overrides_on_top_and_old_keys_dropped():
    saved = load_config(REFERENCE.parent / "demo.yaml").to_dict()
    saved["model"]["num_classes"] = 5  # a key older checkpoints have
    cfg = load_saved_config(saved, "checkpoint ckpt.pt", ["eval.ims_per_batch=2"])
    assert cfg.model.to_dict() == load_config(REFERENCE.parent / "demo.yaml").model.to_dict()
    assert cfg.eval.ims_per_batch == 2
    saved["data"]["backend"] = "tourch"
    with pytest.raises(ConfigError, match=r"\(from checkpoint ckpt.pt\) is not allowed"):
        load_saved_config(saved, "checkpoint ckpt.pt")


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
    with pytest.raises(ConfigError, match=r"unknown config key 'solver.base_rl' \(from .*typo.yaml\); did you mean 'solver.base_lr'"):
        load_config(child)


def test_a_retired_key_names_the_file_and_the_keys_that_replaced_it(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(f"base: {REFERENCE}\ndata:\n  num_threads: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(old)
    message = str(error.value)
    assert "\n" not in message
    for part in ("data.num_threads", str(old), "retired", "data.dali_threads", "data.torch_workers"):
        assert part in message, (part, message)
    with pytest.raises(ConfigError, match=r"data.num_threads \(from override data.num_threads=2\) is retired"):
        load_config(REFERENCE, ["data.num_threads=2"])
    complete = tmp_path / "old_reference.yaml"  # a copy of an old reference.yaml, with no base
    complete.write_text(Path(REFERENCE).read_text().replace("dali_threads:", "num_threads:"))
    with pytest.raises(ConfigError, match=rf"data.num_threads \(from {re.escape(str(complete))}\) is retired"):
        load_config(complete)

"""tools/bench_checkpoint.py: the checkpoints a recipe writes on its way to the target, and the tool on the reference model."""

from __future__ import annotations

import json

import pytest

from tools.bench_checkpoint import GOAL_IMAGES_PER_S_PER_GPU, TRAIN_IMAGES, recipe_costs


def test_recipe_costs_count_epoch_ends_and_periodic_saves():
    rows = {row["recipe"]: row for row in recipe_costs(save_s=2.0)}
    eight = rows["batch96_8gpu.yaml"]
    # 14 epochs of 117,266 images at batch 96: 17,101 iterations, 8 saves every 2,000 and 14 at epoch ends
    assert (eight["iterations"], eight["checkpoint_every"], eight["saves"]) == (17101, 2000, 22)
    assert eight["training_s"] == pytest.approx(14 * TRAIN_IMAGES / (8 * GOAL_IMAGES_PER_S_PER_GPU))
    assert eight["share"] == pytest.approx(22 * 2.0 / eight["training_s"])
    assert rows["batch8_1gpu.yaml"]["saves"] == 12 + 186160 // 2000


@pytest.mark.slow
def test_the_tool_saves_and_loads_the_reference_model_with_its_momentum(tmp_path):
    from tools.bench_checkpoint import get_args_parser, main

    figures = main(get_args_parser().parse_args(["--out", str(tmp_path), "--repeat", "1", "--json", str(tmp_path / "f.json")]))
    assert json.loads((tmp_path / "f.json").read_text())["bytes"] == figures["bytes"]
    # float32 weights and one momentum buffer per trainable parameter, plus the config and RNG states
    assert 4 * (figures["parameters"] + figures["trainable"]) < figures["bytes"] < 4 * (figures["parameters"] + figures["trainable"]) * 1.02
    assert figures["save_s"] > 0 and figures["load_s"] > 0 and not list(tmp_path.glob("*/*.pt"))

"""MLPerf log lines: the keys and values the 3.1.0 maskrcnn rules check, parsed by mlperf_logging."""

from pathlib import Path

import pytest
import torch
from mlperf_logging.compliance_checker.mlp_parser import parse_file

from train.config import load_config
from train.distributed import init_distributed, pick_device
from train.mlperf_log import MLPerfLog, log_eval_accuracy, log_hyperparameters, log_submission

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"


def test_hyperparameter_keys_and_values(tmp_path):
    cfg = load_config(REFERENCE, ["solver.ims_per_batch=96", "solver.base_lr=0.12", "solver.steps=[12000, 16000]"])
    path = tmp_path / "mlperf.log"
    mlog = MLPerfLog(path)
    log_submission(mlog, cfg)
    log_hyperparameters(mlog, cfg, train_samples=117266, eval_samples=5000, images_per_rank=12)
    log_eval_accuracy(mlog, epoch=3, box_ap=0.2, mask_ap=0.1)
    mlog.close()
    lines, errors = parse_file(str(path), ruleset="3.1.0")
    assert errors == []
    values = {line.key: line.value["value"] for line in lines}
    assert values["submission_benchmark"] == "maskrcnn"
    assert values["global_batch_size"] == 96
    assert values["opt_base_learning_rate"] == 0.12
    assert values["opt_learning_rate_decay_steps"] == [12000, 16000]
    assert values["opt_learning_rate_decay_factor"] == 0.1
    assert values["opt_learning_rate_warmup_steps"] == 500
    assert values["min_image_size"] == 800 and values["max_image_size"] == 1333
    assert values["num_image_candidates"] == 12000  # the top 1000 x 12 over each GPU's 12 images, as NVIDIA's log
    assert values["train_samples"] == 117266 and values["eval_samples"] == 5000
    assert values["gradient_accumulation_steps"] == 1 and values["seed"] == 1
    assert values["eval_accuracy"] == {"BBOX": 0.2, "SEGM": 0.1}
    accuracy = next(line for line in lines if line.key == "eval_accuracy")
    assert accuracy.value["metadata"]["epoch_num"] == 3


@pytest.mark.parametrize("per_batch, images_per_rank, expected", [(True, 12, 12000), (True, 1, 1000), (False, 8, 1000)])
def test_num_image_candidates_per_image_or_over_each_ranks_batch(tmp_path, per_batch, images_per_rank, expected):
    cfg = load_config(REFERENCE, [f"model.rpn.post_nms_per_batch={str(per_batch).lower()}"])
    path = tmp_path / "mlperf.log"
    mlog = MLPerfLog(path)
    log_hyperparameters(mlog, cfg, train_samples=16, eval_samples=8, images_per_rank=images_per_rank)
    mlog.close()
    lines, errors = parse_file(str(path), ruleset="3.1.0")
    assert errors == []
    assert {line.key: line.value["value"] for line in lines}["num_image_candidates"] == expected


def test_other_ranks_write_nothing(tmp_path):
    mlog = MLPerfLog(None)
    mlog.event("seed", 1)
    mlog.close()
    assert list(tmp_path.iterdir()) == []


def test_a_single_process_needs_no_process_group():
    ctx = init_distributed("cpu", env={})
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert ctx.device == torch.device("cpu")
    ctx = init_distributed("cpu", env={"RANK": "1", "WORLD_SIZE": "1", "LOCAL_RANK": "1"})
    assert not ctx.is_main
    if not torch.cuda.is_available():
        assert pick_device("auto", 3) == torch.device("cpu")

"""What a long run prints: plain lines for cluster logs, progress while evaluating, no COCO API chatter.

A tiny run of train/main.py with stdout piped (as in a batch job) must print one plain line per
loss readback with the iteration, losses, LR, images/s, data wait and the whole run's ETA, no
progress bar (`\\r`), the evaluation's progress and one result line per epoch, and none of pycocotools'
'loading annotations...' / 'DONE (t=...)' lines. The ETA arithmetic is checked by hand.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.model_helpers import TINY_RUN
from train.config import load_config
from train.engine import LoggedStep
from train.evaluation import inference_on_dataset
from train.metrics import RunPlan, RunReporter, format_duration

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
TINY = [*TINY_RUN, "solver.max_iter=4", "solver.steps=[3, 4]", "solver.warmup_iters=1", "train.loss_readback_every=2"]
CHATTER = ("loading annotations into memory", "index created!", "DONE (t=", "Loading and preparing results",
           "Running per image evaluation", "Accumulating evaluation results")


def test_a_piped_run_prints_plain_lines_and_no_chatter(train_shards, val_shards, synthetic_coco, tmp_path):
    command = [sys.executable, str(REPO / "train" / "main.py"), "--config", str(DEMO), "--data", str(train_shards),
               "--val-data", str(val_shards), "--val-annotations", str(synthetic_coco.val_json), *TINY,
               f"output_dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "\r" not in out and "it/s" not in out  # no tqdm bar in a log file
    lines = [line for line in out.splitlines() if re.search(r"\] iter \d+/", line)]
    assert len(lines) == 2  # iterations 2 and 4: one line per readback
    pattern = (r"iter (\d+)/4  loss \d+\.\d{3} \(objectness \d+\.\d{3} rpn_box_reg \d+\.\d{3} classifier \d+\.\d{3} "
               r"box_reg \d+\.\d{3} mask \d+\.\d{3}\)  lr [\d.e-]+  \d+\.\d img/s  data wait \d+ ms/it  ETA \S+$")
    assert [int(re.search(pattern, line)[1]) for line in lines] == [2, 4]
    assert re.search(r"inference: \d+ images .* \d+\.\d images/s", out)
    # One line per evaluation, not COCOeval's tables (tools/evaluate.py prints those); one line at the end.
    assert re.search(r"epoch 1 \(iteration 4\): box AP \d\.\d{4}, mask AP \d\.\d{4}; training waited", out)
    assert "Average Precision" not in out and "COCOeval bbox" not in out
    assert re.search(r"run ended: 4 iterations, 1 epoch; box AP \d\.\d{4}, mask AP \d\.\d{4}; .*; summary in ", out)
    assert out.count("\n{") == 0  # the summary is in summary.json, not dumped on the console
    for chatter in CHATTER:
        assert chatter not in out, chatter
    assert "resolved config saved to" in out and "model:\n" not in out  # the config is in config.yaml, not the console


def test_the_eta_counts_the_remaining_iterations_and_evaluations():
    plan = RunPlan(total_iterations=100, iterations_per_epoch=10, eval_every_epochs=2)
    assert plan.evaluations_after(35) == 4  # after epochs 4, 6, 8 and 10
    assert RunPlan(95, 10, 3).evaluations_after(0) == 4  # epochs 3, 6, 9 and the last, 10
    assert RunPlan(100, 10, 0).evaluations_after(0) == 0  # eval.every_epochs=0: none
    reporter = RunReporter("unused", enabled=False, global_batch=2, plan=plan)
    assert reporter.eta_seconds(35, 0.5) == pytest.approx(65 * 0.5)  # no evaluation timed yet
    reporter._eval_seconds = [10.0, 14.0]
    assert reporter.eta_seconds(35, 0.5) == pytest.approx(65 * 0.5 + 4 * 12.0)
    cfg = load_config(DEMO, ["solver.max_iter=1000", "train.max_epochs=3"])
    assert RunPlan.of(cfg, 46).total_iterations == 138  # the epochs end it before max_iter
    assert [format_duration(s) for s in (42, 185, 3725)] == ["42s", "3m05s", "1h02m"]


@pytest.mark.parametrize("terminal", [True, False])
def test_the_bar_is_drawn_only_on_a_terminal(terminal, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)
    reporter = RunReporter(tmp_path, enabled=True, global_batch=2, plan=RunPlan(10, 10, 1))
    reporter.start_epoch(0, 10)
    with caplog.at_level("INFO"):
        reporter.steps([LoggedStep(2, {"loss_mask": 0.5}, 0.5, 0.01, False)])
    reporter.close()
    assert "iter 2/10  loss 0.500 (mask 0.500)  lr 0.01" in caplog.text
    assert ("it/s" in capsys.readouterr().out) is terminal


class _Batch:
    images = torch.zeros(4, 3, 8, 8)

    def __len__(self):
        return 4


class _Model(torch.nn.Module):
    def forward(self, batch):
        return batch


class _Evaluator:
    def reset(self):
        self.seen = 0

    def process(self, batch, detections):
        self.seen += len(batch)

    def evaluate(self):
        return {"seen": self.seen}


def test_inference_reports_its_progress(capsys):
    batches = [_Batch()] * 3
    evaluator = _Evaluator()
    assert inference_on_dataset(_Model(), batches, evaluator, progress_every_s=0.0) == {"seen": 12}
    lines = capsys.readouterr().out.splitlines()
    assert [re.match(r"inference: (\d)/3 batches, (\d+) images, [\d.]+ images/s, ETA \d+s$", line).groups()
            for line in lines[:3]] == [("1", "4"), ("2", "8"), ("3", "12")]
    assert lines[3].startswith("inference: 12 images (padded repeats included) in 3 batches")

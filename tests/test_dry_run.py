"""How the dry runs and the GPU check time the training step (at LR 0, every timed step's losses
read back and checked), and how the trainer builds its optimizer and DDP wrapper for the GPU:
checked on the CPU, the CUDA calls replaced by recorders."""

import contextlib
import json
import logging
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model import build_model
from model.synthetic_batch import synthetic_batch
from tests.model_helpers import TINY, model_config
from tools.gpu_check import REHEARSAL
from train import dry_run
from train.config import load_config
from train.cuda_graphs import graph_static_part
from train.distributed import DistributedContext, data_parallel, init_distributed, join_process_group
from train.dry_run import hold_weights, run_dry_runs
from train.throughput import measure, timed_seconds
from train.engine import NonFiniteLossError, TrainingStep, make_grad_scaler, step_autocast
from train.solver import build_optimizer

from train_standins import TinyLossModel, tiny_batches

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_train_step_calls_its_lap_hook_at_each_stage_end(precision):
    model = TinyLossModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    laps = []
    step = TrainingStep(model, optimizer, make_grad_scaler(precision, CPU), step_autocast(precision, CPU, cuda_graphs=False), CPU)
    step(tiny_batches(1)[0], lap=laps.append)
    assert laps == ["forward", "backward", "optimizer"]


class CudaRecorder:
    """Stands in for torch.cuda's events and synchronize, recording the order of calls."""

    def __init__(self, monkeypatch):
        self.calls = []
        recorder = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.at = None

            def record(self):
                recorder.calls.append("record")
                self.at = len(recorder.calls)

            def synchronize(self):
                recorder.calls.append("wait for event")

            def elapsed_time(self, end):
                return 1000.0 * (end.at - self.at)  # ms: one second per call in between

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.calls.append("synchronize"))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**30)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 2**31)


def test_cuda_timing_waits_only_after_the_timed_steps(monkeypatch):
    cuda = CudaRecorder(monkeypatch)
    seconds, _ = timed_seconds(lambda: cuda.calls.extend(["step", "step"]), CUDA)
    assert cuda.calls == ["record", "step", "step", "record", "wait for event"]
    assert seconds == 3.0


def test_measure_times_plain_steps_then_breaks_down_separately(monkeypatch):
    cuda = CudaRecorder(monkeypatch)

    def step(lap):
        cuda.calls.append("step")
        lap("forward")
        return {"loss": torch.tensor(1.0)}

    result = measure("model", step, iters=3, images_per_iter=4, device=CUDA, warmup=2, breakdown=2)
    timed = cuda.calls[cuda.calls.index("record") : cuda.calls.index("wait for event") + 1]
    assert timed == ["record", "step", "step", "step", "record", "wait for event"]  # nothing waits in between
    assert cuda.calls[:2] == ["step", "step"]  # warm-up
    assert cuda.calls[-5:] == ["synchronize", "step", "synchronize", "step", "synchronize"]  # breakdown laps
    assert result["images_per_s"] == pytest.approx(12 / 4.0)
    assert set(result["stages_s_per_iter"]) == {"forward"}
    assert result["peak_memory_gib"] == 1.0


def test_measure_reports_every_timed_steps_losses_and_names_the_non_finite_ones(caplog):
    values = iter([1.0, 2.0, float("nan"), 4.0, float("inf"), 6.0])  # warm-up, 3 timed, breakdown

    def step(lap):
        value = next(values)
        return {"loss_a": torch.tensor(value), "loss_b": torch.tensor(0.5)}

    with caplog.at_level(logging.INFO, logger="train.throughput"):
        result = measure("model", step, iters=3, images_per_iter=2, device=CPU, warmup=1, breakdown=2)
    assert [row["loss_a"] for row in result["losses"][:1]] == [2.0] and result["losses"][0]["total"] == 2.5
    assert math.isnan(result["losses"][1]["total"]) and result["losses"][2] == {"loss_a": 4.0, "loss_b": 0.5, "total": 4.5}
    assert result["nonfinite_steps"] == [2] and result["losses_finite"] is False  # the breakdown's inf is not a timed step
    assert result["images_per_s"] > 0  # the figures stay, for the caller to keep
    progress = [r.getMessage() for r in caplog.records if ": " in r.getMessage() and " step " in r.getMessage()]
    assert [m.split(": ")[1].split(" at ")[0] for m in progress] == [
        "warm-up step 1/1", "timed step 1/3", "timed step 2/3", "timed step 3/3", "breakdown step 1/2", "breakdown step 2/2"]


def test_hold_weights_runs_the_optimizers_whole_step_but_keeps_the_weights():
    torch.manual_seed(0)
    model = TinyLossModel()
    optimizer, _ = build_optimizer(model, load_config(REFERENCE).solver, CPU)
    step = TrainingStep(model, optimizer, None, step_autocast("fp32", CPU, cuda_graphs=False), CPU)
    hold_weights(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    for batch in tiny_batches(2):
        step(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(b is not None and b.abs().sum() > 0 for b in buffers)  # momentum and weight decay ran


def test_the_model_dry_run_of_random_reference_weights_reports_finite_losses_for_every_timed_step(tmp_path, caplog):
    # At the schedule's LR these weights give NaN from the second step on (tools/gpu_check.py's rehearsal shows it).
    # the reference model at a quarter of its width, 64x96; traced (train/trace.py), which must not change what it reports
    cfg = load_config(REFERENCE, [*REHEARSAL.overrides, f"train.trace={tmp_path / 'model.json'}"])
    ctx = init_distributed(cfg.train.device, env={})
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO):
            results = run_dry_runs("model", cfg, ctx, iters=2, report=str(tmp_path / "R.json"))
    finally:
        torch.set_num_threads(threads)  # configure_torch set one thread for this process
    model = json.loads((tmp_path / "R.json").read_text())["model"]
    assert model == json.loads(json.dumps(results["model"]))
    assert model["image_size"] == [64, 96] and len(model["losses"]) == 2
    assert model["losses_finite"] and all(math.isfinite(v) for row in model["losses"] for v in row.values())
    assert set(model["losses"][0]) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                                       "loss_mask", "total"}
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("building the model (random weights)") and "LR 0" in model["setup"]
    assert sum(" step " in m for m in messages) == 3 + 2 + 3  # warm-up, timed, breakdown: each step shows
    ops = {row["op"]: row["count"] for row in model["trace_ops"]}
    assert ops == {"step": 2, "forward": 2, "backward": 2, "optimizer": 2}  # the timed steps' phases, nothing else
    assert json.loads((tmp_path / "model.json").read_text())["otherData"]["images"] == 2 * 2


def test_a_dry_run_with_non_finite_losses_writes_its_report_then_stops_in_one_sentence(tmp_path, monkeypatch):
    figures = {"images_per_s": 3.0, "losses": [{"total": float("nan")}], "nonfinite_steps": [1], "losses_finite": False}
    monkeypatch.setitem(dry_run.RUNNERS, "model", lambda cfg, ctx, iters, traces: figures)
    ctx = init_distributed("cpu", env={})
    with pytest.raises(NonFiniteLossError, match=r"non-finite losses \(model: steps \[1\]\); its figures are in .*R.json"):
        run_dry_runs("model", load_config(REFERENCE), ctx, iters=1, report=str(tmp_path / "R.json"))
    assert json.loads((tmp_path / "R.json").read_text())["model"]["images_per_s"] == 3.0


def test_graph_capture_takes_only_the_buckets_asked_for():
    captured = []
    model = SimpleNamespace(static_part=SimpleNamespace(capture=lambda shapes, images, autocast: captured.append(shapes)))
    cfg, cuda = load_config(REFERENCE), DistributedContext(0, 1, 0, CUDA)
    graph_static_part(model, cfg, cuda, contextlib.nullcontext, buckets=[(800, 1344)])
    graph_static_part(model, cfg, cuda, contextlib.nullcontext)
    assert captured == [[(800, 1344)], [(800, 1344), (1344, 800)]]


def test_measure_counts_graph_replays():
    torch.manual_seed(0)
    model = build_model(model_config(*TINY), num_classes=4).train()
    batch = synthetic_batch(2, (96, 128), num_classes=4, max_gt=3, seed=0)
    calls = []

    def stand_in(images, image_sizes):  # a graph that replays the eager computation
        calls.append(1)
        return model.static_part.compute(images, image_sizes)

    model.static_part.capture([batch.images.shape[-2:]], len(batch), contextlib.nullcontext,
                              graph_maker=lambda module, sample: stand_in)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step = TrainingStep(model, optimizer, None, contextlib.nullcontext, CPU)
    result = measure("model", lambda lap: step(batch, lap), iters=2, images_per_iter=2, device=CPU, warmup=1, breakdown=1,
                     replays=lambda: step.graph_replays)
    assert result["graph_replays_per_step"] == 1.0 and len(calls) == 4
    assert set(result["stages_s_per_iter"]) == {"forward", "backward", "optimizer"}


def test_auto_optimizer_with_a_grad_scaler_is_torch_fused_sgd(monkeypatch):
    # apex's FusedSGD makes GradScaler.step read found-inf on the host every step; torch's does not.
    class ApexFusedSGD(torch.optim.SGD):
        pass

    monkeypatch.setattr("train.solver._apex_fused_sgd", lambda: ApexFusedSGD)
    solver = load_config(REFERENCE).solver
    _, without_scaler = build_optimizer(TinyLossModel(), solver, CUDA)
    optimizer, with_scaler = build_optimizer(TinyLossModel(), solver, CUDA, grad_scaling=True)
    assert without_scaler == "apex.optimizers.FusedSGD"
    assert with_scaler == "torch.optim.SGD(fused=True)" and optimizer._step_supports_amp_scaling


def test_ddp_broadcasts_buffers_only_where_they_change(monkeypatch):
    with socket.socket() as s:  # a free port: other test runs may share this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    join_process_group(0, 1, CPU)
    try:
        frozen = build_model(model_config(*TINY, "model.backbone.norm=frozen_bn"), num_classes=4)
        trainable = build_model(model_config(*TINY, "model.backbone.norm=bn"), num_classes=4)
        assert data_parallel(frozen, CPU).broadcast_buffers is False
        assert data_parallel(trainable, CPU).broadcast_buffers is True
    finally:
        torch.distributed.destroy_process_group()

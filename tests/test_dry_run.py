"""How the dry runs and the GPU check time the training step, and how the trainer builds its
optimizer and DDP wrapper for the GPU: checked on the CPU, the CUDA calls replaced by recorders."""

import contextlib
import socket
from pathlib import Path

import pytest
import torch

from model import build_model
from model.synthetic_batch import synthetic_batch
from tests.model_helpers import TINY, model_config
from train.config import load_config
from train.distributed import data_parallel, join_process_group
from train.throughput import measure, timed_seconds
from train.engine import TrainingStep, make_grad_scaler, step_autocast
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

    result = measure("model", step, iters=3, images_per_iter=4, device=CUDA, warmup=2, breakdown=2)
    timed = cuda.calls[cuda.calls.index("record") : cuda.calls.index("wait for event") + 1]
    assert timed == ["record", "step", "step", "step", "record", "wait for event"]  # nothing waits in between
    assert cuda.calls[:2] == ["step", "step"]  # warm-up
    assert cuda.calls[-5:] == ["synchronize", "step", "synchronize", "step", "synchronize"]  # breakdown laps
    assert result["images_per_s"] == pytest.approx(12 / 4.0)
    assert set(result["stages_s_per_iter"]) == {"forward"}
    assert result["peak_memory_gib"] == 1.0


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

"""Traces of the loaders and the step (train/trace.py) from the loaders' one timer (pipeline/loader.py `StageTimer`).

The trace is valid trace-event JSON (checked against the format's own rules: no trace parser
runs offline here), every span lies inside its thread's parent (and the parent is the one the
code nests it in), the per-op table's totals are the spans' sums and the per-stage figures
the same spans' sums, a deliberately slowed stage is the largest op, and a timer that is not
tracing keeps nothing per span.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from pipeline import loader as loader_module, torch_loader
from pipeline.loader import STAGE_OPS, StageTimer, build_loader
from pipeline_shards import REFERENCE_CONFIG, data_config
from train import trace
from train.config import ConfigError, load_config
from train.distributed import init_distributed
from train.dry_run import run_dry_runs
from train.engine import EpochLoop, NonFiniteGuard, TrainingStep, TrainState, step_autocast, train_one_epoch
from train.solver import build_optimizer
from tools import trace_report
from train.trace import (
    EPOCH_IMAGES,
    StepTracer,
    TraceWindow,
    largest_work_op,
    op_table,
    span_durations,
    trace_document,
    traced_step,
    write_trace,
)
from train_standins import TinyLossModel

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
EPS_US = 1e-6  # timestamps are written to the nanosecond: rounding, not more
# Where the code nests each span (its thread's enclosing span); None: a thread's top level.
PARENTS = {
    "read": "sample", "check": "sample", "record": "sample",
    "ground_truth": "collate", "pad_images": "collate",
    "forward": "step", "backward": "step", "optimizer": "step", "data_wait": "step",
}


def trace_problems(document: dict) -> list[str]:
    """What breaks the Trace Event Format (JSON object form) in `document`; [] when nothing does."""
    problems = []
    events = document.get("traceEvents")
    if not isinstance(events, list) or not events:
        return ["traceEvents is not a non-empty list"]
    named_processes, named_threads, open_async = set(), set(), {}
    for event in events:
        if not (isinstance(event.get("name"), str) and isinstance(event.get("pid"), int) and isinstance(event.get("tid"), int)):
            problems.append(f"an event lacks name, pid or tid: {event}")
            continue
        ph = event.get("ph")
        if ph == "M":
            if event["name"] == "process_name":
                named_processes.add(event["pid"])
            elif event["name"] == "thread_name":
                named_threads.add((event["pid"], event["tid"]))
            if not isinstance(event.get("args"), dict):
                problems.append(f"metadata without args: {event}")
        elif ph in ("X", "b", "e"):
            if not isinstance(event.get("ts"), (int, float)) or event["ts"] < 0:
                problems.append(f"bad ts: {event}")
            if ph == "X" and not (isinstance(event.get("dur"), (int, float)) and event["dur"] >= 0):
                problems.append(f"a complete event without a duration: {event}")
            if ph in ("b", "e"):
                key = (event["pid"], event.get("cat"), event.get("id"))
                if event.get("id") is None or event.get("cat") is None:
                    problems.append(f"an async event without id or cat: {event}")
                elif ph == "b":
                    open_async[key] = event["ts"]
                elif key not in open_async or open_async.pop(key) > event["ts"]:
                    problems.append(f"an async end before (or without) its begin: {event}")
        else:
            problems.append(f"unexpected phase {ph!r}")
    problems += [f"async slice {key} never ends" for key in open_async]
    for event in events:
        if event.get("ph") == "X":
            if event["pid"] not in named_processes or (event["pid"], event["tid"]) not in named_threads:
                problems.append(f"a span on an unnamed track: {event}")
                break
    return problems


def parents_of(document: dict) -> tuple[list[dict], list[str]]:
    """Every complete event with the name of its enclosing span on its thread (`parent`), and the
    spans that cross the end of the span they start in (a nesting violation)."""
    by_thread = defaultdict(list)
    for event in document["traceEvents"]:
        if event["ph"] == "X":
            by_thread[(event["pid"], event["tid"])].append(event)
    found, crossing = [], []
    for spans in by_thread.values():
        stack = []  # (name, end)
        for event in sorted(spans, key=lambda e: (e["ts"], -e["dur"])):
            end = event["ts"] + event["dur"]
            while stack and stack[-1][1] <= event["ts"] + EPS_US:
                stack.pop()
            if stack and end > stack[-1][1] + EPS_US:
                crossing.append(f"{event['name']} ({event['ts']}..{end}) crosses the end of {stack[-1][0]} ({stack[-1][1]})")
            found.append({**event, "parent": stack[-1][0] if stack else None})
            stack.append((event["name"], end))
    return found, crossing


def assert_nested(document: dict) -> list[dict]:
    spans, crossing = parents_of(document)
    assert not crossing, crossing[:5]
    wrong = [(s["name"], s["parent"]) for s in spans if s["name"] in PARENTS and s["parent"] != PARENTS[s["name"]]]
    assert not wrong, wrong[:5]
    return spans


def span_ns(timer: StageTimer) -> dict[str, int]:
    """op -> the sum of its kept spans (ns), straight from the timer's arrays."""
    sums: dict[str, int] = defaultdict(int)
    for thread in timer.threads():
        spans = thread.spans
        for i in range(0, len(spans), 3):
            sums[timer.ops[spans[i]]] += spans[i + 2] - spans[i + 1]
    return sums


def pull(loader, batches: int, step=None) -> None:
    for i, batch in enumerate(loader):
        if step is not None:
            step(batch)
        if i + 1 == batches:
            break


def fake_step(timer: StageTimer):
    """A step with the training step's three phases, each doing a little work, under `StepTracer`."""
    tracer = StepTracer(timer)

    def phases(lap):
        for phase in ("forward", "backward", "optimizer"):
            torch.ones(64, 64).sum()
            lap(phase)

    return lambda batch: tracer(phases)


# --- The timer ---


def test_a_timer_that_is_not_tracing_keeps_its_totals_and_nothing_per_span():
    timer = StageTimer()
    for _ in range(100):  # every op and thread record allocated once, before measuring
        with timer.measure("read"):
            pass
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(20_000):
            with timer.measure("read"):
                pass
        grown_off = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
        timer.tracing = True
        before = tracemalloc.take_snapshot()
        for _ in range(20_000):
            with timer.measure("read"):
                pass
        grown_on = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert grown_off < 2_000  # nothing kept per span (a 20,000-span loop; snapshots' own noise is a few hundred bytes)
    assert grown_on >= 20_000 * 3 * 8  # three int64 per span, and nothing else of note
    assert sum(len(t.spans) for t in timer.threads()) == 3 * 20_000
    assert timer.op_totals_ns()["read"] > 0


def test_a_tracing_timer_keeps_each_threads_spans_and_its_totals_are_their_sums():
    timer = StageTimer()
    timer.tracing = True

    def work():
        for _ in range(50):
            with timer.measure("sample"):
                with timer.measure("read"):
                    sum(range(200))
                with timer.measure("decode"):
                    sum(range(400))

    threads = [threading.Thread(target=work, name=f"reader-{i}") for i in range(2)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()
    assert {t.thread for t in timer.threads()} == {"main thread", "reader-0", "reader-1"}
    assert dict(span_ns(timer)) == timer.op_totals_ns()  # exactly, in ns
    report = timer.report()["total_s"]
    assert report["read"] == timer.op_totals_ns()["read"] / 1e9 and report["decode"] == timer.op_totals_ns()["decode"] / 1e9
    document = trace_document([timer], device="cpu", images=150)
    assert not trace_problems(json.loads(json.dumps(document)))
    assert_nested(document)


def test_a_worker_timers_spans_come_back_under_the_workers_track():
    worker, loader = StageTimer(), StageTimer()
    worker.tracing = True
    with worker.measure("decode"):
        pass
    loader.merge(worker.take("loader worker 3", "worker"))
    with loader.measure("collate"):
        pass
    (track,) = [t for t in loader.threads() if t.process == "loader worker 3"]
    assert len(track.spans) == 3 and loader.ops[track.spans[0]] == "decode"
    assert loader.op_totals_ns()["decode"] == worker.op_totals_ns().get("decode", 0) + track.spans[2] - track.spans[1]
    assert worker.take("loader worker 3", "worker").totals == {}  # taken once


# --- The loaders' traces ---


def test_the_torch_loaders_trace_is_valid_nested_and_its_table_sums_its_spans(train_shards, tmp_path):
    loader = build_loader(data_config("data.torch_workers=1"), train_shards, training=True, batch_size=2, backend="torch")
    loader.timer.tracing = True  # from the first span: then the stage totals are the kept spans' sums
    pull(loader, 4, step=fake_step(loader.timer))
    loader.timer.tracing = False
    path = write_trace(trace_document([loader.timer], device="cpu", images=loader.timer.traced_images), tmp_path / "t.json")
    document = json.loads(path.read_text())  # valid JSON, as written
    assert not trace_problems(document)
    spans = assert_nested(document)
    workers = {s["pid"] for s in spans if s["name"] == "sample"}
    assert workers and os.getpid() not in workers  # per-sample work in the worker process, on its own track
    by_track = {(s["pid"], s["name"]) for s in spans}
    assert {(os.getpid(), op) for op in ("collate", "pad_images", "to_device", "wait", "step", "forward")} <= by_track
    assert all(s["parent"] == "sample" for s in spans if s["name"] in ("decode", "resize_flip"))
    assert (tmp_path / "t.png").stat().st_size > 0

    images = document["otherData"]["images"]
    assert images == 8
    rows = {row["op"]: row for row in op_table(span_durations(document), images)}
    for op, row in rows.items():  # the table's totals and counts are the file's events, summed independently
        durations = [e["dur"] for e in document["traceEvents"] if e["ph"] == "X" and e["name"] == op]
        assert row["count"] == len(durations) and row["total_s"] == pytest.approx(sum(durations) / 1e6, rel=1e-9)
    assert rows["sample"]["count"] == rows["read"]["count"] >= 8
    ns = span_ns(loader.timer)
    for stage, total in loader.timings()["total_s"].items():  # the per-stage figures: the same spans' sums
        assert total == sum(ns.get(op, 0) for op in STAGE_OPS[stage]) / 1e9, stage
    assert all(rows[op]["total_s"] == pytest.approx(ns[op] / 1e9, abs=1e-9) for op in ns)


def test_the_dali_loaders_trace_shows_the_feed_its_batches_and_the_copy_out(train_shards):
    loader = build_loader(data_config(), train_shards, training=True, batch_size=2, backend="dali")
    loader.timer.tracing = True
    pull(loader, 4)
    loader.timer.tracing = False
    document = json.loads(json.dumps(trace_document([loader.timer], device="cpu", images=loader.timer.traced_images)))
    assert not trace_problems(document)
    spans = assert_nested(document)
    parents = {(s["name"], s["parent"]) for s in spans}
    assert {("sample", "feed"), ("feed", "wait"), ("read", "sample"), ("pad_images", "collate")} <= parents
    assert not {"decode", "resize_flip"} & {s["name"] for s in spans}  # inside DALI's threads: not exposed
    flights = [e for e in document["traceEvents"] if e["ph"] == "b"]
    assert [e["name"] for e in flights] == ["dali_graph"] * 4
    assert "exposes no per-sample or per-operator timing" in document["otherData"]["dali"]


def _slowed(function, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)

    return slow


@pytest.mark.parametrize("backend, module, name, op", [
    ("torch", torch_loader, "transform_image", "resize_flip"),
    ("dali", loader_module, "checked_sample", "check"),
])
def test_a_deliberately_slowed_stage_is_the_largest_op(train_shards, monkeypatch, backend, module, name, op):
    monkeypatch.setattr(module, name, _slowed(getattr(module, name), 0.02))  # before the worker forks: it inherits it
    loader = build_loader(data_config("data.torch_workers=1"), train_shards, training=True, batch_size=2, backend=backend)
    loader.timer.tracing = True
    pull(loader, 3)
    loader.timer.tracing = False
    rows = trace.timer_table(loader.timer, loader.timer.traced_images, "cpu")
    assert largest_work_op(rows) == op
    slowed = next(row for row in rows if row["op"] == op)
    assert slowed["avg_ms"] >= 20.0 and slowed["under_10ms"] == 0.0


def test_the_op_table_on_a_hand_worked_case():
    ms = 1_000_000
    durations = {"decode": [i * ms for i in range(1, 11)], "read": [50_000, 150_000], "wait": [30 * ms]}
    rows = {row["op"]: row for row in op_table(durations, images=20)}
    decode = rows["decode"]
    assert decode["count"] == 10 and decode["avg_ms"] == pytest.approx(5.5) and decode["total_s"] == pytest.approx(0.055)
    assert decode["p90_ms"] == pytest.approx(9.1)  # numpy's linear P90 of 1..10: 9 + 0.1 x (10 - 9)
    assert decode["under_10ms"] == pytest.approx(0.9) and decode["under_100us"] == 0.0  # 10 ms is not under 10 ms
    assert decode["ms_per_image"] == pytest.approx(55.0 / 20) and decode["epoch_s"] == pytest.approx(0.055 / 20 * EPOCH_IMAGES)
    assert rows["read"]["under_100us"] == 0.5 and rows["read"]["p90_ms"] == pytest.approx(0.14)
    assert rows["wait"]["epoch_s"] is None  # a blocked thread is no CPU time
    assert [row["op"] for row in op_table(durations, 20)] == ["decode", "wait", "read"]  # largest total first
    assert largest_work_op(op_table(durations, 20)) == "decode"


# --- Dry runs and training ---


def test_the_pipeline_dry_run_writes_a_trace_its_picture_and_the_table_in_its_report(train_shards, tmp_path, capsys):
    cfg = load_config(REFERENCE_CONFIG, [
        "data.backend=torch", "data.torch_workers=1", "data.min_size=96", "data.max_size=160", "solver.ims_per_batch=2",
        f"data.train_shards={train_shards}", f"train.trace={tmp_path / 'dry.json'}",
    ])
    ctx = init_distributed("cpu", env={})
    threads = torch.get_num_threads()
    try:
        results = run_dry_runs("pipeline", cfg, ctx, iters=3, report=str(tmp_path / "report.json"))
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["trace"] == str(tmp_path / "dry.json") and report["pipeline"]["trace_ops"] == json.loads(
        json.dumps(results["pipeline"]["trace_ops"]))
    document = json.loads((tmp_path / "dry.json").read_text())
    assert not trace_problems(document)
    assert_nested(document)
    assert {row["op"] for row in report["pipeline"]["trace_ops"]} >= {"read", "check", "decode", "resize_flip", "collate", "wait"}
    assert (tmp_path / "dry.png").stat().st_size > 0
    assert trace_report.main(trace_report.get_args_parser().parse_args([str(tmp_path / "dry.json")])) == 0
    printed = capsys.readouterr().out
    assert "resize_flip" in printed and "<100us" in printed


class BatchLosses(torch.nn.Module):
    """The stand-in model of the trainer's tests, on a `Batch`: losses from its pixels and boxes."""

    def __init__(self):
        super().__init__()
        self.tiny = TinyLossModel()

    def forward(self, batch):
        features = torch.cat([batch.images.float().mean((2, 3)) / 255, batch.boxes.sum((1, 2))[:, None] / 1000], 1)
        return self.tiny(features)


def test_a_training_window_traces_exactly_its_iterations(train_shards, tmp_path):
    loader = build_loader(data_config("data.torch_workers=0"), train_shards, training=True, batch_size=2, backend="torch")
    model, solver = BatchLosses(), load_config(REFERENCE_CONFIG).solver
    step = TrainingStep(model, build_optimizer(model, solver, CPU)[0], None, step_autocast("fp32", CPU, cuda_graphs=False), CPU)
    window = TraceWindow(loader.timer, tmp_path / "train.json", first=2, last=4, device=CPU)
    loop = EpochLoop(traced_step(step, window, done=0), solver, NonFiniteGuard(10), readback_every=1, global_batch=2,
                     max_iter=5)
    train_one_epoch(loop, loader, TrainState())
    document = json.loads((tmp_path / "train.json").read_text())
    assert not trace_problems(document)
    spans = assert_nested(document)
    names = [s["name"] for s in spans if s["pid"] == os.getpid() and s["tid"] == threading.get_native_id()]
    assert names.count("step") == 2 and names.count("wait") == 2  # iterations 2 and 3, and the waits for their batches
    assert names.count("forward") == names.count("backward") == names.count("optimizer") == 2
    assert document["otherData"]["images"] == 4 and window.written and not loader.timer.tracing


@pytest.mark.parametrize("value", ["[5, 5]", "[0, 3]", "[3]", "[4, 2]", "10"])
def test_a_bad_trace_window_stops_in_one_sentence(value):
    with pytest.raises(ConfigError, match=r"train.trace_iters must be a list of 2 increasing values, each an integer >= 1"):
        load_config(REFERENCE_CONFIG, [f"train.trace_iters={value}"])


@pytest.mark.slow
def test_a_training_run_with_a_trace_writes_it(train_shards, val_shards, synthetic_coco, tmp_path):
    from train_runs import ENV, command

    out = tmp_path / "run"
    argv = command(train_shards, val_shards, synthetic_coco, out, "eval.every_epochs=0", "train.trace_iters=[2,4]",
                   "--trace", str(tmp_path / "run.json"))
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "run.json").read_text())
    assert not trace_problems(document)
    assert [s["name"] for s in assert_nested(document)].count("step") == 2
    assert "tracing iterations 2 to 3" in result.stdout and math.isfinite(document["otherData"]["images"])

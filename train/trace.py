"""See the input pipeline: a Chrome trace of every stage, a per-op table, a picture of the timeline.

    python train/main.py --config C --data SHARDS --dry-run pipeline --iters 30 --trace runs/trace.json
    python train/main.py --config C --data SHARDS ... train.trace=runs/trace.json train.trace_iters=[100,150]
    python tools/trace_report.py runs/trace.json --png runs/trace.png --seconds 2

The spans come from the loader's own timer (pipeline/loader.py `StageTimer`), the one that also
sums the per-stage figures of the dry runs, so the trace and those figures are the same
measurement. While a timer traces, it keeps every span: per sample in the thread or DataLoader
worker process that did the work (workers send theirs back with the samples), per batch on the
thread that made or waited for it, and the training step's phases (its `lap` hook, `StepTracer`)
on the training loop's thread. `trace_document` turns them into a trace-event file (the JSON
object format: Perfetto and chrome://tracing open it) with one track per thread and per worker;
`op_table` gives, per op, what Lotus' Table II gives: count, average, P90, the share of events
under 10 ms and under 100 us, and the CPU-seconds one epoch of COCO (117,266 images) would spend
in it at the traced images' rate.

Ops (`OPS` below says what each measures): per sample `sample` > `read`, `check`, `record`, then
`decode` and `resize_flip` (the torch backend); per batch `collate` > `ground_truth`,
`pad_images`, then `to_device`, and the consumer's `wait`; per step `step` > the step's phases.
The DALI backend runs decode and resize inside DALI's own threads, which DALI does not expose
per sample or per operator (its Python API reports operators' memory, not their time; on a GPU
build Nsight Systems sees its NVTX ranges). What its trace shows from outside: the feed
(`feed` > per-sample `sample` > `read`, `check`, `record`, on the consumer's thread inside its
`wait`, since DALI calls the feeder from `pipe.run`), each batch's time inside DALI
(`dali_graph`, an async slice from its feed to its outputs: batches overlap there), and the copy
out of DALI's buffers (`pad_images`) and `to_device`.

Clocks: time.perf_counter_ns, CLOCK_MONOTONIC on Linux, one clock for every process on the
machine, so workers' spans line up with the main process's. Spans are host time: on CUDA the
step's phases, a GPU decode and `to_device` measure the time the host spent queueing work, not
the GPU's time (nothing synchronizes inside a traced step; the dry run's `stages_s_per_iter` is
the synchronized view). Each file says so in its `otherData`.
"""

from __future__ import annotations

import json
import logging
import time
from array import array
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np
import torch

from pipeline.loader import PROCESS, StageTimer
from train.engine import TrainingStep, no_lap

log = logging.getLogger(__name__)

T = TypeVar("T")
EPOCH_IMAGES = 117_266  # COCO train2017 after the reference's filters: one epoch
TIMELINE_SECONDS = 2.0  # the picture shows the trace's first seconds

# op -> (kind, what it measures). Kinds: `work` (a thread computing), `group` (a span around
# others), `wait` (a thread blocked), `inside` (a batch inside DALI, overlapping others).
OPS: dict[str, tuple[str, str]] = {
    "sample": ("group", "one sample's host work, in the worker or thread that read it"),
    "read": ("work", "the sample's bytes from its shard (file reads at the index's offsets)"),
    "check": ("work", "the per-sample check: crc32s, json, labels, boxes, polygons (shard_format.decode_sample)"),
    "record": ("work", "per-sample ground truth: the reference resize size and the record (batch.sample_record)"),
    "decode": ("work", "JPEG -> pixels, torchvision (on CUDA: the whole batch, host-side)"),
    "resize_flip": ("work", "resize to min/max size with the flip, torchvision"),
    "feed": ("group", "DALI's external source: the next batch read for DALI, called from pipe.run"),
    "collate": ("group", "the batch made from its samples (batch.make_batch)"),
    "ground_truth": ("work", "per batch: ground truth padded, scaled and flipped"),
    "pad_images": ("work", "per batch: images copied into the padded batch (DALI: the copy out of its buffers)"),
    "to_device": ("work", "per batch: the batch to the training device (on CUDA: queueing the copies; DALI then waits for them)"),
    "wait": ("wait", "the consumer blocked for its next batch (DALI: pipe.run, the feeds it calls included)"),
    "dali_graph": ("inside", "a batch inside DALI, from its feed to its outputs (decode, resize, flip in DALI's threads)"),
    "step": ("group", "one training step: the batch consumed"),
    "data_wait": ("wait", "the step waiting for its batch (dry run `full`)"),
    "forward": ("work", "the step's forward and losses (host-side on CUDA)"),
    "backward": ("work", "the step's backward (host-side on CUDA)"),
    "optimizer": ("work", "the optimizer step (host-side on CUDA)"),
}
NOT_EXPOSED_BY_DALI = (
    "DALI decodes, resizes and flips inside its own threads and exposes no per-sample or per-operator "
    "timing (its Python API reports operators' memory only; Nsight Systems sees its NVTX ranges on a GPU "
    "build): this trace shows the feed per sample, each batch inside DALI (dali_graph, from its feed to its "
    "outputs), the consumer's wait (pipe.run) and the copy out (pad_images, to_device)"
)


class StepTracer:
    """Runs `step_fn(lap)` under a `step` span with each phase (the time up to each `lap`) as a span.

    Only while `timer` traces; otherwise it calls `step_fn(outer_lap)` and records nothing.
    `outer_lap` is still called at each phase end (the dry run's synchronizing `StageClock`).
    """

    def __init__(self, timer: StageTimer):
        self.timer = timer
        self._phase_start = 0

    def __call__(self, step_fn: Callable[[Callable[[str], None]], T], outer_lap: Callable[[str], None] = no_lap) -> T:
        if not self.timer.tracing:
            return step_fn(outer_lap)

        def lap(phase: str) -> None:
            outer_lap(phase)
            now = time.perf_counter_ns()
            self.timer.record(phase, self._phase_start, now)
            self._phase_start = now

        with self.timer.measure("step"):
            self._phase_start = time.perf_counter_ns()
            return step_fn(lap)


# --- The trace-event file ---


def trace_document(timers: Iterable[StageTimer], *, device: torch.device | str, images: int) -> dict[str, Any]:
    """The Chrome trace-event JSON object of every span the `timers` kept (their threads and workers).

    Complete events ("X") per thread, async slices ("b"/"e") for DALI's batches, names of the
    processes and threads ("M"), timestamps in microseconds from the first span; `otherData`
    holds the clock, the images traced, what each op is and what the spans cannot show.
    """
    # Copies: a producer thread may still merge spans its workers traced; a triple is written as three appends.
    tracks = [(timer, thread, _triples(thread.spans), _triples(thread.flights)) for timer in timers for thread in timer.threads()]
    starts = [spans[1::3] for _, _, spans, _ in tracks] + [flights[1::3] for _, _, _, flights in tracks]
    origin = min((min(s) for s in starts if len(s)), default=0)

    def us(ns: int) -> float:
        return round(ns / 1000.0, 3)

    events: list[dict[str, Any]] = []
    named: set[tuple[int, int | None]] = set()
    flight_id = 0
    for timer, thread, spans, flights in tracks:
        if not (len(spans) or len(flights)):
            continue
        pid, tid = thread.pid, thread.tid
        if (pid, None) not in named:
            named.add((pid, None))
            sort = 0 if thread.process == PROCESS else 1 + pid
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"{thread.process} (pid {pid})"}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": sort}})
        if (pid, tid) not in named:
            named.add((pid, tid))
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread.thread}})
        for i in range(0, len(spans), 3):
            name = timer.ops[spans[i]]
            events.append({"ph": "X", "name": name, "cat": _kind(name), "pid": pid, "tid": tid,
                           "ts": us(spans[i + 1] - origin), "dur": us(spans[i + 2] - spans[i + 1])})
        for i in range(0, len(flights), 3):
            flight_id += 1
            name = timer.ops[flights[i]]
            common = {"name": name, "cat": _kind(name), "id": flight_id, "pid": pid, "tid": tid}
            events.append({"ph": "b", "ts": us(flights[i + 1] - origin), **common})
            events.append({"ph": "e", "ts": us(flights[i + 2] - origin), **common})
    events.sort(key=lambda e: (e["ph"] != "M", e.get("ts", 0.0), -e.get("dur", 0.0)))
    device = torch.device(device)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "clock": "time.perf_counter_ns (CLOCK_MONOTONIC: one clock for all processes); ts in us from the first span",
            "origin_ns": origin,
            "images": images,
            "device": str(device),
            "host_side": (
                "spans are host time; on CUDA the step's phases, GPU decode and to_device measure queueing, not GPU time "
                "(nothing synchronizes inside a traced step)" if device.type == "cuda" else "spans are host time (CPU run)"
            ),
            "dali": NOT_EXPOSED_BY_DALI,
            "ops": {op: what for op, (_, what) in OPS.items()},
        },
    }


def _triples(values: array) -> array:
    """A copy of a span array, cut to whole (op, start, end) triples."""
    copy = values[:]
    return copy[: len(copy) - len(copy) % 3]


def _kind(op: str) -> str:
    return OPS.get(op, ("work", ""))[0]


def write_trace(document: dict[str, Any], path: str | Path) -> Path:
    """Write the trace file (and a picture of its first seconds beside it, as .png, where matplotlib is installed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    picture = path.with_suffix(".png")
    try:
        draw_timeline(document, picture)
    except ImportError:
        log.info("trace written to %s (for its picture: pip install -e '.[trace]', then tools/trace_report.py %s --png)",
                 path, path)
        return path
    log.info("trace written to %s, its first %.0f s drawn in %s (open the trace in https://ui.perfetto.dev)",
             path, TIMELINE_SECONDS, picture)
    return path


# --- The per-op table (Lotus, Table II) ---


def span_durations(document: Mapping[str, Any]) -> dict[str, list[int]]:
    """op -> the duration of each of its spans in ns (complete events and async slices alike)."""
    durations: dict[str, list[int]] = {}
    begins: dict[tuple[int, int], float] = {}
    for event in document["traceEvents"]:
        if event["ph"] == "X":
            durations.setdefault(event["name"], []).append(round(event["dur"] * 1000))
        elif event["ph"] == "b":
            begins[(event["pid"], event["id"])] = event["ts"]
        elif event["ph"] == "e":
            start = begins.pop((event["pid"], event["id"]))
            durations.setdefault(event["name"], []).append(round((event["ts"] - start) * 1000))
    return durations


def op_table(durations: Mapping[str, Sequence[int]], images: int, epoch_images: int = EPOCH_IMAGES) -> list[dict[str, Any]]:
    """One row per op, largest total first: count, average and P90 (ms), the shares under 10 ms and
    under 100 us, the total (s), ms per traced image, and the seconds one epoch of `epoch_images`
    would spend in it at that rate (`epoch_s`; CPU-seconds for `work` and `group` ops, where the
    thread computes, and None for `wait` and `inside`, which are not CPU time)."""
    rows = []
    for op, ns in durations.items():
        seconds = np.asarray(ns, dtype=np.float64) / 1e9
        total = sum(ns) / 1e9
        per_image = total / images if images else None
        kind = _kind(op)
        rows.append({
            "op": op,
            "kind": kind,
            "count": len(ns),
            "avg_ms": 1e3 * total / len(ns),
            "p90_ms": 1e3 * float(np.percentile(seconds, 90)),
            "under_10ms": float(np.mean(seconds < 0.010)),
            "under_100us": float(np.mean(seconds < 0.0001)),
            "total_s": total,
            "ms_per_image": None if per_image is None else 1e3 * per_image,
            "epoch_s": None if per_image is None or kind in ("wait", "inside") else per_image * epoch_images,
        })
    return sorted(rows, key=lambda row: -row["total_s"])


def largest_work_op(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The op whose spans took the most time among those that compute (kind `work`)."""
    work = [row for row in rows if row["kind"] == "work"]
    return max(work, key=lambda row: row["total_s"])["op"] if work else None


def format_op_table(rows: Sequence[Mapping[str, Any]], images: int) -> str:
    """The table as text, one op per line (the form of Lotus' Table II)."""
    lines = [
        f"per-op figures over {images} traced images; epoch = {EPOCH_IMAGES:,} images, CPU-seconds of span time",
        f"{'op':14s} {'kind':6s} {'count':>7s} {'avg ms':>9s} {'P90 ms':>9s} {'<10ms':>6s} {'<100us':>7s} "
        f"{'total s':>9s} {'ms/image':>9s} {'s/epoch':>9s}",
    ]
    for row in rows:
        per_image = "-" if row["ms_per_image"] is None else f"{row['ms_per_image']:9.3f}"
        epoch = "-" if row["epoch_s"] is None else f"{row['epoch_s']:9.0f}"
        lines.append(
            f"{row['op']:14s} {row['kind']:6s} {row['count']:7d} {row['avg_ms']:9.3f} {row['p90_ms']:9.3f} "
            f"{100 * row['under_10ms']:5.0f}% {100 * row['under_100us']:6.0f}% {row['total_s']:9.3f} {per_image:>9s} {epoch:>9s}"
        )
    return "\n".join(lines)


def timer_table(timer: StageTimer, images: int, device: torch.device | str) -> list[dict[str, Any]]:
    """`op_table` of one timer's spans (one dry run's), through the same events the file holds."""
    return op_table(span_durations(trace_document([timer], device=device, images=images)), images)


# --- The picture ---


def headless_pyplot() -> Any:
    """matplotlib's pyplot drawing to files only (no display needed); ImportError without the [trace] extra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_timeline(document: Mapping[str, Any], path: str | Path, seconds: float = TIMELINE_SECONDS) -> None:
    """A PNG of the trace's first `seconds`: one row per thread or worker (nested spans below their
    parents), one more per process for DALI's batches in flight, one colour per op. Needs matplotlib."""
    plt = headless_pyplot()
    from matplotlib.patches import Patch

    end_us = seconds * 1e6
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in document["traceEvents"] if e["name"] == "thread_name"}
    processes = {e["pid"]: e["args"]["name"] for e in document["traceEvents"] if e["name"] == "process_name"}
    lanes = _lanes(document["traceEvents"], end_us)
    ops = sorted({bar[2] for bars in lanes.values() for bar in bars}, key=lambda op: list(OPS).index(op) if op in OPS else len(OPS))
    colours = {op: plt.get_cmap("tab20")(i % 20) for i, op in enumerate(ops)}
    rows = sorted(lanes, key=lambda key: (key[0] != min((k[0] for k in lanes), default=0), key))
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.32 * len(rows)))
    labels = []
    for y, key in enumerate(rows):
        pid, tid, depth = key
        process = str(processes.get(pid, pid)).split(" (pid ")[0]
        track = names.get((pid, tid), "batches inside DALI" if tid == -1 else str(tid))
        labels.append(f"{track if process == PROCESS else process}" + (f" [{depth}]" if depth else ""))
        for op in ops:
            bars = [(start / 1000, duration / 1000) for start, duration, name in lanes[key] if name == op]
            if bars:
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=colours[op], edgecolor="white", linewidth=0.2)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, seconds * 1000)
    ax.set_xlabel("ms from the first span")
    images = document.get("otherData", {}).get("images")
    ax.set_title(f"trace: first {seconds:g} s ({images} images traced in all); [n]: spans nested n deep", fontsize=9)
    handles = [Patch(color=colours[op], label=op) for op in ops]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lanes(events: Sequence[Mapping[str, Any]], end_us: float) -> dict[tuple[int, int, int], list[tuple[float, float, str]]]:
    """(pid, tid, nesting depth) -> bars (start us, duration us, op) up to `end_us`; async slices go to
    (pid, -1, lane), a lane per slice that overlaps the ones before it."""
    lanes: dict[tuple[int, int, int], list[tuple[float, float, str]]] = {}
    open_spans: dict[tuple[int, int], list[float]] = {}
    begins: dict[tuple[int, int], Mapping[str, Any]] = {}
    lane_ends: dict[int, list[float]] = {}
    for event in events:  # sorted by start, longest first: parents before their children
        if event["ph"] == "X" and event["ts"] < end_us:
            stack = open_spans.setdefault((event["pid"], event["tid"]), [])
            while stack and stack[-1] <= event["ts"]:
                stack.pop()
            lanes.setdefault((event["pid"], event["tid"], len(stack)), []).append((event["ts"], event["dur"], event["name"]))
            stack.append(event["ts"] + event["dur"])
        elif event["ph"] == "b":
            begins[(event["pid"], event["id"])] = event
        elif event["ph"] == "e":
            begin = begins.pop((event["pid"], event["id"]))
            if begin["ts"] >= end_us:
                continue
            ends = lane_ends.setdefault(event["pid"], [])
            lane = next((i for i, lane_end in enumerate(ends) if lane_end <= begin["ts"]), len(ends))
            ends[lane:lane + 1] = [event["ts"]]
            lanes.setdefault((event["pid"], -1, lane), []).append((begin["ts"], event["ts"] - begin["ts"], event["name"]))
    return lanes


# --- A training run's window of iterations ---


@dataclass
class TraceWindow:
    """Traces training iterations `first` .. `last - 1` (1-based, as the log numbers them) into `path`.

    The loader's timer traces from the end of iteration `first - 1` (so the wait for the first
    traced batch is in) to the end of iteration `last - 1`; then the file, its picture and the
    per-op table are written and logged. `finish()` writes what a run that ended inside the
    window traced.
    """

    timer: StageTimer
    path: Path
    first: int
    last: int
    device: torch.device
    written: bool = False
    tracer: StepTracer = field(init=False)

    def __post_init__(self) -> None:
        self.tracer = StepTracer(self.timer)

    def after(self, done: int) -> None:
        """Iteration `done` just ended (0: none yet, or the resumed iteration)."""
        if self.first - 1 <= done < self.last - 1 and not self.written:
            if not self.timer.tracing:
                log.info("tracing iterations %d to %d into %s", max(done + 1, self.first), self.last - 1, self.path)
            self.timer.tracing = True
        elif done >= self.last - 1:
            self.finish()

    def finish(self) -> None:
        if self.written or not self.timer.tracing:
            return
        self.timer.tracing = False
        self.written = True
        images = self.timer.traced_images
        document = trace_document([self.timer], device=self.device, images=images)
        write_trace(document, self.path)
        log.info("%s", format_op_table(op_table(span_durations(document), images), images))


@dataclass
class TracedStep(TrainingStep):
    """The training step with a `TraceWindow`: inside the window each step's phases become spans.

    The loop runs it as the step itself (train/engine.py `train_one_epoch`); `done` is the
    iteration the run starts from.
    """

    window: TraceWindow | None = None
    done: int = 0

    def __call__(self, batch: Any, lap: Callable[[str], None] = no_lap) -> dict[str, torch.Tensor]:
        losses = self.window.tracer(lambda phase_lap: TrainingStep.__call__(self, batch, phase_lap), lap)
        self.done += 1
        self.window.after(self.done)
        return losses


def traced_step(step: TrainingStep, window: TraceWindow, done: int) -> TracedStep:
    """`step` inside `window`, the run having done `done` iterations already (a resume)."""
    window.after(done)
    return TracedStep(**{f.name: getattr(step, f.name) for f in fields(TrainingStep)}, window=window, done=done)


def rank_path(path: str | Path, rank: int, world_size: int) -> Path:
    """Each rank traces its own loader and step: FILE.json on rank 0, FILE.rankN.json on the others."""
    path = Path(path)
    return path if world_size == 1 or rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")

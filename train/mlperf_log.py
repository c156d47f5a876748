"""The MLPerf Training log (`<output_dir>/mlperf.log`) through `mlperf_logging.mllog`.

Every key the 3.1.0 rules check for maskrcnn is written by one of the functions below,
called from visible places in `train/main.py`: submission info and hyperparameters at
init, run/block/epoch/eval intervals in the loop, eval_accuracy with BBOX and SEGM, and
run_stop with its status. Only rank 0 writes; elsewhere `MLPerfLog(None)` drops events.
Each attempt of a run writes its own log (train/run_folder.py: `mlperf.log`, then
`mlperf-attempt-N.log`); a resumed attempt's log says where it began with
`init_checkpoint_step`. Check a log with `python -m mlperf_logging.compliance_checker
--usage training --ruleset 3.1.0 <output_dir>/mlperf.log`; `read_run_result` reads what a log
says about its run (time to train, status, the epoch that converged), as MLPerf scores it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlperf_logging.compliance_checker import mlp_parser
from mlperf_logging.mllog import constants as C
from mlperf_logging.mllog.mllog import MLLogger

from train.config import Config

_logger_ids = itertools.count()


class MLPerfLog:
    """One attempt's MLPerf log file, never an existing one; a no-op when `path` is None (ranks other than 0)."""

    def __init__(self, path: str | Path | None):
        self._handler = None
        self._mllogger = None
        if path is None:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A private logger per run: mllog's shared one would collect handlers across runs.
        logger = logging.getLogger(f"mlperf_log.run{next(_logger_ids)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        self._handler = logging.FileHandler(path, mode="x")  # a log is one attempt's, never appended to
        logger.addHandler(self._handler)
        root = str(Path(__file__).resolve().parents[1])
        # stack offset 2: the metadata names the line that called event/start/end, not this class
        self._mllogger = MLLogger(logger=logger, default_stack_offset=2, root_dir=root)

    def event(self, key: str, value: Any = None, **metadata: Any) -> None:
        if self._mllogger is not None:
            self._mllogger.event(key=key, value=value, metadata=metadata or None)

    def start(self, key: str, value: Any = None, time_ms: float | None = None, **metadata: Any) -> None:
        """`time_ms` (ms since the epoch) dates an interval that began before the log could be opened."""
        if self._mllogger is not None:
            self._mllogger.start(key=key, value=value, metadata=metadata or None, time_ms=time_ms)

    def end(self, key: str, value: Any = None, **metadata: Any) -> None:
        if self._mllogger is not None:
            self._mllogger.end(key=key, value=value, metadata=metadata or None)

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
            self._handler = None
            self._mllogger = None


def platform_name(configured: str) -> str:
    if configured != "auto":
        return configured
    import torch  # here: reading a log (tools/time_to_train.py) needs no torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def log_submission(mlog: MLPerfLog, cfg: Config) -> None:
    """The submission_* keys and cache_clear: the first lines of a run."""
    info = cfg.train.mlperf
    mlog.event(C.SUBMISSION_BENCHMARK, C.MASKRCNN)
    mlog.event(C.SUBMISSION_ORG, info.org)
    mlog.event(C.SUBMISSION_DIVISION, info.division)
    mlog.event(C.SUBMISSION_STATUS, info.status)
    mlog.event(C.SUBMISSION_PLATFORM, platform_name(info.platform))
    # True only when the page cache was dropped before the run (tools/run_and_time.sh says so in the config).
    mlog.event(C.CACHE_CLEAR, info.cache_clear)


def num_image_candidates(rpn_cfg: Config, images_per_rank: int) -> int:
    """Training proposals kept after NMS, as the rules count them: per image, or over each GPU's batch.

    With `post_nms_per_batch` the model keeps the top post_nms_top_n_train x images per rank
    over the batch on each rank (the reference's FPN_POST_NMS_TOP_N_TRAIN, NVIDIA's 12000 at
    12 images per GPU); otherwise the top post_nms_top_n_train of each image.
    """
    per_image = rpn_cfg.post_nms_top_n_train
    return per_image * images_per_rank if rpn_cfg.post_nms_per_batch else per_image


def log_hyperparameters(
    mlog: MLPerfLog, cfg: Config, *, train_samples: int, eval_samples: int, images_per_rank: int
) -> None:
    """The hyperparameters the maskrcnn rules require, exactly as this run uses them."""
    solver = cfg.solver
    mlog.event(C.SEED, cfg.seed)
    mlog.event(C.GLOBAL_BATCH_SIZE, solver.ims_per_batch)
    mlog.event(C.GRADIENT_ACCUMULATION_STEPS, 1)
    mlog.event(C.TRAIN_SAMPLES, train_samples)
    mlog.event(C.EVAL_SAMPLES, eval_samples)
    mlog.event(C.OPT_NAME, "sgd")
    mlog.event(C.OPT_BASE_LR, solver.base_lr)
    mlog.event(C.OPT_WEIGHT_DECAY, solver.weight_decay)
    mlog.event(C.OPT_LR_WARMUP_STEPS, solver.warmup_iters)
    mlog.event(C.OPT_LR_WARMUP_FACTOR, solver.warmup_factor)
    mlog.event(C.OPT_LR_DECAY_FACTOR, solver.gamma)
    mlog.event(C.OPT_LR_DECAY_STEPS, list(solver.steps))
    mlog.event(C.MIN_IMAGE_SIZE, cfg.data.min_size)
    mlog.event(C.MAX_IMAGE_SIZE, cfg.data.max_size)
    mlog.event(C.NUM_IMAGE_CANDIDATES, num_image_candidates(cfg.model.rpn, images_per_rank))


def log_eval_accuracy(mlog: MLPerfLog, *, epoch: int, box_ap: float, mask_ap: float) -> None:
    mlog.event(C.EVAL_ACCURACY, {"BBOX": box_ap, "SEGM": mask_ap}, epoch_num=epoch)


RULESET = "3.1.0"


@dataclass(frozen=True)
class RunResult:
    """What an MLPerf log says about its run, read as MLPerf's result summarizer and RCP checker read it."""

    seconds: float  # run_start to run_stop: the time to train
    status: str  # run_stop's status: success (the quality target reached) or aborted
    ended: str | None  # why the run stopped (this trainer's logs): target, schedule (trained to its end) or stopped
    quality_target: dict[str, float] | None  # the AP it stopped at ({"BBOX", "SEGM"}); None: it had none (a fine-tune)
    org: str  # submission_org
    epoch: int | None  # the last eval_accuracy before run_stop: the epochs to converge (None: no result)
    box_ap: float | None
    mask_ap: float | None


def read_run_result(path: str | Path) -> RunResult:
    """The run result in the MLPerf log at `path`; ValueError (naming the file) when it is not a finished run's log."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass the mlperf.log in the run's output_dir")
    loglines, _ = mlp_parser.parse_file(str(path), ruleset=RULESET)
    first = {}
    last_accuracy = None
    for line in loglines:
        if line.key == C.EVAL_ACCURACY and C.RUN_STOP not in first:
            last_accuracy = line
        first.setdefault(line.key, line)
    missing = [key for key in (C.RUN_START, C.RUN_STOP) if key not in first]
    if missing:
        raise ValueError(f"{path} has no {' and no '.join(missing)}: the attempt did not finish (it was stopped or killed)")
    accuracy = last_accuracy.value if last_accuracy is not None else None
    stop = first[C.RUN_STOP].value["metadata"]
    return RunResult(
        seconds=(first[C.RUN_STOP].timestamp - first[C.RUN_START].timestamp) / 1000,
        status=stop["status"],
        ended=stop.get("ended"),
        quality_target=stop.get("quality_target"),
        org=first[C.SUBMISSION_ORG].value["value"] if C.SUBMISSION_ORG in first else "",
        epoch=accuracy["metadata"]["epoch_num"] if accuracy else None,
        box_ap=accuracy["value"]["BBOX"] if accuracy else None,
        mask_ap=accuracy["value"]["SEGM"] if accuracy else None,
    )

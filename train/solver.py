"""Optimizer, learning-rate schedule and the MLPerf closed-division solver rules.

The reference's solver (maskrcnn-benchmark `make_optimizer` / `WarmupMultiStepLR`):
momentum SGD with two parameter groups (biases: LR x `bias_lr_factor`, weight decay
`weight_decay_bias`; frozen parameters left out), linear warmup from `warmup_factor`
over `warmup_iters`, then LR x `gamma` at each of the two `steps`.

MLPerf lets a submission tune the global batch, the base LR as 0.02 x K (or 0.02 / K
below a global batch of 16), the decay steps as (60000, 80000) x (1 + K/10) x 16 / batch,
and the warmup; `mlperf_lr_and_steps` derives the first two from the batch and K, and
`closed_division_violations` lists what a config changes beyond that.
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from train.config import REFERENCE_CONFIG, Config, load_config

log = logging.getLogger(__name__)

REFERENCE_STEPS = (60000, 80000)  # decay steps at global batch 16, K = 1
REFERENCE_BATCH = 16
REFERENCE_LR_UNIT = 0.02

# Keys whose reference value the closed division fixes (besides the model section).
CLOSED_FIXED_KEYS = (
    "data.min_size",
    "data.max_size",
    "data.flip_prob",
    "solver.momentum",
    "solver.weight_decay",
    "solver.weight_decay_bias",
    "solver.bias_lr_factor",
    "solver.gamma",
)
# Model keys the closed division leaves free: num_image_candidates may be 1000 x images per
# GPU (checked as a multiple of 1000 below), and the norm is FrozenBN either way.
CLOSED_FREE_MODEL_KEYS = ("model.rpn.post_nms_top_n_train",)


def parameter_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_bias: float,
    bias_lr_factor: float,
) -> list[dict[str, Any]]:
    """The reference's two groups; each remembers its `base_lr` so the schedule scales it."""
    weights, biases = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen stem/res2 and FrozenBN are not optimized at all
        (biases if name.endswith("bias") else weights).append(param)
    groups = [
        {"params": weights, "base_lr": base_lr, "weight_decay": weight_decay},
        {"params": biases, "base_lr": base_lr * bias_lr_factor, "weight_decay": weight_decay_bias},
    ]
    for group in groups:
        group["lr"] = group["base_lr"]
    return [g for g in groups if g["params"]]


def _apex_fused_sgd():
    try:
        from apex.optimizers import FusedSGD
    except ImportError:
        return None
    return FusedSGD


def build_optimizer(
    model: nn.Module, solver_cfg: Config, device: torch.device
) -> tuple[torch.optim.Optimizer, str]:
    """Momentum SGD over `parameter_groups`, the fastest implementation the machine has.

    `solver_cfg.optimizer`: auto (apex FusedSGD on CUDA when apex imports, else
    torch's fused SGD on CUDA, foreach on CPU) | apex | fused | foreach | plain.
    Returns the optimizer and the name of the implementation chosen.
    """
    groups = parameter_groups(
        model,
        base_lr=solver_cfg.base_lr,
        weight_decay=solver_cfg.weight_decay,
        weight_decay_bias=solver_cfg.weight_decay_bias,
        bias_lr_factor=solver_cfg.bias_lr_factor,
    )
    choice = solver_cfg.optimizer
    if choice == "auto":
        if device.type != "cuda":
            choice = "foreach"
        else:
            choice = "apex" if _apex_fused_sgd() is not None else "fused"
    momentum = solver_cfg.momentum
    if choice == "apex":
        fused_sgd = _apex_fused_sgd()
        if fused_sgd is None:
            raise ValueError("solver.optimizer=apex needs NVIDIA apex; install it or use solver.optimizer=auto")
        return fused_sgd(groups, lr=solver_cfg.base_lr, momentum=momentum), "apex.optimizers.FusedSGD"
    if choice == "fused":
        optimizer = torch.optim.SGD(groups, lr=solver_cfg.base_lr, momentum=momentum, fused=True)
        return optimizer, "torch.optim.SGD(fused=True)"
    if choice in ("foreach", "plain"):
        foreach = choice == "foreach"
        optimizer = torch.optim.SGD(groups, lr=solver_cfg.base_lr, momentum=momentum, foreach=foreach)
        return optimizer, f"torch.optim.SGD(foreach={foreach})"
    raise ValueError(f"solver.optimizer must be auto, apex, fused, foreach or plain, got {choice!r}")


def lr_multiplier(
    iteration: int, *, warmup_iters: int, warmup_factor: float, steps: Iterable[int], gamma: float
) -> float:
    """The LR at `iteration` (0-based) as a multiple of the base LR.

    1. warmup (iteration < warmup_iters): linear from warmup_factor to 1;
    2. afterwards: 1;
    3. times gamma for every decay step already reached (iteration >= step).
    """
    warmup = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        warmup = warmup_factor * (1.0 - alpha) + alpha
    return warmup * gamma ** bisect.bisect_right(sorted(steps), iteration)


def set_learning_rate(optimizer: torch.optim.Optimizer, solver_cfg: Config, iteration: int) -> float:
    """Write the schedule's LR for `iteration` into every group; returns the base group's LR."""
    scale = lr_multiplier(
        iteration,
        warmup_iters=solver_cfg.warmup_iters,
        warmup_factor=solver_cfg.warmup_factor,
        steps=solver_cfg.steps,
        gamma=solver_cfg.gamma,
    )
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale
    return solver_cfg.base_lr * scale


def mlperf_lr_and_steps(global_batch: int, k: int) -> tuple[float, tuple[int, int]]:
    """Base LR and decay steps the MLPerf rules allow for a global batch and LR multiple K.

    Steps are rounded to the nearest iteration, e.g. batch 96, K 6 -> 0.12, (16000, 21333).
    """
    if k < 1:
        raise ValueError(f"K must be a positive integer, got {k}")
    base_lr = REFERENCE_LR_UNIT * k if global_batch >= REFERENCE_BATCH else REFERENCE_LR_UNIT / k
    scale = (1 + k / 10) * REFERENCE_BATCH / global_batch
    first, second = (int(round(step * scale)) for step in REFERENCE_STEPS)
    return base_lr, (first, second)


def lr_multiple(base_lr: float, global_batch: int) -> int | None:
    """K such that base_lr = 0.02 x K (or 0.02 / K below batch 16), or None if there is none."""
    ratio = base_lr / REFERENCE_LR_UNIT
    if ratio >= 1 and math.isclose(ratio, round(ratio), rel_tol=1e-9):
        return round(ratio)
    inverse = REFERENCE_LR_UNIT / base_lr
    if global_batch < REFERENCE_BATCH and math.isclose(inverse, round(inverse), rel_tol=1e-9):
        return round(inverse)
    return None


def _lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _flatten(cfg: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def closed_division_violations(cfg: Config, reference: Config | None = None) -> list[str]:
    """What in `cfg` the MLPerf closed division does not allow, one sentence each (empty: compliant)."""
    reference = reference if reference is not None else load_config(REFERENCE_CONFIG)
    problems = []
    batch, solver = cfg.solver.ims_per_batch, cfg.solver
    k = lr_multiple(solver.base_lr, batch)
    if k is None:
        problems.append(f"solver.base_lr={solver.base_lr} is not 0.02 x K (or 0.02 / K below batch 16)")
    else:
        _, steps = mlperf_lr_and_steps(batch, k)
        if tuple(solver.steps) != steps:
            problems.append(f"solver.steps={list(solver.steps)} should be {list(steps)} for batch {batch}, K {k}")
    fixed = [k for k in _flatten(reference.model, "model.") if k not in CLOSED_FREE_MODEL_KEYS]
    for key in list(CLOSED_FIXED_KEYS) + fixed:
        ours, theirs = _lookup(cfg, key), _lookup(reference, key)
        if ours != theirs:
            problems.append(f"{key}={ours!r} differs from the reference {theirs!r}")
    candidates = cfg.model.rpn.post_nms_top_n_train
    if candidates % 1000:
        problems.append(f"model.rpn.post_nms_top_n_train={candidates} is not a multiple of 1000")
    if not cfg.train.weights:
        problems.append("train.weights is empty: the closed division starts from the provided R-50 weights")
    return problems


def log_closed_division_check(cfg: Config) -> list[str]:
    """Say at start whether the run keeps the closed-division rules, and what it breaks.

    A run that declares the open division (`train.mlperf.division: open`) knowingly breaks them:
    one line names the settings; a closed-division run gets one line per problem, as a warning.
    """
    problems = closed_division_violations(cfg)
    if problems and cfg.train.mlperf.division == "open":
        keys = [problem.split("=", 1)[0].split(" ", 1)[0] for problem in problems]
        log.info("open division: %d settings differ from the closed division's (%s)", len(problems), ", ".join(keys))
    elif problems:
        log.warning("this run is outside the MLPerf closed division:\n  %s", "\n  ".join(problems))
    else:
        log.info("solver and model keep the MLPerf closed-division rules")
    return problems

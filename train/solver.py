"""Optimizer, learning-rate schedule and the MLPerf closed-division solver rules.

The reference's solver (maskrcnn-benchmark `make_optimizer` / `WarmupMultiStepLR`):
momentum SGD with two parameter groups (biases: LR x `bias_lr_factor`, weight decay
`weight_decay_bias`; frozen parameters left out), a linear warmup over `warmup_iters`, then
LR x `gamma` at each of the two `steps`. The warmup is one of the reference scheduler's two
(`solver.warmup_method`): `linear`, its default, relative: each group's LR from
`warmup_factor` x its base LR up to it; `mlperf_linear`, absolute: the same
(warmup_iters - i) x `warmup_factor` subtracted from every group's base LR, which NVIDIA's
recipes and the MLPerf reference convergence points use (from 0 for the weights, while the
biases, at twice the LR, start halfway).

MLPerf lets a submission tune the global batch, the base LR as 0.02 x K1 (or 0.02 / K1
below a global batch of 16), the decay steps as (60000, 80000) x (1 + K2/10) x 16 / batch
with K1 and K2 two independent integers (K2 >= 0, truncated to whole iterations: see
`decay_steps`), and the warmup. E.g. the reference's own run: batch 2, LR 0.0025, steps
(480000, 640000): K1 = 8, K2 = 0; NVIDIA's 8xH100 v3.0 run: batch 96, LR 0.12, steps
(12000, 16000): K1 = 6, K2 = 2. `closed_division_violations` lists what a config breaks.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Iterable

import torch
from torch import nn

from train.config import REFERENCE_CONFIG, Config, leaves, load_config, lookup
from train.config_schema import WARMUP_METHODS

log = logging.getLogger(__name__)

REFERENCE_STEPS = (60000, 80000)  # decay steps at global batch 16, K2 = 0
REFERENCE_BATCH = 16
REFERENCE_LR_UNIT = 0.02
REFERENCE_CANDIDATES = 1000  # num_image_candidates per image: 1000, or 1000 x images per GPU
INTEGER_TOLERANCE = 1e-5  # the compliance checker's is_integer

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
# Model keys the closed division leaves free: the top-k of proposals may be per image (1000) or
# over each GPU's batch (1000 x images per GPU); the count itself is checked below.
CLOSED_FREE_MODEL_KEYS = ("model.rpn.post_nms_top_n_train", "model.rpn.post_nms_per_batch")


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
    model: nn.Module, solver_cfg: Config, device: torch.device, grad_scaling: bool = False
) -> tuple[torch.optim.Optimizer, str]:
    """Momentum SGD over `parameter_groups`, the fastest implementation the machine has.

    `solver_cfg.optimizer`: auto (on CUDA apex FusedSGD when apex imports, else torch's fused
    SGD; foreach on CPU) | apex | fused | foreach | plain. With `grad_scaling` (fp16's
    GradScaler) auto takes torch's fused SGD: it unscales and skips inside its kernel, while
    GradScaler.step reads found-inf on the host every step for any other optimizer (apex's too).
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
            choice = "apex" if _apex_fused_sgd() is not None and not grad_scaling else "fused"
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


def learning_rate(
    base_lr: float,
    iteration: int,
    *,
    warmup_method: str,
    warmup_iters: int,
    warmup_factor: float,
    steps: Iterable[int],
    gamma: float,
) -> float:
    """The LR of a parameter group whose base LR is `base_lr` at `iteration` (0-based), as `WarmupMultiStepLR`.

    1. warmup (iteration < warmup_iters), `linear`: base_lr x (warmup_factor (1 - a) + a),
       a = iteration / warmup_iters; `mlperf_linear`: base_lr - (warmup_iters - iteration) x
       warmup_factor, never below 0 (the reference's arithmetic can leave -1e-17 at iteration 0);
    2. afterwards: base_lr;
    3. times gamma for every decay step already reached (iteration >= step).
    """
    if warmup_method not in WARMUP_METHODS:
        raise ValueError(f"solver.warmup_method must be one of {WARMUP_METHODS}, got {warmup_method!r}")
    lr = base_lr
    if iteration < warmup_iters:
        if warmup_method == "linear":
            alpha = iteration / warmup_iters
            lr = base_lr * (warmup_factor * (1.0 - alpha) + alpha)
        else:
            lr = max(base_lr - (warmup_iters - iteration) * warmup_factor, 0.0)
    return lr * gamma ** bisect.bisect_right(sorted(steps), iteration)


def set_learning_rate(optimizer: torch.optim.Optimizer, solver_cfg: Config, iteration: int) -> float:
    """Write the schedule's LR for `iteration` into every group; returns the LR of the base group (solver.base_lr)."""
    schedule = dict(
        warmup_method=solver_cfg.warmup_method,
        warmup_iters=solver_cfg.warmup_iters,
        warmup_factor=solver_cfg.warmup_factor,
        steps=solver_cfg.steps,
        gamma=solver_cfg.gamma,
    )
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(group["base_lr"], iteration, **schedule)
    return learning_rate(solver_cfg.base_lr, iteration, **schedule)


def lr_multiple(base_lr: float, global_batch: int) -> int | None:
    """K1 >= 1 with base_lr = 0.02 x K1 (or 0.02 / K1 below a global batch of 16), else None.

    "Integer" within 1e-5, as the compliance checker's `is_integer` reads the logged LR.
    """
    if base_lr <= 0:
        return None
    ratios = [base_lr / REFERENCE_LR_UNIT]
    if global_batch < REFERENCE_BATCH:
        ratios.append(REFERENCE_LR_UNIT / base_lr)
    for ratio in ratios:
        if round(ratio) >= 1 and abs(ratio - round(ratio)) < INTEGER_TOLERANCE:
            return round(ratio)
    return None


def decay_steps(global_batch: int, k2: int) -> tuple[int, int]:
    """The decay steps the rule gives: (60000, 80000) x (1 + K2/10) x 16 / global_batch, truncated.

    The rules state the product and not how a fraction becomes an iteration; the MLPerf
    reference convergence points truncate it (mlperf_logging rcp_checker, rcps_maskrcnn.json,
    maskrcnn_ref_272: 5294.1, 7058.8 -> [5294, 7058]), so we do. Integer arithmetic: exact.
    """
    return tuple(_decay_step(step, global_batch, k2) for step in REFERENCE_STEPS)


def _decay_step(reference_step: int, global_batch: int, k2: int) -> int:
    return reference_step * REFERENCE_BATCH * (10 + k2) // (10 * global_batch)


def _k2_of_step(step: int, reference_step: int, global_batch: int) -> int | None:
    """K2 >= 0 whose rule gives `step` from `reference_step`, or None."""
    # The smallest 10 + K2 whose product reaches `step` is the only candidate: the product grows
    # by reference_step x 16 / (10 x batch) >= 1 iteration per unit of K2 (any batch up to 96000).
    ten_plus_k2 = -(-step * 10 * global_batch // (reference_step * REFERENCE_BATCH))
    k2 = ten_plus_k2 - 10
    return k2 if k2 >= 0 and _decay_step(reference_step, global_batch, k2) == step else None


def decay_step_multiple(steps: Iterable[int], global_batch: int) -> int | None:
    """The one K2 >= 0 whose `decay_steps` are `steps`, or None."""
    steps = tuple(steps)
    if len(steps) != len(REFERENCE_STEPS):
        return None
    k2s = {_k2_of_step(s, r, global_batch) for s, r in zip(steps, REFERENCE_STEPS)}
    return k2s.pop() if len(k2s) == 1 and None not in k2s else None


def schedule_violations(solver: Config) -> list[str]:
    """What the solver section breaks of the closed division's LR rule, one sentence each.

    Tunable (training_rules.adoc, maskrcnn hyperparameters): base LR = 0.02 x K1 (or 0.02 / K1
    below a global batch of 16); decay steps = (60000, 80000) x (1 + K2/10) x 16 / batch,
    K1 and K2 independent integers; warmup iterations, factor and method (the 3.1.0 compliance
    checker requires a factor > 0; `mlperf_linear` may start from 0, not below).
    """
    problems = []
    batch, steps = solver.ims_per_batch, list(solver.steps)
    if lr_multiple(solver.base_lr, batch) is None:
        below = " (or 0.02 / K1, allowed below a global batch of 16)" if batch < REFERENCE_BATCH else ""
        problems.append(f"solver.base_lr={solver.base_lr} is not 0.02 x K1 for an integer K1 >= 1{below}")
    rule = f"(60000, 80000) x (1 + K2/10) x 16 / {batch} (truncated)"
    if len(steps) != 2:
        problems.append(f"solver.steps={steps} must hold two decay steps, {rule}")
    elif decay_step_multiple(steps, batch) is None:
        k2s = [_k2_of_step(s, r, batch) for s, r in zip(steps, REFERENCE_STEPS)]
        k2 = next((k for k in k2s if k is not None), None)
        if k2 is not None:
            problems.append(
                f"solver.steps={steps} do not share one K2: one step is K2 = {k2}'s in {rule}, which makes the pair "
                f"{list(decay_steps(batch, k2))}"
            )
        else:
            below = max(0, -(-steps[0] * 10 * batch // (REFERENCE_STEPS[0] * REFERENCE_BATCH)) - 11)
            nearest = " or ".join(f"{list(decay_steps(batch, k))} (K2 = {k})" for k in (below, below + 1))
            problems.append(f"solver.steps={steps} fit no integer K2 >= 0 in {rule}; nearest: {nearest}")
    if solver.warmup_factor <= 0:
        problems.append(
            f"solver.warmup_factor={solver.warmup_factor} must be > 0: the MLPerf compliance checker "
            "rejects opt_learning_rate_warmup_factor <= 0"
        )
    if solver.warmup_iters < 0:
        problems.append(f"solver.warmup_iters={solver.warmup_iters} must be >= 0")
    start = solver.base_lr - solver.warmup_iters * solver.warmup_factor
    if solver.warmup_method == "mlperf_linear" and start < -INTEGER_TOLERANCE * solver.base_lr:
        problems.append(
            f"solver.warmup_factor={solver.warmup_factor} x solver.warmup_iters={solver.warmup_iters} exceeds "
            f"solver.base_lr={solver.base_lr}: mlperf_linear's warmup would start below 0 (it is held at 0); "
            f"from 0 the factor is base_lr / warmup_iters = {solver.base_lr / max(solver.warmup_iters, 1):.6g}"
        )
    return problems


def closed_division_violations(cfg: Config, reference: Config | None = None) -> list[str]:
    """What in `cfg` the MLPerf closed division does not allow, one sentence each (empty: compliant)."""
    reference = reference if reference is not None else load_config(REFERENCE_CONFIG)
    problems = schedule_violations(cfg.solver)
    fixed = [k for k, _ in leaves(reference.model, "model.") if k not in CLOSED_FREE_MODEL_KEYS]
    for key in list(CLOSED_FIXED_KEYS) + fixed:
        ours, theirs = lookup(cfg, key), lookup(reference, key)
        if ours != theirs:
            problems.append(f"{key}={ours!r} differs from the reference {theirs!r}")
    candidates = cfg.model.rpn.post_nms_top_n_train
    if candidates != REFERENCE_CANDIDATES:
        problems.append(
            f"model.rpn.post_nms_top_n_train={candidates} is not 1000: num_image_candidates must be 1000 per "
            "image (or 1000 x images per GPU with model.rpn.post_nms_per_batch=true)"
        )
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

"""Matching predictions to padded ground truth and balanced sampling, in fixed-size tensors.

torchvision's `Matcher` and `BalancedPositiveNegativeSampler` find indices with
`torch.where`/`randperm` on variable-length sets (host synchronizations on CUDA); these
versions give the same labels and the same sampling distribution with masks and top-k, which
is what the closed division asks of a reimplementation (the reference's sampler is
torchvision's, via maskrcnn-benchmark's `BalancedPositiveNegativeSampler`).
"""

from __future__ import annotations

import torch
from torch import Tensor

BACKGROUND = 0  # match label: below the background threshold
IGNORED = -1  # match label: between the thresholds, or excluded by the caller
KEY_BITS = 61  # random bits of a sampling key; the candidate's class sits above them (3 x 2^61 < 2^63)


def match_to_ground_truth(
    iou: Tensor, gt_valid: Tensor, fg_iou: float, bg_iou: float, allow_low_quality: bool
) -> tuple[Tensor, Tensor]:
    """Assign each prediction its best ground truth, as torchvision's `Matcher`.

    iou [B, G, N] (ground truth x predictions); gt_valid [B, G] marks real (unpadded) rows.
    Returns (gt_index [B, N] of the best-overlapping ground truth, 0 when there is none;
    label [B, N]: 1 foreground (IoU >= fg_iou), BACKGROUND (< bg_iou), IGNORED otherwise).
    With `allow_low_quality`, each ground truth's highest-IoU predictions are foreground too
    (matched to their own best ground truth), even below fg_iou.
    """
    iou = torch.where(gt_valid[:, :, None], iou, torch.full_like(iou, -1.0))
    best_iou, gt_index = iou.max(dim=1)
    label = torch.full_like(gt_index, IGNORED)
    label = torch.where(best_iou >= fg_iou, torch.ones_like(label), label)
    label = torch.where(best_iou < bg_iou, torch.full_like(label, BACKGROUND), label)
    if allow_low_quality:
        best_per_gt = iou.max(dim=2, keepdim=True).values
        is_best = ((iou == best_per_gt) & gt_valid[:, :, None]).any(dim=1)
        label = torch.where(is_best, torch.ones_like(label), label)
    label = torch.where(gt_valid.any(dim=1, keepdim=True), label, torch.full_like(label, BACKGROUND))
    return gt_index, label


def sample_balanced(
    label: Tensor, num_samples: int, positive_fraction: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pick up to `num_samples` per image: at most a `positive_fraction` positives, the rest negatives.

    label [B, N]: 1 positive, 0 negative, -1 neither. Each positive (and each negative) is
    equally likely to be chosen, as with torchvision's randperm. Returns (index [B, S],
    is_positive [B, S], valid [B, S]) with S = min(num_samples, N): the chosen positives come
    first, then the negatives, then padding (valid False).
    """
    n = label.shape[1]
    max_positives = min(int(num_samples * positive_fraction), n)
    num_samples = min(num_samples, n)
    positive = label == 1
    negative = label == 0
    # Integer keys, drawn on the device: a class rank in the top bits above KEY_BITS random bits.
    # Integers are exact, so no key can round into the class above (float32 `noise + 1.0` became
    # 2.0 for noise within 2^-24 of 1 and took a negative as a positive), and ties, which topk
    # breaks by position, are vanishingly rare (about n^2 / 2^62 pairs).
    noise = torch.randint(0, 1 << KEY_BITS, label.shape, dtype=torch.int64, device=label.device, generator=generator)
    # Rank positives randomly; the first `max_positives` of them are taken.
    positive_key = torch.where(positive, noise, torch.full_like(noise, -1))
    top_positive = positive_key.topk(max_positives, dim=1).indices
    chosen_positive = torch.zeros_like(positive).scatter(1, top_positive, True) & positive
    # Chosen positives rank above every negative, negatives above the rest; random order within.
    rank = chosen_positive.to(torch.int64) * 2 + negative.to(torch.int64)
    key, index = ((rank << KEY_BITS) | noise).topk(num_samples, dim=1)
    rank = key >> KEY_BITS
    # Negatives fill the slots the positives left; a slot without a candidate is padding.
    return index, rank == 2, rank >= 1

"""The reference's five losses as free functions over fixed-size, masked samples.

Every normalizer is a device tensor (a count of real samples, at least 1), so no loss needs
the host; rows that are padding contribute exactly zero (`torch.where`, not multiplication,
so a non-finite value in a padding row cannot leak in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def rpn_losses(
    objectness: Tensor, deltas: Tensor, targets: Tensor, is_positive: Tensor, sampled: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """(loss_objectness, loss_rpn_box_reg) over sampled anchors.

    objectness [B, S] logits; deltas and targets [B, S, 4]; is_positive, sampled [B, S].
    BCE averaged over the sampled anchors of the batch; smooth L1 (beta) summed over the
    positives and divided by the same count.
    """
    num_sampled = sampled.sum().clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(objectness, is_positive.to(objectness.dtype), reduction="none")
    box = F.smooth_l1_loss(deltas, targets, beta=beta, reduction="none").sum(-1)
    return _masked_sum(bce, sampled) / num_sampled, _masked_sum(box, is_positive) / num_sampled


def box_head_losses(
    class_logits: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor, sampled: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """(loss_classifier, loss_box_reg) over sampled RoIs.

    class_logits [B, S, K]; deltas [B, S, 4K] class-specific; labels [B, S] (0 background);
    targets [B, S, 4]. Cross-entropy averaged over the sampled RoIs; smooth L1 (beta) of the
    true class's deltas summed over the positives and divided by the same count.
    """
    num_sampled = sampled.sum().clamp(min=1)
    ce = F.cross_entropy(class_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    class_deltas = deltas.unflatten(-1, (-1, 4)).gather(2, labels[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)
    box = F.smooth_l1_loss(class_deltas, targets, beta=beta, reduction="none").sum(-1)
    return _masked_sum(ce, sampled) / num_sampled, _masked_sum(box, sampled & (labels > 0)) / num_sampled


def mask_loss(mask_logits: Tensor, mask_targets: Tensor, is_positive: Tensor) -> Tensor:
    """Per-pixel BCE averaged over the pixels of the positive RoIs: logits, targets [R, M, M], is_positive [R]."""
    bce = F.binary_cross_entropy_with_logits(mask_logits, mask_targets, reduction="none").mean(dim=(1, 2))
    return _masked_sum(bce, is_positive) / is_positive.sum().clamp(min=1)

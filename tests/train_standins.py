"""Stand-ins for the trainer's unit tests: a tiny loss-returning module and its batches."""

from __future__ import annotations

import torch
from torch import nn


class TinyLossModel(nn.Module):
    """Returns a dict of losses like Mask R-CNN does; NaN on the listed (1-based) calls."""

    def __init__(self, nan_at: set[int] | None = None, nan_from: int | None = None):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.calls = 0
        self.nan_at = nan_at or set()
        self.nan_from = nan_from

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        out = self.head(torch.relu(self.trunk(batch)))
        # small losses, so that fp16 gradients at GradScaler's initial scale (2**16) do not overflow
        losses = {
            "loss_a": 0.1 * out[:, 0].float().square().mean(),
            "loss_b": 0.1 * (out[:, 1].float() - 1).abs().mean(),
        }
        if self.calls in self.nan_at or (self.nan_from is not None and self.calls >= self.nan_from):
            losses["loss_a"] = losses["loss_a"] * float("nan")
        return losses


def tiny_batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=generator) for _ in range(n)]

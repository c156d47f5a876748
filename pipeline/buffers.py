"""Batch image buffers reused on the CPU once nothing outside the pool references them.

A fresh 10-50 MB CPU tensor is page-faulted in on every batch, which costs about as much as
filling it (the copy out of the pipeline is the consumer's main cost on a CPU). A buffer is
handed out again only when its storage has no user besides the pool: no Batch, view or numpy
array of it is alive, so batches the consumer keeps are never overwritten. CUDA tensors need
none of this (torch's caching allocator already reuses device memory).
"""

from __future__ import annotations

import torch


def _storage_users(tensor: torch.Tensor) -> int | None:
    # torch has no public storage use count; without this private one, buffers are simply not reused.
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else use_count(tensor.untyped_storage()._cdata)


class BufferPool:
    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when only the pool holds it)

    def empty(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """An uninitialized uint8 tensor of `shape`, reused when one is free."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=torch.uint8, device=device)
        for buffer, alone in self._buffers:
            if tuple(buffer.shape) == tuple(shape) and _storage_users(buffer) == alone:
                return buffer
        buffer = torch.empty(shape, dtype=torch.uint8)
        alone = _storage_users(buffer)
        if alone is not None:
            self._buffers = [*self._buffers, (buffer, alone)][-self.capacity :]
        return buffer

"""Reused batch buffers: handed out again only once nothing outside the pool uses them."""

import torch

from pipeline.buffers import BufferPool

CPU = torch.device("cpu")


def test_a_buffer_still_viewed_by_the_consumer_is_not_reused():
    pool = BufferPool(capacity=2)
    first = pool.empty((2, 4, 4, 3), CPU)
    kept = first.permute(0, 3, 1, 2)[0]  # a derived view, as a consumer might keep
    second = pool.empty((2, 4, 4, 3), CPU)
    assert second.data_ptr() != first.data_ptr()
    del kept


def test_a_released_buffer_is_reused():
    pool = BufferPool(capacity=2)
    batch_images = pool.empty((2, 4, 4, 3), CPU).permute(0, 3, 1, 2)
    pointer = batch_images.data_ptr()
    del batch_images
    assert pool.empty((2, 4, 4, 3), CPU).data_ptr() == pointer


def test_kept_batches_keep_their_values():
    pool = BufferPool(capacity=1)
    kept = []
    for value in range(4):
        images = pool.empty((1, 2, 2, 3), CPU)
        images.fill_(value)
        kept.append(images.permute(0, 3, 1, 2))
    assert [int(k.max()) for k in kept] == [0, 1, 2, 3]

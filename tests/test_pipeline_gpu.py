"""GPU delivery: both backends on CUDA (nvJPEG / torchvision CUDA decode) give what the CPU path gives."""

import pytest
import torch

from pipeline.loader import build_loader
from pipeline_shards import data_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GROUND_TRUTH = ["image_sizes", "original_sizes", "flipped", "image_ids", "num_boxes", "labels", "num_polys", "polys"]


def epoch(folder, backend, device, *overrides):
    loader = build_loader(
        data_config("data.flip_prob=1.0", *overrides), folder, training=False, batch_size=3, device=device, backend=backend
    )
    return list(loader)


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("decode_device", ["auto", "cpu"])
def test_cuda_batches_match_the_cpu_ones(val_shards, backend, decode_device):
    on_cpu = epoch(val_shards, backend, "cpu")
    on_gpu = epoch(val_shards, backend, "cuda", f"data.decode_device={decode_device}")
    assert len(on_cpu) == len(on_gpu)
    for a, b in zip(on_cpu, on_gpu):
        assert b.images.is_cuda and b.images.is_contiguous(memory_format=torch.channels_last)
        for name in GROUND_TRUTH:
            assert torch.equal(getattr(a, name), getattr(b, name).cpu()), name
        assert torch.allclose(a.boxes, b.boxes.cpu(), atol=1e-3)
        assert torch.allclose(a.verts, b.verts.cpu(), atol=1e-3)
        # nvJPEG and libjpeg-turbo differ by a few levels (chroma upsampling, IDCT).
        assert (a.images - b.images.cpu()).abs().mean() < 3.0

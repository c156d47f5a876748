"""GPU delivery: both backends on CUDA (nvJPEG / torchvision CUDA decode) give what the CPU path gives."""

import pytest
import torch

from pipeline.loader import build_loader, dali_available
from pipeline_shards import data_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GROUND_TRUTH = ["image_sizes", "original_sizes", "flipped", "num_boxes", "labels", "num_polys", "polys"]


def samples_by_id(folder, backend, device, *overrides):
    loader = build_loader(
        data_config("data.flip_prob=1.0", *overrides), folder, training=True, batch_size=3, device=device, backend=backend
    )
    samples = {}
    for batch in loader:
        assert batch.images.device.type == torch.device(device).type
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        for i, image_id in enumerate(batch.image_ids.tolist()):
            samples[image_id] = {name: getattr(batch, name)[i].cpu() for name in vars(batch)}
    return samples


# GPU machines without DALI (its wheel is large) still check the torch fallback.
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs nvidia-dali")), "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decode_device", ["auto", "cpu"])
def test_cuda_batches_match_the_cpu_ones(train_shards, backend, decode_device):
    on_cpu = samples_by_id(train_shards, backend, "cpu")
    on_gpu = samples_by_id(train_shards, backend, "cuda", f"data.decode_device={decode_device}")
    assert on_cpu.keys() == on_gpu.keys()
    for image_id, a in on_cpu.items():
        b = on_gpu[image_id]
        for name in GROUND_TRUTH:
            assert torch.equal(a[name], b[name]), (image_id, name)
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3)
        assert torch.allclose(a["verts"], b["verts"], atol=1e-3)
        # nvJPEG and libjpeg-turbo differ by a few levels (chroma upsampling, IDCT); uint8 would wrap.
        assert (a["images"].float() - b["images"].float()).abs().mean() < 3.0, image_id

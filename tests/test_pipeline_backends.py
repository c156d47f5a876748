"""DALI and the torch fallback agree on the same samples, with the flip forced on and forced off.

Both follow one epoch plan, so they yield the same batches in the same order; the real rows of
the ground truth are compared (and the padding checked on its own): equal counts, labels and
polygon indices, boxes and vertices to float rounding; pixels within decoder differences.
"""

import pytest
import torch

from pipeline.loader import build_loader
from pipeline_shards import data_config

PER_IMAGE = ["image_sizes", "original_sizes", "scales", "flipped", "num_boxes", "num_polys"]


def real_rows(sample):
    """The sample's ground truth without its padding, after checking the padding is what batch.py says."""
    n, p = int(sample["num_boxes"]), int(sample["num_polys"])
    v = int(sample["polys"][:p, 2].max()) if p else 0
    assert not sample["boxes"][n:].any() and not sample["labels"][n:].any() and not sample["verts"][v:].any()
    assert (sample["polys"][p:] == torch.tensor([-1, 0, 0], dtype=torch.int32)).all()
    return {"boxes": sample["boxes"][:n], "labels": sample["labels"][:n], "polys": sample["polys"][:p], "verts": sample["verts"][:v]}


def samples_by_id(folder, backend, flip_prob):
    loader = build_loader(
        data_config(f"data.flip_prob={flip_prob}"), folder, training=True, batch_size=3, seed=5, backend=backend
    )
    samples = {}
    for batch in loader:
        samples.setdefault("order", []).append(batch.image_ids.tolist())
        for i, image_id in enumerate(batch.image_ids.tolist()):
            samples[image_id] = {name: getattr(batch, name)[i] for name in vars(batch)}
    return samples


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_backends_give_the_same_samples(train_shards, flip_prob):
    dali = samples_by_id(train_shards, "dali", flip_prob)
    torch_ = samples_by_id(train_shards, "torch", flip_prob)
    assert dali.pop("order") == torch_.pop("order")  # one epoch plan: the same batches in the same order
    assert dali.keys() == torch_.keys()
    for image_id, a in dali.items():
        b = torch_[image_id]
        for name in PER_IMAGE:
            assert torch.equal(a[name], b[name]), (image_id, name)
        rows_a, rows_b = real_rows(a), real_rows(b)
        assert torch.equal(rows_a["labels"], rows_b["labels"]) and torch.equal(rows_a["polys"], rows_b["polys"]), image_id
        assert torch.allclose(rows_a["boxes"], rows_b["boxes"], atol=1e-3), image_id
        assert torch.allclose(rows_a["verts"], rows_b["verts"], atol=1e-3), image_id
        assert a["images"].shape == b["images"].shape
        # Decoders (DALI's vs libjpeg-turbo in torchvision) and resize kernels differ by a few levels.
        assert a["images"].dtype == b["images"].dtype == torch.uint8
        difference = (a["images"].float() - b["images"].float()).abs()
        assert difference.mean() < 1.0, (image_id, float(difference.mean()))
        assert difference.max() < 16.0, image_id

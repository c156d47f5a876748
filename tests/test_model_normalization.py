"""The model's first op: uint8 RGB padded images -> the normalized input the weights expect.

Checked against the two conventions it must reproduce: maskrcnn-benchmark's `to_bgr255` +
`Normalize` followed by `to_image_list`'s zero padding (the reference, MSRA R-50.pkl), and
torchvision's `GeneralizedRCNNTransform.normalize` (its ImageNet weights).
"""

import numpy as np
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from model.normalization import NORMALIZATIONS, InputNormalization

SIZES = torch.tensor([[20, 30], [32, 17]], dtype=torch.int32)


def padded_images(generator: torch.Generator) -> torch.Tensor:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=generator)
    for image, (h, w) in zip(images, SIZES.tolist()):
        image[:, h:], image[:, :, w:] = 0, 0  # the pipelines' zero padding
    return images.contiguous(memory_format=torch.channels_last)


def test_constants():
    assert NORMALIZATIONS["bgr255"].mean == (102.9801, 115.9465, 122.7717)
    assert NORMALIZATIONS["bgr255"].std == (1.0, 1.0, 1.0)
    rgb = NORMALIZATIONS["rgb"]
    assert np.allclose(np.array(rgb.mean) / 255, [0.485, 0.456, 0.406])
    assert np.allclose(np.array(rgb.std) / 255, [0.229, 0.224, 0.225])


def test_bgr255_equals_the_reference_then_zero_padding():
    images = padded_images(torch.Generator().manual_seed(0))
    out = InputNormalization(NORMALIZATIONS["bgr255"])(images, SIZES)
    mean = torch.tensor([102.9801, 115.9465, 122.7717]).view(3, 1, 1)
    for i, (h, w) in enumerate(SIZES.tolist()):
        # maskrcnn-benchmark: ToTensor (0-1), to_bgr255 (x[[2, 1, 0]] * 255), Normalize(mean, std 1).
        bgr255 = (images[i, :, :h, :w].float() / 255)[[2, 1, 0]] * 255
        expected = torch.zeros(3, 32, 32)
        expected[:, :h, :w] = bgr255 - mean  # to_image_list pads the normalized image with zeros
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)


def test_rgb_equals_torchvision_normalize():
    images = padded_images(torch.Generator().manual_seed(1))
    out = InputNormalization(NORMALIZATIONS["rgb"])(images, SIZES)
    transform = GeneralizedRCNNTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    for i, (h, w) in enumerate(SIZES.tolist()):
        expected = transform.normalize(images[i, :, :h, :w].float() / 255)
        torch.testing.assert_close(out[i, :, :h, :w], expected, atol=1e-5, rtol=1e-5)
        assert not out[i, :, h:].any() and not out[i, :, :, w:].any()

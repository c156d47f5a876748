"""Every head parameter starts as the reference initializes it (maskrcnn-benchmark, MLPerf reference).

The rules, from the reference's modeling code: FPN inner and layer convs `conv_with_kaiming_uniform`
(kaiming-uniform a=1); RPN head conv and both predictors N(0, 0.01) (rpn.py `RPNHead`); box head
fc6/fc7 `make_fc` (kaiming-uniform a=1); `FPNPredictor` cls_score N(0, 0.01), bbox_pred
N(0, 0.001); mask head convs `make_conv3x3` (kaiming-normal, fan-out, ReLU);
`MaskRCNNC4Predictor` conv5_mask and mask_fcn_logits kaiming-normal fan-out ReLU. Every bias 0.
Each weight's sample mean, std and kurtosis are checked against the rule (uniform: excess
kurtosis -1.2 and nothing past the bound; normal: 0) within sampling tolerance.
"""

import math
import re

import pytest
import torch

from model import build_model
from tests.model_helpers import model_config


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) as torch.nn.init computes them: dims 1 and 0 times the kernel size."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def kaiming_uniform_a1(w):
    return "uniform", 1 / math.sqrt(fans(w)[0])  # bound sqrt(3 / fan_in): std 1 / sqrt(fan_in)


def kaiming_normal_fan_out(w):
    return "normal", math.sqrt(2 / fans(w)[1])


def normal(std):
    return lambda w: ("normal", std)


RULES = [
    (r"static_part\.backbone\.fpn\.(inner|layer)_blocks\.\d\.0\.weight", kaiming_uniform_a1),
    (r"static_part\.rpn_head\.(conv\.0\.0|cls_logits|bbox_pred)\.weight", normal(0.01)),
    (r"roi_heads\.box_head\.fc[67]\.weight", kaiming_uniform_a1),
    (r"roi_heads\.box_predictor\.cls_score\.weight", normal(0.01)),
    (r"roi_heads\.box_predictor\.bbox_pred\.weight", normal(0.001)),
    (r"roi_heads\.mask_head\.\d\.0\.weight", kaiming_normal_fan_out),
    (r"roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.weight", kaiming_normal_fan_out),
]


@pytest.fixture(scope="module")
def head_parameters():
    torch.manual_seed(0)
    model = build_model(model_config(), num_classes=81)
    return {n: p.detach() for n, p in model.named_parameters() if not n.startswith("static_part.backbone.body.")}


def test_every_head_bias_starts_at_zero(head_parameters):
    biases = {n: p for n, p in head_parameters.items() if n.endswith(".bias")}
    assert len(biases) == len(head_parameters) // 2
    assert [n for n, p in biases.items() if not torch.equal(p, torch.zeros_like(p))] == []


def test_every_head_weight_follows_the_reference_rule(head_parameters):
    weights = {n: p for n, p in head_parameters.items() if not n.endswith(".bias")}
    for name, w in weights.items():
        rules = [rule for pattern, rule in RULES if re.fullmatch(pattern, name)]
        assert len(rules) == 1, f"{name} has no initialization rule in this test"
        kind, std = rules[0](w)
        values = w.double().flatten()
        n = values.numel()
        # Sampling tolerances: 6 standard errors of the mean, the std and the kurtosis.
        assert abs(values.mean()) < 6 * std / math.sqrt(n), name
        assert values.std() == pytest.approx(std, rel=6 / math.sqrt(2 * n)), name
        excess_kurtosis = ((values - values.mean()) ** 4).mean() / values.var() ** 2 - 3
        if kind == "uniform":
            assert values.abs().max() <= math.sqrt(3) * std, name
            assert excess_kurtosis == pytest.approx(-1.2, abs=6 * math.sqrt(1.32 / n)), name  # its variance: 1.32 / n
        else:
            assert excess_kurtosis == pytest.approx(0.0, abs=6 * math.sqrt(24 / n)), name

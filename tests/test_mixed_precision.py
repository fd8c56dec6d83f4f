"""Where bfloat16 (train.py --amp on a CPU) would change results, the arithmetic stays in float32: the loss
reductions, box encoding and decoding against default boxes near 300 or 512 pixels and the hard-negative ranking.
Score thresholds and NMS: tests/test_inference_parity.py::test_autocast_outputs_are_post_processed_in_float32."""
import contextlib

import pytest
import torch

import models
from helpers import random_targets
from models.box_coder import decode, encode
from models.ssd import hard_negatives
from models.transform import batch_targets

BFLOAT16_AUTOCAST = {"autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                     "no autocast": contextlib.nullcontext}


def bfloat16_head(model, batch_size, seed=0):
    """Head outputs as bfloat16 autocast gives them (float32 values rounded to bfloat16) and their default boxes."""
    with torch.no_grad():
        head, anchors = model._head_outputs(torch.zeros(1, 3, *model.size))
    generator = torch.Generator().manual_seed(seed)
    head = {key: (torch.randn(batch_size, *value.shape[1:], generator=generator) * 3).to(torch.bfloat16)
            for key, value in head.items()}
    return head, anchors


@pytest.mark.parametrize("context", BFLOAT16_AUTOCAST.values(), ids=BFLOAT16_AUTOCAST.keys())
def test_losses_of_bfloat16_head_outputs_are_float32_sums(context, lite_pair):
    """The losses of bfloat16 head outputs equal, as float32, the losses of the same values upcast by hand:
    matching, target encoding, the hard-negative ranking and every sum run in float32, with or without autocast."""
    model = lite_pair[0]
    head, anchors = bfloat16_head(model, batch_size=4)
    targets = random_targets([0, 3, 12, 40], [model.size] * 4)
    gt = batch_targets(targets)
    with context():
        losses = model.compute_loss(head, anchors, *gt)
    upcast = model.compute_loss({key: value.float() for key, value in head.items()}, anchors, *gt)
    for key, loss in losses.items():
        assert loss.dtype == torch.float32, key
        torch.testing.assert_close(loss, upcast[key], rtol=1e-6, atol=0)


def test_hard_negatives_of_bfloat16_logits_rank_in_float32():
    """bfloat16 cross-entropies against background tie in steps of 1/128 near 1: the ranking of bfloat16 logits
    must be that of the same values in float32."""
    generator = torch.Generator().manual_seed(3)
    # Close logits: many candidates whose cross-entropies differ by less than bfloat16 resolves.
    logits = (torch.randn(2, 3000, 21, generator=generator) * 0.05).to(torch.bfloat16)
    positive = torch.rand(2, 3000, generator=generator) < 0.01
    num_negative = 3.0 * positive.sum(dim=1, keepdim=True)
    picked = hard_negatives(logits, positive, num_negative)
    assert torch.equal(picked, hard_negatives(logits.float(), positive, num_negative))
    rounded = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.zeros(2, 3000, dtype=torch.int64),
                                                reduction="none")
    assert rounded.unique().numel() < 200  # the bfloat16 ranking this guards against would be a lottery of ties


@pytest.mark.parametrize("name", ["ssd300_vgg16", "ssd512_vgg16"])
def test_default_boxes_and_box_coding_stay_float32_under_autocast(name):
    """Under bfloat16 autocast the default boxes are the float32 ones, targets encode against them in float32, and
    bfloat16 regression outputs decode to float32 boxes: a box near the image's far edge comes back within
    1e-3 px, where bfloat16 coordinates there are 2 or 4 px apart."""
    model = models.get_model(name, num_classes=3).eval()
    size = model.size[0]
    with torch.no_grad():
        _, expected = model._head_outputs(torch.zeros(1, 3, *model.size))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head, anchors = model._head_outputs(torch.zeros(1, 3, *model.size))
    assert head["bbox_regression"].dtype == torch.bfloat16
    assert anchors.dtype == torch.float32 and torch.equal(anchors, expected)

    boxes = torch.tensor([[size - 40.3, size - 35.7, size - 1.1, size - 0.6]]).expand(len(anchors), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        deltas = encode(boxes, anchors)
        near = deltas.abs().amax(dim=1) < 2  # anchors that reach the box with deltas bfloat16 can hold
        rounded = deltas[near].to(torch.bfloat16)
        decoded = decode(rounded, anchors[near])
    assert deltas.dtype == decoded.dtype == torch.float32 and near.sum() > 0
    assert torch.equal(decoded, decode(rounded.float(), anchors[near]))
    exact = decode(deltas[near], anchors[near])
    torch.testing.assert_close(exact, boxes[near], rtol=0, atol=1e-3)


def test_depthwise_convolutions_stay_float32_under_cpu_bfloat16_autocast():
    """SSDlite's depthwise convolutions run in float32 under CPU bfloat16 autocast (oneDNN's bfloat16 depthwise
    kernels are the slower ones there: docs/bfloat16.md); its other convolutions autocast as before."""
    from models.ssdlite import DepthwiseConv2d

    model = models.get_model("ssdlite320_mobilenet_v3_large", num_classes=3)
    convolutions = [module for module in model.modules() if isinstance(module, torch.nn.Conv2d)]
    depthwise = [module for module in convolutions if module.groups > 1]
    assert len(depthwise) > 10 and all(type(module) is DepthwiseConv2d for module in depthwise)
    assert all(type(module) is torch.nn.Conv2d for module in convolutions if module.groups == 1)
    x = torch.randn(2, depthwise[0].in_channels, 20, 20)
    pointwise = next(module for module in convolutions if module.groups == 1 and module.in_channels == x.shape[1])
    with torch.no_grad():
        expected = depthwise[0](x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept, lowered = depthwise[0](x), pointwise(x)
    assert kept.dtype == torch.float32 and torch.equal(kept, expected)
    assert lowered.dtype == torch.bfloat16

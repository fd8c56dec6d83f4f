"""Eval-mode detections equal torchvision's SSD (the oracle) end to end: float and uint8 images, autocast,
channels_last, and the preprocess/detect halves that predict.py and export.py call."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import models
from helpers import (IMAGE_SIZES, LITE, REPO, SSD300, assert_detections_match_to_rounding, assert_same_detections,
                     random_images, random_targets, sgd_step)
from models.postprocess import postprocess_detections


@pytest.mark.parametrize("name", [SSD300, LITE])
def test_eval_detections_equal_torchvision(name, ssd300_pair, lite_pair):
    ours, theirs = ssd300_pair if name == SSD300 else lite_pair
    images = random_images()
    with torch.no_grad():
        mine, reference = ours(images), theirs(images)
    assert_same_detections(mine, reference)
    counts = [len(d["scores"]) for d in reference]
    assert max(counts) > 10, counts  # real detections, not an empty comparison
    assert all(d["boxes"].dtype == torch.float32 and d["labels"].dtype == torch.int64 for d in mine)


def test_uint8_images_give_what_float_images_scaled_by_255_give(lite_pair):
    """The presets hand the model uint8 images; it scales them as ToDtype(float32, scale=True) would, so that
    the batch, the detections and the losses equal those of torchvision's float pipeline exactly."""
    ours, theirs = lite_pair
    generator = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in IMAGE_SIZES]
    as_float = [image.float() / 255 for image in images]
    assert torch.equal(ours.preprocess(images)[0], ours.preprocess(as_float)[0])
    with torch.no_grad():
        assert_same_detections(ours(images), theirs(as_float))
        trainable = copy.deepcopy(ours).train()
        targets = random_targets([2, 0, 7], IMAGE_SIZES)
        from_uint8, from_float = trainable(images, targets), trainable(as_float, targets)
    assert all(torch.equal(from_uint8[key], from_float[key]) for key in from_float)


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_autocast_outputs_are_post_processed_in_float32(device, dtype, lite_pair):
    """Under autocast (train.py --amp) the heads give float16/bfloat16 outputs. Default boxes, softmax and box
    decoding stay in float32, where float16 would round pixel coordinates near 300 to 0.25 px: the detections
    equal those of the same head outputs upcast by hand."""
    ours = copy.deepcopy(lite_pair[0]).to(device)
    batch, _ = ours.preprocess([image.to(device) for image in random_images()])
    settings = (ours.size, ours.score_thresh, ours.nms_thresh, ours.detections_per_img, ours.topk_candidates)
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        head, anchors = ours._head_outputs(batch)
        detections = postprocess_detections(head["bbox_regression"], head["cls_logits"], anchors, *settings)
    assert head["cls_logits"].dtype == head["bbox_regression"].dtype == dtype and anchors.dtype == torch.float32
    upcast = postprocess_detections(head["bbox_regression"].float(), head["cls_logits"].float(), anchors, *settings)
    assert detections[0].dtype == detections[1].dtype == torch.float32
    assert detections[3].sum() > 10  # real detections, not an empty comparison
    for mine, expected in zip(detections, upcast):
        torch.testing.assert_close(mine, expected, rtol=0, atol=0)


def test_detect_and_preprocess_are_the_two_halves_of_eval(lite_pair):
    ours, _ = lite_pair
    images = random_images()
    with torch.no_grad():
        batch, original_sizes = ours.preprocess(images)
        boxes, scores, labels, valid = ours.detect(batch)
        full = ours(images)
    assert batch.shape == (len(images), 3, 320, 320) and original_sizes == IMAGE_SIZES
    assert boxes.shape == (len(images), ours.detections_per_img, 4)
    for image, detections in enumerate(full):
        count = int(valid[image].sum())
        assert torch.equal(detections["scores"], scores[image, :count])
        height, width = IMAGE_SIZES[image]
        scale = torch.tensor([width, height, width, height]) / 320
        torch.testing.assert_close(detections["boxes"], boxes[image, :count] * scale)
    with pytest.raises(ValueError, match=r"detect expects a \[B, 3, 320, 320\] batch"):
        ours.detect(torch.zeros(1, 3, 300, 300))


def test_channels_last_is_chosen_where_measured_faster():
    """models.prefers_channels_last: on CPU, inference of both models and SSDlite training; SSD300 training only
    where PyTorch's CPU kernels dispatch to AVX-512 (its NHWC convolution backward is slower with AVX2 alone, measured
    on one machine with ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA lowered to AVX2: docs/performance.md)."""
    assert models.prefers_channels_last(LITE, "cpu", training=True)
    assert models.prefers_channels_last(SSD300, "cpu", training=False)
    assert not models.prefers_channels_last(LITE, "cuda", training=True)
    assert models.prefers_channels_last(SSD300, "cuda", training=True)
    assert not models.prefers_channels_last(SSD300, "mps", training=False)
    native = torch.backends.cpu.get_cpu_capability()
    assert models.prefers_channels_last(SSD300, "cpu", training=True) == (native == "AVX512"), native
    code = ("import torch, models; print(torch.backends.cpu.get_cpu_capability(), "
            "models.prefers_channels_last('ssd300_vgg16', 'cpu', training=True))")
    lowered = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                             env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
    capability, prefers = lowered.stdout.split()
    assert capability != "AVX512" and prefers == "False", lowered.stdout


@pytest.mark.parametrize("name", [LITE, SSD300])
def test_channels_last_gives_torchvision_results(name, ssd300_pair, lite_pair):
    """Our scripts run both models in channels_last on (some) CPUs. Its NHWC kernels sum in another order:
    detections match torchvision's default layout to rounding, and a training step matches torchvision's in
    channels_last (the layout's own rounding is PyTorch's, not ours)."""
    ours, theirs = copy.deepcopy(ssd300_pair if name == SSD300 else lite_pair)
    ours.to(memory_format=torch.channels_last)
    images = random_images()
    with torch.no_grad():
        assert_detections_match_to_rounding(ours(images), theirs(images))
    theirs.to(memory_format=torch.channels_last)
    sizes = IMAGE_SIZES[:3]
    images, targets = random_images(sizes), random_targets([0, 1, 25], sizes)
    mine, reference = sgd_step(ours, images, targets), sgd_step(theirs, images, targets)
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=0)
    ours_state = ours.state_dict()
    first_conv = "backbone.features.0.weight" if name == SSD300 else "backbone.features.0.0.0.weight"
    assert ours_state[first_conv].is_contiguous(memory_format=torch.channels_last)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-5, atol=1e-5, msg=key)

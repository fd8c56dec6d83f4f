"""Tests of transforms.py and presets.py against torchvision's kernels and v2 transforms as oracles."""

import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2

import presets
import transforms as T

MEAN = [123.0, 117.0, 104.0]


def random_image(seed, height=60, width=80):
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def make_target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    return {
        "boxes": boxes,
        "labels": torch.arange(1, n + 1) if labels is None else torch.tensor(labels),
        "image_id": 7,
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
    }


BOXES = [[5.0, 5.0, 30.0, 40.0], [40.0, 10.0, 70.0, 50.0], [10.0, 30.0, 25.0, 55.0], [60.0, 45.0, 64.0, 49.0]]


def assert_consistent(image, target, original):
    """Boxes inside the image with positive size; every per-box key has one entry per box; labels come from the
    original target; "area" never grows beyond the original box area."""
    height, width = image.shape[-2:]
    boxes = target["boxes"]
    n = len(boxes)
    assert boxes.dtype == torch.float32 and boxes.shape == (n, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    for key in ("labels", "area", "iscrowd"):
        assert len(target[key]) == n, key
    assert set(target["labels"].tolist()) <= set(original["labels"].tolist())
    assert target["image_id"] == original["image_id"]
    box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert torch.allclose(target["area"], box_areas, rtol=1e-4)  # the fixture's area is the box area


# ---------------------------------------------------------------- colour kernels


def adjust(kernel, image, factor):
    """One colour kernel on an image of any dtype, as RandomPhotometricDistort runs it: on a float32 copy in the
    image's own range, back to the image's dtype at the end."""
    integer = image.dtype == torch.uint8
    return T._from_float(kernel(T._to_float32(image), factor, integer), image.dtype)


KERNELS = {"adjust_brightness": T._brightness_, "adjust_contrast": T._contrast_, "adjust_saturation": T._saturation_}


@pytest.mark.parametrize("factor", [0.5, 0.9, 1.3])
@pytest.mark.parametrize("name", list(KERNELS))
def test_colour_kernels_equal_torchvision_tensor_kernels(name, factor):
    image = random_image(0)
    ours, theirs = adjust(KERNELS[name], image, factor), getattr(F, name)(image, factor)
    assert ours.dtype == torch.uint8
    assert torch.equal(ours, theirs)
    as_float = image.float() / 255
    assert torch.allclose(adjust(KERNELS[name], as_float, factor), getattr(F, name)(as_float, factor), atol=1e-6)


@pytest.mark.parametrize("factor", [-0.5, -0.05, 0.0, 0.03, 0.25, 0.5])
def test_hue_matches_torchvision_up_to_rounding(factor):
    image = random_image(1)
    image[:, :5] = 90  # grey pixels keep their value
    ours = adjust(T._hue, image, factor)
    difference = (ours.int() - F.adjust_hue(image, factor).int()).abs()
    assert ours.dtype == torch.uint8 and difference.max() <= 1
    assert torch.equal(ours[:, :5], image[:, :5])
    as_float = image.float() / 255
    assert torch.allclose(adjust(T._hue, as_float, factor), F.adjust_hue(as_float, factor), atol=1e-5)


def test_photometric_distort_applies_every_step_and_keeps_the_target():
    image = random_image(2)
    target = make_target(BOXES)
    torch.manual_seed(0)
    out, out_target = T.RandomPhotometricDistort(p=1.0)(image, target)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert not torch.equal(out, image)
    assert out_target is target

    torch.manual_seed(0)
    same, _ = T.RandomPhotometricDistort(p=1.0)(Image.fromarray(image.permute(1, 2, 0).numpy()), target)
    assert torch.equal(same, out)  # PIL input gives the tensor result

    untouched, _ = T.RandomPhotometricDistort(p=0.0)(image, target)
    assert torch.equal(untouched, image)


# ---------------------------------------------------------------- geometry against torchvision v2


def v2_sample(image, target):
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
    return image, {"boxes": boxes, "labels": target["labels"]}


def test_zoom_out_matches_torchvision_v2():
    image, target = random_image(4), make_target(BOXES)
    for seed in range(30):
        torch.manual_seed(seed)
        ours, ours_target = T.RandomZoomOut(fill=MEAN)(image, target)
        torch.manual_seed(seed)
        theirs, theirs_target = v2.RandomZoomOut(fill=tuple(MEAN))(*v2_sample(image, target))
        assert torch.equal(ours, theirs)
        assert torch.equal(ours_target["boxes"], theirs_target["boxes"].as_subclass(torch.Tensor))


def test_iou_crop_matches_torchvision_v2():
    image, target = random_image(5), make_target(BOXES[:3])  # boxes large enough to survive SanitizeBoundingBoxes
    oracle = v2.Compose([v2.RandomIoUCrop(), v2.SanitizeBoundingBoxes()])
    for seed in range(60):
        torch.manual_seed(seed)
        ours, ours_target = T.RandomIoUCrop()(image, target)
        torch.manual_seed(seed)
        theirs, theirs_target = oracle(*v2_sample(image, target))
        assert torch.equal(ours, theirs), seed
        assert torch.equal(ours_target["boxes"], theirs_target["boxes"].as_subclass(torch.Tensor)), seed
        assert torch.equal(ours_target["labels"], theirs_target["labels"]), seed


def test_fused_zoom_out_iou_crop_equals_the_two_transforms_in_sequence():
    image, target = random_image(6), make_target(BOXES)
    fused = T.RandomZoomOutIoUCrop(T.RandomZoomOut(fill=MEAN), T.RandomIoUCrop())
    sequential = T.Compose([T.RandomZoomOut(fill=MEAN), T.RandomIoUCrop()])
    for seed in range(100):
        torch.manual_seed(seed)
        a, a_target = fused(image, target)
        torch.manual_seed(seed)
        b, b_target = sequential(image, target)
        assert torch.equal(a, b), seed
        for key in ("boxes", "labels", "area", "iscrowd"):
            assert torch.equal(a_target[key], b_target[key]), (seed, key)
    # and both leave the random generator in the same state
    torch.manual_seed(1)
    fused(image, target)
    after_fused = torch.rand(3)
    torch.manual_seed(1)
    sequential(image, target)
    assert torch.equal(after_fused, torch.rand(3))


def test_zoom_out_fills_float_images_with_scaled_mean():
    image = torch.rand(3, 10, 12)
    torch.manual_seed(0)
    out, out_target = T.RandomZoomOut(fill=MEAN, side_range=(3.0, 3.0), p=1.0)(image, make_target([[1, 1, 5, 5]]))
    assert out.shape == (3, 30, 36)
    left, top = int(out_target["boxes"][0, 0]) - 1, int(out_target["boxes"][0, 1]) - 1
    assert torch.equal(out[:, top : top + 10, left : left + 12], image)
    outside = torch.ones(30, 36, dtype=torch.bool)
    outside[top : top + 10, left : left + 12] = False
    assert torch.allclose(out[:, outside], (torch.tensor(MEAN) / 255)[:, None])


# ---------------------------------------------------------------- IoU crop properties


def coordinate_image(height, width):
    """Float image whose channel 0 is the column and channel 1 the row, so a crop reveals where it was taken."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)])


@pytest.mark.parametrize("min_iou", [0.1, 0.3, 0.5, 0.7])
def test_accepted_iou_crops_meet_the_constraint(min_iou):
    image = coordinate_image(90, 120)
    target = make_target([[10, 10, 60, 70], [50, 20, 110, 85], [20, 50, 45, 80], [90, 5, 115, 30]])
    crop = T.RandomIoUCrop(sampler_options=[min_iou])
    for seed in range(40):
        torch.manual_seed(seed)
        out, out_target = crop(image, target)
        left, top = int(out[0, 0, 0]), int(out[1, 0, 0])
        height, width = out.shape[-2:]
        window = torch.tensor([[left, top, left + width, top + height]], dtype=torch.float32)
        centres = (target["boxes"][:, :2] + target["boxes"][:, 2:]) / 2
        inside = (centres > window[0, :2]).all(1) & (centres < window[0, 2:]).all(1)
        kept = target["boxes"][inside]
        assert torch.equal(out_target["labels"], target["labels"][inside])
        assert box_iou(kept, window).max() >= min_iou
        assert torch.allclose(out_target["boxes"], (kept - window[:, [0, 1, 0, 1]]).clamp(min=0).minimum(
            torch.tensor([width, height, width, height], dtype=torch.float32)))
        assert_consistent(out, out_target, target)


@pytest.mark.timeout(120)  # a crop loop that never ends on an image without boxes fails here, not after 30 minutes
def test_iou_crop_on_an_image_without_boxes_returns_it_unchanged():
    image = random_image(7)
    target = make_target([])
    out, out_target = T.RandomIoUCrop()(image, target)
    fused, fused_target = T.RandomZoomOutIoUCrop(T.RandomZoomOut(p=0.0), T.RandomIoUCrop())(image, target)
    assert out is image and out_target is target
    assert torch.equal(fused, image) and len(fused_target["boxes"]) == 0


def test_geometric_transforms_need_a_target():
    with pytest.raises(ValueError, match="targets can't be None"):
        T.RandomIoUCrop()(random_image(0), None)


def test_horizontal_flip_mirrors_image_and_boxes():
    image, target = random_image(8), make_target(BOXES)
    out, out_target = T.RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(out, image.flip(-1))
    expected = torch.tensor([[50.0, 5.0, 75.0, 40.0], [10.0, 10.0, 40.0, 50.0], [55.0, 30.0, 70.0, 55.0], [16.0, 45.0, 20.0, 49.0]])
    assert torch.equal(out_target["boxes"], expected)
    assert torch.equal(target["boxes"], torch.tensor(BOXES))  # input untouched
    same, same_target = T.RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and same_target is target


@pytest.mark.parametrize(
    "transform",
    [
        T.RandomHorizontalFlip(),
        T.RandomZoomOut(fill=MEAN),
        T.RandomIoUCrop(),
        T.RandomZoomOutIoUCrop(T.RandomZoomOut(fill=MEAN), T.RandomIoUCrop()),
        T.Compose([T.RandomPhotometricDistort(), T.RandomZoomOutIoUCrop(T.RandomZoomOut(fill=MEAN), T.RandomIoUCrop())]),
    ],
    ids=["hflip", "zoom_out", "iou_crop", "fused", "photometric+fused"],
)
def test_augmentations_keep_boxes_inside_and_targets_consistent(transform):
    target = make_target(BOXES)
    for seed in range(40):
        torch.manual_seed(seed)
        image, out_target = transform(random_image(seed), target)
        assert image.dtype == torch.uint8
        assert_consistent(image, out_target, target)


def test_pil_to_tensor():
    array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    image, _ = T.PILToTensor()(Image.fromarray(array), None)
    assert torch.equal(image, F.pil_to_tensor(Image.fromarray(array))) and image.is_contiguous()


# ---------------------------------------------------------------- presets


def pil_sample(v2_target=False):
    array = np.random.default_rng(1).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    target = make_target(BOXES[:3])
    if v2_target:
        target = {"boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(60, 80)),
                  "labels": target["labels"], "image_id": 7}
    return Image.fromarray(array), target


CONFIGS = [(p, b, False) for p in presets.POLICIES for b in ("pil", "tensor")] + [
    (p, b, True) for p in presets.POLICIES for b in presets.BACKENDS
]


@pytest.mark.parametrize("policy, backend, use_v2", CONFIGS)
def test_train_preset_outputs_uint8_images_and_xyxy_boxes(policy, backend, use_v2):
    preset = presets.DetectionPresetTrain(data_augmentation=policy, backend=backend, use_v2=use_v2)
    for seed in range(6):
        torch.manual_seed(seed)
        image, target = preset(*pil_sample(use_v2))
        assert type(image) is torch.Tensor and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        assert type(target["boxes"]) is torch.Tensor and target["labels"].dtype == torch.int64
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) and len(boxes) > 0
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 2] <= image.shape[-1]).all() and (boxes[:, 3] <= image.shape[-2]).all() and (boxes >= 0).all()


@pytest.mark.parametrize("backend, use_v2", [("pil", False), ("tensor", False), ("pil", True), ("tv_tensor", True)])
def test_eval_preset_only_converts(backend, use_v2):
    pil, target = pil_sample(use_v2)
    image, out_target = presets.DetectionPresetEval(backend=backend, use_v2=use_v2)(pil, target)
    assert type(image) is torch.Tensor
    assert type(image) is torch.Tensor and torch.equal(image, F.pil_to_tensor(pil))
    assert torch.equal(torch.as_tensor(out_target["boxes"]), torch.tensor(BOXES[:3]))


def test_v1_presets_give_the_same_result_for_pil_and_tensor_backends():
    results = []
    for backend in ("pil", "tensor"):
        torch.manual_seed(11)
        results.append(presets.DetectionPresetTrain(data_augmentation="ssd", backend=backend)(*pil_sample()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1]["boxes"], results[1][1]["boxes"])


def test_presets_reject_unknown_policy_and_backend():
    with pytest.raises(ValueError, match="Unknown data augmentation policy 'lsj'; valid choices: hflip, ssd, ssdlite"):
        presets.DetectionPresetTrain(data_augmentation="lsj")
    with pytest.raises(ValueError, match="Unknown backend 'cv2'; valid choices: pil, tensor, tv_tensor"):
        presets.DetectionPresetTrain(data_augmentation="ssd", backend="cv2")
    with pytest.raises(ValueError, match="Unknown backend 'cv2'"):
        presets.DetectionPresetEval(backend="cv2")
    with pytest.raises(ValueError, match="use --use-v2"):
        presets.DetectionPresetTrain(data_augmentation="ssd", backend="tv_tensor")


def test_a_one_pixel_image_becomes_a_writable_tensor():
    """np.ascontiguousarray handed back PIL's read-only buffer here, and torch warned (issue 23). torch warns once
    per process: run alone, this test fails without the fix."""
    image = Image.fromarray(np.full((1, 1, 3), 7, dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor, _ = T.PILToTensor()(image, None)
    assert tensor.tolist() == [[[7]]] * 3

"""Bad images and bad targets given to the model are refused with one clear message naming the image,
target or box at fault."""
import pytest
import torch

import models
from helpers import LITE, random_images, random_targets


@pytest.mark.parametrize(
    "images, error, message",
    [
        ([torch.rand(3, 20, 20), torch.zeros(3, 20, 20, dtype=torch.uint8)], TypeError,
         "image 1 is torch.uint8 but image 0 is torch.float32"),
        ([torch.zeros(3, 20, 20, dtype=torch.int64)], TypeError, "image 0: expected a uint8 tensor"),
        ([torch.rand(20, 20)], ValueError, r"image 0: expected shape \[3, H, W\], got \[20, 20\]"),
        ([torch.rand(3, 9, 9), torch.rand(4, 20, 20)], ValueError, r"image 1: expected shape \[3, H, W\]"),
        (torch.rand(1, 3, 20, 20), TypeError, "images must be a list"),
        ([], ValueError, "empty"),
    ],
)
def test_bad_images_are_rejected(images, error, message, lite_pair):
    with pytest.raises(error, match=message):
        lite_pair[0](images)


def bad_targets(box, label=1):
    targets = random_targets([2, 3], [(20, 20), (30, 30)])
    targets[1]["boxes"][2] = torch.tensor(box)
    targets[1]["labels"][2] = label
    return targets


@pytest.mark.parametrize(
    "targets, message",
    [
        (None, "targets are required in training mode"),
        ([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}], "expected a list of 2"),
        ([{"boxes": torch.zeros(0, 4)}] * 2, "target 0: expected a dict with 'boxes' and 'labels'"),
        ([{"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64)},
          {"boxes": torch.zeros(4), "labels": torch.ones(1, dtype=torch.int64)}],
         r"target 1: 'boxes' must be a float tensor of shape \[N, 4\], got torch.float32 tensor of shape \[4\]"),
        ([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
          {"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.ones(1, dtype=torch.int32)}],
         r"target 1: 'labels' must be an int64 tensor of shape \[1\], got torch.int32"),
        (bad_targets([10.0, 5, 10, 9]), r"target 1: box 2 \[10.0, 5.0, 10.0, 9.0\] with label 1 is invalid"),
        (bad_targets([3.0, 9, 8, 2]), r"target 1: box 2 \[3.0, 9.0, 8.0, 2.0\]"),
        (bad_targets([1.0, 1, 4, 4], label=91), r"target 1: box 2 .* with label 91 is invalid.*num_classes = 91"),
    ],
)
def test_bad_targets_are_rejected(targets, message):
    model = models.get_model(LITE).train()
    with pytest.raises(ValueError, match=message):
        model(random_images([(20, 20), (30, 30)]), targets)

"""models/ builds torchvision's SSD architectures: the same state_dict keys, shapes and dtypes, the same
parameter counts, and the same default boxes as torchvision's builders (the oracle)."""
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

import models
from helpers import LITE, SSD300, TORCHVISION_BUILDERS


@pytest.mark.parametrize("name, num_classes", [(SSD300, None), (LITE, None), (LITE, 7)])
def test_state_dict_layout_matches_torchvision(name, num_classes, ssd300_pair):
    if name == SSD300:
        theirs = ssd300_pair[1].state_dict()  # torchvision's SSD300 builder takes seconds: reuse it
    else:
        theirs = TORCHVISION_BUILDERS[name](weights=None, weights_backbone=None, num_classes=num_classes).state_dict()
    ours = models.get_model(name, num_classes=num_classes).state_dict()
    assert list(ours) == list(theirs)
    assert [(v.shape, v.dtype) for v in ours.values()] == [(v.shape, v.dtype) for v in theirs.values()]


def test_num_classes_only_changes_the_classification_layers(ssd300_pair):
    theirs = ssd300_pair[1].state_dict()
    ours = models.get_model(SSD300, num_classes=5).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        if key.startswith("head.classification_head"):
            assert ours[key].shape[0] * 91 == value.shape[0] * 5, key
        else:
            assert ours[key].shape == value.shape, key


@pytest.mark.parametrize("name, num_params", [(SSD300, 35_641_826), (LITE, 3_440_060)])
def test_parameter_count_of_the_coco_configuration(name, num_params):
    model = models.get_model(name)
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert all(p.requires_grad for p in model.parameters())  # nothing pretrained: everything trains


@pytest.mark.parametrize("name, num_anchors", [(SSD300, 8732), (LITE, 3234)])
def test_default_boxes_equal_torchvision(name, num_anchors, ssd300_pair, lite_pair):
    ours, theirs = ssd300_pair if name == SSD300 else lite_pair
    batch = torch.zeros(1, 3, *ours.size)
    with torch.no_grad():
        feature_sizes = [f.shape[-2:] for f in ours.backbone(batch)]
    expected = theirs.anchor_generator(
        ImageList(batch, [ours.size]), [torch.zeros(1, 1, *size) for size in feature_sizes]
    )[0]
    boxes = ours.anchor_generator(feature_sizes, ours.size)
    assert boxes.shape == (num_anchors, 4)
    assert torch.equal(boxes, expected)
    assert ours.anchor_generator(feature_sizes, ours.size) is boxes  # cached, not rebuilt

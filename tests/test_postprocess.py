"""Post-processing (head outputs to detections): the vectorised selection and batched NMS equal torchvision's
per-class loop, the early-stopping NMS gives the full NMS's prefix, thresholds can change after construction,
and detect traces (the export path)."""
import warnings

import pytest
import torch
from torchvision.ops import boxes as box_ops

from helpers import IMAGE_SIZES, assert_same_detections, random_images
from models.postprocess import first_kept_per_image, postprocess_detections


@pytest.mark.parametrize(
    "score_thresh, nms_thresh, detections_per_img, topk_candidates",
    [(0.01, 0.45, 200, 400), (0.2, 0.3, 50, 400), (0.001, 0.6, 300, 20), (0.05, 0.45, 10, 1000)],
)
def test_postprocessing_equals_torchvision_per_class_loop(score_thresh, nms_thresh, detections_per_img,
                                                          topk_candidates, ssd300_pair):
    """Head outputs with peaked scores straight into both post-processings: the vectorised selection and
    batched NMS give the per-class loop's detections, including where top-k or the detection cap bites."""
    ours, theirs = ssd300_pair
    generator = torch.Generator().manual_seed(3)
    num_images, num_anchors = 3, 8732
    logits = torch.randn(num_images, num_anchors, 91, generator=generator) * 2
    logits[..., 0] += 7  # background first
    logits[..., 1:4] += torch.tensor([3.0, 2.0, 1.5])
    regression = torch.randn(num_images, num_anchors, 4, generator=generator) * 0.5
    anchors = ours.anchor_generator([(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)], ours.size)
    head = {"bbox_regression": regression, "cls_logits": logits}
    for model in (ours, theirs):
        model.score_thresh, model.nms_thresh = score_thresh, nms_thresh
        model.detections_per_img, model.topk_candidates = detections_per_img, topk_candidates
    try:
        reference = theirs.postprocess_detections(head, [anchors] * num_images, [ours.size] * num_images)
        boxes, scores, labels, valid = postprocess_detections(
            regression, logits, anchors, ours.size, score_thresh, nms_thresh, detections_per_img, topk_candidates
        )
    finally:
        for model in (ours, theirs):
            model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates = 0.01, 0.45, 200, 400
    assert boxes.shape == (num_images, detections_per_img, 4) and valid.shape == (num_images, detections_per_img)
    mine = []
    for image in range(num_images):
        count = int(valid[image].sum())
        assert valid[image, :count].all() and not valid[image, count:].any()  # valid is a prefix
        assert (labels[image, count:] == 0).all() and (scores[image, count:] == 0).all()
        mine.append({"boxes": boxes[image, :count], "scores": scores[image, :count], "labels": labels[image, :count]})
    assert_same_detections(mine, reference)
    assert sum(len(d["scores"]) for d in reference) > 0


def test_nms_gives_the_full_nms_prefix_whatever_the_survival_rate():
    """first_kept_per_image starts each image's NMS from the previous image's survival rate and widens when too
    few survive: images with almost no overlap, with heavy overlap, and without candidates, in varied orders,
    must all give the first max_kept boxes of a full per-class NMS."""
    generator = torch.Generator().manual_seed(0)

    def image_boxes(count, spread):  # small spread: many boxes on top of each other, few survive
        centres = torch.rand(count, 2, generator=generator) * spread
        sizes = 10 + torch.rand(count, 2, generator=generator) * 20
        return torch.cat((centres, centres + sizes), 1)

    for spreads in ([2000, 40, 0, 2000], [40, 2000, 40], [0, 0], [2000, 2000, 40, 40, 2000]):
        counts = [0 if spread == 0 else 900 for spread in spreads]
        boxes = torch.cat([image_boxes(count, spread) for count, spread in zip(counts, spreads)])
        labels = torch.randint(1, 4, (len(boxes),), generator=generator)
        image_idx = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        scores = torch.rand(len(boxes), generator=generator)
        order = torch.argsort(image_idx * 2 - scores.double(), stable=True)
        boxes, labels, image_idx, scores = boxes[order], labels[order], image_idx[order], scores[order]
        keep = first_kept_per_image(boxes, scores, labels * 10_000.0, image_idx, len(counts), 0.45, 50)
        expected = []
        for image in range(len(counts)):
            inside = torch.where(image_idx == image)[0]
            kept = box_ops.batched_nms(boxes[inside], scores[inside], labels[inside], 0.45)
            expected.append(inside[kept[:50]])
        assert torch.equal(keep, torch.cat(expected)), spreads


def test_thresholds_are_settable_after_construction(lite_pair):
    ours, theirs = lite_pair
    images = random_images(IMAGE_SIZES[:2])
    try:
        for model in (ours, theirs):
            model.score_thresh, model.detections_per_img = 0.3, 5
        with torch.no_grad():
            mine, reference = ours(images), theirs(images)
    finally:
        for model in (ours, theirs):
            model.score_thresh, model.detections_per_img = 0.001, 300
    assert_same_detections(mine, reference)
    assert all(len(d["scores"]) <= 5 and (d["scores"] > 0.3).all() for d in mine)


def test_detect_can_be_traced(lite_pair):
    ours, _ = lite_pair
    batch, _ = ours.preprocess(random_images(IMAGE_SIZES[:1]))
    other_batch, _ = ours.preprocess(random_images(IMAGE_SIZES[1:2], seed=5))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived constants
        traced = torch.jit.trace_module(ours, {"detect": (batch,)}, check_trace=False)
        for inputs in (batch, other_batch):  # the trace also holds for inputs it was not made with
            for expected, got in zip(ours.detect(inputs), traced.detect(inputs)):
                assert torch.equal(expected, got)

"""models/: same state_dict, default boxes, detections, losses and SGD step as torchvision's SSD builders
(the oracle), weights loading, and the errors for bad weights and bad inputs."""
import copy
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import ssd300_vgg16 as tv_ssd300_vgg16
from torchvision.models.detection import ssdlite320_mobilenet_v3_large as tv_ssdlite
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops

import models
from models.matcher import match_anchors
from models.postprocess import first_kept_per_image, match_detections, postprocess_detections
from models.ssd import hard_negatives, vgg16_features
from models.transform import batch_targets

SSD300, LITE = "ssd300_vgg16", "ssdlite320_mobilenet_v3_large"
TORCHVISION_BUILDERS = {SSD300: tv_ssd300_vgg16, LITE: tv_ssdlite}
# Images of several sizes and aspect ratios, two of the same size (resized in one call).
IMAGE_SIZES = [(240, 320), (410, 170), (240, 320)]


def last_convs(head: nn.Module) -> list[nn.Conv2d]:
    return [[m for m in level.modules() if isinstance(m, nn.Conv2d)][-1] for level in head.module_list]


def make_realistic(model: nn.Module, background: float, reinit: bool) -> None:
    """Weights that act like a trained detector's: class logits biased towards background, with three
    classes well above the rest, so that the score threshold, the per-class top-k and NMS all have work.
    reinit: variance-preserving convolutions (SSDlite's own init makes random-weight activations vanish)."""
    torch.manual_seed(0)
    if reinit:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    for conv in last_convs(model.head.classification_head):
        with torch.no_grad():
            bias = conv.bias.view(-1, 91)
            bias[:, 0] += background
            bias[:, 1:4] += torch.tensor([3.0, 2.0, 1.0])


def model_pair(name: str, background: float = 8.0):
    """(ours, torchvision's) with the same realistic weights, in eval mode."""
    torch.manual_seed(0)
    theirs = TORCHVISION_BUILDERS[name](weights=None, weights_backbone=None)
    make_realistic(theirs, background, reinit=name == LITE)
    ours = models.get_model(name)
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs.eval()


@pytest.fixture(scope="module")
def ssd300_pair():
    return model_pair(SSD300)


@pytest.fixture(scope="module")
def lite_pair():
    return model_pair(LITE)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache: weights names resolve to files planted in it, never to downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def plant(checkpoints, weights_name: str, state_dict: dict) -> None:
    url = torchvision.models.get_weight(weights_name).url
    torch.save(state_dict, checkpoints / os.path.basename(url))


def random_images(sizes=IMAGE_SIZES, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


def random_targets(box_counts, sizes, num_classes=91, seed=2):
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count, (height, width) in zip(box_counts, sizes):
        corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 0.7
        extent = (torch.rand(count, 2, generator=generator) * 0.5 + 0.05) * torch.tensor([width, height])
        boxes = torch.cat([corner, torch.minimum(corner + extent, torch.tensor([width, height]))], dim=1)
        labels = torch.randint(1, num_classes, (count,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "image_id": torch.tensor(len(targets))})
    return targets


def assert_same_detections(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for image, (mine, reference) in enumerate(zip(ours, theirs)):
        assert torch.equal(mine["labels"], reference["labels"]), f"image {image}"
        torch.testing.assert_close(mine["boxes"], reference["boxes"], atol=1e-4, rtol=0, msg=f"image {image}")
        torch.testing.assert_close(mine["scores"], reference["scores"], atol=1e-4, rtol=0, msg=f"image {image}")


# ---------------------------------------------------------------------------------------------------------
# Architecture: state_dict layout, parameter counts, default boxes


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


# ---------------------------------------------------------------------------------------------------------
# Inference


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


# ---------------------------------------------------------------------------------------------------------
# Training


def torchvision_losses(model, head, anchors, targets):
    """torchvision's SSD.forward from head outputs to losses: per-image matching, then compute_loss."""
    matched = [
        model.proposal_matcher(box_ops.box_iou(t["boxes"], anchors)) if len(t["boxes"])
        else torch.full((len(anchors),), -1, dtype=torch.int64)
        for t in targets
    ]
    return model.compute_loss(targets, head, [anchors] * len(targets), matched), matched


@pytest.mark.parametrize("box_counts", [[0, 1, 12, 40], [0, 0, 0, 0], [3, 1200, 1, 0]])
def test_matching_and_losses_equal_torchvision(box_counts, lite_pair):
    """Straight from head outputs: batched matching equals torchvision's per-image matcher (including boxes
    that share a best anchor), and the losses agree, including images without boxes and more positives than
    negatives (1200 boxes)."""
    ours, theirs = lite_pair
    generator = torch.Generator().manual_seed(4)
    anchors = ours.anchor_generator([(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], ours.size)
    head = {
        "bbox_regression": torch.randn(4, len(anchors), 4, generator=generator),
        "cls_logits": torch.randn(4, len(anchors), 91, generator=generator) * 2,
    }
    targets = random_targets(box_counts, [ours.size] * 4)
    if box_counts[1] >= 2:  # duplicates: both claim the same best anchor, the last one wins
        targets[1]["boxes"][1] = targets[1]["boxes"][0]
    reference, reference_matches = torchvision_losses(theirs, head, anchors, targets)
    gt_boxes, gt_labels, gt_valid = batch_targets(targets)
    matches = match_anchors(gt_boxes, gt_valid, anchors, 0.5)
    assert torch.equal(matches, torch.stack(reference_matches))
    losses = ours.compute_loss(head, anchors, gt_boxes, gt_labels, gt_valid)
    assert list(losses) == ["bbox_regression", "classification"]
    for key in losses:
        torch.testing.assert_close(losses[key], reference[key], rtol=1e-5, atol=0)


def ranked_hard_negatives(logits, positive, num_negative):
    """The mask hard_negatives must give, from every anchor's full cross-entropy against background."""
    loss = F.cross_entropy(logits.transpose(1, 2), torch.zeros(positive.shape, dtype=torch.int64), reduction="none")
    order = torch.where(positive, -math.inf, loss).argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return rank < num_negative


def one_hard_logit(num_classes, gap):
    return torch.cat([torch.zeros(1), torch.full((num_classes - 1,), -30.0)]).index_fill(0, torch.tensor(1), gap)


@pytest.mark.parametrize("ratio", [3.0, 7 / 3])
def test_hard_negative_pruning_picks_what_a_full_ranking_picks(ratio, monkeypatch):
    """hard_negatives computes the cross-entropy only of anchors that can make the cut. On trained-like logits it
    must pick exactly what ranking every anchor by its full cross-entropy picks, for integer and fractional
    negative:positive ratios. Most anchors are easy background; hard ones have one foreground logit above the rest
    (CE near its lower bound) or all foreground logits alike (CE at its upper bound, up to log(90) above that of an
    anchor with the same largest logit)."""
    generator = torch.Generator().manual_seed(5)
    num_images, num_anchors, num_classes = 4, 3000, 91
    uniform = lambda low, high, *shape: low + (high - low) * torch.rand(*shape, generator=generator)  # noqa: E731
    logits = uniform(-31, -30, num_images, num_anchors, num_classes)
    logits[..., 0] = 0
    kind = torch.randint(0, 10, (num_images, num_anchors), generator=generator)  # 0: one-peak, 1: flat, else easy
    peaked = torch.where(kind == 0)
    logits[(*peaked, torch.randint(1, num_classes, peaked[0].shape, generator=generator))] = uniform(
        -2, 4, len(peaked[0]))
    flat = torch.where(kind == 1)
    logits[flat] = torch.cat([torch.zeros(len(flat[0]), 1), uniform(-6.5, 0, len(flat[0]), 1).expand(
        -1, num_classes - 1) + uniform(0, 1e-3, len(flat[0]), num_classes - 1)], dim=1)
    positive = torch.rand(num_images, num_anchors, generator=generator) < torch.tensor([[0.0], [0.002], [0.01], [0.05]])
    num_negative = ratio * positive.sum(dim=1, keepdim=True)

    rows_with_loss = []
    cross_entropy = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda input, *a, **k: rows_with_loss.append(len(input))
                        or cross_entropy(input, *a, **k))
    picked = hard_negatives(logits, positive, num_negative)
    assert torch.equal(picked, ranked_hard_negatives(logits, positive, num_negative))
    assert picked.sum(1).tolist() == [math.ceil(n) for n in num_negative.flatten().tolist()]
    assert 0 < sum(rows_with_loss) < 0.5 * (~positive).sum()  # the bound really pruned


def test_hard_negative_pruning_bound_is_tight():
    """At the edge of the bound: 2 positives want 6 negatives; 5 anchors have one foreground logit 5 above
    background and one has 2 (the 6th largest gap). A flat anchor, all 90 foreground logits at 2 - log(90) + 0.01,
    has a larger cross-entropy than that 6th one and must displace it; a bound 0.1 nats tighter would prune it."""
    num_classes = 91
    rows = [one_hard_logit(num_classes, 5.0)] * 5 + [one_hard_logit(num_classes, 2.0)]
    flat = torch.full((num_classes,), 2 - math.log(num_classes - 1) + 0.01).index_fill(0, torch.tensor(0), 0.0)
    rows += [flat] + [one_hard_logit(num_classes, -20.0)] * 50 + [one_hard_logit(num_classes, 1.0)] * 2
    logits = torch.stack(rows)[None]
    positive = torch.zeros(1, len(rows), dtype=torch.bool)
    positive[0, -2:] = True
    picked = hard_negatives(logits, positive, torch.tensor([[6.0]]))
    assert torch.equal(picked, ranked_hard_negatives(logits, positive, torch.tensor([[6.0]])))
    assert picked[0, 6] and not picked[0, 5]


def sgd_step(model, images, targets):
    model.train()
    losses = model(images, targets)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    sum(losses.values()).backward()
    optimizer.step()
    return {key: value.detach() for key, value in losses.items()}


@pytest.mark.parametrize("name, box_counts", [(LITE, [0, 1, 25]), (SSD300, [6])])
def test_training_step_equals_torchvision(name, box_counts, ssd300_pair, lite_pair):
    """Losses of a full training forward (resize, matching, loss) and the parameters after one SGD step."""
    ours, theirs = copy.deepcopy(ssd300_pair if name == SSD300 else lite_pair)
    initial = {key: value.clone() for key, value in theirs.state_dict().items()}
    sizes = IMAGE_SIZES[: len(box_counts)]
    images, targets = random_images(sizes), random_targets(box_counts, sizes)
    mine, reference = sgd_step(ours, images, targets), sgd_step(theirs, images, targets)
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=0)
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    for key, value in their_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-5, atol=1e-5, msg=key)
    changed = sum(not torch.equal(initial[key], value) for key, value in their_state.items())
    assert changed > len(their_state) // 2  # the step really moved the weights


def assert_detections_match_to_rounding(ours: list[dict], theirs: list[dict], top: int = 100) -> None:
    """Each of our `top` best detections pairs one to one with one of theirs with its label, a box within 0.01
    pixel and a score within 1e-4: near-tied scores may swap places when kernels sum in another order."""
    for image, (mine, reference) in enumerate(zip(ours, theirs)):
        best = {key: value[:top] for key, value in mine.items()}
        matched, worst_box, worst_score = match_detections(reference, best, box_tolerance=0.05, score_tolerance=5e-4)
        assert matched == len(best["labels"]), f"image {image}: {len(best['labels']) - matched} detections unpaired"
        assert worst_box < 0.01, f"image {image}: a box moved by {worst_box:.3g} pixels"
        assert worst_score <= 1e-4, f"image {image}: a score moved by {worst_score:.3g}"


def test_channels_last_gives_torchvision_results(lite_pair):
    """Our scripts run SSDlite in channels_last on CPU (models.prefers_channels_last). Its NHWC kernels sum in
    another order: detections match torchvision's default layout to rounding, and a training step matches
    torchvision's in channels_last (the layout's own rounding is PyTorch's, not ours)."""
    assert models.prefers_channels_last(LITE, "cpu", training=True)
    assert not models.prefers_channels_last(SSD300, "cpu", training=True)
    assert models.prefers_channels_last(SSD300, "cpu", training=False)
    assert not models.prefers_channels_last(LITE, "cuda", training=True)
    assert models.prefers_channels_last(SSD300, "cuda", training=True)
    assert not models.prefers_channels_last(SSD300, "mps", training=False)
    ours, theirs = copy.deepcopy(lite_pair)
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
    assert ours_state["backbone.features.0.0.0.weight"].is_contiguous(memory_format=torch.channels_last)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-5, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------------------
# Weights


def test_checkpoint_saved_from_torchvision_loads_strictly(tmp_path):
    torch.manual_seed(0)
    theirs = tv_ssdlite(weights=None, weights_backbone=None, num_classes=5)
    plain, training = tmp_path / "plain.pth", tmp_path / "training.pth"
    torch.save(theirs.state_dict(), plain)
    torch.save({"model": theirs.state_dict(), "epoch": 3, "args": {"lr": 0.1}}, training)
    for path in (plain, str(training)):
        ours = models.get_model(LITE, weights=path)
        assert ours.num_classes == 5  # read from the file's classification head
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
    # With weights, the default trainable_backbone_layers applies, as in torchvision (6 of 6 for SSDlite).
    assert all(p.requires_grad for p in ours.parameters())


def test_checkpoint_of_another_architecture_lists_every_mismatch(tmp_path):
    path = tmp_path / "lite.pth"
    torch.save(models.get_model(LITE, num_classes=5).state_dict(), path)
    with pytest.raises(models.WeightsError) as error:
        models.get_model(LITE, weights=path, num_classes=8)
    message = str(error.value)
    assert "lite.pth" in message and "shape mismatches" in message and "[30, 672, 1, 1] in file" in message
    assert "\n" not in message
    with pytest.raises(models.WeightsError, match=r"lite.pth.*missing keys.*unexpected keys"):
        models.get_model(SSD300, weights=path, num_classes=5)


def test_torchvision_weights_names_resolve_through_the_hub_cache(torch_home, monkeypatch):
    def offline(url, *args, **kwargs):
        raise OSError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    torch.manual_seed(0)
    coco = tv_ssdlite(weights=None, weights_backbone=None).state_dict()
    plant(torch_home, "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1", coco)
    enum = torchvision.models.get_weight("SSDLite320_MobileNet_V3_Large_Weights.COCO_V1")
    for spec in ("SSDLite320_MobileNet_V3_Large_Weights.COCO_V1", "SSDLite320_MobileNet_V3_Large_Weights.DEFAULT",
                 enum):
        model = models.get_model(LITE, weights=spec)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in coco.items())
    with pytest.raises(models.WeightsError, match="91 classes, num_classes=5"):
        models.get_model(LITE, weights=enum, num_classes=5)
    with pytest.raises(models.WeightsError, match="SSD300_VGG16_Weights.COCO_V1"):
        models.get_model(SSD300, weights=enum)  # the other model's weights
    with pytest.raises(models.WeightsError, match="could not get SSD300_VGG16_Weights.COCO_V1 from https://"):
        models.get_model(SSD300, weights="SSD300_VGG16_Weights.COCO_V1")  # not cached: a download, made to fail


def test_mobilenet_backbone_weights_give_the_full_tail_and_torchvision_freezing(torch_home):
    torch.manual_seed(0)
    backbone = torchvision.models.mobilenet_v3_large().state_dict()
    plant(torch_home, "MobileNet_V3_Large_Weights.IMAGENET1K_V1", backbone)
    for layers in (None, 2):
        kwargs = {} if layers is None else {"trainable_backbone_layers": layers}
        theirs = tv_ssdlite(weights=None, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1", **kwargs)
        ours = models.get_model(LITE, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1", **kwargs)
        assert [(n, p.shape, p.requires_grad) for n, p in ours.named_parameters()] == \
               [(n, p.shape, p.requires_grad) for n, p in theirs.named_parameters()]
    assert sum(p.numel() for p in ours.parameters()) == 5_198_540
    assert torch.equal(ours.state_dict()["backbone.features.0.0.0.weight"], backbone["features.0.0.weight"])
    # A checkpoint of such a model loads with weights= alone: the full tail is read from the file.
    path = torch_home / "trained_from_imagenet.pth"
    torch.save({"model": ours.state_dict()}, path)
    reloaded = models.get_model(LITE, weights=path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_vgg16_features_map_onto_the_ssd300_backbone(torch_home):
    features = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    plant(torch_home, "VGG16_Weights.IMAGENET1K_FEATURES", {**features, "classifier.0.bias": torch.zeros(4096)})
    model = models.get_model(SSD300, weights_backbone="VGG16_Weights.IMAGENET1K_FEATURES")
    state = model.state_dict()
    for n in (0, 2, 21):
        assert torch.equal(state[f"backbone.features.{n}.weight"], features[f"features.{n}.weight"])
    for n, extra in ((24, 1), (26, 3), (28, 5)):
        assert torch.equal(state[f"backbone.extra.0.{extra}.weight"], features[f"features.{n}.weight"])
    # Default trainable_backbone_layers=4 with pretrained weights freezes conv1_1 and conv1_2 only.
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["backbone.features.0.bias", "backbone.features.0.weight",
                      "backbone.features.2.bias", "backbone.features.2.weight"]
    all_frozen = models.get_model(SSD300, weights_backbone="VGG16_Weights.IMAGENET1K_FEATURES",
                                  trainable_backbone_layers=0)
    frozen = {n for n, p in all_frozen.named_parameters() if not p.requires_grad}
    assert len(frozen) == 26 and "backbone.extra.0.5.weight" in frozen and "backbone.extra.0.7.1.weight" not in frozen


def test_trainable_backbone_layers_rules():
    with pytest.warns(UserWarning, match="trainable_backbone_layers"):
        model = models.get_model(LITE, trainable_backbone_layers=2)  # no pretrained weights: ignored
    assert all(p.requires_grad for p in model.parameters())
    # Checked before any weights are read.
    with pytest.raises(ValueError, match=r"trainable_backbone_layers must be in \[0, 6\], got 7"):
        models.get_model(LITE, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1", trainable_backbone_layers=7)


class _WritesAMarker:
    """Unpickling calls open(marker, "w"): what a malicious checkpoint would do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_load_checkpoint_file_errors(tmp_path):
    with pytest.raises(models.WeightsError, match=r"weights file '.*missing.pth' does not exist"):
        models.load_checkpoint_file(tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(models.WeightsError, match="notes.pth' is not a PyTorch checkpoint or is truncated"):
        models.load_checkpoint_file(text)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:700])
    with pytest.raises(models.WeightsError, match="truncated.pth' is not a PyTorch checkpoint or is truncated"):
        models.load_checkpoint_file(truncated)

    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _WritesAMarker(str(marker))}, evil)
    refused = r"evil.pth' refused: contains non-tensor Python objects \(weights_only\)"
    with pytest.raises(models.WeightsError, match=refused):
        models.get_model(LITE, weights=evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # proof that the file was really malicious
    assert marker.exists()


def test_unknown_names_and_options_are_rejected():
    with pytest.raises(ValueError, match=f"unknown model 'ssd512'; valid names: {SSD300}, {LITE}"):
        models.get_model("ssd512")
    assert models.list_models() == [SSD300, LITE]
    with pytest.raises(ValueError, match="unknown option.*size.*valid: score_thresh"):
        models.get_model(SSD300, size=(512, 512))
    with pytest.raises(models.WeightsError, match="neither an existing file nor one of VGG16_Weights.IMAGENET1K_V1"):
        models.get_model(SSD300, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        models.get_model(LITE, num_classes=1)


def test_options_reach_the_model():
    model = models.get_model(LITE, score_thresh=0.2, nms_thresh=0.5, detections_per_img=7, topk_candidates=9,
                             iou_thresh=0.6, positive_fraction=0.5, image_mean=[0.1, 0.2, 0.3], image_std=[1, 1, 1])
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates) == (0.2, 0.5, 7, 9)
    assert model.iou_thresh == 0.6 and model.neg_to_pos_ratio == 1.0 and model.size == (320, 320)
    assert model.image_mean.tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert "image_mean" not in model.state_dict()  # normalisation is not a checkpoint entry


# ---------------------------------------------------------------------------------------------------------
# Input errors


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

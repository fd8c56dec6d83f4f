"""Training: batched anchor matching, the losses, hard-negative mining and one SGD step equal torchvision's
SSD (the oracle; its per-image matching and compute_loss come from bench.torchvision_loss)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bench import torchvision_loss, torchvision_matches
from helpers import IMAGE_SIZES, LITE, SSD300, random_images, random_targets, sgd_step
from models.matcher import match_anchors
from models.ssd import hard_negatives
from models.transform import batch_targets


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
    reference = torchvision_loss(theirs, targets, head, [anchors] * len(targets))
    reference_matches = torchvision_matches(theirs, targets, [anchors] * len(targets))
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

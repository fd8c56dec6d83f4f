"""The SSD matcher: which ground-truth box (if any) each anchor learns to predict.

The arithmetic follows torchvision operation for operation, so that matching decisions (IoU >= 0.5) are
bit-identical to it.
"""
import torch
from torch import Tensor


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU [..., N, M] between boxes1 [..., N, 4] and boxes2 [..., M, 4] (leading dimensions broadcast).

    Computed one coordinate at a time on contiguous [..., N, M] planes, which vectorises far better than
    broadcasting [..., N, M, 2] corner pairs; the arithmetic per pair is torchvision's.
    """
    x1a, y1a, x2a, y2a = (c.unsqueeze(-1) for c in boxes1.unbind(-1))
    x1b, y1b, x2b, y2b = (c.contiguous().unsqueeze(-2) for c in boxes2.unbind(-1))
    width = (torch.min(x2a, x2b) - torch.max(x1a, x1b)).clamp(min=0)
    height = (torch.min(y2a, y2b) - torch.max(y1a, y1b)).clamp(min=0)
    inter = width * height
    return inter / ((x2a - x1a) * (y2a - y1a) + (x2b - x1b) * (y2b - y1b) - inter)


def match_anchors(gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor, iou_thresh: float) -> Tensor:
    """SSD matching for a batch: [B, A] index of the ground-truth box of each anchor, -1 for background.

    gt_boxes [B, M, 4] is padded to the largest number of boxes; gt_valid [B, M] marks the real ones.
    An anchor takes the box it overlaps most (the first one on ties) if that IoU >= iou_thresh; then every
    box claims its best anchor whatever the IoU, so that each box is learned by at least one anchor. When
    boxes share a best anchor the one listed last wins, as on torchvision's CPU path.
    """
    batch_size, num_slots = gt_valid.shape
    num_anchors = anchors.shape[0]
    # IoU of the real boxes only ([N, A]), then laid out per image with -1 (below any overlap) as padding.
    box_image, box_slot = torch.where(gt_valid)
    iou = box_iou(gt_boxes[box_image, box_slot], anchors)
    padded_iou = iou.new_full((batch_size, num_slots, num_anchors), -1.0)
    padded_iou[box_image, box_slot] = iou
    best_iou, best_box = padded_iou.max(dim=1)
    matches = torch.where(best_iou >= iou_thresh, best_box, -1)

    # Every box claims its best anchor; "amax" makes the last box win where boxes share a best anchor.
    best_anchor = iou.argmax(dim=1)  # [N]
    forced = torch.full_like(matches, -1).view(-1).scatter_reduce(
        0, box_image * num_anchors + best_anchor, box_slot, reduce="amax"
    )
    return torch.where(forced.view_as(matches) >= 0, forced.view_as(matches), matches)

"""Box encoding/decoding against anchors and the SSD anchor matcher.

The arithmetic follows torchvision operation for operation, so that matching decisions (IoU >= 0.5) and
decoded boxes are bit-identical to it.
"""
import math

import torch
from torch import Tensor

# The regression targets are scaled by these (x, y, w, h) weights: the "variances" 0.1 / 0.2 of the paper.
WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# exp(dw) is clamped so that a wild prediction cannot grow a box beyond 1000 / 16 times its anchor.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def _centre_size(boxes: Tensor):
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode(boxes: Tensor, anchors: Tensor) -> Tensor:
    """Regression targets [..., 4] (dx, dy, dw, dh) that turn each anchor into the matching box."""
    anchor_cx, anchor_cy, anchor_w, anchor_h = _centre_size(anchors)
    cx, cy, w, h = _centre_size(boxes)
    wx, wy, ww, wh = WEIGHTS
    return torch.stack(
        (
            wx * (cx - anchor_cx) / anchor_w,
            wy * (cy - anchor_cy) / anchor_h,
            ww * torch.log(w / anchor_w),
            wh * torch.log(h / anchor_h),
        ),
        dim=-1,
    )


def decode(deltas: Tensor, anchors: Tensor) -> Tensor:
    """Boxes [..., 4] XYXY predicted by the regression outputs deltas [..., 4] for anchors [..., 4]."""
    anchors = anchors.to(deltas.dtype)
    anchor_cx, anchor_cy, anchor_w, anchor_h = _centre_size(anchors)
    wx, wy, ww, wh = WEIGHTS
    cx = deltas[..., 0] / wx * anchor_w + anchor_cx
    cy = deltas[..., 1] / wy * anchor_h + anchor_cy
    half_w = 0.5 * (torch.exp(torch.clamp(deltas[..., 2] / ww, max=MAX_LOG_SCALE)) * anchor_w)
    half_h = 0.5 * (torch.exp(torch.clamp(deltas[..., 3] / wh, max=MAX_LOG_SCALE)) * anchor_h)
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


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

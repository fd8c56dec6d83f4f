"""Box encoding and decoding against anchors (the matcher that pairs anchors with boxes is in matcher.py).

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
    # In float32 at least: bfloat16 pixel coordinates near 300 or 512 are 2 px apart (float16's 0.25 px).
    dtype = torch.promote_types(deltas.dtype, torch.float32)
    deltas, anchors = deltas.to(dtype), anchors.to(dtype)
    anchor_cx, anchor_cy, anchor_w, anchor_h = _centre_size(anchors)
    wx, wy, ww, wh = WEIGHTS
    cx = deltas[..., 0] / wx * anchor_w + anchor_cx
    cy = deltas[..., 1] / wy * anchor_h + anchor_cy
    half_w = 0.5 * (torch.exp(torch.clamp(deltas[..., 2] / ww, max=MAX_LOG_SCALE)) * anchor_w)
    half_h = 0.5 * (torch.exp(torch.clamp(deltas[..., 3] / wh, max=MAX_LOG_SCALE)) * anchor_h)
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)

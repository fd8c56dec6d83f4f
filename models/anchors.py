"""SSD default boxes (anchors), as in section 2.2 of the SSD paper and torchvision's DefaultBoxGenerator."""
import math

import torch
from torch import Tensor


class DefaultBoxes:
    """Default boxes for a list of square-ish feature maps, in XYXY pixels of the resized input.

    For feature map k with scale s_k: boxes of size s_k and sqrt(s_k * s_{k+1}) with aspect ratio 1, plus a
    pair (w/h = ar and h/w = ar) for each ar in aspect_ratios[k]. Box order is feature map -> row -> column
    -> box, the order in which the heads flatten their outputs.

    The boxes only depend on the feature map sizes and the image size, so they are built once per
    (sizes, dtype, device) and cached, instead of rebuilt on the CPU and copied at every forward.
    """

    def __init__(self, aspect_ratios, min_ratio=0.15, max_ratio=0.9, scales=None, steps=None, clip=True):
        if steps is not None and len(steps) != len(aspect_ratios):
            raise ValueError(f"got {len(steps)} steps for {len(aspect_ratios)} feature maps")
        self.aspect_ratios = aspect_ratios
        self.steps = steps
        self.clip = clip
        num_maps = len(aspect_ratios)
        if scales is None:
            # Linear scales from min_ratio to max_ratio, plus 1.0 for the extra box of the last map.
            if num_maps > 1:
                step = (max_ratio - min_ratio) / (num_maps - 1.0)
                scales = [min_ratio + step * k for k in range(num_maps)] + [1.0]
            else:
                scales = [min_ratio, max_ratio]
        self.scales = scales
        self._box_sizes = [self._relative_box_sizes(k) for k in range(num_maps)]
        self._cache = {}

    def _relative_box_sizes(self, k: int) -> Tensor:
        """[num boxes per location, 2] widths and heights relative to the image size, for feature map k."""
        scale = self.scales[k]
        between_scales = math.sqrt(self.scales[k] * self.scales[k + 1])
        sizes = [[scale, scale], [between_scales, between_scales]]
        for ratio in self.aspect_ratios[k]:
            w, h = scale * math.sqrt(ratio), scale / math.sqrt(ratio)
            sizes += [[w, h], [h, w]]
        sizes = torch.tensor(sizes, dtype=torch.float32)
        # Only the sizes are clipped, not the centres: border boxes may extend past the image.
        return sizes.clamp(0, 1) if self.clip else sizes

    def num_anchors_per_location(self) -> list[int]:
        return [2 + 2 * len(ratios) for ratios in self.aspect_ratios]

    def __call__(self, grid_sizes, image_size, dtype=torch.float32, device="cpu") -> Tensor:
        """[num anchors, 4] XYXY boxes for feature maps of grid_sizes [(h, w), ...] on an image of (H, W)."""
        grid_sizes = tuple((int(h), int(w)) for h, w in grid_sizes)
        image_size = (int(image_size[0]), int(image_size[1]))
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # Graph capture may run on fake tensors, which must not outlive it in the cache.
            return self._build(grid_sizes, image_size, dtype).to(device)
        key = (grid_sizes, image_size, dtype, torch.device(device))
        if key not in self._cache:
            self._cache[key] = self._build(grid_sizes, image_size, dtype).to(device)
        return self._cache[key]

    def _build(self, grid_sizes, image_size, dtype) -> Tensor:
        height, width = image_size
        boxes = []
        for k, (grid_h, grid_w) in enumerate(grid_sizes):
            # With steps the centres follow the paper's fixed strides (38 x 38 cells of 8 px on a 300 px
            # image even though 300 / 8 = 37.5); without, they are spread over the actual grid.
            cells_x = width / self.steps[k] if self.steps else grid_w
            cells_y = height / self.steps[k] if self.steps else grid_h
            centres_x = ((torch.arange(grid_w) + 0.5) / cells_x).to(dtype)
            centres_y = ((torch.arange(grid_h) + 0.5) / cells_y).to(dtype)
            cy, cx = torch.meshgrid(centres_y, centres_x, indexing="ij")
            num_sizes = len(self._box_sizes[k])
            centres = torch.stack((cx.reshape(-1), cy.reshape(-1)), dim=-1).repeat_interleave(num_sizes, dim=0)
            sizes = self._box_sizes[k].to(dtype).repeat(grid_h * grid_w, 1)
            boxes.append(torch.cat((centres, sizes), dim=1))
        boxes = torch.cat(boxes, dim=0)
        scale = torch.tensor([width, height])
        return torch.cat(((boxes[:, :2] - 0.5 * boxes[:, 2:]) * scale, (boxes[:, :2] + 0.5 * boxes[:, 2:]) * scale), 1)

    def __repr__(self):
        return (
            f"{type(self).__name__}(aspect_ratios={self.aspect_ratios}, scales={self.scales}, "
            f"steps={self.steps}, clip={self.clip})"
        )

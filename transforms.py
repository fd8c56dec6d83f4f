"""Detection transforms with the semantics of torchvision's v1 references (references/detection/transforms.py).

Every transform is an nn.Module with forward(image, target) -> (image, target); boxes are float XYXY pixels.
Images may be PIL images or CHW tensors (uint8, or float in [0, 1]); PIL images are turned into uint8 tensors by
the first transform that touches pixels, so a pipeline converts once and never goes back to PIL, and the "pil"
and "tensor" preset backends give identical results. Colour operations use the arithmetic of torchvision's
tensor kernels (one step on a uint8 image equals torchvision.transforms.functional's result; PIL's ImageEnhance
differs by rounding only), but RandomPhotometricDistort chains its steps in float32 and rounds once at the end.

Differences from the references, all deliberate:
* RandomIoUCrop filters "area" and "iscrowd" with the boxes (the reference leaves them stale) and scales "area"
  by the fraction of each box that survives clamping; an image without boxes is returned unchanged at once
  instead of looping until the "leave as is" option is drawn.
* RandomZoomOutIoUCrop fuses the ssd policy's zoom-out and IoU crop: it draws the same random numbers in the
  same order as RandomZoomOut followed by RandomIoUCrop and gives the same output, but only allocates the final
  crop instead of a canvas of up to 16x the image area.
* RandomZoomOut on float images fills with fill / 255 (the reference writes the 0-255 fill into [0, 1] data).
"""

import numpy as np
import torch
from PIL import Image
from torch import nn


def _as_tensor(image):
    """PIL image -> contiguous uint8 CHW tensor (one copy); tensors pass through."""
    if isinstance(image, torch.Tensor):
        return image
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a CHW tensor, got {type(image).__name__}")
    array = np.asarray(image)
    array = array[:, :, None] if array.ndim == 2 else array
    # np.array copies always: ascontiguousarray would hand back PIL's read-only buffer where the transpose is
    # already contiguous (a 1x1 image), and torch warns about a non-writable array.
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))


def _to_float32(image):
    """float32 copy of a CPU image. numpy casts uint8 several times faster than torch does on CPU and allocates
    big arrays on transparent huge pages (fewer page faults for zoomed-out canvases); the values are identical."""
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {image.dtype}")
    return torch.from_numpy(image.numpy().astype(np.float32))


def _from_float(x, dtype):
    """Back to the image's dtype; values are already clamped to its range, and the cast truncates like torch's."""
    return torch.from_numpy(x.numpy().astype(np.uint8)) if dtype == torch.uint8 else x.to(dtype)


def _grayscale(x, integer):
    r, g, b = x.unbind(-3)
    gray = 0.2989 * r + 0.587 * g + 0.114 * b
    # torchvision's grayscale of a uint8 image is itself uint8 (truncated)
    return (gray.trunc_() if integer else gray).unsqueeze(-3)


def _blend_(x, other, ratio, integer):
    return x.mul_(ratio).add_((1.0 - ratio) * other).clamp_(0, 255.0 if integer else 1.0)


def _brightness_(x, factor, integer):
    """Scale the image by `factor`."""
    return _blend_(x, 0.0, factor, integer)


def _contrast_(x, factor, integer):
    """Blend the image with its mean grey level."""
    return _blend_(x, torch.mean(_grayscale(x, integer), dim=(-3, -2, -1), keepdim=True), factor, integer)


def _saturation_(x, factor, integer):
    """Blend the image with its own grayscale version."""
    return _blend_(x, _grayscale(x, integer), factor, integer)


def _hue(x, factor, integer):
    """Rotate the HSV hue by `factor` turns (in [-0.5, 0.5]).

    A hue rotation keeps each pixel's max and min channel, so instead of converting to HSV and back this takes
    the hue in sextants h and rebuilds each channel as max - (max - min) * clamp(min(k, 4 - k), 0, 1) with
    k = (h + n) mod 6, n = 5, 3, 1 for R, G, B: the same result as torchvision's kernel up to rounding, in a
    fraction of its time.
    """
    r, g, b = x.unbind(-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # Grey pixels (chroma 0) get hue 0 from a 0 / tiny division, as in torchvision's rgb_to_hsv.
    hue = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(chroma, alpha=2), (r - g).add_(chroma, alpha=4)))
    hue.div_(chroma.clamp(min=torch.finfo(torch.float32).tiny)).add_(6 * factor)
    out = torch.empty_like(x)
    for channel, n in zip(out.unbind(-3), (5, 3, 1)):
        k = hue + n
        k.sub_(torch.floor(k / 6).mul_(6))
        torch.addcmul(maxc, chroma, torch.minimum(k, 4 - k).clamp_(0, 1), value=-1, out=channel)
    return out


def _paste_window(image, left, top, width, height, fill):
    """The window [left, left + width) x [top, top + height) of `image` (in its pixel coordinates); parts of the
    window outside the image take `fill`, one value per channel. A window inside the image is a view."""
    channels, image_h, image_w = image.shape
    if left >= 0 and top >= 0 and left + width <= image_w and top + height <= image_h:
        return image[:, top : top + height, left : left + width]
    out = torch.empty((channels, height, width), dtype=image.dtype)
    for plane, value in zip(out, fill):
        plane.fill_(value)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, image_w), min(top + height, image_h)
    if x1 > x0 and y1 > y0:
        out[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
    return out


def _image_fill(fill, image):
    fill = [float(v) for v in fill]
    return fill if image.dtype == torch.uint8 else [v / 255.0 for v in fill]


def _f32(value):
    """Round a Python float to float32, to reproduce the reference's float32 tensor arithmetic exactly."""
    return float(np.float32(value))


def _iou(box, window):
    width = min(box[2], window[2]) - max(box[0], window[0])
    height = min(box[3], window[3]) - max(box[1], window[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (window[2] - window[0]) * (window[3] - window[1]) - inter
    return inter / union


def _crop_target(target, left, top, width, height, keep):
    """Keep the boxes in `keep`, move them into the crop's frame and clamp them to it. Every per-box key follows
    the boxes; "area" shrinks with the part of each box that was clamped away."""
    boxes = target["boxes"][keep]
    before = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    boxes = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    boxes[:, 0::2].clamp_(0, width)
    boxes[:, 1::2].clamp_(0, height)
    after = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    target = dict(target, boxes=boxes)
    for key in ("labels", "iscrowd"):
        if key in target:
            target[key] = target[key][keep]
    if "area" in target:
        target["area"] = target["area"][keep] * torch.where(before > 0, after / before, 1.0)
    return target


def _shift_boxes(target, dx, dy):
    boxes = target["boxes"]
    return dict(target, boxes=boxes + torch.tensor([dx, dy, dx, dy], dtype=boxes.dtype))


class Compose(nn.Module):
    def __init__(self, transforms):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, image, target=None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip(nn.Module):
    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, image, target=None):
        if torch.rand(1) < self.p:
            image = _as_tensor(image).flip(-1)
            if target is not None:
                boxes = target["boxes"]
                width = image.shape[-1]
                target = dict(target, boxes=torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1))
        return image, target


class PILToTensor(nn.Module):
    """PIL image -> uint8 CHW tensor; tensors (already converted by an earlier transform) pass through."""

    def forward(self, image, target=None):
        return _as_tensor(image), target


class RandomPhotometricDistort(nn.Module):
    """SSD's photometric distortion: brightness, contrast (before or after saturation and hue), saturation, hue,
    each with probability p, then a random channel permutation with probability p. The steps run on one float32
    copy and round back to the image's dtype once at the end."""

    def __init__(self, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.05, 0.05), brightness=(0.875, 1.125), p=0.5):
        super().__init__()
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.brightness = brightness
        self.p = p

    def forward(self, image, target=None):
        image = _as_tensor(image)
        if image.shape[-3] != 3:
            raise ValueError(f"RandomPhotometricDistort needs a 3-channel RGB image, got shape {tuple(image.shape)}")
        integer = image.dtype == torch.uint8
        x = _to_float32(image)
        r = torch.rand(7)
        contrast_before = r[1] < 0.5
        steps = [
            (r[0] < self.p, _brightness_, self.brightness),
            (contrast_before and r[2] < self.p, _contrast_, self.contrast),
            (r[3] < self.p, _saturation_, self.saturation),
            (r[4] < self.p, _hue, self.hue),
            (not contrast_before and r[5] < self.p, _contrast_, self.contrast),
        ]
        for apply, kernel, (low, high) in steps:
            if apply:
                x = kernel(x, float(torch.empty(1).uniform_(low, high)), integer)
        if r[6] < self.p:
            x = x[..., torch.randperm(3), :, :]
        return _from_float(x, image.dtype), target


class RandomZoomOut(nn.Module):
    """Place the image at a random spot of a canvas 1-4x its size (probability p), filled with `fill`."""

    def __init__(self, fill=None, side_range=(1.0, 4.0), p=0.5):
        super().__init__()
        self.fill = [0.0, 0.0, 0.0] if fill is None else list(fill)
        if side_range[0] < 1.0 or side_range[0] > side_range[1]:
            raise ValueError(f"Invalid canvas side range provided {side_range}.")
        self.side_range = side_range
        self.p = p

    def sample(self, width, height):
        """(left, top, canvas_width, canvas_height): where the image goes on the canvas; None to leave it."""
        if torch.rand(1) >= self.p:
            return None
        r = self.side_range[0] + torch.rand(1) * (self.side_range[1] - self.side_range[0])
        canvas_width, canvas_height = int(width * r), int(height * r)
        r = torch.rand(2)
        left = int((canvas_width - width) * r[0])
        top = int((canvas_height - height) * r[1])
        return left, top, canvas_width, canvas_height

    def forward(self, image, target=None):
        image = _as_tensor(image)
        placement = self.sample(image.shape[-1], image.shape[-2])
        if placement is None:
            return image, target
        left, top, canvas_width, canvas_height = placement
        image = _paste_window(image, -left, -top, canvas_width, canvas_height, _image_fill(self.fill, image))
        if target is not None:
            target = _shift_boxes(target, left, top)
        return image, target


class RandomIoUCrop(nn.Module):
    """SSD's random crop: draw a minimum IoU from `sampler_options` (1.0 = leave the image as is), then up to
    `trials` random crops (scale and aspect limits) keeping the boxes whose centre is inside; accept the first
    crop with a kept box of IoU >= the minimum, else draw another option."""

    def __init__(self, min_scale=0.3, max_scale=1.0, min_aspect_ratio=0.5, max_aspect_ratio=2.0, sampler_options=None, trials=40):
        super().__init__()
        # Configuration similar to weiliu89/caffe ssd_coco.py
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.min_aspect_ratio = min_aspect_ratio
        self.max_aspect_ratio = max_aspect_ratio
        self.options = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0] if sampler_options is None else list(sampler_options)
        self.trials = trials

    def sample(self, boxes, width, height):
        """(left, top, crop_width, crop_height, keep mask) or None to leave the image as is.

        The draws and the integer crop arithmetic match the reference exactly (float32 emulated on Python floats,
        which is much faster than 0-d tensors in this loop of up to hundreds of trials); the IoU test runs in
        double precision.
        """
        if len(boxes) == 0:
            return None
        boxes = boxes.to(torch.float32).numpy()
        cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
        cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
        candidates = list(zip(cx.tolist(), cy.tolist(), *boxes.T.tolist()))
        scale_low, scale_span = _f32(self.min_scale), _f32(self.max_scale - self.min_scale)
        while True:
            min_iou = self.options[int(torch.randint(low=0, high=len(self.options), size=(1,)))]
            if min_iou >= 1.0:
                return None
            for _ in range(self.trials):
                rw, rh = torch.rand(2).tolist()
                crop_w = int(_f32(width * _f32(scale_low + _f32(scale_span * rw))))
                crop_h = int(_f32(height * _f32(scale_low + _f32(scale_span * rh))))
                if crop_h == 0 or not self.min_aspect_ratio <= crop_w / crop_h <= self.max_aspect_ratio:
                    continue
                rx, ry = torch.rand(2).tolist()
                left, top = int(_f32((width - crop_w) * rx)), int(_f32((height - crop_h) * ry))
                right, bottom = left + crop_w, top + crop_h
                if crop_w == 0:  # a zero-area crop; only reachable with min_aspect_ratio 0
                    continue
                if any(
                    left < x < right and top < y < bottom and _iou(box, (left, top, right, bottom)) >= min_iou
                    for x, y, *box in candidates
                ):
                    keep = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
                    return left, top, crop_w, crop_h, torch.from_numpy(keep)

    def forward(self, image, target=None):
        if target is None:
            raise ValueError("The targets can't be None for this transform.")
        image = _as_tensor(image)
        crop = self.sample(target["boxes"], image.shape[-1], image.shape[-2])
        if crop is None:
            return image, target
        left, top, width, height, keep = crop
        return image[:, top : top + height, left : left + width], _crop_target(target, left, top, width, height, keep)


class RandomZoomOutIoUCrop(nn.Module):
    """RandomZoomOut followed by RandomIoUCrop, fused: the same random draws and the same result, but the zoomed
    canvas (up to 16x the image area) is never built; only the final crop is, from the image and the fill."""

    def __init__(self, zoom_out, iou_crop):
        super().__init__()
        self.zoom_out = zoom_out
        self.iou_crop = iou_crop

    def forward(self, image, target=None):
        if target is None:
            raise ValueError("The targets can't be None for this transform.")
        image = _as_tensor(image)
        height, width = image.shape[-2:]
        placement = self.zoom_out.sample(width, height)
        pad_left, pad_top, canvas_width, canvas_height = placement or (0, 0, width, height)
        if placement is not None:
            target = _shift_boxes(target, pad_left, pad_top)

        crop = self.iou_crop.sample(target["boxes"], canvas_width, canvas_height)
        if crop is None:
            left, top, crop_width, crop_height = 0, 0, canvas_width, canvas_height
        else:
            left, top, crop_width, crop_height, keep = crop
            target = _crop_target(target, left, top, crop_width, crop_height, keep)
        fill = _image_fill(self.zoom_out.fill, image)
        image = _paste_window(image, left - pad_left, top - pad_top, crop_width, crop_height, fill)
        return image, target

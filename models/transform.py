"""Input handling: validation, fixed-size resize + batching, normalisation, and box rescaling."""
import torch
import torch.nn.functional as F
from torch import Tensor


def check_images(images) -> None:
    if not isinstance(images, (list, tuple)) or not all(isinstance(image, Tensor) for image in images):
        raise TypeError(f"images must be a list of [3, H, W] tensors, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is an empty list")
    for index, image in enumerate(images):
        if not (image.is_floating_point() or image.dtype == torch.uint8):
            raise TypeError(f"image {index}: expected a uint8 tensor (0-255) or a float one (0-1), got {image.dtype}")
        if image.dtype != images[0].dtype:
            raise TypeError(f"image {index} is {image.dtype} but image 0 is {images[0].dtype}: pass all images as "
                            "uint8 (0-255) or all as float (0-1)")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index}: expected shape [3, H, W], got {list(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"image {index}: empty image of shape {list(image.shape)}")


def check_targets(targets, num_images: int) -> None:
    """Shape and dtype checks (no host sync); the box values are checked by find_bad_box."""
    if targets is None:
        raise ValueError("targets are required in training mode")
    if not isinstance(targets, (list, tuple)) or len(targets) != num_images:
        raise ValueError(f"expected a list of {num_images} target dicts, got {type(targets).__name__}"
                         + (f" of length {len(targets)}" if isinstance(targets, (list, tuple)) else ""))
    for index, target in enumerate(targets):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise ValueError(f"target {index}: expected a dict with 'boxes' and 'labels'")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or not boxes.is_floating_point() or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"target {index}: 'boxes' must be a float tensor of shape [N, 4], got {_describe(boxes)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"target {index}: 'labels' must be an int64 tensor of shape [{boxes.shape[0]}], got {_describe(labels)}"
            )


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def batch_targets(targets) -> tuple[Tensor, Tensor, Tensor]:
    """Targets padded to the largest box count M: boxes [B, M, 4], labels [B, M], valid [B, M]. M >= 1 (an
    invalid slot when no image has boxes) keeps the loss code free of empty-tensor special cases."""
    counts = [len(target["labels"]) for target in targets]
    device = targets[0]["boxes"].device
    num_slots = max(counts + [1])
    valid = torch.arange(num_slots, device=device) < torch.tensor(counts, device=device)[:, None]
    boxes = torch.zeros((len(targets), num_slots, 4), dtype=targets[0]["boxes"].dtype, device=device)
    labels = torch.zeros((len(targets), num_slots), dtype=torch.int64, device=device)
    boxes[valid] = torch.cat([target["boxes"] for target in targets]).to(boxes.dtype)
    labels[valid] = torch.cat([target["labels"] for target in targets])
    return boxes, labels, valid


def find_bad_box(boxes: Tensor, labels: Tensor, valid: Tensor, num_classes: int):
    """(image index, box index) of the first box that is degenerate (x2 <= x1 or y2 <= y1, or NaN) or
    whose label is outside [0, num_classes); None if all are fine. One host sync for the whole batch."""
    # Written as "not (x2 > x1)" so that NaN coordinates count as bad too.
    degenerate = ~(boxes[..., 2:] > boxes[..., :2]).all(dim=-1)
    bad = valid & (degenerate | (labels < 0) | (labels >= num_classes))
    if not bad.any():
        return None
    image_index, box_index = bad.nonzero()[0].tolist()
    return image_index, box_index


def normalize_and_resize(images: list[Tensor], mean: Tensor, std: Tensor, size: tuple[int, int]) -> Tensor:
    """(image - mean) / std, then bilinear resize (align_corners=False, no antialiasing, aspect ratio not
    kept) to size (H, W), batched into [B, 3, H, W] of mean's dtype. Images of equal size go through in one call.
    uint8 images are first scaled to [0, 1] as torchvision's ToDtype(float32, scale=True) does (divided by 255).

    Normalising before resizing, as torchvision does, keeps the batch bit-identical to torchvision's (the
    reverse order is cheaper but rounds differently, which moves boxes by ~1e-3 px)."""
    batch = mean.new_empty((len(images), 3) + tuple(size))
    by_size = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[1:]), []).append(index)
    for image_size, indices in by_size.items():
        same_size = torch.stack([images[i] for i in indices])
        if not same_size.is_floating_point():
            same_size = same_size.to(mean.dtype).div_(255)
        same_size = (same_size - mean[:, None, None]) / std[:, None, None]
        if image_size != tuple(size):
            same_size = F.interpolate(same_size, size=size, mode="bilinear", align_corners=False)
        batch[indices] = same_size
    return batch


def scale_boxes(boxes: Tensor, from_sizes, to_sizes) -> Tensor:
    """Per-image XYXY boxes [B, N, 4] moved from images of from_sizes to images of to_sizes ((H, W) pairs,
    [B, 2] or one for all). The ratios are float32 divisions, as torchvision computes them."""
    from_sizes = torch.as_tensor(from_sizes, dtype=torch.float32, device=boxes.device)
    to_sizes = torch.as_tensor(to_sizes, dtype=torch.float32, device=boxes.device)
    ratio_h, ratio_w = (to_sizes / from_sizes).unbind(-1)
    ratios = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h), dim=-1).reshape(-1, 1, 4)
    return boxes * ratios

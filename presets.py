"""Training and evaluation transform presets, as in torchvision's detection references.

Both presets take the dataset's PIL image and box target and return a uint8 CHW image with a target holding float32
XYXY "boxes" and int64 "labels". No resizing and no conversion to float: the SSD models take uint8 images, scale them
to [0, 1] exactly as torchvision's ToDtype(float32, scale=True) would, and resize them to their fixed input size.
Leaving both to the model moves a quarter of the bytes from the loader workers to the training process (and to the
GPU), and the float copy is made once, on the device, instead of in the workers.
"""

from collections import defaultdict

import torch

import coco_utils
import transforms as reference_transforms
from models.transform import scale_boxes

POLICIES = ("hflip", "ssd", "ssdlite")
BACKENDS = ("pil", "tensor", "tv_tensor")


def _get_modules(use_v2):
    if use_v2:
        # Imported here so the v1 path never pays for (or warns about) transforms.v2.
        import torchvision.transforms.v2
        import torchvision.tv_tensors

        return torchvision.transforms.v2, torchvision.tv_tensors
    return reference_transforms, None


def _check_backend(backend, use_v2):
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    if backend == "tv_tensor" and not use_v2:
        raise ValueError("The tv_tensor backend needs the v2 transforms: use --use-v2 (use_v2=True)")


def _pil_conversions(T, backend, use_v2):
    """(transforms before the augmentation, transforms after it) turning the dataset's PIL image into a tensor:
    the tensor backends convert first, the pil backend converts last. (The v1 transforms in transforms.py turn
    a PIL image into a tensor as soon as they touch its pixels, so for them both backends give the same result.)"""
    if backend == "pil":
        return [], [T.ToImage() if use_v2 else T.PILToTensor()]
    return [T.PILToTensor() if backend == "tensor" else T.ToImage()], []


class DropUnusableBoxes(torch.nn.Module):
    """The last training transform, on v1 and v2 alike: keeps the boxes of positive size in float32 after the
    model's resize to input_size ((H, W); None: the image's own frame), the test the model applies to its targets.
    Augmentation (a crop, a zoom) can leave a box that the annotation file's check passed a sliver the model
    refuses; v2's RandomIoUCrop leaves the boxes outside its crop as zeros. Every per-box entry of the target
    ("boxes", "labels", "area", "iscrowd") is filtered alike."""

    def __init__(self, input_size=None):
        super().__init__()
        self.input_size = input_size

    def forward(self, image, target):
        boxes = target["boxes"]
        if self.input_size is not None:
            boxes = scale_boxes(boxes.to(torch.float32)[None], tuple(image.shape[-2:]), self.input_size)[0]
        keep = coco_utils.has_positive_size(boxes)
        if keep.all():
            return image, target
        count = len(keep)
        return image, {key: value[keep] if isinstance(value, torch.Tensor) and value.shape[:1] == (count,) else value
                       for key, value in target.items()}


class _LeaveTinyImagesUncropped:
    """torchvision.transforms.v2.RandomIoUCrop, except that an image a few pixels high or wide, for which it divides
    by a crop size of 0 (ZeroDivisionError), is left as it is; v1's RandomIoUCrop skips such crops."""

    def __init__(self, iou_crop):
        self.iou_crop = iou_crop

    def __call__(self, *inputs):
        try:
            return self.iou_crop(*inputs)
        except ZeroDivisionError:
            return inputs if len(inputs) > 1 else inputs[0]


class DetectionPresetTrain:
    """The training augmentation of a policy; input_size: the (H, W) the model resizes images to, for the final
    usable-box test (DropUnusableBoxes)."""

    def __init__(self, *, data_augmentation, hflip_prob=0.5, mean=(123.0, 117.0, 104.0), backend="pil", use_v2=False,
                 input_size=None):
        _check_backend(backend, use_v2)
        if data_augmentation not in POLICIES:
            raise ValueError(f"Unknown data augmentation policy {data_augmentation!r}; valid choices: {', '.join(POLICIES)}")
        T, tv_tensors = _get_modules(use_v2)
        before, after = _pil_conversions(T, backend, use_v2)

        iou_crop = _LeaveTinyImagesUncropped(T.RandomIoUCrop()) if use_v2 else T.RandomIoUCrop()
        if data_augmentation == "hflip":
            augment = [T.RandomHorizontalFlip(p=hflip_prob)]
        elif data_augmentation == "ssd":
            if use_v2:
                zoom_and_crop = [T.RandomZoomOut(fill=defaultdict(lambda: mean, {tv_tensors.Mask: 0})), iou_crop]
            else:  # the same draws and result as RandomZoomOut then RandomIoUCrop, without the zoomed-out canvas
                zoom_and_crop = [T.RandomZoomOutIoUCrop(T.RandomZoomOut(fill=list(mean)), iou_crop)]
            augment = [T.RandomPhotometricDistort(), *zoom_and_crop, T.RandomHorizontalFlip(p=hflip_prob)]
        else:  # ssdlite
            augment = [iou_crop, T.RandomHorizontalFlip(p=hflip_prob)]

        transforms = before + augment + after
        if use_v2:
            # Not torchvision's SanitizeBoundingBoxes, which drops boxes under 1 pixel that v1 trains on: the one
            # usable-box rule below serves both paths.
            transforms += [T.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY), T.ToPureTensor()]
        self.transforms = T.Compose([*transforms, DropUnusableBoxes(input_size)])

    def __call__(self, img, target):
        return self.transforms(img, target)


class DetectionPresetEval:
    def __init__(self, backend="pil", use_v2=False):
        _check_backend(backend, use_v2)
        T, tv_tensors = _get_modules(use_v2)
        before, after = _pil_conversions(T, backend, use_v2)
        transforms = before + after
        if use_v2:
            # The reference stops at ToPureTensor, which would hand back boxes in whatever format they came.
            transforms += [T.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY), T.ToPureTensor()]
        self.transforms = T.Compose(transforms)

    def __call__(self, img, target):
        return self.transforms(img, target)

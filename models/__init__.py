"""SSD300 VGG16 and SSDlite320 MobileNetV3-Large, behaving exactly as torchvision's builders of the same
names (same state_dict, losses and detections), without depending on torchvision's detection code."""
import torch

from .ssd import SSD, ssd300_vgg16
from .ssdlite import ssdlite320_mobilenet_v3_large
from .weights import WeightsError, class_names, load_checkpoint_file, load_model_state

_BUILDERS = {
    "ssd300_vgg16": ssd300_vgg16,
    "ssdlite320_mobilenet_v3_large": ssdlite320_mobilenet_v3_large,
}

# channels_last against the default layout, measured A/B on the models as our scripts run them.
# CPU (2-core AVX2, oneDNN kernels): inference is faster for both models (SSDlite 1.1-1.2x, SSD300 1.15-1.25x at
# batch 1-8); a training step is faster for SSDlite (1.2x at batch 4, 1.7x at batch 16: the depthwise kernels
# prefer NHWC) but slower for SSD300 (0.76x: the backward pass of its dense 3x3 convolutions is slower in NHWC).
# CUDA (H200, cuDNN, torch 2.11): SSD300 is faster in NHWC (training step at batch 16 1.26x in float32 with TF32,
# 1.32x under float16 autocast; inference at batch 8 1.23x / 1.10x); SSDlite is not (training 1.04x, inference
# 0.78x in float32).
_CHANNELS_LAST = {  # (device type, training) -> model names
    ("cpu", True): {"ssdlite320_mobilenet_v3_large"},
    ("cpu", False): {"ssd300_vgg16", "ssdlite320_mobilenet_v3_large"},
    ("cuda", True): {"ssd300_vgg16"},
    ("cuda", False): {"ssd300_vgg16"},
}

__all__ = [
    "SSD", "WeightsError", "class_names", "get_model", "list_models", "load_checkpoint_file", "load_model_state",
    "prefers_channels_last", *_BUILDERS,
]


def list_models() -> list[str]:
    return list(_BUILDERS)


def get_model(name: str, *, weights=None, weights_backbone=None, num_classes=None, trainable_backbone_layers=None,
              class_names=None, **kwargs) -> SSD:
    """Build model `name` (see list_models()). weights / weights_backbone: a torchvision weights name such as
    "SSD300_VGG16_Weights.COCO_V1" / "VGG16_Weights.IMAGENET1K_FEATURES", or a local checkpoint file.

    Without class_names, weights load strictly (num_classes must be theirs). class_names ({label: name} for
    labels 1..N-1, or a checkpoint's category table) fine-tunes weights made for other classes: everything
    but the classification layers loads whole, those are built for the given classes, and the rows of the
    background and of every class whose name matches one of the weights' class names (ignoring case,
    spaces, "_" and "-") are copied; a line saying what was kept is printed. Weights with the same classes
    load strictly. With weights, trainable_backbone_layers defaults as in torchvision (SSD300 4 of 5,
    SSDlite 6 of 6).

    kwargs: SSD options (score_thresh, nms_thresh, detections_per_img, topk_candidates, iou_thresh,
    positive_fraction, image_mean, image_std)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; valid names: {', '.join(_BUILDERS)}")
    return _BUILDERS[name](
        weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
        trainable_backbone_layers=trainable_backbone_layers, class_names=class_names, **kwargs,
    )


def prefers_channels_last(name: str, device, training: bool) -> bool:
    """Whether our scripts run model `name` in channels_last on `device` unless told otherwise: where it was
    measured faster (see above). Other devices keep the default layout."""
    return name in _CHANNELS_LAST.get((torch.device(device).type, training), ())

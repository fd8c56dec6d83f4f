"""SSD300 VGG16 and SSDlite320 MobileNetV3-Large, behaving exactly as torchvision's builders of the same
names (same state_dict, losses and detections), without depending on torchvision's detection code."""
from .ssd import SSD, ssd300_vgg16
from .ssdlite import ssdlite320_mobilenet_v3_large
from .weights import WeightsError, load_checkpoint_file, load_model_state

_BUILDERS = {
    "ssd300_vgg16": ssd300_vgg16,
    "ssdlite320_mobilenet_v3_large": ssdlite320_mobilenet_v3_large,
}

__all__ = [
    "SSD", "WeightsError", "get_model", "list_models", "load_checkpoint_file", "load_model_state", *_BUILDERS,
]


def list_models() -> list[str]:
    return list(_BUILDERS)


def get_model(name: str, *, weights=None, weights_backbone=None, num_classes=None, trainable_backbone_layers=None,
              **kwargs) -> SSD:
    """Build model `name` (see list_models()). weights / weights_backbone: a torchvision weights name such as
    "SSD300_VGG16_Weights.COCO_V1" / "VGG16_Weights.IMAGENET1K_FEATURES", or a local checkpoint file.
    kwargs: SSD options (score_thresh, nms_thresh, detections_per_img, topk_candidates, iou_thresh,
    positive_fraction, image_mean, image_std)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; valid names: {', '.join(_BUILDERS)}")
    return _BUILDERS[name](
        weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
        trainable_backbone_layers=trainable_backbone_layers, **kwargs,
    )

"""SSD300 VGG16 and SSDlite320 MobileNetV3-Large, behaving exactly as torchvision's builders of the same
names (same state_dict, losses and detections), without depending on torchvision's detection code, and SSD512
VGG16, the SSD paper's model that torchvision does not have, built from the same parts."""
import torch

from .compile import CompileError, compile_network
from . import ssd, ssdlite
from .ssd import SSD, SSD300_INPUT_SIZE, TargetError, ssd300_vgg16
from .ssd512 import SSD512_INPUT_SIZE, ssd512_vgg16
from .ssdlite import SSDLITE320_INPUT_SIZE, ssdlite320_mobilenet_v3_large
from .weights import (WeightsError, category_ids, class_names, load_checkpoint_file, load_model_state,
                      read_weights_record)

_BUILDERS = {
    "ssd300_vgg16": ssd300_vgg16,
    "ssd512_vgg16": ssd512_vgg16,
    "ssdlite320_mobilenet_v3_large": ssdlite320_mobilenet_v3_large,
}
# The most backbone stages trainable_backbone_layers can name, per model.
TRAINABLE_LAYERS = {"ssd300_vgg16": ssd.TRAINABLE_LAYERS, "ssd512_vgg16": ssd.TRAINABLE_LAYERS,  # one VGG16 trunk
                    "ssdlite320_mobilenet_v3_large": ssdlite.TRAINABLE_LAYERS}
# The (H, W) each model resizes its images to, known before a model is built (the training transforms need it).
INPUT_SIZES = {"ssd300_vgg16": SSD300_INPUT_SIZE, "ssd512_vgg16": SSD512_INPUT_SIZE,
               "ssdlite320_mobilenet_v3_large": SSDLITE320_INPUT_SIZE}

# Where channels_last was measured faster than the default layout, A/B on the models as our scripts run them (the
# figures, machines and dates are in docs/performance.md, "Memory format"): on CPU, inference of both models and an
# SSDlite training step; an SSD300 training step only where the CPU has AVX-512 (oneDNN's NHWC kernels for its dense
# 3x3 backward are slower than the default layout's with AVX2 alone); on CUDA, SSD300 only. SSD512 follows SSD300's
# rule, unmeasured: the same VGG16 convolutions on larger maps.
_CHANNELS_LAST = {  # (device kind, training) -> model names
    ("cpu", True): {"ssdlite320_mobilenet_v3_large"},
    ("cpu", False): {"ssd300_vgg16", "ssd512_vgg16", "ssdlite320_mobilenet_v3_large"},
    ("cpu-avx512", True): {"ssd300_vgg16", "ssd512_vgg16", "ssdlite320_mobilenet_v3_large"},
    ("cpu-avx512", False): {"ssd300_vgg16", "ssd512_vgg16", "ssdlite320_mobilenet_v3_large"},
    ("cuda", True): {"ssd300_vgg16", "ssd512_vgg16"},
    ("cuda", False): {"ssd300_vgg16", "ssd512_vgg16"},
}

__all__ = [
    "INPUT_SIZES", "SSD", "TRAINABLE_LAYERS", "TargetError", "CompileError", "WeightsError", "category_ids",
    "class_names", "compile_network", "get_model", "list_models",
    "load_checkpoint_file", "load_detector", "load_model_state", "prefers_channels_last", "read_weights_record",
    *_BUILDERS,
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


def load_detector(weights, model_name=None) -> tuple[SSD, str, dict]:
    """(model in eval mode, model name, the classes as recorded: read_weights_record's, for class_names and
    category_ids) from a checkpoint file or a torchvision weights name, loaded strictly and built with the options
    the checkpoint records (SSD512's default_boxes). model_name may be None where the weights say which model they
    belong to (our checkpoints and torchvision's names do); given, it must agree with them."""
    saved_model_name, categories, options = read_weights_record(weights)
    if model_name is None:
        if saved_model_name is None:
            raise WeightsError(f"{weights} does not say which model it belongs to: name the model (--model)")
        model_name = saved_model_name
    elif model_name not in _BUILDERS:
        raise WeightsError(f"unknown model '{model_name}'; valid names: {', '.join(_BUILDERS)}")
    elif saved_model_name is not None and saved_model_name != model_name:
        raise WeightsError(f"model {model_name} does not match weights {weights}, which belong to {saved_model_name}")
    return get_model(model_name, weights=weights, **options).eval(), model_name, categories


def prefers_channels_last(name: str, device, training: bool) -> bool:
    """Whether our scripts run model `name` in channels_last on `device` unless told otherwise: where it was
    measured faster (see above). Other devices keep the default layout."""
    kind = torch.device(device).type
    # The vector instructions PyTorch's CPU kernels dispatch to (ATEN_CPU_CAPABILITY can lower them).
    if kind == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512":
        kind = "cpu-avx512"
    return name in _CHANNELS_LAST.get((kind, training), ())

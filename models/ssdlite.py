"""SSDlite320 with a MobileNetV3-Large backbone (MobileNetV2 paper section 6.2, MobileNetV3 section 6.3).

Behaves like torchvision's ssdlite320_mobilenet_v3_large (same state_dict, losses and detections).
"""
from functools import partial

import torch
from torch import nn, Tensor
from torchvision.models import mobilenet_v3_large
from torchvision.ops.misc import Conv2dNormActivation

from .anchors import DefaultBoxes
from .builders import check_options, freeze_stages, load_planned_weights, plan_weights, resolve_trainable_layers
from .ssd import SSD, SSDHead
from .weights import load_model_state, load_weights

# BatchNorm settings of the SSDlite paper's TensorFlow setup.
BatchNorm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
# The projection of MobileNetV3's C4 block: 80 output channels with the reduced tail, 160 without.
C4_PROJECTION_KEY = "backbone.features.1.0.3.0.weight"


def normal_init(module: nn.Module) -> nn.Module:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=0.03)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def _prediction_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Depthwise 3x3 + BN + ReLU6, then a 1x1 projection to the predictions."""
    return normal_init(nn.Sequential(
        Conv2dNormActivation(in_channels, in_channels, kernel_size=3, groups=in_channels,
                             norm_layer=BatchNorm, activation_layer=nn.ReLU6),
        nn.Conv2d(in_channels, out_channels, kernel_size=1),
    ))


def _extra_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 to half the output width, depthwise 3x3 with stride 2, 1x1 to the output width."""
    mid_channels = out_channels // 2
    conv = partial(Conv2dNormActivation, norm_layer=BatchNorm, activation_layer=nn.ReLU6)
    return nn.Sequential(
        conv(in_channels, mid_channels, kernel_size=1),
        conv(mid_channels, mid_channels, kernel_size=3, stride=2, groups=mid_channels),
        conv(mid_channels, out_channels, kernel_size=1),
    )


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise convolution that stays in float32 under CPU bfloat16 autocast (train.py --amp on a CPU): there
    oneDNN's bfloat16 depthwise kernels, the backward above all, are slower than its float32 ones, where the model's
    other convolutions gain (docs/bfloat16.md). Everywhere else, as nn.Conv2d; the same parameters and state_dict."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and \
                torch.get_autocast_dtype("cpu") == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def use_float32_depthwise_convolutions(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if type(module) is nn.Conv2d and module.groups > 1 and module.groups == module.in_channels:
            module.__class__ = DepthwiseConv2d
    return model


class MobileNetV3Extractor(nn.Module):
    """Six SSDlite feature maps (20, 10, 5, 3, 2, 1 cells for a 320 x 320 input): the C4 block's expansion
    (stride 16), the backbone's last layer (stride 32) and four extra blocks."""

    def __init__(self, backbone_features: nn.Sequential, c4_position: int):
        super().__init__()
        c4_block = backbone_features[c4_position]
        if c4_block.use_res_connect:
            raise ValueError("the C4 block of the backbone must not have a residual connection")
        self.features = nn.Sequential(
            nn.Sequential(*backbone_features[:c4_position], c4_block.block[0]),  # up to the C4 expansion
            nn.Sequential(c4_block.block[1:], *backbone_features[c4_position + 1:]),  # C4 depthwise to the end
        )
        last_channels = backbone_features[-1].out_channels
        self.extra = normal_init(nn.ModuleList([
            _extra_block(last_channels, 512), _extra_block(512, 256), _extra_block(256, 256), _extra_block(256, 128),
        ]))
        self.out_channels = [c4_block.block[0].out_channels, last_channels, 512, 256, 256, 128]

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for block in [*self.features, *self.extra]:
            x = block(x)
            outputs.append(x)
        return outputs


SSDLITE320_INPUT_SIZE = (320, 320)  # (H, W) every image is resized to
# The stem, MobileNetV3-Large's four resolution-halving blocks and its last layer: the most trainable_backbone_layers
# can name (torchvision's).
TRAINABLE_LAYERS = 6


def ssdlite320_mobilenet_v3_large(
    *, weights=None, weights_backbone=None, num_classes=None, trainable_backbone_layers=None, class_names=None,
    **options
) -> SSD:
    """SSDlite320 with a MobileNetV3-Large backbone, as torchvision's ssdlite320_mobilenet_v3_large.

    weights: "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1" (or the enum member) or a local checkpoint file;
    it replaces weights_backbone ("MobileNet_V3_Large_Weights.IMAGENET1K_V1" or a local MobileNetV3 file).
    Without backbone weights the backbone has the paper's "reduced tail" (half-width C4/C5 blocks), as the
    released COCO weights do. class_names ({label: name}): fine-tune weights made for other classes to
    these (see models.builders.plan_weights). options: see models.builders.SSD_OPTIONS.
    """
    check_options("ssdlite320_mobilenet_v3_large", options)
    anchor_generator = DefaultBoxes([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)
    num_anchors = anchor_generator.num_anchors_per_location()
    plan = plan_weights(
        weights, "ssdlite320_mobilenet_v3_large", num_classes, class_names,
        "head.classification_head.module_list.0.1.weight", num_anchors[0],
    )
    if plan.weights is not None:
        weights_backbone = None
    trainable_layers = resolve_trainable_layers(
        plan.weights is not None or weights_backbone is not None, trainable_backbone_layers, TRAINABLE_LAYERS,
        TRAINABLE_LAYERS
    )

    reduced_tail = weights_backbone is None
    if plan.weights is not None and C4_PROJECTION_KEY in plan.weights.state_dict:
        # A checkpoint of a model trained from ImageNet weights has the full tail: build what the file holds.
        reduced_tail = plan.weights.state_dict[C4_PROJECTION_KEY].shape[0] == 80
    backbone = mobilenet_v3_large(weights=None, norm_layer=BatchNorm, reduced_tail=reduced_tail)
    if weights_backbone is not None:
        load_model_state(backbone, *load_weights(weights_backbone, ("mobilenet_v3_large",))[:2])
    else:
        normal_init(backbone)
    features = backbone.features
    # Stages start at the stem, at each block that halves the resolution, and at the last layer.
    strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    stage_starts = [0] + strided + [len(features) - 1]
    freeze_stages(features, stage_starts, trainable_layers)
    extractor = MobileNetV3Extractor(features, c4_position=stage_starts[-2])

    model = SSD(
        extractor,
        SSDHead(extractor.out_channels, num_anchors, plan.num_classes, make_predictor=_prediction_block),
        anchor_generator,
        size=SSDLITE320_INPUT_SIZE,
        num_classes=plan.num_classes,
        **{
            "score_thresh": 0.001,
            "nms_thresh": 0.55,
            "detections_per_img": 300,
            "topk_candidates": 300,
            # Inputs in [-1, 1].
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            **options,
        },
    )
    load_planned_weights(model, plan)
    return use_float32_depthwise_convolutions(model)

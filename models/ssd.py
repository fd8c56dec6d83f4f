"""SSD (Liu et al., 2016): the meta-architecture, its heads, the VGG16 trunk SSD300 and SSD512 share, and SSD300.

Behaves like torchvision's SSD / ssd300_vgg16 (same state_dict, same losses and detections).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn, Tensor

from .anchors import DefaultBoxes
from .box_coder import encode
from .matcher import match_anchors
from .postprocess import postprocess_detections
from .transform import (
    batch_targets, check_images, check_targets, find_bad_box, normalize_and_resize, scale_boxes,
)
from .builders import check_options, freeze_stages, load_planned_weights, plan_weights, resolve_trainable_layers
from .weights import load_model_state, load_weights



class TargetError(ValueError):
    """A training target the model refuses; `index` is its position in the batch, so that the caller can name the
    image it came from."""

    def __init__(self, index, message):
        super().__init__(message)
        self.index = index


class SSD(nn.Module):
    """Single-shot detector: backbone feature maps -> per-anchor class logits and box regression.

    Call with a list of [3, H, W] images of any sizes (resized to `size`), all uint8 (0-255, as the presets
    give them) or all float (0-1, as torchvision's SSD takes them). Training mode
    needs targets (dicts with "boxes" [N, 4] XYXY pixels and "labels" int64 [N]) and returns the losses
    {"bbox_regression", "classification"}; eval mode returns one {"boxes", "scores", "labels"} per image,
    boxes in the image's own pixels.

    For export, `preprocess` (images -> normalised batch) and `detect` (batch -> padded detections) are
    the two tensor-only halves of the eval forward.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        anchor_generator: DefaultBoxes,
        size: tuple[int, int],
        num_classes: int,
        image_mean: list[float],
        image_std: list[float],
        score_thresh: float = 0.01,
        nms_thresh: float = 0.45,
        detections_per_img: int = 200,
        iou_thresh: float = 0.5,
        topk_candidates: int = 400,
        positive_fraction: float = 0.25,
    ):
        super().__init__()
        if not 0 < positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in (0, 1], got {positive_fraction}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean and image_std need 3 values (std > 0), got {image_mean} and {image_std}")
        self.backbone = backbone
        self.head = head
        self.anchor_generator = anchor_generator
        self.size = tuple(size)  # (H, W) of the network input
        self.num_classes = num_classes  # including background (0)
        # Not persistent: the normalisation is part of the model's definition, not of its checkpoints.
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32), persistent=False)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.iou_thresh = iou_thresh
        # Hard negative mining keeps (1 - p) / p negatives per positive: 3 for the paper's p = 0.25.
        self.neg_to_pos_ratio = (1.0 - positive_fraction) / positive_fraction
        # Set by models.compile_network: SSD.network compiled, called as compiled_network(self, batch) in eval mode
        # (and in training mode where compiled_for_training). A function, not a submodule: the state_dict keeps
        # its keys.
        self.compiled_network = None
        self.compiled_for_training = False

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        batch, original_sizes = self.preprocess(images)
        if self.training:
            check_targets(targets, len(images))
            return self.compute_loss(*self._head_outputs(batch), *self._batch_targets(targets, original_sizes))

        boxes, scores, labels, valid = self.detect(batch)
        boxes = scale_boxes(boxes, self.size, original_sizes)
        return [
            {"boxes": image_boxes[:count], "scores": image_scores[:count], "labels": image_labels[:count]}
            for image_boxes, image_scores, image_labels, count in zip(boxes, scores, labels, valid.sum(1).tolist())
        ]

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalised [B, 3, H, W] batch at self.size, and the (H, W) of each original image."""
        check_images(images)
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        dtype = images[0].dtype if images[0].is_floating_point() else torch.float32
        mean, std = (value.to(images[0].device, dtype) for value in (self.image_mean, self.image_std))
        return normalize_and_resize(images, mean, std, self.size), original_sizes

    def detect(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections for a preprocessed batch, padded to K = detections_per_img per image: boxes [B, K, 4]
        (XYXY pixels of the resized input), scores [B, K], labels [B, K] and valid [B, K] (a prefix)."""
        if not torch.jit.is_tracing() and (batch.dim() != 4 or tuple(batch.shape[1:]) != (3, *self.size)):
            raise ValueError(f"detect expects a [B, 3, {self.size[0]}, {self.size[1]}] batch, got {list(batch.shape)}")
        head_outputs, anchors = self._head_outputs(batch)
        return postprocess_detections(
            head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors, self.size,
            self.score_thresh, self.nms_thresh, self.detections_per_img, self.topk_candidates,
        )

    def _head_outputs(self, batch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        if self.compiled_network is not None and (self.compiled_for_training or not self.training):
            head_outputs, feature_sizes = self.compiled_network(self, batch)
        else:
            head_outputs, feature_sizes = self.network(batch)
        # At least float32 under autocast: float16 pixel coordinates near 300 are only 0.25 px apart.
        anchors = self.anchor_generator(
            feature_sizes, self.size, torch.promote_types(head_outputs["cls_logits"].dtype, torch.float32),
            batch.device,
        )
        return head_outputs, anchors

    def network(self, batch: Tensor) -> tuple[dict[str, Tensor], list[torch.Size]]:
        """Backbone and heads: the head outputs and the (H, W) of each feature map. The part of the forward
        that models.compile_network compiles."""
        features = self.backbone(batch)
        return self.head(features), [feature.shape[-2:] for feature in features]

    def _batch_targets(self, targets, original_sizes) -> tuple[Tensor, Tensor, Tensor]:
        """Targets padded into [B, M] tensors, boxes moved to the resized input."""
        boxes, labels, valid = batch_targets(targets)
        boxes = scale_boxes(boxes, original_sizes, self.size)
        bad = find_bad_box(boxes, labels, valid, self.num_classes)
        if bad is not None:
            image, index = bad
            raise TargetError(
                image, f"target {image}: box {index} {targets[image]['boxes'][index].tolist()} with label "
                f"{int(targets[image]['labels'][index])} is invalid: boxes need x2 > x1 and y2 > y1 (after "
                f"resizing to {self.size}) and labels need 0 <= label < num_classes = {self.num_classes}"
            )
        return boxes, labels, valid

    def compute_loss(self, head_outputs, anchors, gt_boxes, gt_labels, gt_valid) -> dict[str, Tensor]:
        """Smooth L1 box loss on matched anchors plus softmax cross-entropy on the matched anchors and the
        hardest negatives (neg_to_pos_ratio per positive, per image), both divided by the number of matched
        anchors in the batch. gt_* are padded [B, M] targets in the resized frame."""
        # In float32 at least, with or without autocast: bfloat16 sums and cross-entropies would round the loss and
        # tie the hard-negative ranking (autocast's own float32 list would do the same for these ops).
        dtype = torch.promote_types(head_outputs["cls_logits"].dtype, torch.float32)
        bbox_regression, cls_logits = (head_outputs[key].to(dtype) for key in ("bbox_regression", "cls_logits"))
        matches = match_anchors(gt_boxes, gt_valid, anchors, self.iou_thresh)  # [B, A]
        foreground = matches >= 0
        num_foreground = foreground.sum().clamp(min=1)

        image_idx, anchor_idx = torch.where(foreground)
        matched_boxes = gt_boxes[image_idx, matches[image_idx, anchor_idx]]
        bbox_loss = F.smooth_l1_loss(
            bbox_regression[image_idx, anchor_idx], encode(matched_boxes, anchors[anchor_idx]), reduction="sum"
        )

        cls_targets = torch.where(foreground, gt_labels.gather(1, matches.clamp(min=0)), 0)
        positive = cls_targets > 0
        num_negative = self.neg_to_pos_ratio * positive.sum(dim=1, keepdim=True)
        hard_negative = hard_negatives(cls_logits.detach(), positive, num_negative)
        # Only these rows have a loss; a positive picked again as a hard negative counts twice, as in torchvision.
        image_idx, anchor_idx = torch.where(positive | hard_negative)
        times_counted = (positive.to(torch.int64) + hard_negative.to(torch.int64))[image_idx, anchor_idx]
        cls_loss = F.cross_entropy(
            cls_logits[image_idx, anchor_idx], cls_targets[image_idx, anchor_idx], reduction="none"
        )
        cls_sum = (cls_loss * times_counted).sum()
        return {"bbox_regression": bbox_loss / num_foreground, "classification": cls_sum / num_foreground}


# Slack on the pruning bound below for float rounding in the logits' differences.
_MINING_MARGIN = 1e-3


def hard_negatives(cls_logits: Tensor, positive: Tensor, num_negative: Tensor) -> Tensor:
    """[B, A] mask of each image's hardest negatives: rank its anchors by cross-entropy against background,
    positives last, and keep the first num_negative [B, 1] (with too few negatives, positives come again).

    Only anchors that can make the cut get a softmax, which is exp-bound (3/4 of SSD300's loss on a CPU). For a
    negative, CE = log(1 + sum over c >= 1 of exp(l_c - l_0)) lies between softplus(g) and
    softplus(g + log(C - 1)), where g = max over c >= 1 of l_c - l_0. Both bounds grow with g, so an anchor whose
    g is more than log(C - 1) below the k-th largest g has a smaller CE than k others and is never picked: on
    trained-like scores ~3% of SSD300's anchors (14% of SSDlite's) remain."""
    num_images, num_anchors, num_classes = cls_logits.shape
    count = num_negative.ceil().to(torch.int64).clamp(max=num_anchors)  # the ranks below num_negative
    most = int(count.max())
    if most == 0:
        return torch.zeros_like(positive)
    # In float32 at least: a float16 difference (autocast) could round by more than the margin.
    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    gap = cls_logits[..., 1:].amax(dim=-1).to(dtype) - cls_logits[..., 0].to(dtype)
    gap = torch.where(positive, -math.inf, gap)
    kth_gap = gap.topk(most, dim=1).values.gather(1, (count - 1).clamp(min=0))
    candidate = ~positive & (count > 0) & (gap >= kth_gap - math.log(num_classes - 1) - _MINING_MARGIN)
    image_idx, anchor_idx = torch.where(candidate)
    background = torch.zeros_like(image_idx)
    candidate_loss = F.cross_entropy(cls_logits[image_idx, anchor_idx].to(dtype), background, reduction="none")
    loss = torch.full(positive.shape, -math.inf, dtype=candidate_loss.dtype, device=positive.device)
    loss[image_idx, anchor_idx] = candidate_loss
    order = loss.topk(most, dim=1).indices
    picked = torch.arange(most, device=positive.device) < count
    return torch.zeros_like(positive).scatter_(1, order, picked)


class ScoringHead(nn.Module):
    """One predictor per feature map; outputs [B, sum over maps of H * W * A, num_columns], in the order of
    the default boxes (map -> row -> column -> anchor)."""

    def __init__(self, predictors: list[nn.Module], num_columns: int):
        super().__init__()
        self.module_list = nn.ModuleList(predictors)
        self.num_columns = num_columns

    def forward(self, features: list[Tensor]) -> Tensor:
        outputs = []
        for predictor, feature in zip(self.module_list, features):
            out = predictor(feature)
            batch, _, height, width = out.shape
            # (B, A * K, H, W) -> (B, H, W, A, K) -> (B, H * W * A, K)
            out = out.view(batch, -1, self.num_columns, height, width).permute(0, 3, 4, 1, 2)
            outputs.append(out.reshape(batch, -1, self.num_columns))
        return torch.cat(outputs, dim=1)


class SSDHead(nn.Module):
    """Class logits and box regression for every anchor. make_predictor(in_channels, out_channels) builds
    the per-map layers: a 3x3 convolution for SSD300, a depthwise-separable block for SSDlite."""

    def __init__(self, in_channels: list[int], num_anchors: list[int], num_classes: int, make_predictor=None):
        super().__init__()
        make_predictor = make_predictor or _conv3x3_predictor
        self.classification_head = ScoringHead(
            [make_predictor(c, num_classes * a) for c, a in zip(in_channels, num_anchors)], num_classes
        )
        self.regression_head = ScoringHead([make_predictor(c, 4 * a) for c, a in zip(in_channels, num_anchors)], 4)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {"bbox_regression": self.regression_head(features), "cls_logits": self.classification_head(features)}


def _conv3x3_predictor(in_channels: int, out_channels: int) -> nn.Conv2d:
    return xavier_init(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))


def xavier_init(module: nn.Module) -> nn.Module:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


# torchvision's VGG16 configuration "D": conv widths, "M" = 2x2 max pooling.
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# features index of the first layer of each stage (conv1_1, conv2_1, ..., conv5_1), for freezing.
VGG16_STAGE_STARTS = [0, 4, 9, 16, 23]
TRAINABLE_LAYERS = len(VGG16_STAGE_STARTS)  # the most trainable_backbone_layers can name


def vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features (same layer indices, so VGG16 checkpoints load as they are), without
    building the 120M-parameter classifier that SSD drops anyway."""
    layers, in_channels = [], 3
    for width in VGG16_LAYOUT:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


def extra_block(in_channels: int, mid_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                padding: int = 0) -> nn.Sequential:
    """One of SSD's extra feature layers after fc7: a 1x1 bottleneck, then the convolution that shrinks the map."""
    return xavier_init(nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding),
        nn.ReLU(inplace=True),
    ))


class VGG16Extractor(nn.Module):
    """SSD's feature maps from VGG16: conv4_3 (L2-normalised with a learned per-channel scale), fc7 (as dilated
    convolutions) and the maps of the blocks make_extra_blocks() builds, each fed the previous one. SSD300's
    (ssd300_extra_blocks) give 38, 19, 10, 5, 3, 1 cells for a 300 x 300 input, channels 512, 1024, 512, 256, 256,
    256."""

    def __init__(self, vgg_features: nn.Sequential, make_extra_blocks):
        super().__init__()
        # Ceil mode in pool3 gives 38 x 38 conv4_3 maps for a 300 px input (floor would give 37), as in the paper.
        vgg_features[16].ceil_mode = True
        self.scale_weight = nn.Parameter(torch.full((512,), 20.0))
        self.features = vgg_features[:23]  # conv1_1 ... conv4_3 + ReLU
        fc = xavier_init(nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),  # pool5, stride 1 to keep conv5's map size
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),  # fc6, atrous
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, kernel_size=1),  # fc7
            nn.ReLU(inplace=True),
        ))
        # pool4, conv5_x (pool5 replaced), fc6, fc7, then the extra blocks (built after fc: a seed gives the
        # weights torchvision's builder draws).
        self.extra = nn.ModuleList([nn.Sequential(*vgg_features[23:-1], fc), *make_extra_blocks()])

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.features(x)
        outputs = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)]
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return outputs


def ssd300_extra_blocks() -> list[nn.Module]:
    """conv8_2 ... conv11_2 of the paper's SSD300: 19 -> 10 -> 5 -> 3 -> 1 cells."""
    return [
        extra_block(1024, 256, 512, stride=2, padding=1),  # conv8_2
        extra_block(512, 128, 256, stride=2, padding=1),  # conv9_2
        extra_block(256, 128, 256),  # conv10_2
        extra_block(256, 128, 256),  # conv11_2
    ]


SSD300_INPUT_SIZE = (300, 300)  # (H, W) every image is resized to


def ssd300_vgg16(
    *, weights=None, weights_backbone=None, num_classes=None, trainable_backbone_layers=None, class_names=None,
    **options
) -> SSD:
    """SSD300 with a VGG16 backbone, as torchvision's ssd300_vgg16.

    weights: "SSD300_VGG16_Weights.COCO_V1" (or the enum member) or a local checkpoint file; it replaces
    weights_backbone ("VGG16_Weights.IMAGENET1K_FEATURES" or a local VGG16 state_dict file). class_names
    ({label: name}): fine-tune weights made for other classes to these (see models.builders.plan_weights).
    options: see models.builders.SSD_OPTIONS.
    """
    check_options("ssd300_vgg16", options)
    anchor_generator = DefaultBoxes(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]], scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )
    return build_vgg16_ssd(
        "ssd300_vgg16", SSD300_INPUT_SIZE, anchor_generator, ssd300_extra_blocks,
        WeightsRequest(weights, weights_backbone, num_classes, trainable_backbone_layers, class_names), options,
    )


class WeightsRequest(NamedTuple):
    """The weights arguments every builder takes."""
    weights: object
    weights_backbone: object
    num_classes: int | None
    trainable_backbone_layers: int | None
    class_names: dict | None


def build_vgg16_ssd(model_name: str, size: tuple[int, int], anchor_generator: DefaultBoxes,
                    make_extra_blocks, request: WeightsRequest, options: dict,
                    donors: tuple[str, ...] = ()) -> SSD:
    """An SSD on VGG16 (SSD300 or SSD512): the trunk, make_extra_blocks() after fc7, 3x3 heads, Caffe-style input,
    with request's weights loaded (donors: see models.builders.plan_weights)."""
    num_anchors = anchor_generator.num_anchors_per_location()
    plan = plan_weights(
        request.weights, model_name, request.num_classes, request.class_names,
        "head.classification_head.module_list.0.weight", num_anchors[0], donors,
    )
    weights_backbone = None if plan.weights is not None else request.weights_backbone
    pretrained = plan.weights is not None or weights_backbone is not None
    trainable_layers = resolve_trainable_layers(pretrained, request.trainable_backbone_layers, TRAINABLE_LAYERS, 4)

    vgg = vgg16_features()
    if weights_backbone is not None:
        vgg_state, vgg_source = load_weights(weights_backbone, ("vgg16",))[:2]
        # VGG16 checkpoints hold the whole classifier network; SSD only uses its convolutions.
        features = {key[len("features."):]: value for key, value in vgg_state.items() if key.startswith("features.")}
        load_model_state(vgg, features, f"{vgg_source} (features.*)")
    freeze_stages(vgg, VGG16_STAGE_STARTS, trainable_layers)

    extractor = VGG16Extractor(vgg, make_extra_blocks)
    model = SSD(
        extractor,
        SSDHead([512, 1024] + [block[-2].out_channels for block in extractor.extra[1:]], num_anchors,
                plan.num_classes),
        anchor_generator,
        size=size,
        num_classes=plan.num_classes,
        **{
            # Caffe-style input: 0-255 RGB minus the ImageNet mean, as the VGG16 features were trained with.
            "image_mean": [0.48235, 0.45882, 0.40784],
            "image_std": [1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0],
            **options,
        },
    )
    load_planned_weights(model, plan)
    return model

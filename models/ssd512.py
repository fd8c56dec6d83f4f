"""SSD512 with a VGG16 backbone: the SSD paper's strongest model (Liu et al., 2016, table 4 and 7), which
torchvision does not have. The same SSD class, heads, loss, matching, post-processing and input transform as
SSD300, on a 512 x 512 input with seven feature maps.

Where the paper leaves a choice open, it follows the paper's released Caffe model (weiliu89/caffe, branch ssd,
examples/ssd/ssd_coco.py and ssd_pascal_512.py at 512), then mmdetection's configs/ssd/ssd512_coco.py; each choice
below says which.
"""
from torch import nn

from .anchors import DefaultBoxes
from .builders import check_options
from .ssd import SSD, WeightsRequest, build_vgg16_ssd, extra_block

# Feature maps of 64, 32, 16, 8, 4, 2 and 1 cells, one default box centre per cell (paper and Caffe).
SSD512_STEPS = [8, 16, 32, 64, 128, 256, 512]
# Default boxes per location 4, 6, 6, 6, 6, 4, 4: 24,564 boxes (paper; mmdetection's ratios are the same).
SSD512_ASPECT_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]
# Box sizes in pixels of the 512 px input: each map's minimum size, then the last map's maximum; each map's
# maximum is the next map's minimum, and its second square box is sqrt(min * max) (paper, eq. 4 and after).
DEFAULT_BOX_SIZES = {
    # The Caffe COCO model: min_ratio 10, max_ratio 90, first map 4% of 512. mmdetection's ssd512_coco
    # (basesize_ratio_range 0.1 to 0.9) computes the same sizes, then truncates them to whole pixels.
    "coco": [20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72],
    # The Caffe VOC model (ssd_pascal_512.py: min_ratio 15, max_ratio 90, first map 7% of 512), the one behind
    # the paper's 79.8 VOC2007 mAP.
    "voc": [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6],
}


def ssd512_extra_blocks() -> list[nn.Module]:
    """The five extra layers of the paper's SSD512 (Caffe's conv6_2 ... conv10_2 after fc7): 32 -> 16 -> 8 -> 4 ->
    2 -> 1 cells. The first two are SSD300's conv8_2 and conv9_2 (same shapes, so SSD300 weights fit them), the next
    two strided 3x3 blocks too (Caffe); the last is a 4x4 convolution with padding 1 (Caffe; mmdetection's
    last_kernel_size=4)."""
    return [
        extra_block(1024, 256, 512, stride=2, padding=1),  # conv8_2: 32 -> 16
        extra_block(512, 128, 256, stride=2, padding=1),  # conv9_2: 16 -> 8
        extra_block(256, 128, 256, stride=2, padding=1),  # conv10_2: 8 -> 4
        extra_block(256, 128, 256, stride=2, padding=1),  # conv11_2: 4 -> 2
        extra_block(256, 128, 256, kernel_size=4, padding=1),  # conv12_2: 2 -> 1
    ]


def ssd512_default_boxes(sizes: str = "coco") -> DefaultBoxes:
    """SSD512's default boxes with the box sizes DEFAULT_BOX_SIZES[sizes] ("coco" or "voc").

    Unlike torchvision's SSD300, the box sizes are not clipped to the image: neither the paper's Caffe model
    (clip: false) nor mmdetection clips them, and there is no torchvision SSD512 to agree with."""
    if sizes not in DEFAULT_BOX_SIZES:
        raise ValueError(f"ssd512_vgg16: default_boxes must be one of {', '.join(DEFAULT_BOX_SIZES)}, got {sizes!r}")
    scales = [size / 512 for size in DEFAULT_BOX_SIZES[sizes]]
    return DefaultBoxes(SSD512_ASPECT_RATIOS, scales=scales, steps=SSD512_STEPS, clip=False)


SSD512_INPUT_SIZE = (512, 512)  # (H, W) every image is resized to: the paper's SSD512


def ssd512_vgg16(
    *, weights=None, weights_backbone=None, num_classes=None, trainable_backbone_layers=None, class_names=None,
    default_boxes="coco", **options
) -> SSD:
    """SSD512 with a VGG16 backbone (the paper's SSD512; no torchvision counterpart, hence no published weights).

    weights: a checkpoint file of this model, or, to fine-tune (class_names given), SSD300 weights
    ("SSD300_VGG16_Weights.COCO_V1" or an ssd300_vgg16 checkpoint of train.py): every tensor whose name and shape
    fit is copied, the others keep their initialisation, and one line says which. weights_backbone:
    "VGG16_Weights.IMAGENET1K_FEATURES" or a local VGG16 state_dict file, as for SSD300. default_boxes: "coco"
    (the default) or "voc", the box sizes of the paper's Caffe models (DEFAULT_BOX_SIZES). options: see
    models.builders.SSD_OPTIONS.
    """
    check_options("ssd512_vgg16", options)
    return build_vgg16_ssd(
        "ssd512_vgg16", SSD512_INPUT_SIZE, ssd512_default_boxes(default_boxes), ssd512_extra_blocks,
        WeightsRequest(weights, weights_backbone, num_classes, trainable_backbone_layers, class_names), options,
        donors=("ssd300_vgg16",),
    )

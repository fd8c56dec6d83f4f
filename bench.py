"""Benchmark this project's SSD against torchvision's, side by side in one process.

Every row times the same work done by our code and by torchvision's reference code: A/B interleaved (the order
alternates each repeat, so drifting machine load hits both sides alike), warm-up excluded, median of the repeats.
Both models get the same weights. One table is printed; --json saves every figure with the machine and versions.
SSD512, which torchvision does not have, is timed against our SSD300 instead (PEERS): its rows give its absolute
figures in the "ours" column and SSD300's in the "torchvision" column, so the ratio is SSD512's cost against SSD300's.

    python bench.py                                    # everything, all models, CPU (the long run)
    python bench.py --quick                            # 1-2 minute smoke run with tiny sizes
    python bench.py --device cuda --amp --channels-last --model ssdlite320_mobilenet_v3_large --rows train infer

The ratio column is ours / torchvision of the figure as printed; "speed-up" turns it into how many times faster
ours is (the ratio for images/s and samples/s, its inverse for milliseconds and seconds).
"""
import argparse
import contextlib
import copy
import datetime
import functools
import importlib.metadata
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import box_iou

import cli
import coco_eval
import coco_utils
import engine
import models
import presets
import safe_io
import utils
from models.postprocess import match_detections, postprocess_detections
from models.transform import batch_targets

MODEL_NAMES = ("ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "ssd512_vgg16")
SHORT_NAMES = {"ssd300_vgg16": "SSD300", "ssdlite320_mobilenet_v3_large": "SSDlite", "ssd512_vgg16": "SSD512"}
# Models torchvision does not have, each timed against one of ours instead (in the torchvision column).
PEERS = {"ssd512_vgg16": "ssd300_vgg16"}
# The augmentation policy of each model's published recipe (SSD512's: the paper's, mmdetection's ssd512_coco).
RECIPE_POLICIES = {"ssd300_vgg16": "ssd", "ssdlite320_mobilenet_v3_large": "ssdlite", "ssd512_vgg16": "ssd"}
ROW_KINDS = ("train", "infer", "postprocess", "loss", "data", "eval")
TIME_UNITS = ("ms/batch", "s")  # lower is better; every other unit is a throughput

# COCO's 80 category ids (1-90 with gaps), so labels and evaluation look like COCO's.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
IMAGE_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 512), (427, 640)]  # (width, height), COCO-like

# A trained SSD keeps about 1k-5k (anchor, class) candidates above its score threshold per image; random-init
# weights score every pair alike and fill every class's top-k, which is not what users run.
CANDIDATES_PER_IMAGE = 2000
LOGIT_SPREAD = 2.0  # standard deviation of the foreground logits over anchors and classes


@dataclass
class Sizes:
    train_batches: tuple
    infer_batches: tuple
    postprocess_batch: int
    loss_batch: int
    data_images: int  # generated JPEGs; one data-loading pass reads them all
    eval_images: int
    detections_per_image: int
    repeats: int
    warmup: int
    peak_matmul_size: int  # n of the n x n matmul (and n / 8 the channels of the convolution) measuring the peak

    def largest_batch(self):
        return max(self.train_batches + self.infer_batches + (self.postprocess_batch, self.loss_batch))


FULL = Sizes(train_batches=(4, 16), infer_batches=(1, 8), postprocess_batch=8, loss_batch=16, data_images=160,
             eval_images=5000, detections_per_image=100, repeats=5, warmup=1, peak_matmul_size=4096)
QUICK = Sizes(train_batches=(2, 3), infer_batches=(1, 2), postprocess_batch=2, loss_batch=2, data_images=8,
              eval_images=50, detections_per_image=100, repeats=1, warmup=1, peak_matmul_size=1024)


# Bounds far beyond use that stop a typo before the benchmark (see cli.whole_number).
MAX_REPEATS = 1000
MAX_PROFILE_ROWS = 1000
# --json replaces an existing file only where it holds these keys (or with --overwrite).
REPORT_KEYS = {"date", "command", "machine", "sizes", "flags", "rows"}


def get_args_parser():
    parser = cli.OneLineParser(description="Benchmark our SSD against torchvision's")
    parser.add_argument("--device", type=cli.device_name, default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--amp", action="store_true",
                        help="autocast the models: float16 on CUDA (with GradScaler); bfloat16 on CPU, which is "
                             "emulated and several times slower on CPUs without AVX512-BF16/AMX")
    parser.add_argument("--amp-vs-float32", action="store_true",
                        help="also time ours under --amp's autocast (bfloat16 on CPU, float16 with GradScaler on CUDA) "
                             "against ours in float32, the float32 figures in the torchvision column: a training "
                             "step and inference at each batch, each column's GFLOP/s as a share of the measured "
                             "peak in its own precision")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last (or, with --no-channels-last, the default layout) for both models; "
                             "by default each side runs as its training script does: ours in train.py's memory "
                             "format for the model and device, torchvision's in the default layout")
    parser.add_argument("--model", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES),
                        help="model(s) to benchmark (default: all three; SSD512 against our SSD300)")
    parser.add_argument("--rows", nargs="+", choices=ROW_KINDS, default=list(ROW_KINDS),
                        help="which kinds of rows to run (default: all)")
    parser.add_argument("--repeats", type=cli.whole_number(1, MAX_REPEATS), default=None,
                        help="timed repeats per row (default: 5, quick: 1)")
    parser.add_argument("--quick", action="store_true", help="1-2 minute smoke run with tiny sizes and repeats")
    parser.add_argument("--data-path", default=None,
                        help="a COCO-layout folder (train2017/, annotations/instances_train2017.json) to read "
                             "images from instead of generated COCO-like JPEGs")
    parser.add_argument("--json", default=None,
                        help="save machine info, versions and every figure to this file (checked before the "
                             "benchmark starts; an existing file is replaced only if it is such a report, see "
                             "--overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --json file that is not a bench.py report")
    parser.add_argument("--profile", type=cli.whole_number(0, MAX_PROFILE_ROWS), default=0, metavar="N",
                        help="also print torch.profiler's N most expensive operators (self time) of one training "
                             "step and one inference batch of each side, and the convolutions' share of the time")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with the network compiled (models.compile_network) against ours eager, "
                             "for inference at the largest batch and, with the train rows, a training step at the "
                             "smallest; the note gives the compile time, from an empty inductor cache")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device):
    synchronize(device)
    start = time.perf_counter()
    output = fn()
    synchronize(device)
    return time.perf_counter() - start, output


def time_interleaved(fns, sizes, device, warmup=None):
    """Median seconds of each fn and each fn's last output. Interleaved, rotating which goes first each repeat, so
    drifting machine load hits every side alike; warm-up runs excluded."""
    warmup = sizes.warmup if warmup is None else warmup
    times, outputs = [[] for _ in fns], [None] * len(fns)
    for i in range(warmup + sizes.repeats):
        for k in [(i + j) % len(fns) for j in range(len(fns))]:
            elapsed, outputs[k] = time_once(fns[k], device)
            if i >= warmup:
                times[k].append(elapsed)
    return [statistics.median(t) for t in times], outputs


# A backward pass takes two products per forward one (gradients of the inputs and of the weights). Counted this way
# rather than by FlopCounterMode, whose backward count of a grouped convolution is multiplied by its group count.
BACKWARD_FLOPS_PER_FORWARD = 2


def count_flops(fn):
    """Floating-point operations of one call of fn as torch's FlopCounterMode counts them: matrix products and
    convolutions, forward and backward. For these models that is nearly all the arithmetic."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measured_peak_gflops(device, size, dtype):
    """The machine's own ceiling in the rows' precision `dtype` (float32, or the autocast dtype under --amp, which
    CPUs with bfloat16 instructions and GPUs run faster), for comparison: GFLOP/s of a large dense matmul (2 n^3
    operations, through BLAS) and of a large dense 3x3 convolution (n / 8 channels in and out, 38x38, batch 8,
    through the library that runs the models' convolutions), each the best of a few runs on the same threads and
    device as the rows. The two libraries can be far apart on one CPU, so the ceiling is the larger."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    matmul_s = min(time_once(lambda: a @ b, device)[0] for _ in range(4))
    channels = size // 8
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype)
    x = torch.randn(8, channels, 38, 38, device=device, dtype=dtype)
    with torch.no_grad():
        conv_s = min(time_once(lambda: conv(x), device)[0] for _ in range(4))
    return {"matmul": 2 * size**3 / matmul_s / 1e9, "convolution": 2 * x.numel() * channels * 9 / conv_s / 1e9}


def with_flops(row, flops_per_image, peak_gflops):
    """Add achieved GFLOP/s (images/s x FLOPs per image, an (ours, torchvision column) pair) and its share of the
    measured peak (one figure, or an (ours, torchvision column) pair where the columns differ in precision) to a
    throughput row."""
    sides = ("ours", "torchvision")
    peaks = peak_gflops if isinstance(peak_gflops, tuple) else (peak_gflops,) * 2
    gflops = {side: row[side] * flops / 1e9 for side, flops in zip(sides, flops_per_image)}
    return {**row, "gflops": gflops, "peak_share": {side: gflops[side] / peak for side, peak in zip(sides, peaks)}}


def make_row(name, ours, theirs, unit, note=""):
    ratio = ours / theirs
    return {"name": name, "ours": ours, "torchvision": theirs, "unit": unit, "ratio": ratio,
            "speedup": 1.0 / ratio if unit in TIME_UNITS else ratio, "note": note}


def throughput_row(name, count, seconds, unit, note=""):
    return make_row(name, count / seconds[0], count / seconds[1], unit, note)


START = time.perf_counter()


def log(message):
    print(f"[bench {time.perf_counter() - START:5.0f} s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Data


def random_boxes(rng, width, height, count):
    """[count, 4] XYWH boxes inside the image, sides log-uniform from small to large like COCO's objects."""
    wh = np.exp(rng.uniform(np.log(12), np.log([0.7 * width, 0.7 * height]), size=(count, 2)))
    xy = rng.uniform(0, 1, (count, 2)) * ([width, height] - wh)
    return np.concatenate([xy, wh], axis=1)


def write_coco_like_images(root, num_images, seed=0):
    """A COCO-layout training folder of ~640x480 JPEGs with 1-6 boxes each. Textured (gradient plus noise) so the
    files are COCO-sized and decoding costs what it does on COCO."""
    rng = np.random.RandomState(seed)
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = IMAGE_SIZES[rng.randint(len(IMAGE_SIZES))]
        gradient = np.linspace(0, 1, width)[None, :, None] * rng.uniform(-80, 80, 3)
        pixels = rng.uniform(60, 200, 3) + gradient + rng.normal(0, 12, (height, width, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for x, y, w, h in random_boxes(rng, width, height, rng.randint(1, 7)).tolist():
            shape = draw.ellipse if rng.rand() < 0.5 else draw.rectangle
            shape([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.randint(0, 256, 3)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.choice(COCO_CATEGORY_IDS)),
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
        file_name = f"{image_id:012d}.jpg"
        image.save(root / "train2017" / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    categories = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in COCO_CATEGORY_IDS]
    ann_file = root / "annotations" / "instances_train2017.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def load_samples(root, count):
    """The first `count` training images as float [0, 1] tensors with their box targets (original sizes)."""
    dataset = coco_utils.get_coco(root, "train", presets.DetectionPresetEval())
    if len(dataset) < count:
        raise SystemExit(f"bench.py: error: --data-path {root} has {len(dataset)} usable training images, "
                         f"need at least {count}")
    samples = [dataset[i] for i in range(count)]
    # The preset gives uint8, which torchvision's SSD does not take: both models get the same float images.
    return ([image.float() / 255 for image, _ in samples],
            [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in samples])


# ---------------------------------------------------------------------------------------------------------------
# Models


def final_classification_convs(model):
    """The convolutions whose output channels are (anchor, class) logits, one per feature map."""
    for module in model.head.classification_head.module_list:
        yield module if isinstance(module, torch.nn.Conv2d) else module[-1]


def candidates_per_image(cls_logits, score_thresh, topk_candidates):
    """Mean count of (anchor, class) pairs post-processing keeps before NMS: score above the threshold, at most
    topk_candidates per class."""
    scores = cls_logits.float().softmax(-1)[..., 1:]
    per_class = (scores > score_thresh).sum(1).clamp(max=topk_candidates)
    return per_class.sum(1).float().mean().item()


def background_offset(cls_logits, score_thresh, topk_candidates, target=CANDIDATES_PER_IMAGE):
    """The shift of the background logit that leaves about `target` candidates per image (bisection: more
    background means fewer candidates)."""
    low, high = -100.0, 100.0
    for _ in range(40):
        middle = (low + high) / 2
        shifted = cls_logits.clone()
        shifted[..., 0] += middle
        if candidates_per_image(shifted, score_thresh, topk_candidates) > target:
            low = middle
        else:
            high = middle
    return high


@torch.no_grad()
def head_outputs(model, images, targets=None):
    """torchvision's forward up to the heads: (head outputs, anchors, resized image sizes, resized targets)."""
    image_list, targets = model.transform(images, targets)
    features = list(model.backbone(image_list.tensors).values())
    outputs = model.head(features)
    return outputs, model.anchor_generator(image_list, features), image_list.image_sizes, targets


def recalibrate_batch_norm(model, images):
    """Running statistics from one batch. Random-init statistics (mean 0, variance 1) do not match the
    activations, and through SSDlite's many normal(0, 0.03) layers its eval-mode logits shrink to ~1e-15, all
    equal; a trained model's statistics match its activations."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one batch, exactly its statistics
    head_outputs(model.train(), images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def build_models(name, calibration_images, args):
    """(ours, torchvision's, ours' state_dict, theirs') with the same weights, whose scores look like a trained
    model's: torchvision's random init, BatchNorm statistics from real images, and calibrate_scores. For a model of
    PEERS: (ours, our peer model, their state_dicts), each calibrated alike."""
    if name in PEERS:
        ours, peer = models.get_model(name), models.get_model(PEERS[name])
        for model in (ours, peer):
            calibrate_scores(model, our_head_outputs(model.eval(), calibration_images)[0]["cls_logits"])
        return ours.to(args.device), peer.to(args.device), copy.deepcopy(ours.state_dict()), \
            copy.deepcopy(peer.state_dict())
    theirs = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    recalibrate_batch_norm(theirs, calibration_images)
    calibrate_scores(theirs, head_outputs(theirs, calibration_images)[0]["cls_logits"])
    ours = models.get_model(name)
    state = copy.deepcopy(theirs.state_dict())
    ours.load_state_dict(state)
    return ours.to(args.device), theirs.to(args.device), state, state


def calibrate_scores(model, cls_logits):
    """Scale the classification layers so that the foreground logits spread like LOGIT_SPREAD, and raise the
    background logit until about CANDIDATES_PER_IMAGE candidates survive per image. Unlike the tests'
    make_realistic (fixed offsets and favoured classes, for exact threshold and NMS checks), this calibrates on
    images so that post-processing has a trained model's amount of work to time."""
    scale = LOGIT_SPREAD / cls_logits[..., 1:].std().item()
    offset = background_offset(scale * cls_logits, model.score_thresh, model.topk_candidates)
    for conv in final_classification_convs(model):
        conv.weight.data *= scale
        conv.bias.data *= scale
        conv.bias.data.view(-1, cls_logits.shape[-1])[:, 0] += offset


@torch.no_grad()
def our_head_outputs(model, images, targets=None):
    """Our SSD's forward up to the heads: (head outputs, anchors, resized targets as padded [B, M] tensors)."""
    batch, original_sizes = model.preprocess(images)
    outputs, feature_sizes = model.network(batch)
    anchors = model.anchor_generator(feature_sizes, model.size, outputs["cls_logits"].dtype, batch.device)
    return outputs, anchors, None if targets is None else model._batch_targets(targets, original_sizes)


def autocast(args):
    return torch.autocast(args.device.type, dtype=utils.autocast_dtype(args.device.type), enabled=args.amp)


def to_device(images, targets, device):
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


@dataclass
class ModelPair:
    name: str
    ours: torch.nn.Module
    theirs: torch.nn.Module  # torchvision's model, or our model PEERS[name]
    ours_state: dict
    theirs_state: dict
    device: torch.device
    channels_last: bool | None  # the --channels-last flag

    @property
    def peer(self):
        """The name of our model in the torchvision column, or None where it holds torchvision's."""
        return PEERS.get(self.name)

    def fresh(self, training=False):
        """Both models in eval mode with their weights again (timed training steps change them), in the memory
        format of the work to time: without --channels-last or --no-channels-last, ours (and a peer) as our scripts
        run it for training or inference and torchvision's in the default layout, as its reference scripts run it."""
        for model, state, channels_last in ((self.ours, self.ours_state, self.ours_channels_last(training)),
                                            (self.theirs, self.theirs_state, self.theirs_channels_last(training))):
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            model.load_state_dict(state)
            model.eval()
        return [self.ours, self.theirs]

    def ours_channels_last(self, training):
        if self.channels_last is None:
            return models.prefers_channels_last(self.name, self.device, training)
        return self.channels_last

    def theirs_channels_last(self, training):
        if self.channels_last is None and self.peer:
            return models.prefers_channels_last(self.peer, self.device, training)
        return bool(self.channels_last)

    def layout_note(self, training):
        """Says what the torchvision column holds for a peer, and when the two run in different memory formats."""
        notes = [f"torchvision column: our {SHORT_NAMES[self.peer]} (torchvision has no {SHORT_NAMES[self.name]})"
                 if self.peer else ""]
        if self.ours_channels_last(training) != self.theirs_channels_last(training):
            notes.append("ours channels_last, as our scripts run it here" if self.ours_channels_last(training)
                         else "theirs channels_last, as our scripts run it here")
        return "; ".join(note for note in notes if note)


# ---------------------------------------------------------------------------------------------------------------
# Rows 1-4: the models


def train_rows(short, pair, images, targets, args, sizes):
    rows = []
    flops_per_image = None
    for batch in sizes.train_batches:
        on_device = to_device(images[:batch], targets[:batch], args.device)
        steps = training_steps(pair, on_device, args)
        if flops_per_image is None:  # counted once, on the smallest batch
            flops_per_image = sides_flops_per_image(pair, [lambda model=model: model(*on_device) for model in
                                                           (pair.ours, pair.theirs)], batch,
                                                    1 + BACKWARD_FLOPS_PER_FORWARD)
        seconds, _ = time_interleaved(steps, sizes, args.device)
        row = throughput_row(f"{short} training step, batch {batch}", batch, seconds, "img/s",
                             pair.layout_note(training=True))
        rows.append(with_flops(row, flops_per_image, args.peak_gflops))
    if args.compile:
        batch = min(sizes.train_batches)
        on_device = to_device(images[:batch], targets[:batch], args.device)
        row = compiled_row(f"{short} training step, batch {batch}", batch, pair, training=True, sizes=sizes,
                           make_call=lambda model: train_step_fn(model, our_optimizer(model), *on_device, args))
        rows.append(with_flops(row, (flops_per_image[0],) * 2,  # ours on both sides
                               args.peak_gflops))
    if args.amp_vs_float32:
        for batch in sizes.train_batches:
            on_device = to_device(images[:batch], targets[:batch], args.device)
            rows.append(autocast_row(f"{short} training step, batch {batch}", batch, pair, args, sizes, training=True,
                                     make_call=lambda model, amp_args: train_step_fn(model, our_optimizer(model),
                                                                                     *on_device, amp_args),
                                     flops_per_image=flops_per_image[0]))
    return rows


def training_steps(pair, on_device, args):
    """[ours, torchvision's] training step on the same fresh weights, each with the optimizer its scripts build."""
    ours, theirs = pair.fresh(training=True)
    their_optimizer = our_optimizer(theirs) if pair.peer else torchvision_optimizer(theirs)
    return [train_step_fn(ours, our_optimizer(ours), *on_device, args),
            train_step_fn(theirs, their_optimizer, *on_device, args)]


def our_optimizer(model):
    return engine.build_optimizer(model, "sgd", lr=1e-4, momentum=0.9, weight_decay=5e-4)


def torchvision_optimizer(model):
    """As torchvision's reference train.py builds it (the same as engine.build_optimizer's today; kept apart so
    that a change to ours shows in the rows)."""
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)


def train_step_fn(model, optimizer, images, targets, args):
    """One step as train.py takes it: forward, loss, backward, optimizer step (with GradScaler under CUDA AMP)."""
    model.train()
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp and args.device.type == "cuda")

    def step():
        with autocast(args):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def infer_rows(short, pair, images, args, sizes):
    rows = []
    flops_per_image = None
    for batch in sizes.infer_batches:
        batch_images = [image.to(args.device) for image in images[:batch]]
        calls = [inference_fn(model, batch_images, args) for model in pair.fresh()]
        if flops_per_image is None:
            flops_per_image = sides_flops_per_image(pair, calls, batch)
        seconds, _ = time_interleaved(calls, sizes, args.device)
        row = throughput_row(f"{short} inference end to end, batch {batch}", batch, seconds, "img/s",
                             pair.layout_note(training=False))
        rows.append(with_flops(row, flops_per_image, args.peak_gflops))
    if args.compile:
        batch = max(sizes.infer_batches)
        batch_images = [image.to(args.device) for image in images[:batch]]
        row = compiled_row(f"{short} inference end to end, batch {batch}", batch, pair, training=False, sizes=sizes,
                           make_call=lambda model: inference_fn(model, batch_images, args))
        rows.append(with_flops(row, (flops_per_image[0],) * 2,  # ours on both sides
                               args.peak_gflops))
    if args.amp_vs_float32:
        for batch in sizes.infer_batches:
            batch_images = [image.to(args.device) for image in images[:batch]]
            rows.append(autocast_row(f"{short} inference end to end, batch {batch}", batch, pair, args, sizes,
                                     training=False, flops_per_image=flops_per_image[0],
                                     make_call=lambda model, amp_args: inference_fn(model, batch_images, amp_args)))
    return rows


def autocast_row(name, batch, pair, args, sizes, training, make_call, flops_per_image):
    """Ours under autocast against ours in float32 (the torchvision column), same weights, layout and work;
    make_call(model, args) builds the call, args.amp saying whether it autocasts. Each column's GFLOP/s is a share
    of the measured peak in its own precision; the FLOPs are float32's count (autocast changes the precision of the
    products, not their number)."""
    lowered = pair.fresh(training)[0]
    calls = [make_call(model, argparse.Namespace(**{**vars(args), "amp": amp}))
             for model, amp in ((lowered, True), (copy.deepcopy(lowered), False))]
    seconds, _ = time_interleaved(calls, sizes, args.device)
    dtype = utils.autocast_dtype(args.device.type)
    row = throughput_row(f"{name}, ours {dtype_name(dtype)} vs ours float32", batch, seconds, "img/s",
                         note="torchvision column: ours float32")
    return with_flops(row, (flops_per_image,) * 2, (args.peak_by_dtype[dtype], args.peak_by_dtype[torch.float32]))


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def sides_flops_per_image(pair, calls, batch, factor=1):
    """(ours, theirs): factor x the FLOPs per image of calls [ours, theirs] on a batch, counted on ours alone where
    both sides run the same architecture."""
    ours = factor * count_flops(calls[0]) / batch
    return ours, (factor * count_flops(calls[1]) / batch if pair.peer else ours)


def compiled_row(name, batch, pair, training, sizes, make_call):
    """Ours with the network compiled against ours eager, in the layout our scripts use (the eager figure goes in
    the torchvision column). The note gives the compile time: compile_network and the first call, less one eager
    call."""
    eager = pair.fresh(training)[0]
    compiled = copy.deepcopy(eager)
    calls = [make_call(compiled), make_call(eager)]
    start = time.perf_counter()
    models.compile_network(compiled, training=training)
    first_call_s = time_once(calls[0], pair.device)[0] + time.perf_counter() - start
    compile_s = first_call_s - time_once(calls[1], pair.device)[0]
    seconds, _ = time_interleaved(calls, sizes, pair.device)
    return throughput_row(f"{name}, ours compiled vs ours eager", batch, seconds, "img/s",
                          note=f"torchvision column: ours eager; compile {compile_s:.0f} s")


def inference_fn(model, images, args):
    """Input transform, backbone, head, post-processing and mapping boxes back to the original image sizes."""
    model.eval()

    def infer():
        with torch.inference_mode(), autocast(args):
            return model(images)
    return infer


def postprocess_rows(short, pair, images, args, sizes):
    """Head outputs to per-image detections in the network's input frame (mapping back excluded)."""
    ours, theirs = pair.fresh()
    batch = sizes.postprocess_batch
    outputs, anchors, image_sizes, _ = head_outputs(theirs, [image.to(args.device) for image in images[:batch]])
    candidates = candidates_per_image(outputs["cls_logits"], theirs.score_thresh, theirs.topk_candidates)
    calls = [lambda: our_postprocess(ours, outputs, anchors[0]),
             lambda: theirs.postprocess_detections(outputs, anchors, image_sizes)]
    with torch.inference_mode():
        seconds, detections = time_interleaved(calls, sizes, args.device)
    note = f"{candidates:.0f} candidates/image; {same_detections(*detections)}"
    return [make_row(f"{short} post-processing, batch {batch}", 1000 * seconds[0], 1000 * seconds[1], "ms/batch",
                     note=note)]


def peer_postprocess_rows(short, pair, images, args, sizes):
    """Post-processing of a model of PEERS against its peer's, both ours, each on its own head outputs."""
    batch_images = [image.to(args.device) for image in images[:sizes.postprocess_batch]]
    calls, candidates = [], []
    for model in pair.fresh():
        outputs, anchors, _ = our_head_outputs(model, batch_images)
        candidates.append(candidates_per_image(outputs["cls_logits"], model.score_thresh, model.topk_candidates))
        calls.append(functools.partial(our_postprocess, model, outputs, anchors))
    with torch.inference_mode():
        seconds, _ = time_interleaved(calls, sizes, args.device)
    note = f"{pair.layout_note(training=False)}; {candidates[0]:.0f} / {candidates[1]:.0f} candidates/image"
    return [make_row(f"{short} post-processing, batch {sizes.postprocess_batch}", 1000 * seconds[0],
                     1000 * seconds[1], "ms/batch", note=note)]


def our_postprocess(model, outputs, anchors):
    boxes, scores, labels, valid = postprocess_detections(
        outputs["bbox_regression"], outputs["cls_logits"], anchors, model.size,
        model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates)
    return [{"boxes": b[:n], "scores": s[:n], "labels": l[:n]}
            for b, s, l, n in zip(boxes, scores, labels, valid.sum(1).tolist())]


def same_detections(ours, theirs):
    """A check that both sides did the same work: as many detections per image, paired one to one with boxes within
    1e-3 px and scores within 1e-4, in whatever order near-tied scores come out (GPU kernels can swap them)."""
    for mine, reference in zip(ours, theirs):
        matched, worst_box, worst_score = match_detections(*({k: v.cpu() for k, v in d.items()}
                                                             for d in (reference, mine)), 1e-3, 1e-4)
        if not (len(mine["labels"]) == len(reference["labels"]) == matched and worst_box <= 1e-3
                and worst_score <= 1e-4):
            return "WARNING: detections differ"
    return f"same detections ({sum(len(d['labels']) for d in ours) / len(ours):.0f}/image)"


def loss_rows(short, pair, images, targets, args, sizes):
    """Matching, target encoding, hard-negative mining and the two losses, from head outputs (no backward)."""
    ours, theirs = pair.fresh()
    batch = sizes.loss_batch
    outputs, anchors, _, resized_targets = head_outputs(theirs, *to_device(images[:batch], targets[:batch], args.device))
    # As in training, the head outputs require grad, so the loss records its autograd graph.
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    calls = [lambda: ours.compute_loss(outputs, anchors[0], *batch_targets(resized_targets)),
             lambda: torchvision_loss(theirs, resized_targets, outputs, anchors)]
    seconds, losses = time_interleaved(calls, sizes, args.device)
    difference = max(abs(losses[0][k].item() / losses[1][k].item() - 1) for k in losses[1])
    note = "same losses" if difference < 1e-4 else f"WARNING: losses differ by {difference:.1e} relative"
    return [make_row(f"{short} loss, batch {batch}", 1000 * seconds[0], 1000 * seconds[1], "ms/batch", note=note)]


def peer_loss_rows(short, pair, images, targets, args, sizes):
    """The loss of a model of PEERS against its peer's, both ours, each from its own head outputs (no backward)."""
    on_device = to_device(images[:sizes.loss_batch], targets[:sizes.loss_batch], args.device)
    calls = []
    for model in pair.fresh():
        outputs, anchors, resized_targets = our_head_outputs(model, *on_device)
        # As in training, the head outputs require grad, so the loss records its autograd graph.
        outputs = {k: v.requires_grad_() for k, v in outputs.items()}
        calls.append(functools.partial(model.compute_loss, outputs, anchors, *resized_targets))
    seconds, _ = time_interleaved(calls, sizes, args.device)
    return [make_row(f"{short} loss, batch {sizes.loss_batch}", 1000 * seconds[0], 1000 * seconds[1], "ms/batch",
                     note=pair.layout_note(training=False))]


def torchvision_matches(model, targets, anchors):
    """torchvision's SSD.forward matching, image by image: the index of the box each anchor is matched to,
    negative where none is (everywhere for an image without boxes)."""
    return [
        model.proposal_matcher(box_iou(target["boxes"], anchors_per_image)) if target["boxes"].numel()
        else torch.full((len(anchors_per_image),), -1, dtype=torch.int64, device=anchors_per_image.device)
        for anchors_per_image, target in zip(anchors, targets)
    ]


def torchvision_loss(model, targets, outputs, anchors):
    """torchvision's SSD.forward from anchors to losses: per-image matching, then compute_loss."""
    return model.compute_loss(targets, outputs, anchors, torchvision_matches(model, targets, anchors))


# ---------------------------------------------------------------------------------------------------------------
# Profiles: where the time of a training step and of an inference batch goes


def profile_reports(short, pair, images, targets, args, sizes):
    """--profile: one training step and one inference batch of each side, as the timed rows run them."""
    batch = sizes.train_batches[0]
    steps = training_steps(pair, to_device(images[:batch], targets[:batch], args.device), args)
    reports = [profile_report(f"{short} training step, batch {batch}, {side}", step, args)
               for side, step in zip(("ours", "torchvision"), steps)]
    batch = max(sizes.infer_batches)
    batch_images = [image.to(args.device) for image in images[:batch]]
    for side, model in zip(("ours", "torchvision"), pair.fresh()):
        reports.append(profile_report(f"{short} inference end to end, batch {batch}, {side}",
                                      inference_fn(model, batch_images, args), args))
    return reports


def profile_report(title, work, args):
    """One warm-up call, then one profiled call: its top operators by self time (the time inside an operator
    minus its children's, so the column adds up to the total) and the convolutions' share of it."""
    work()
    synchronize(args.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        work()
        synchronize(args.device)
    events = profiler.key_averages()
    if args.device.type == "cuda":  # kernels and the operators launching them both carry device time: no shares
        table = events.table(sort_by="self_device_time_total", row_limit=args.profile, max_name_column_width=48)
        return f"## profile: {title}\n{table}"
    total = sum(event.self_cpu_time_total for event in events)
    convolution = sum(event.self_cpu_time_total for event in events if is_convolution(event.key))
    table = events.table(sort_by="self_cpu_time_total", row_limit=args.profile, max_name_column_width=48)
    return (f"## profile: {title}\n# convolutions (forward and backward kernels): {100 * convolution / total:.1f}% "
            f"of {total / 1e3:.1f} ms CPU self time\n{table}")


def is_convolution(operator):
    """Whether a profiler key is a convolution kernel (oneDNN or PyTorch's own CPU path) or its backward;
    the aten::convolution / aten::_convolution dispatchers have children and no self time to speak of."""
    return "conv" in operator.lower() and operator not in ("aten::convolution", "aten::_convolution")


MODEL_ROW_KINDS = ("train", "infer", "postprocess", "loss")

# ---------------------------------------------------------------------------------------------------------------
# Row 5: data loading


def torchvision_v2_policy(policy):
    """torchvision's reference DetectionPresetTrain(data_augmentation=policy, use_v2=True) for PIL input."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    mean = (123.0, 117.0, 104.0)
    augmentations = {
        "ssd": [v2.RandomPhotometricDistort(), v2.RandomZoomOut(fill=defaultdict(lambda: mean, {tv_tensors.Mask: 0})),
                v2.RandomIoUCrop(), v2.RandomHorizontalFlip()],
        "ssdlite": [v2.RandomIoUCrop(), v2.RandomHorizontalFlip()],
    }[policy]
    return v2.Compose(augmentations + [
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY), v2.SanitizeBoundingBoxes(), v2.ToPureTensor(),
    ])


def training_datasets(root, policy, count):
    """(ours, torchvision's v2 pipeline) over the same first `count` training images."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' "loading annotations" chatter
        ours = coco_utils.get_coco(root, "train", presets.DetectionPresetTrain(data_augmentation=policy))
        theirs = torchvision.datasets.CocoDetection(
            root / "train2017", root / "annotations" / "instances_train2017.json", transforms=torchvision_v2_policy(policy))
    theirs = torchvision.datasets.wrap_dataset_for_transforms_v2(theirs, target_keys=["boxes", "labels", "image_id"])
    return [torch.utils.data.Subset(d, range(min(count, len(d)))) for d in (ours, theirs)]


def data_rows(root, policy, sizes, device):
    rows = []
    datasets = training_datasets(root, policy, sizes.data_images)
    for workers in (0, 2):
        # Persistent workers: each timed pass is a steady-state epoch, not process start-up.
        loaders = [torch.utils.data.DataLoader(d, batch_size=4, num_workers=workers, collate_fn=utils.collate_fn,
                                               persistent_workers=workers > 0) for d in datasets]
        seconds, _ = time_interleaved([epoch_fn(loader) for loader in loaders], sizes, device)
        rows.append(make_row(f"data loading, {policy} policy, {workers} workers",
                             len(datasets[0]) / seconds[0], len(datasets[1]) / seconds[1], "samples/s",
                             note="ours v1 (uint8 out) vs torchvision v2 (float out)"))
    return rows


def epoch_fn(loader):
    def epoch():
        for _ in loader:
            pass
    return epoch


# ---------------------------------------------------------------------------------------------------------------
# Row 6: COCO evaluation


def synthetic_evaluation(num_images, detections_per_image, seed=0):
    """(COCO ground truth with 1-14 objects per image like COCO val, detections like a trained model's: jittered
    copies of the objects with high scores, a fifth of them with the wrong class, and random low-score boxes)."""
    rng = np.random.RandomState(seed)
    images, annotations, detections = [], [], {}
    for image_id in range(1, num_images + 1):
        width, height = IMAGE_SIZES[rng.randint(len(IMAGE_SIZES))]
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        gt_boxes = random_boxes(rng, width, height, rng.randint(1, 15))
        gt_labels = rng.choice(COCO_CATEGORY_IDS, len(gt_boxes))
        for box, label in zip(gt_boxes.tolist(), gt_labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        hits = rng.randint(len(gt_boxes), size=min(3 * len(gt_boxes), detections_per_image))
        jittered = gt_boxes[hits] + rng.normal(0, 0.1, (len(hits), 4)) * gt_boxes[hits][:, [2, 3, 2, 3]]
        jittered[:, 2:] = np.abs(jittered[:, 2:]) + 1
        misses = detections_per_image - len(hits)
        xywh = np.concatenate([jittered, random_boxes(rng, width, height, misses)])
        labels = np.concatenate([gt_labels[hits], rng.choice(COCO_CATEGORY_IDS, misses)])
        wrong_class = rng.rand(len(hits)) < 0.2
        labels[:len(hits)][wrong_class] = rng.choice(COCO_CATEGORY_IDS, wrong_class.sum())
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(hits)), rng.uniform(0.0, 0.4, misses)])
        detections[image_id] = {
            "boxes": torch.tensor(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
    categories = [{"id": i, "name": f"class{i}"} for i in COCO_CATEGORY_IDS]
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    return coco_gt, detections


def our_evaluation_fn(coco_gt, detections, backend, batch_size=8):
    """engine.evaluate's flow: update per inference batch, evaluate once at the end."""
    def evaluate():
        evaluator = coco_eval.CocoEvaluator(coco_gt, backend=backend)
        image_ids = sorted(detections)
        for start in range(0, len(image_ids), batch_size):
            evaluator.update({i: detections[i] for i in image_ids[start:start + batch_size]})
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.summarize()
        return evaluator.stats
    return evaluate


def torchvision_evaluation_fn(coco_gt, detections):
    """torchvision's reference flow, written with pycocotools directly: copy the ground truth, run loadRes and
    COCOeval.evaluate after every batch of its evaluation loader (batch size 1), then concatenate the per-image
    results and accumulate once."""
    def evaluate():
        coco_eval_ = COCOeval(copy.deepcopy(coco_gt), iouType="bbox")
        image_ids, per_batch = [], []
        for image_id, prediction in sorted(detections.items()):
            boxes = prediction["boxes"]
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
            results = [{"image_id": image_id, "category_id": label, "bbox": box, "score": score} for box, score, label
                       in zip(xywh, prediction["scores"].tolist(), prediction["labels"].tolist())]
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval_.cocoDt = coco_eval_.cocoGt.loadRes(results)
                coco_eval_.params.imgIds = [image_id]
                coco_eval_.evaluate()
            image_ids.append(image_id)
            per_batch.append(np.asarray(coco_eval_.evalImgs).reshape(-1, len(coco_eval_.params.areaRng), 1))
        coco_eval_.evalImgs = list(np.concatenate(per_batch, 2).flatten())
        coco_eval_.params.imgIds = image_ids
        coco_eval_._paramsEval = copy.deepcopy(coco_eval_.params)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval_.accumulate()
            coco_eval_.summarize()
        return [float(s) for s in coco_eval_.stats]
    return evaluate


def eval_rows(sizes, device):
    coco_gt, detections = synthetic_evaluation(sizes.eval_images, sizes.detections_per_image)
    flows = [our_evaluation_fn(coco_gt, detections, "pycocotools"),
             our_evaluation_fn(coco_gt, detections, "faster-coco-eval"),
             torchvision_evaluation_fn(coco_gt, detections)]
    # No warm-up: nothing is compiled or cached, and one pycocotools pass of 5,000 images takes a minute.
    (pycocotools_s, faster_s, torchvision_s), stats = time_interleaved(flows, sizes, device, warmup=0)
    difference = max(abs(a - b) for ours in stats[:2] for a, b in zip(ours, stats[2]))
    check = "same 12 stats" if difference < 1e-9 else f"WARNING: stats differ by {difference:.2g}"
    name = f"COCO eval, {sizes.eval_images} images x {sizes.detections_per_image} detections"
    return [
        make_row(f"{name}, pycocotools", pycocotools_s, torchvision_s, "s",
                 note=f"vs torchvision's per-batch flow; {check}"),
        make_row(f"{name}, faster-coco-eval", faster_s, torchvision_s, "s",
                 note=f"{pycocotools_s / faster_s:.1f}x our pycocotools backend"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Report


def significant(x, digits=3):
    """x with `digits` significant digits, without an exponent."""
    decimals = digits - 1 - math.floor(math.log10(abs(x))) if x else 0
    return f"{x:.{max(0, decimals)}f}"


def flops_cell(row):
    """'ours / torchvision GFLOP/s (ours / torchvision share of the measured peak)', or '' for other rows."""
    if "gflops" not in row:
        return ""
    gflops, share = row["gflops"], row["peak_share"]
    return (f"{significant(gflops['ours'])} / {significant(gflops['torchvision'])} "
            f"({share['ours']:.0%} / {share['torchvision']:.0%})")


def format_table(rows):
    header = ["row", "ours", "torchvision", "unit", "ours/tv", "speed-up", "GFLOP/s (of peak)", "note"]
    lines = [[r["name"], significant(r["ours"]), significant(r["torchvision"]), r["unit"], significant(r["ratio"]),
              f"{significant(r['speedup'])}x", flops_cell(r), r["note"]] for r in rows]
    widths = [max(len(str(line[i])) for line in [header] + lines) for i in range(len(header))]
    render = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), "-+-".join("-" * w for w in widths)] + [render(line) for line in lines])


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(device):
    versions = {name: importlib.metadata.version(name)
                for name in ("torch", "torchvision", "numpy", "pillow", "pycocotools", "faster-coco-eval")}
    return {
        "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0], "platform": platform.platform(),
        "python": platform.python_version(), "versions": versions,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def is_bench_report(path):
    """Whether path holds a report an earlier bench.py --json wrote (so that replacing it loses nothing else)."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (ValueError, RecursionError):
        return False
    return isinstance(report, dict) and REPORT_KEYS <= report.keys()


def main(args):
    if args.amp_vs_float32 and not {"train", "infer"} & set(args.rows):
        raise cli.UserInputError(f"--amp-vs-float32 times training and inference: --rows {' '.join(args.rows)} has "
                                 "neither train nor infer")
    if args.json:
        safe_io.check_output_file(args.json, "--json", kind="a bench.py report", is_kind=is_bench_report,
                                  overwrite=args.overwrite)
    args.device = torch.device(args.device)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # SSD inputs have one fixed size
    sizes = QUICK if args.quick else FULL
    if args.compile:
        # Compile times as a first run sees them: inductor's on-disk caches would hide most of the work.
        compile_cache = tempfile.TemporaryDirectory(prefix="bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache.name
    if args.repeats is not None:
        sizes = Sizes(**{**asdict(sizes), "repeats": args.repeats})
    info = machine_info(args.device)
    args.peak_gflops, args.peak_by_dtype = None, {}
    if {"train", "infer"} & set(args.rows):
        autocast_dtype = utils.autocast_dtype(args.device.type)
        peak_dtype = autocast_dtype if args.amp else torch.float32
        info["peak_dtype"] = dtype_name(peak_dtype)
        info["peak_gflops_by_dtype"] = {}
        for dtype in dict.fromkeys([peak_dtype, *([autocast_dtype, torch.float32] if args.amp_vs_float32 else [])]):
            log(f"measuring the {dtype_name(dtype)} peak (a matmul and a convolution)")
            by_operation = measured_peak_gflops(args.device, sizes.peak_matmul_size, dtype)
            info["peak_gflops_by_dtype"][dtype_name(dtype)] = by_operation
            args.peak_by_dtype[dtype] = max(by_operation.values())
        info["peak_gflops_by_operation"] = info["peak_gflops_by_dtype"][info["peak_dtype"]]
        info["peak_gflops"] = args.peak_gflops = args.peak_by_dtype[peak_dtype]
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    rows, profiles = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if set(args.rows) - {"eval"}:
            if args.data_path:
                root = Path(args.data_path)
            else:
                count = max(sizes.data_images, sizes.largest_batch())
                log(f"writing {count} COCO-like JPEGs")
                root = write_coco_like_images(Path(tmp) / "coco", count)
            rows, profiles = model_and_data_rows(root, args, sizes)
    if "eval" in args.rows:
        log("COCO evaluation")
        rows += eval_rows(sizes, args.device)

    command = " ".join(["python"] + sys.argv)
    print(f"# {command}\n# {started}; {info['cpu']} ({info['cpu_capability']}), {info['cpu_count']} cpus, "
          f"{info['torch_threads']} torch threads, device {info['device']}, torch {info['versions']['torch']}, torchvision {info['versions']['torchvision']}, "
          f"load average at start {info['load_average_at_start']:.2f}")
    for dtype, by_operation in info.get("peak_gflops_by_dtype", {}).items():
        print(f"# measured {dtype} peak: {significant(max(by_operation.values()))} GFLOP/s (the better of a {dtype} "
              f"matmul of {sizes.peak_matmul_size}x{sizes.peak_matmul_size} matrices, "
              f"{significant(by_operation['matmul'])}, "
              f"and a dense 3x3 convolution, {significant(by_operation['convolution'])})")
    if args.peak_gflops:
        print(f"# training and inference rows show the GFLOP/s each side achieves, from FlopCounterMode's count of "
              f"the model's FLOPs, and its share of the {info['peak_dtype']} peak (rows of ours in two precisions: "
              f"of each column's own)")
    print(format_table(rows))
    for profile in profiles:
        print(f"\n{profile}")
    if args.json:
        report = {"date": started, "command": command, "machine": info, "sizes": asdict(sizes),
                  "flags": {"device": str(args.device), "amp": args.amp, "channels_last": args.channels_last,
                            "compile": args.compile, "amp_vs_float32": args.amp_vs_float32},
                  "rows": rows}
        safe_io.write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")


def model_and_data_rows(root, args, sizes):
    """The rows of the model and data kinds asked for, and the --profile reports."""
    rows, profiles = [], []
    model_kinds = [kind for kind in MODEL_ROW_KINDS if kind in args.rows]
    for name in args.model if model_kinds else []:
        short = SHORT_NAMES[name]
        log(f"{short}: building both models")
        images, targets = load_samples(root, sizes.largest_batch())
        pair = ModelPair(name, *build_models(name, images[:max(sizes.infer_batches)], args), args.device,
                         args.channels_last)
        row_makers = {  # inference and post-processing need no targets
            "train": lambda: train_rows(short, pair, images, targets, args, sizes),
            "infer": lambda: infer_rows(short, pair, images, args, sizes),
            "postprocess": lambda: (peer_postprocess_rows if pair.peer else postprocess_rows)(
                short, pair, images, args, sizes),
            "loss": lambda: (peer_loss_rows if pair.peer else loss_rows)(short, pair, images, targets, args, sizes),
        }
        for kind in model_kinds:
            log(f"{short}: {kind}")
            rows += row_makers[kind]()
        if args.profile and not pair.peer:  # profiles compare against torchvision's code
            log(f"{short}: profiling")
            profiles += profile_reports(short, pair, images, targets, args, sizes)
    # SSD512 reads its data as SSD300 does (the network resizes): each policy once.
    for policy in dict.fromkeys(RECIPE_POLICIES[name] for name in args.model) if "data" in args.rows else []:
        log(f"data loading, {policy} policy")
        rows += data_rows(root, policy, sizes, args.device)
    return rows, profiles


if __name__ == "__main__":
    cli.survive_closed_output()
    try:
        main(get_args_parser().parse_args())
    except coco_utils.DatasetError as error:
        sys.exit(f"bench.py: error: --data-path: {error}")
    except cli.UserInputError as error:
        sys.exit(f"bench.py: error: {error}")
    except OSError as error:  # the final --json write (a full disk, a folder gone); the table is printed above
        sys.exit(f"bench.py: error: {cli.one_line(error)}")

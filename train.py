r"""Train and evaluate SSD300 VGG16 / SSDlite320 MobileNetV3-Large on COCO-format data.

The flags follow torchvision's detection references. The published recipes, on 8 GPUs:

    torchrun --nproc_per_node=8 train.py --dataset coco --model ssd300_vgg16 --epochs 120 \
        --lr-steps 80 110 --aspect-ratio-group-factor 3 --lr 0.002 --batch-size 4 \
        --weight-decay 0.0005 --data-augmentation ssd --weights-backbone VGG16_Weights.IMAGENET1K_FEATURES

    torchrun --nproc_per_node=8 train.py --dataset coco --model ssdlite320_mobilenet_v3_large --epochs 660 \
        --aspect-ratio-group-factor 3 --lr-scheduler cosineannealinglr --lr 0.15 --batch-size 24 \
        --weight-decay 0.00004 --data-augmentation ssdlite

--batch-size is per process; scale --lr linearly with the total batch size when changing the GPU count.
"""
import argparse
import datetime
import errno
import json
import math
import os
import re
import secrets
import signal
import sys
import time


def _stop_while_importing(signum, frame):
    print(f"train.py: stopped by {signal.Signals(signum).name} while starting", file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == "__main__":
    # Ctrl-C during the seconds the imports below take ends in one line too; main() installs the real handlers.
    signal.signal(signal.SIGINT, _stop_while_importing)

import torch
import torch.utils.data

import coco_eval
import coco_utils
import engine
import models
import presets
import shapes
import utils
from group_by_aspect_ratio import GroupedBatchSampler, create_aspect_ratio_groups
from plot_curves import plot_curves

CHECKPOINT_NAME = "checkpoint.pth"
BEST_NAME = "model_best.pth"
LOG_NAME = "log.jsonl"
DETECTIONS_NAME = "detections.json"
METRICS_NAME = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
EPOCH_MODEL = re.compile(r"model_(\d+)\.pth")
AUTO_RESUME = "auto"
# The files a run writes into --output-dir: a folder holding any of them belongs to a run.
RUN_FILE_PATTERN = re.compile(r"checkpoint\.pth|log\.jsonl|curves\.png|model_(\d+|best)\.pth|detections\.json|"
                              r"metrics\.json")
# Training images per process below which a model cannot train: SSDlite's last extra block applies BatchNorm to
# 1x1 feature maps, and BatchNorm needs more than one value per channel in training mode.
MIN_TRAIN_BATCH_SIZE = {"ssdlite320_mobilenet_v3_large": 2}
DEFAULT_DATA_PATHS = {"coco": "data/coco", "shapes": "data/shapes", "voc": "data/VOCdevkit"}


class ConfigError(ValueError):
    """A flag, or a combination of flags, that cannot work; reported in one line without a traceback."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser(add_help=True):
    parser = _OneLineParser(description="SSD detection training", add_help=add_help)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="coco", choices=["coco", "shapes", "voc"],
                      help="coco: any COCO-layout folder; shapes: the built-in synthetic set, generated on first use; "
                           "voc: Pascal VOC in the VOCdevkit layout, evaluated with the VOC devkit's AP")
    data.add_argument("--data-path", default=None,
                      help="dataset root (default: data/coco, data/shapes or data/VOCdevkit)")
    data.add_argument("--train-images", default=None, metavar="DIR",
                      help="training image folder (default: DATA_PATH/train2017)")
    data.add_argument("--train-annotations", default=None, metavar="FILE",
                      help="training COCO annotation file (default: DATA_PATH/annotations/instances_train2017.json)")
    data.add_argument("--val-images", default=None, metavar="DIR",
                      help="validation image folder (default: DATA_PATH/val2017)")
    data.add_argument("--val-annotations", default=None, metavar="FILE",
                      help="validation COCO annotation file (default: DATA_PATH/annotations/instances_val2017.json)")
    data.add_argument("--keep-empty-images", action="store_true",
                      help="keep training images without boxes as pure negatives (default: drop them, as torchvision)")
    data.add_argument("--train-split", default=None, nargs="+", metavar="YEAR/LIST",
                      help="voc: training image lists, ROOT/VOC{YEAR}/ImageSets/Main/{LIST}.txt (default: the "
                           "trainval list of VOC2007 and of VOC2012, those present)")
    data.add_argument("--val-split", default=None, metavar="YEAR/LIST",
                      help="voc: evaluation image list, e.g. 2007/val (default: 2007/test)")
    data.add_argument("--voc-classes", default=None, nargs="+", metavar="NAME",
                      help="voc: the class names, labels 1..N in this order (default: the 20 Pascal VOC classes)")
    data.add_argument("--keep-difficult", action="store_true",
                      help="voc: train on objects marked difficult too (evaluation always ignores them)")
    data.add_argument("--shapes-num-train", default=1000, type=int, help="training images of the shapes dataset")
    data.add_argument("--shapes-num-val", default=200, type=int, help="validation images of the shapes dataset")
    data.add_argument("-j", "--workers", default=4, type=int, help="data loading workers per process")
    data.add_argument("--aspect-ratio-group-factor", default=3, type=int,
                      help="batch images of similar aspect ratio (k bins per side); negative disables")
    data.add_argument("--data-augmentation", default="hflip", choices=presets.POLICIES)
    data.add_argument("--backend", default="pil", type=str.lower, choices=presets.BACKENDS)
    data.add_argument("--use-v2", action="store_true", help="use torchvision.transforms.v2 and tv_tensors")
    data.add_argument("--allow-image-paths-outside-folder", action="store_true",
                      help="accept annotation file_names that are absolute or contain '..' (refused by default: "
                           "they read files outside the image folder)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="ssd300_vgg16", choices=models.list_models())
    model.add_argument("--weights", default=None,
                       help="torchvision weights name (e.g. SSD300_VGG16_Weights.COCO_V1) or a local .pth file; "
                            "weights made for other classes are fine-tuned to the dataset's: the classification "
                            "layers are rebuilt, keeping the rows of classes with matching names")
    model.add_argument("--weights-backbone", default=None,
                       help="backbone weights name (e.g. VGG16_Weights.IMAGENET1K_FEATURES) or a local .pth file")
    model.add_argument("--trainable-backbone-layers", default=None, type=int)
    model.add_argument("--default-boxes", default=None, choices=["coco", "voc"],
                       help="ssd512_vgg16: the default box sizes of the paper's Caffe COCO model (the default) or "
                            "of its VOC model (see docs/ssd512.md)")
    model.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (SSDlite)")
    model.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last memory format for the convolutions (default: where measured faster: "
                            "on CPU SSDlite training, SSD300 training on CPUs with AVX-512 and any --test-only, on "
                            "CUDA SSD300; see models.prefers_channels_last)")
    model.add_argument("--compile", default="off", choices=["off", "eval", "all"],
                       help="compile the network (backbone and heads) with torch.compile: 'eval' for evaluation "
                            "only (and --test-only), 'all' for training too. Compiling takes minutes on a CPU, once "
                            "per mode and again for a smaller last batch. On a CPU it was measured to pay for long "
                            "SSDlite evaluations only (SSD300 runs the same convolutions either way, and a compiled "
                            "training step is no faster), so 'all' is meant for GPUs (default: off; figures in "
                            "docs/performance.md)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    optim.add_argument("-b", "--batch-size", default=2, type=int, help="images per process")
    optim.add_argument("--epochs", default=26, type=int, metavar="N")
    optim.add_argument("--opt", default="sgd", type=str.lower, choices=engine.OPTIMIZERS)
    optim.add_argument("--lr", default=0.02, type=float)
    optim.add_argument("--momentum", default=0.9, type=float, metavar="M")
    optim.add_argument("--wd", "--weight-decay", default=1e-4, type=float, metavar="W", dest="weight_decay")
    optim.add_argument("--norm-weight-decay", default=None, type=float,
                       help="weight decay for normalisation layers (default: same as --weight-decay)")
    optim.add_argument("--lr-scheduler", default="multisteplr", type=str.lower,
                       choices=["multisteplr", "cosineannealinglr"])
    optim.add_argument("--lr-steps", default=[16, 22], nargs="+", type=int, help="MultiStepLR milestones (epochs)")
    optim.add_argument("--lr-gamma", default=0.1, type=float, help="MultiStepLR factor")
    optim.add_argument("--warmup-iters", default=1000, type=int,
                       help="linear warm-up iterations in the first epoch (torchvision: 1000)")
    optim.add_argument("--amp", action="store_true",
                       help="mixed precision: float16 + GradScaler on CUDA, bfloat16 on CPU (slow without AVX512-BF16/AMX)")
    optim.add_argument("--seed", default=None, type=int,
                       help="seed every random generator (default: a fresh seed, printed and stored in the "
                            "checkpoints, so a run can be repeated with --seed)")
    optim.add_argument("--use-deterministic-algorithms", action="store_true")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="output",
                     help="checkpoints, log.jsonl, and with --test-only detections.json and metrics.json "
                          "('' writes nothing)")
    run.add_argument("--resume", default="",
                     help="checkpoint to resume from (e.g. OUTPUT_DIR/checkpoint.pth), or 'auto': "
                          "OUTPUT_DIR/checkpoint.pth when it exists, else start fresh (a requeued job reruns "
                          "its own command)")
    run.add_argument("--start-epoch", "--start_epoch", default=0, type=int, dest="start_epoch")
    run.add_argument("--print-freq", default=20, type=int)
    run.add_argument("--test-only", action="store_true",
                     help="only evaluate (--weights or --resume); writes OUTPUT_DIR/detections.json and metrics.json")
    run.add_argument("--format-only", action="store_true",
                     help="only write OUTPUT_DIR/detections.json, without evaluating (implies --test-only; for "
                          "an image-info file without annotations, such as COCO test-dev's)")
    run.add_argument("--keep-checkpoints", default=None, type=int, metavar="K",
                     help="keep only the K newest model_{epoch}.pth (default: all); model_best.pth and "
                          "checkpoint.pth always stay")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log losses, lr and AP to OUTPUT_DIR/tensorboard (needs: pip install tensorboard)")
    run.add_argument("--eval-freq", default=1, type=int, help="evaluate every N epochs and after the last")
    run.add_argument("--eval-batch-size", default=8, type=int, help="images per process during evaluation")
    run.add_argument("--coco-backend", default="pycocotools", choices=coco_eval.BACKENDS)
    run.add_argument("--world-size", default=1, type=int, help="number of processes (set by torchrun)")
    run.add_argument("--dist-url", default="env://", help="url used to set up distributed training")
    return parser


def validate_args(args):
    """Reject flag values and combinations that cannot work, before anything is loaded or written."""
    positive = {"--batch-size": args.batch_size, "--epochs": args.epochs, "--eval-freq": args.eval_freq,
                "--eval-batch-size": args.eval_batch_size, "--print-freq": args.print_freq}
    for flag, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    if args.warmup_iters < 0:
        raise ConfigError(f"--warmup-iters must be >= 0, got {args.warmup_iters}")
    non_negative = {"--momentum": args.momentum, "--weight-decay": args.weight_decay,
                    "--norm-weight-decay": args.norm_weight_decay, "--start-epoch": args.start_epoch}
    for flag, value in non_negative.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a number >= 0, got {value}")
    if not (math.isfinite(args.lr_gamma) and args.lr_gamma > 0):
        raise ConfigError(f"--lr-gamma must be a positive number, got {args.lr_gamma}")
    if args.default_boxes is not None and args.model != "ssd512_vgg16":
        raise ConfigError(f"--default-boxes is an option of --model ssd512_vgg16, not of --model {args.model}")
    min_batch_size = MIN_TRAIN_BATCH_SIZE.get(args.model, 1)
    if not args.test_only and args.batch_size < min_batch_size:
        raise ConfigError(f"--model {args.model} cannot train with --batch-size {args.batch_size}: its BatchNorm "
                          f"over 1x1 feature maps needs at least {min_batch_size} images per process")
    if args.lr_scheduler == "multisteplr" and args.lr_steps != sorted(args.lr_steps):
        raise ConfigError(f"--lr-steps must be increasing, got {args.lr_steps}")
    if args.backend == "tv_tensor" and not args.use_v2:
        raise ConfigError("--backend tv_tensor needs --use-v2")
    if args.resume and args.resume != AUTO_RESUME and args.weights:
        raise ConfigError("--resume already restores the model; drop --weights")
    if args.keep_checkpoints is not None and args.keep_checkpoints < 1:
        raise ConfigError(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
    for flag, needs_output in (("--resume auto", args.resume == AUTO_RESUME), ("--format-only", args.format_only),
                               ("--tensorboard", args.tensorboard)):
        if needs_output and not args.output_dir:
            raise ConfigError(f"{flag} needs an --output-dir")
    if args.dataset == "shapes" and (args.shapes_num_train < 1 or args.shapes_num_val < 1):
        raise ConfigError("--shapes-num-train and --shapes-num-val must be at least 1")
    if args.amp and args.device.startswith("cpu") and not utils.cpu_has_bfloat16_instructions():
        print("warning: --amp on CPU uses bfloat16 autocast, which this CPU emulates (no AVX512-BF16 or AMX): "
              "several times slower than float32", file=sys.stderr)
    validate_voc_args(args)
    utils.check_device(args.device)


def fill_in_implied_flags(args):
    """Flags whose value follows from others: --format-only is a --test-only, and --data-path defaults by dataset."""
    args.test_only = args.test_only or args.format_only
    if args.data_path is None:
        args.data_path = DEFAULT_DATA_PATHS[args.dataset]


def voc_splits(args, is_train):
    """The --train-split / --val-split YEAR/LIST values as (year, list) pairs, or None for get_voc's default."""
    if is_train:
        flag, value = "--train-split", args.train_split
    else:
        flag, value = "--val-split", None if args.val_split is None else [args.val_split]
    try:
        return None if value is None else [coco_utils.parse_voc_split(split) for split in value]
    except ValueError as error:
        raise ConfigError(f"{flag}: {error}") from None


def validate_voc_args(args):
    """Check the VOC-only flags (they go with --dataset voc only)."""
    voc_flags = {"--train-split": args.train_split, "--val-split": args.val_split,
                 "--voc-classes": args.voc_classes, "--keep-difficult": args.keep_difficult}
    coco_flags = {"--train-images": args.train_images, "--train-annotations": args.train_annotations,
                  "--val-images": args.val_images, "--val-annotations": args.val_annotations,
                  "--keep-empty-images": args.keep_empty_images}
    if args.dataset != "voc":
        for flag, value in voc_flags.items():
            if value:
                raise ConfigError(f"{flag} is for --dataset voc, not --dataset {args.dataset}")
        return
    for flag, value in coco_flags.items():
        if value:
            raise ConfigError(f"{flag} is for COCO-format data, not --dataset voc (see --train-split / --val-split)")
    for is_train in (True, False):
        voc_splits(args, is_train)  # a malformed YEAR/LIST stops here, before anything is loaded
    if args.voc_classes is not None and len(set(args.voc_classes)) != len(args.voc_classes):
        raise ConfigError(f"--voc-classes names a class twice: {' '.join(args.voc_classes)}")


def get_transform(is_train, args):
    if is_train:
        return presets.DetectionPresetTrain(
            data_augmentation=args.data_augmentation, backend=args.backend, use_v2=args.use_v2
        )
    return presets.DetectionPresetEval(backend=args.backend, use_v2=args.use_v2)


def prepare_data_root(args):
    """Generate the shapes dataset once (rank 0 first, the others then reuse it)."""
    if args.dataset != "shapes":
        return
    if utils.is_main_process():
        shapes.ensure_shapes_dataset(args.data_path, num_train=args.shapes_num_train,
                                     num_val=args.shapes_num_val)
    utils.barrier()
    if not utils.is_main_process():
        shapes.ensure_shapes_dataset(args.data_path, num_train=args.shapes_num_train,
                                     num_val=args.shapes_num_val)


def get_datasets(args):
    """(training dataset, or None with --test-only; validation dataset), labelled by one category table made from
    the union of the training and validation files' categories, so that a label means the same class in training
    and in any later evaluation. With --test-only the training file is read for its categories where it exists.
    Pascal VOC's labels are its class list's, the same for every split."""
    if args.dataset == "voc":
        return None if args.test_only else get_voc_dataset(args, True), get_voc_dataset(args, False)
    paths = {"val": coco_utils.split_paths(args.data_path, "val", args.val_images, args.val_annotations)}
    try:
        paths["train"] = coco_utils.split_paths(args.data_path, "train", args.train_images, args.train_annotations)
    except coco_utils.DatasetError:
        if not args.test_only:
            raise
        print(f"No training split found: the classes are those of {paths['val'][1]} alone")
    splits = [split for split in ("train", "val") if split in paths]
    cocos = {split: coco_utils.load_annotation_file(paths[split][1]) for split in splits}
    categories = coco_utils.build_category_table({paths[split][1]: cocos[split] for split in splits})
    if any(label != entry["id"] for label, entry in categories.items()):
        ids = [entry["id"] for entry in categories.values()]
        print(f"{len(ids)} categories with ids {min(ids)}..{max(ids)}: the model's labels are 1..{len(ids)} in "
              "ascending id order; evaluation results keep the annotation files' ids")

    def make_dataset(split, is_train):
        img_folder, ann_file = paths[split]
        return coco_utils.get_coco(
            args.data_path, split, get_transform(is_train, args), use_v2=args.use_v2, img_folder=img_folder,
            ann_file=ann_file, categories=categories, keep_empty_images=args.keep_empty_images, coco=cocos[split],
            allow_paths_outside=args.allow_image_paths_outside_folder,
        )

    return None if args.test_only else make_dataset("train", True), make_dataset("val", False)


def get_voc_dataset(args, is_train):
    return coco_utils.get_voc(
        args.data_path, "train" if is_train else "val", get_transform(is_train, args), use_v2=args.use_v2,
        splits=voc_splits(args, is_train), classes=args.voc_classes or coco_utils.VOC_CLASSES,
        keep_difficult=args.keep_difficult,
    )


def choose_seed(args, resume_checkpoint):
    """--seed; else the seed of the run being resumed (its data order goes on); else a fresh one.

    A fixed default would give every unseeded run the same data order, so runs meant as independent repeats
    would all share one draw of it. Rank 0 draws the fresh seed and every rank uses it: the distributed
    sampler needs one seed across ranks to split the data without overlap.
    """
    if args.seed is not None:
        return args.seed
    saved_seed = (resume_checkpoint or {}).get("args", {}).get("seed")
    if saved_seed is not None:
        return saved_seed
    seed = utils.broadcast_object(secrets.randbelow(2**31))
    print(f"No --seed given: seeding with {seed} (pass --seed {seed} to repeat this run)")
    return seed


def seed_loader_for_epoch(data_loader, args, epoch):
    """Make the workers' augmentation randomness a function of --seed, epoch and rank alone."""
    data_loader.generator.manual_seed(args.seed * 1_000_003 + epoch * 1_009 + utils.get_rank())


def build_train_loader(dataset, args):
    # DistributedSampler with one replica is a seeded, epoch-aware shuffle: the same code path for 1 or N processes.
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(), shuffle=True, seed=args.seed
    )
    if args.aspect_ratio_group_factor >= 0:
        group_ids = create_aspect_ratio_groups(dataset, k=args.aspect_ratio_group_factor)
        batch_sampler = GroupedBatchSampler(sampler, group_ids, args.batch_size)
    else:
        batch_sampler = torch.utils.data.BatchSampler(sampler, args.batch_size, drop_last=True)
    if len(batch_sampler) == 0:
        raise ConfigError(
            f"--batch-size {args.batch_size} is larger than the {len(sampler)} training images of this process"
        )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=args.workers, collate_fn=utils.collate_fn,
        pin_memory=args.device.startswith("cuda"), generator=torch.Generator(),
        worker_init_fn=utils.ignore_stop_signals,
    )
    return loader, sampler


def build_eval_loader(dataset, args):
    if utils.get_world_size() > 1:
        # Pads with repeated images to an equal share per rank; the evaluator drops the repeats.
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.eval_batch_size, sampler=sampler, num_workers=args.workers,
        collate_fn=utils.collate_fn, pin_memory=args.device.startswith("cuda"),
        worker_init_fn=utils.ignore_stop_signals,
        # Its own generator, so evaluating never consumes the global RNG that exact resume depends on.
        generator=torch.Generator().manual_seed(0),
    )


def build_lr_scheduler(optimizer, args):
    if args.lr_scheduler == "multisteplr":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_steps, gamma=args.lr_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)


def amp_setup(args, device):
    """(autocast dtype or None, GradScaler or None): float16 with loss scaling on CUDA, bfloat16 on CPU."""
    if not args.amp:
        return None, None
    dtype = utils.autocast_dtype(device.type)
    return dtype, torch.amp.GradScaler("cuda") if device.type == "cuda" else None


def checkpoint_args(args):
    """The run's flags as plain data (checkpoints must load with weights_only=True)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def load_resume_checkpoint(args):
    checkpoint = models.load_checkpoint_file(args.resume)
    if "model" not in checkpoint or "epoch" not in checkpoint:
        raise ConfigError(f"--resume {args.resume}: not a training checkpoint (no 'model'/'epoch'); "
                          "use --weights for model-only files")
    if args.test_only:
        return checkpoint
    if "optimizer" not in checkpoint or "lr_scheduler" not in checkpoint:
        raise ConfigError(f"--resume {args.resume} holds the weights only (like model_N.pth), not the optimizer and "
                          f"schedule: resume from the run's {CHECKPOINT_NAME}, or start a new run with --weights")
    check_resume_flags(args, checkpoint.get("args") or {})
    return checkpoint


def check_resume_flags(args, saved):
    """Refuse to resume with flags that would give the checkpoint's optimizer or schedule state another meaning."""
    saved_model = saved.get("model")
    if saved_model is not None and saved_model != args.model:
        raise ConfigError(f"--resume {args.resume} was made with --model {saved_model}, not --model {args.model}")
    for flag, name in (("--opt", "opt"), ("--lr-scheduler", "lr_scheduler"), ("--default-boxes", "default_boxes")):
        if name in saved and saved[name] != getattr(args, name):
            raise ConfigError(f"--resume {args.resume} was trained with {flag} {saved[name]}, not {flag} "
                              f"{getattr(args, name)}: resume with {flag} {saved[name]}, or start a new run with "
                              "--weights")
    saved_norm_decay = saved.get("norm_weight_decay")
    if "norm_weight_decay" in saved and (saved_norm_decay is None) != (args.norm_weight_decay is None):
        saved_flag = "without --norm-weight-decay" if saved_norm_decay is None else \
            f"with --norm-weight-decay {saved_norm_decay}"
        raise ConfigError(f"--resume {args.resume} was trained {saved_flag}, which groups the optimizer's "
                          f"parameters differently: resume {saved_flag}")


def check_resume_categories(args, checkpoint, categories):
    """A resumed model's labels must stand for the same category ids and names as this data's. Older checkpoints,
    which stored {label: name}, are not checked."""
    saved = checkpoint.get("categories") or {}
    if not all(isinstance(entry, dict) for entry in saved.values()) or saved == categories:
        return
    label = min(k for k in set(saved) | set(categories) if saved.get(k) != categories.get(k))
    there, here = saved.get(label), categories.get(label)
    raise ConfigError(f"--resume {args.resume} was trained on other categories than this data's: label {label} is "
                      f"{there or 'no class'} there and {here or 'no class'} here")


def build_model(args, num_classes, class_names, device, resume_checkpoint):
    kwargs = {}
    if args.trainable_backbone_layers is not None:
        kwargs["trainable_backbone_layers"] = args.trainable_backbone_layers
    if args.default_boxes is not None:
        kwargs["default_boxes"] = args.default_boxes
    if args.weights and not args.test_only:
        # Training may adapt weights made for other classes; evaluating them as they are may not.
        kwargs["class_names"] = class_names
    model = models.get_model(args.model, weights=args.weights, weights_backbone=args.weights_backbone,
                             num_classes=num_classes, **kwargs)
    if resume_checkpoint is not None:
        models.load_model_state(model, resume_checkpoint["model"], source=args.resume)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile != "off":
        # The inner network, before any DistributedDataParallel wrapping: DDP's hooks stay outside the graphs.
        models.compile_network(model, training=args.compile == "all")
    return model


def check_output_dir(args):
    """Refuse a folder holding another run's files: training writes there only to continue the run it holds
    (--resume of a checkpoint in that folder). --test-only writes its own result files next to a checkpoint."""
    run_files = sorted(name for name in os.listdir(args.output_dir) if RUN_FILE_PATTERN.fullmatch(name))
    resuming_this_run = bool(args.resume) and utils.same_file(os.path.dirname(os.path.abspath(args.resume)),
                                                              args.output_dir)
    if args.test_only or not run_files or resuming_this_run:
        return
    existing = os.path.join(args.output_dir, CHECKPOINT_NAME)
    if not args.resume and CHECKPOINT_NAME in run_files:
        raise ConfigError(f"{existing} already exists: continue that run with --resume {existing}, "
                          "or choose another --output-dir")
    shown = ", ".join(run_files[:4]) + (", ..." if len(run_files) > 4 else "")
    resuming = f" (--resume {args.resume} is another run's checkpoint)" if args.resume else ""
    raise ConfigError(f"--output-dir {args.output_dir} holds another run's files ({shown}){resuming}: "
                      "choose an empty or new --output-dir")


def take_output_dir(args):
    """Create --output-dir, lock it for this process's life and check it may be written; rank 0 only (the only
    writer). Returns the lock, which must stay referenced until the end."""
    utils.prepare_output_dir(args.output_dir)
    check_output_dir(args)  # first without the lock: a refused folder is left exactly as it was
    lock = utils.lock_output_dir(args.output_dir)
    check_output_dir(args)  # again under the lock, which another run may have just released
    stale = utils.remove_stale_temp_files(args.output_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) an interrupted write left in {args.output_dir}: "
              f"{', '.join(stale)}")
    return lock


def resolve_resume(args):
    """--resume auto -> OUTPUT_DIR/checkpoint.pth when it exists, else "" (start fresh); any other value as given.

    Rank 0 looks and broadcasts its answer, so every rank takes the same decision even where the ranks of several
    nodes see the output folder through differently cached (or different) file systems; a rank that cannot then
    read the checkpoint stops with the same error as with an explicit --resume.
    """
    if args.resume != AUTO_RESUME:
        return args.resume
    candidate = os.path.join(args.output_dir, CHECKPOINT_NAME)
    found = utils.broadcast_object(os.path.isfile(candidate) if utils.is_main_process() else None)
    if not found:
        print(f"--resume auto: no {candidate}, starting fresh")
        return ""
    print(f"--resume auto: continuing from {candidate}")
    if args.weights:
        print(f"--resume auto: --weights {args.weights} is not used, the checkpoint restores the model")
        args.weights = None
    return candidate


def primary_metric(metrics):
    """(name, value) of the metric model_best.pth follows: VOC's 11-point mAP when evaluated, else COCO AP."""
    if "voc" in metrics:
        return "voc.mAP_11pt", metrics["voc"]["mAP_11pt"]
    return "coco.AP", metrics["coco"]["AP"]


def training_checkpoint(args, epoch, model, optimizer, lr_scheduler, scaler, categories, rng_states):
    """Everything --resume needs, as plain data (checkpoints must load with weights_only=True)."""
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng_states": rng_states,
        "epoch": epoch,
        "args": checkpoint_args(args),
        "categories": categories,
    }
    if scaler is not None:
        checkpoint["scaler"] = scaler.state_dict()
    return checkpoint


def model_file(checkpoint):
    """What model_{epoch}.pth and model_best.pth hold: the weights with the epoch, flags and categories."""
    return {key: checkpoint[key] for key in ("model", "epoch", "args", "categories")}


def end_epoch(args, checkpoint, record, metrics, best, tensorboard=None):
    """Save, log and plot one finished epoch (rank 0); returns the best evaluated epoch so far.

    The order keeps the folder consistent whenever a kill or a full disk strikes: every file is written under a
    temporary name and renamed; checkpoint.pth (which also holds the epoch's log record and the best epoch) comes
    first, so that a folder holding any file of this run also holds the checkpoint --resume auto continues from;
    then model_{epoch}.pth (a kill just before it leaves that epoch's weights in checkpoint.pth alone), model_best.pth
    and the log line, which a resume rebuilds from the checkpoint (reconcile_outputs); older model_{epoch}.pth files
    are deleted only once the newer ones are in place.
    """
    epoch = checkpoint["epoch"]
    improved = False
    if metrics is not None:
        name, value = primary_metric(metrics)
        improved = best is None or value > best["value"]
        if improved:
            best = {"metric": name, "value": value, "epoch": epoch}
    if best is not None:
        record["best"] = best

    utils.save_atomic({**checkpoint, "log_record": record, "best": best},
                      os.path.join(args.output_dir, CHECKPOINT_NAME))
    utils.save_atomic(model_file(checkpoint), os.path.join(args.output_dir, f"model_{epoch}.pth"))
    if improved:
        utils.save_atomic(model_file(checkpoint), os.path.join(args.output_dir, BEST_NAME))
        print(f"{BEST_NAME}: epoch {epoch}, best {best['metric']} so far ({best['value']:.4f})")
    utils.append_jsonl(os.path.join(args.output_dir, LOG_NAME), record)
    if args.keep_checkpoints is not None:
        prune_epoch_models(args.output_dir, keep=args.keep_checkpoints, newest=epoch)
    if tensorboard is not None:
        write_tensorboard_metrics(tensorboard, metrics, step=record["iterations"])
    draw_curves(args.output_dir)
    return best


def prune_epoch_models(output_dir, keep, newest):
    """Delete model_{epoch}.pth of the epochs up to newest - keep (files of later epochs are never touched)."""
    for name in os.listdir(output_dir):
        match = EPOCH_MODEL.fullmatch(name)
        if match and int(match.group(1)) <= newest - keep:
            os.remove(os.path.join(output_dir, name))


def write_tensorboard_metrics(writer, metrics, step):
    if metrics is not None:
        for name, value in metrics["coco"].items():
            writer.add_scalar(f"val/{name}", value, step)
        for category, values in metrics["per_class"].items():
            writer.add_scalar(f"val_AP_per_class/{category}", values["AP"], step)
    writer.flush()


def reconcile_outputs(args, checkpoint):
    """On resume, make log.jsonl and model_best.pth agree with checkpoint.pth whatever moment the run was killed.

    log.jsonl gets exactly the records of the epochs before the checkpoint's, then the checkpoint's own record: a
    kill between writing checkpoint.pth and appending its line, a torn last line, or lines of epochs after an older
    checkpoint would otherwise leave an epoch missing or doubled. When the checkpoint's epoch was the best one,
    model_best.pth is written again from it (the kill may have come before it was).
    """
    record = checkpoint.get("log_record")
    if record is None:  # a checkpoint written before checkpoints carried their log record
        return
    log_path = os.path.join(args.output_dir, LOG_NAME)
    earlier = [line for previous, line in utils.read_jsonl_lines(log_path) if previous.get("epoch", -1) < record["epoch"]]
    utils.write_text_atomic(log_path, "".join(line + "\n" for line in [*earlier, json.dumps(record)]))
    best = checkpoint.get("best")
    if best is not None and best["epoch"] == checkpoint["epoch"]:
        utils.save_atomic(model_file(checkpoint), os.path.join(args.output_dir, BEST_NAME))


def write_evaluation_files(args, dataset, evaluator, metrics):
    """detections.json (COCO results format) and, when evaluated, metrics.json, both written atomically."""
    detections_path = os.path.join(args.output_dir, DETECTIONS_NAME)
    utils.write_text_atomic(detections_path, json.dumps(evaluator.coco_results()))
    print(f"wrote {detections_path}")
    if metrics is None:
        return
    evaluated = {
        "checkpoint" if args.resume else "weights": args.resume or args.weights,
        "annotation_file": coco_utils.get_annotation_file(dataset),
        "images": len(dataset),
        "model": args.model,
        "args": checkpoint_args(args),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    metrics_path = os.path.join(args.output_dir, METRICS_NAME)
    utils.write_text_atomic(metrics_path, json.dumps({**metrics, "evaluated": evaluated}, indent=1) + "\n")
    print(f"wrote {metrics_path}")


def start_or_resume_training(args, model, scaler, resume_checkpoint):
    """(optimizer, lr scheduler, best evaluation so far): fresh, or as the checkpoint left them, in which case
    the run folder's log is also brought back to the checkpoint's epoch."""
    optimizer = engine.build_optimizer(model, args.opt, args.lr, args.momentum, args.weight_decay,
                                       args.norm_weight_decay)
    lr_scheduler = build_lr_scheduler(optimizer, args)
    if resume_checkpoint is None:
        return optimizer, lr_scheduler, None
    restore_training_state(args, resume_checkpoint, optimizer, lr_scheduler, scaler)
    if args.output_dir and utils.is_main_process():
        reconcile_outputs(args, resume_checkpoint)
    return optimizer, lr_scheduler, resume_checkpoint.get("best")


def check_epochs_left(args):
    """Training starts below --epochs, whether the start comes from --start-epoch or from --resume."""
    if args.start_epoch < args.epochs:
        return
    if args.resume:
        raise ConfigError(f"--resume {args.resume} already finished epoch {args.start_epoch - 1}; "
                          f"--epochs {args.epochs} must be above {args.start_epoch} to train more")
    raise ConfigError(f"--start-epoch {args.start_epoch} must be below --epochs {args.epochs}")


def restore_training_state(args, checkpoint, optimizer, lr_scheduler, scaler):
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:  # e.g. another number of parameter groups than this run's flags give
        raise ConfigError(f"--resume {args.resume}: its optimizer state does not fit this run's optimizer "
                          f"({one_line(error)})") from None
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint.get("rng_states") or []
    if len(rng_states) == utils.get_world_size():
        utils.set_rng_state(rng_states[utils.get_rank()])
    else:
        print(f"warning: {args.resume} holds RNG states for {len(rng_states)} processes, not "
              f"{utils.get_world_size()}: the resumed run will not repeat the original exactly", file=sys.stderr)


def main(args):
    utils.install_stop_handlers()
    fill_in_implied_flags(args)
    validate_args(args)
    summary_writer_class = utils.tensorboard_writer_class() if args.tensorboard else None
    coco_eval.load_backend(args.coco_backend)  # a missing package fails here, not after the first epoch
    utils.init_distributed_mode(args)
    auto_resume = args.resume == AUTO_RESUME
    args.resume = resolve_resume(args)
    resume_checkpoint = load_resume_checkpoint(args) if args.resume else None
    if resume_checkpoint is not None and not args.test_only:
        args.start_epoch = resume_checkpoint["epoch"] + 1
        if auto_resume and args.start_epoch >= args.epochs:
            # A job requeued after its last epoch was saved: it has done its work, which is not an error.
            print(f"--resume auto: {args.resume} already holds the last epoch ({resume_checkpoint['epoch']}) of "
                  f"--epochs {args.epochs}: nothing left to train")
            utils.finish_distributed()
            return
    if not args.test_only:
        check_epochs_left(args)
    output_lock = take_output_dir(args) if args.output_dir and utils.is_main_process() else None
    device = torch.device(args.device)
    if args.channels_last is None:
        args.channels_last = models.prefers_channels_last(args.model, device, training=not args.test_only)
    args.seed = choose_seed(args, resume_checkpoint)
    print(args)
    set_up_randomness(args, device)

    print("Loading data")
    prepare_data_root(args)
    dataset, dataset_test = get_datasets(args)
    num_classes = coco_utils.get_num_classes(dataset_test)
    categories = coco_utils.get_categories(dataset_test)
    if resume_checkpoint is not None:
        check_resume_categories(args, resume_checkpoint, categories)
    data_loader_test = build_eval_loader(dataset_test, args)

    print("Creating model")
    model = build_model(args, num_classes, coco_utils.get_category_names(dataset_test), device, resume_checkpoint)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    amp_dtype, scaler = amp_setup(args, device)

    if args.test_only:
        evaluate_only(args, model, data_loader_test, device, amp_dtype)
        utils.finish_distributed()
        return

    data_loader, train_sampler = build_train_loader(dataset, args)
    optimizer, lr_scheduler, best = start_or_resume_training(args, model_without_ddp, scaler, resume_checkpoint)
    del resume_checkpoint
    tensorboard = None
    if summary_writer_class is not None and utils.is_main_process():
        # purge_step: a resumed run drops what the killed one logged after its checkpoint.
        tensorboard = summary_writer_class(os.path.join(args.output_dir, TENSORBOARD_DIR),
                                           purge_step=args.start_epoch * len(data_loader))

    print("Start training")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        epoch_start = time.time()
        train_sampler.set_epoch(epoch)
        seed_loader_for_epoch(data_loader, args, epoch)
        with utils.deferred_stop(f"after epoch {epoch}'s training"):  # signals act between steps
            train_stats = engine.train_one_epoch(
                model, optimizer, data_loader, device, epoch, args.print_freq,
                scaler=scaler, amp_dtype=amp_dtype, warmup_iters=args.warmup_iters, tensorboard=tensorboard,
            )
            lr_scheduler.step()
        metrics = None
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:
            metrics = engine.evaluate(model, data_loader_test, device, coco_backend=args.coco_backend,
                                      amp_dtype=amp_dtype)
        # Captured after evaluation so a resumed run starts the next epoch from exactly this state.
        rng_states = utils.all_gather(utils.get_rng_state())
        if args.output_dir and utils.is_main_process():
            record = {"epoch": epoch, "lr": train_stats["lr"], "time_s": round(time.time() - epoch_start, 3),
                      "iterations": (epoch + 1) * len(data_loader), "seed": args.seed,
                      "train": {k: v for k, v in train_stats.items() if k != "lr"}, **(metrics or {})}
            checkpoint = training_checkpoint(args, epoch, model_without_ddp, optimizer, lr_scheduler, scaler,
                                             categories, rng_states)
            with utils.deferred_stop(f"after saving epoch {epoch}"):  # a signal lets the save and log finish
                best = end_epoch(args, checkpoint, record, metrics, best, tensorboard)
    if tensorboard is not None:
        tensorboard.close()

    utils.finish_distributed()
    total_time = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"Training time {total_time}")
    del output_lock  # held until here: the whole run


def set_up_randomness(args, device):
    """Seeds every generator (each rank its own stream) and picks deterministic or fastest kernels."""
    utils.seed_everything(args.seed + utils.get_rank())
    if args.use_deterministic_algorithms:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # SSD inputs have one fixed size


def evaluate_only(args, model, data_loader_test, device, amp_dtype):
    """--test-only: detections of the whole validation set, their evaluation (unless --format-only) and, on rank
    0, detections.json and metrics.json in --output-dir."""
    torch.backends.cudnn.deterministic = True
    evaluator = engine.detect(model, data_loader_test, device, coco_backend=args.coco_backend, amp_dtype=amp_dtype)
    metrics = None if args.format_only else engine.evaluate_detections(evaluator)
    if args.output_dir and utils.is_main_process():
        write_evaluation_files(args, data_loader_test.dataset, evaluator, metrics)


def draw_curves(output_dir):
    """Redraw curves.png; a picture is a convenience, so a log it cannot draw (an old or odd log.jsonl) warns in
    one line and training goes on."""
    log_path = os.path.join(output_dir, LOG_NAME)
    try:
        plot_curves(log_path, os.path.join(output_dir, "curves.png"))
    except Exception as error:  # noqa: BLE001 - whatever the drawing fails on, the run must continue
        print(f"warning: curves.png not drawn from {log_path}: {one_line(error)}", file=sys.stderr)


def report_stop(stop, args):
    """The one line a stopped run ends with, saying how to continue it."""
    checkpoint = os.path.join(args.output_dir, CHECKPOINT_NAME) if args.output_dir else ""
    hint = f"; continue with --resume {checkpoint}" if checkpoint and os.path.isfile(checkpoint) else ""
    print(f"train.py: {stop}{hint}", file=sys.stderr)


def one_line(error):
    """The message of a user-facing error, without the traceback a DataLoader worker wraps around it."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
        last = last.removeprefix(prefix)
    return last


USER_ERRORS = (ConfigError, coco_utils.DatasetError, models.WeightsError, models.CompileError,
               engine.NonFiniteLossError, utils.DistributedSetupError, utils.UserInputError,
               utils.OptionalDependencyError)

if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except utils.StopRequested as stop:
        report_stop(stop, args)
        sys.exit(stop.exit_code)
    except USER_ERRORS as error:
        sys.exit(f"error: {one_line(error)}")
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sys.exit(f"error: {error} (the previous checkpoint was left intact)")

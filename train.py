r"""Train and evaluate SSD300 VGG16 / SSDlite320 MobileNetV3-Large on COCO-format data.

The flags follow torchvision's detection references. The published recipes, on 8 GPUs:

    torchrun --nproc_per_node=8 train.py --dataset coco --model ssd300_vgg16 --epochs 120 \
        --lr-steps 80 110 --aspect-ratio-group-factor 3 --lr 0.002 --batch-size 4 \
        --weight-decay 0.0005 --data-augmentation ssd --weights-backbone VGG16_Weights.IMAGENET1K_FEATURES

    torchrun --nproc_per_node=8 train.py --dataset coco --model ssdlite320_mobilenet_v3_large --epochs 660 \
        --aspect-ratio-group-factor 3 --lr-scheduler cosineannealinglr --lr 0.15 --batch-size 24 \
        --weight-decay 0.00004 --data-augmentation ssdlite

--batch-size is per process; scale --lr linearly with the total batch size when changing the GPU count.

Reading order: the flags and their checks, the datasets and loaders, the model, then main(), which holds the training
loop. What the output folder holds and how it survives kills and resumes is run_folder.py's, one call per step here.
"""
import argparse
import contextlib
import datetime
import os
import secrets
import signal
import sys
import time


def _stop_while_starting(signum, frame):
    # Nothing is written yet, so the process may leave at once. Raising an exception instead would strike whatever
    # bytecode runs (the middle of an import, which may swallow it and go on half set up).
    os.write(2, f"train.py: stopped by {signal.Signals(signum).name} while starting\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":
    # Ctrl-C or SIGTERM during the imports and the start-up end in one line; main() records signals from the first
    # write of the run on (utils.record_stop_signals).
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _stop_while_starting)

import torch
import torch.utils.data

import cli
import coco_eval
import coco_utils
import detection_datasets
import engine
import models
import presets
import run_folder
import shapes
import utils
from cli import ConfigError
from group_by_aspect_ratio import GroupedBatchSampler, create_aspect_ratio_groups

# Training images per process below which a model cannot train: SSDlite's last extra block applies BatchNorm to
# 1x1 feature maps, and BatchNorm needs more than one value per channel in training mode.
MIN_TRAIN_BATCH_SIZE = {"ssdlite320_mobilenet_v3_large": 2}
DEFAULT_DATA_PATHS = {"coco": "data/coco", "shapes": "data/shapes", "voc": "data/VOCdevkit"}
DEFAULT_LR_STEPS = [16, 22]
# Bounds far beyond use that stop a typo before the run starts (see cli.whole_number); the published recipes
# train for at most 660 epochs.
MAX_EPOCHS = 100_000
MAX_ITERATIONS = 10**9  # --warmup-iters, --print-freq
MAX_LR = 10.0  # over sixty times the largest published recipe's (0.15, SSDlite at 8 x 24 images)
MAX_ASPECT_RATIO_BINS = 100


def get_args_parser(add_help=True):
    parser = cli.OneLineParser(description="SSD detection training", add_help=add_help)

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
    image_count = cli.whole_number(1, shapes.MAX_IMAGES)
    data.add_argument("--shapes-num-train", default=1000, type=image_count, help="training images of the shapes dataset")
    data.add_argument("--shapes-num-val", default=200, type=image_count, help="validation images of the shapes dataset")
    data.add_argument("-j", "--workers", default=4, type=cli.whole_number(0, cli.MAX_PROCESSES),
                      help="data loading workers per process (0: load in the training process)")
    data.add_argument("--aspect-ratio-group-factor", default=3, type=cli.whole_number(-1, MAX_ASPECT_RATIO_BINS),
                      help="batch images of similar aspect ratio (k bins per side; 0: two groups, portrait and "
                           "landscape); -1 disables")
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
    model.add_argument("--trainable-backbone-layers", default=None,
                       type=cli.whole_number(0, max(models.TRAINABLE_LAYERS.values())),
                       help="backbone stages to train, counted from the last, with pretrained weights: SSD300 has "
                            f"{models.TRAINABLE_LAYERS['ssd300_vgg16']}, SSDlite "
                            f"{models.TRAINABLE_LAYERS['ssdlite320_mobilenet_v3_large']} (default: torchvision's, "
                            "4 and 6; without pretrained weights everything trains)")
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
    optim.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=cli.device_name)
    optim.add_argument("-b", "--batch-size", default=2, type=cli.whole_number(1, cli.MAX_BATCH_SIZE),
                       help="images per process")
    optim.add_argument("--epochs", default=26, type=cli.whole_number(1, MAX_EPOCHS), metavar="N")
    optim.add_argument("--opt", default="sgd", type=str.lower, choices=engine.OPTIMIZERS)
    optim.add_argument("--lr", default=0.02, type=cli.real_number(0.0, MAX_LR, above_minimum=True))
    # Momentum of 1 or more never forgets a gradient, so the steps grow without bound; weight decay is far below 1
    # in every recipe (1e-4 to 0.05).
    below_one = cli.real_number(0.0, 1.0, below_maximum=True)
    optim.add_argument("--momentum", default=0.9, type=below_one, metavar="M")
    optim.add_argument("--wd", "--weight-decay", default=1e-4, type=below_one, metavar="W", dest="weight_decay")
    optim.add_argument("--norm-weight-decay", default=None, type=below_one,
                       help="weight decay for normalisation layers (default: same as --weight-decay)")
    optim.add_argument("--lr-scheduler", default="multisteplr", type=str.lower,
                       choices=["multisteplr", "cosineannealinglr"])
    optim.add_argument("--lr-steps", default=None, nargs="+", type=cli.whole_number(1, MAX_EPOCHS),
                       help="MultiStepLR milestones: the epochs, below --epochs and increasing, from which the lr is "
                            f"multiplied by --lr-gamma (default: {' '.join(map(str, DEFAULT_LR_STEPS))}, "
                            "torchvision's)")
    optim.add_argument("--lr-gamma", default=0.1, type=cli.real_number(0.0, 1.0, above_minimum=True),
                       help="MultiStepLR factor, above 0 and at most 1")
    optim.add_argument("--warmup-iters", default=1000, type=cli.whole_number(0, MAX_ITERATIONS),
                       help="linear warm-up iterations in the first epoch (torchvision: 1000)")
    optim.add_argument("--amp", action="store_true",
                       help="mixed precision: float16 + GradScaler on CUDA, bfloat16 on CPU (emulated, so slower, "
                            "without AVX512-BF16 or AMX; how bfloat16 learns against float32: docs/bfloat16.md)")
    optim.add_argument("--seed", default=None, type=cli.seed,
                       help=f"seed every random generator, from 0 to {cli.SEED_LIMIT - 1} (default: a fresh seed, "
                            "printed and stored in the checkpoints, so a run can be repeated with --seed)")
    optim.add_argument("--use-deterministic-algorithms", action="store_true")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="output",
                     help="checkpoints, log.jsonl, and with --test-only detections.json and metrics.json "
                          "('' writes nothing)")
    run.add_argument("--resume", default="",
                     help="checkpoint to resume from (e.g. OUTPUT_DIR/checkpoint.pth), or 'auto': "
                          "OUTPUT_DIR/checkpoint.pth when it exists, else start fresh (a requeued job reruns "
                          "its own command)")
    run.add_argument("--start-epoch", "--start_epoch", default=0, type=cli.whole_number(0, MAX_EPOCHS),
                     dest="start_epoch")
    run.add_argument("--print-freq", default=20, type=cli.whole_number(1, MAX_ITERATIONS))
    run.add_argument("--test-only", action="store_true",
                     help="only evaluate (--weights or --resume); writes OUTPUT_DIR/detections.json and metrics.json")
    run.add_argument("--format-only", action="store_true",
                     help="only write OUTPUT_DIR/detections.json, without evaluating (implies --test-only; for "
                          "an image-info file without annotations, such as COCO test-dev's)")
    run.add_argument("--keep-checkpoints", default=None, type=cli.whole_number(1, MAX_EPOCHS), metavar="K",
                     help="keep only the K newest model_{epoch}.pth (default: all); model_best.pth and "
                          "checkpoint.pth always stay")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log losses, lr and AP to OUTPUT_DIR/tensorboard (needs: pip install tensorboard)")
    run.add_argument("--eval-freq", default=1, type=cli.whole_number(1, MAX_EPOCHS),
                     help="evaluate every N epochs and after the last")
    run.add_argument("--eval-batch-size", default=8, type=cli.whole_number(1, cli.MAX_BATCH_SIZE),
                     help="images per process during evaluation")
    run.add_argument("--coco-backend", default="pycocotools", choices=coco_eval.BACKENDS)
    run.add_argument("--world-size", default=1, type=cli.whole_number(1, cli.MAX_PROCESSES),
                     help="number of processes (set by torchrun)")
    run.add_argument("--dist-url", default="env://", type=cli.dist_url,
                     help="how the processes find each other: env:// (torchrun's), tcp://HOST:PORT or "
                          "file:///PATH")
    return parser


def validate_args(args):
    """Reject flag combinations that cannot work, before anything is loaded or written (each flag's own range is
    checked by its argparse type). Runs before fill_in_implied_flags, so that defaults are told from given values."""
    if args.default_boxes is not None and args.model != "ssd512_vgg16":
        raise ConfigError(f"--default-boxes is an option of --model ssd512_vgg16, not of --model {args.model}")
    min_batch_size = MIN_TRAIN_BATCH_SIZE.get(args.model, 1)
    if not (args.test_only or args.format_only) and args.batch_size < min_batch_size:
        raise ConfigError(f"--model {args.model} cannot train with --batch-size {args.batch_size}: its BatchNorm "
                          f"over 1x1 feature maps needs at least {min_batch_size} images per process")
    check_lr_steps(args)
    trainable_layers = models.TRAINABLE_LAYERS[args.model]
    if args.trainable_backbone_layers is not None and args.trainable_backbone_layers > trainable_layers:
        raise ConfigError(f"--trainable-backbone-layers {args.trainable_backbone_layers}: --model {args.model} has "
                          f"{trainable_layers} backbone stages")
    if args.backend == "tv_tensor" and not args.use_v2:
        raise ConfigError("--backend tv_tensor needs --use-v2")
    if args.resume and args.resume != run_folder.AUTO_RESUME and args.weights:
        raise ConfigError("--resume already restores the model; drop --weights")
    for flag, needs_output in (("--resume auto", args.resume == run_folder.AUTO_RESUME),
                               ("--format-only", args.format_only),
                               ("--tensorboard", args.tensorboard)):
        if needs_output and not args.output_dir:
            raise ConfigError(f"{flag} needs an --output-dir")
    if args.amp and args.device.startswith("cpu") and not utils.cpu_has_bfloat16_instructions():
        print("warning: --amp on CPU uses bfloat16 autocast, which this CPU emulates (no AVX512-BF16 or AMX): "
              "several times slower than float32", file=sys.stderr)
    detection_datasets.validate_voc_args(args)


def check_lr_steps(args):
    """Given --lr-steps must be increasing and below --epochs: a milestone never reached would leave the lr
    undecayed without a word. (The default, torchvision's, is not checked: short runs keep it unreached.)"""
    if args.lr_steps is None or args.lr_scheduler != "multisteplr":
        return
    steps = " ".join(map(str, args.lr_steps))
    if args.lr_steps != sorted(args.lr_steps):
        raise ConfigError(f"--lr-steps {steps}: give the epochs in increasing order")
    if args.lr_steps[-1] >= args.epochs:
        raise ConfigError(f"--lr-steps {steps}: epoch {args.lr_steps[-1]} is never reached with --epochs "
                          f"{args.epochs} (epochs are numbered from 0); give steps below {args.epochs}")


def fill_in_implied_flags(args):
    """Flags whose value follows from others: --format-only is a --test-only, --data-path defaults by dataset, and
    --lr-steps by default are torchvision's."""
    args.test_only = args.test_only or args.format_only
    if args.data_path is None:
        args.data_path = DEFAULT_DATA_PATHS[args.dataset]
    if args.lr_steps is None:
        args.lr_steps = list(DEFAULT_LR_STEPS)


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
        batch_sampler = GroupedBatchSampler(sampler, group_ids, args.batch_size,
                                            min_batch_size=MIN_TRAIN_BATCH_SIZE.get(args.model, 1))
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


def read_weights_record(args):
    """What --weights record (model name, categories, builder options), read once and only where used: evaluation
    maps labels through their categories, SSD512 keeps their default boxes. None without --weights."""
    if args.weights and (args.test_only or args.model == "ssd512_vgg16"):
        return models.read_weights_record(args.weights)
    return None


def take_default_boxes_of_the_weights(args, weights_record):
    """Without --default-boxes, SSD512 --weights keep the default boxes they were trained with (they are not in the
    state_dict: other boxes would give other detections, silently). Evaluating them with others is refused."""
    if weights_record is None or args.model != "ssd512_vgg16":
        return
    recorded = weights_record[2].get("default_boxes")
    if recorded is None or args.default_boxes == recorded:
        return
    if args.default_boxes is None:
        print(f"--default-boxes {recorded}: those --weights {args.weights} were trained with")
        args.default_boxes = recorded
    elif args.test_only:
        raise ConfigError(f"--weights {args.weights} were trained with --default-boxes {recorded}: evaluating them "
                          f"with --default-boxes {args.default_boxes} would score other boxes than they predict")


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


def start_or_resume_training(args, model, scaler, resume_checkpoint):
    """(optimizer, lr scheduler, best evaluation so far): fresh, or as the checkpoint left them, in which case
    the run folder is also brought into agreement with the checkpoint (run_folder.reconcile_outputs)."""
    optimizer = engine.build_optimizer(model, args.opt, args.lr, args.momentum, args.weight_decay,
                                       args.norm_weight_decay)
    lr_scheduler = build_lr_scheduler(optimizer, args)
    if resume_checkpoint is None:
        return optimizer, lr_scheduler, None
    run_folder.restore_training_state(args, resume_checkpoint, optimizer, lr_scheduler, scaler)
    if args.output_dir and utils.is_main_process():
        run_folder.reconcile_outputs(args, resume_checkpoint)
    return optimizer, lr_scheduler, resume_checkpoint.get("best")


def main(args):
    # Whatever ends the run (its end, --test-only, an error, a signal), the output folder's lock file is closed
    # here, not left to the garbage collector (a ResourceWarning under python -W error).
    with contextlib.ExitStack() as held_for_the_run:
        train_or_evaluate(args, held_for_the_run)


def train_or_evaluate(args, held_for_the_run):
    validate_args(args)
    fill_in_implied_flags(args)
    summary_writer_class = utils.tensorboard_writer_class() if args.tensorboard else None
    coco_eval.load_backend(args.coco_backend)  # a missing package fails here, not after the first epoch
    utils.init_distributed_mode(args)
    resume_checkpoint, finished = run_folder.read_resume_checkpoint(args)
    holds_folder = bool(args.output_dir) and utils.is_main_process()
    if holds_folder:
        held_for_the_run.enter_context(run_folder.take_output_dir(args, resume_checkpoint))
    if finished:  # a requeued job whose epochs are all saved: only heal what a kill during the last save left
        utils.record_stop_signals()  # the run is finished once healed: a signal meanwhile changes nothing
        if holds_folder:
            run_folder.reconcile_outputs(args, resume_checkpoint)
            if summary_writer_class is not None:
                run_folder.reconcile_tensorboard(args, resume_checkpoint, summary_writer_class)
        utils.finish_distributed()
        return
    device = torch.device(args.device)
    if args.channels_last is None:
        args.channels_last = models.prefers_channels_last(args.model, device, training=not args.test_only)
    args.seed = choose_seed(args, resume_checkpoint)
    weights_record = read_weights_record(args)
    take_default_boxes_of_the_weights(args, weights_record)
    print(args)
    set_up_randomness(args, device)

    print("Loading data")
    detection_datasets.prepare_data_root(args)
    dataset, dataset_test = detection_datasets.get_datasets(args)
    categories = coco_utils.get_categories(dataset_test)
    num_classes = coco_utils.get_num_classes(dataset_test)
    if args.test_only:
        categories, num_classes = evaluated_categories(args, resume_checkpoint, weights_record, categories)
        writes = args.output_dir and utils.is_main_process()
        weights_identity = run_folder.evaluated_weights(args, resume_checkpoint) if writes else None
    elif resume_checkpoint is not None:
        run_folder.check_resume_categories(args, resume_checkpoint, categories)
    data_loader_test = build_eval_loader(dataset_test, args)

    print("Creating model")
    model = build_model(args, num_classes, models.class_names(categories), device, resume_checkpoint)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    amp_dtype, scaler = amp_setup(args, device)

    utils.record_stop_signals()  # from here on the run writes files: no write may be cut short
    if args.test_only:
        evaluate_only(args, model, data_loader_test, device, amp_dtype, categories, weights_identity)
        utils.finish_distributed()
        return

    data_loader, train_sampler = build_train_loader(dataset, args)
    optimizer, lr_scheduler, best = start_or_resume_training(args, model_without_ddp, scaler, resume_checkpoint)
    tensorboard = None
    if summary_writer_class is not None and utils.is_main_process():
        tensorboard = run_folder.open_tensorboard(args, summary_writer_class, resume_checkpoint,
                                                  purge_step=args.start_epoch * len(data_loader))
    del resume_checkpoint

    print("Start training")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        epoch_start = time.time()
        train_sampler.set_epoch(epoch)
        seed_loader_for_epoch(data_loader, args, epoch)
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
            record = run_folder.log_record(args, epoch, train_stats, metrics, time.time() - epoch_start,
                                           iterations=(epoch + 1) * len(data_loader))
            checkpoint = run_folder.training_checkpoint(args, epoch, model_without_ddp, optimizer, lr_scheduler,
                                                        scaler, categories, rng_states)
            best = run_folder.end_epoch(args, checkpoint, record, metrics, best, tensorboard)
        stop_after_saving(args, epoch, device)
    if tensorboard is not None:
        tensorboard.close()

    utils.finish_distributed()
    total_time = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"Training time {total_time}")


def stop_after_saving(args, epoch, device):
    """Act on a stop signal that came during epoch's evaluation or saves, all ranks together: after an earlier epoch
    StopRequested says how to continue; after the last one the run is simply finished."""
    stop_signal = utils.stop_signal_of_any_rank(device)
    if not stop_signal:
        return
    if epoch + 1 < args.epochs:
        raise utils.StopRequested(stop_signal, f"after saving epoch {epoch}")
    print(f"{signal.Signals(stop_signal).name} came while the last epoch was saved: the run is finished")


def set_up_randomness(args, device):
    """Seeds every generator (each rank its own stream) and picks deterministic or fastest kernels."""
    utils.seed_everything(cli.rank_seed(args.seed, utils.get_rank()))
    if args.use_deterministic_algorithms:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # SSD inputs have one fixed size


def evaluated_categories(args, resume_checkpoint, weights_record, data_categories):
    """--test-only: (category table, number of classes) of the evaluated weights (--resume or --weights, whose
    read_weights_record is weights_record), whose labels mean what they were trained for, matched with the data's
    (coco_utils.categories_for_evaluation)."""
    if resume_checkpoint is not None:
        recorded, source = resume_checkpoint.get("categories") or {}, f"--resume {args.resume}"
    else:
        recorded, source = weights_record[1], f"--weights {args.weights}"
    table, note = coco_utils.categories_for_evaluation(recorded, data_categories, source)
    if note:
        print(note)
    # Every recorded label has its rows in the classifier, also those left out of the table.
    return table, max(map(int, recorded or table)) + 1


def evaluate_only(args, model, data_loader_test, device, amp_dtype, categories, weights_identity):
    """--test-only: detections of the whole validation set, their evaluation (unless --format-only) and, on rank
    0, detections.json and metrics.json in --output-dir. categories: the evaluated model's table, which maps its
    labels to the data's category ids; weights_identity: what metrics.json names as evaluated."""
    torch.backends.cudnn.deterministic = True
    evaluator = engine.detect(model, data_loader_test, device, coco_backend=args.coco_backend, amp_dtype=amp_dtype,
                              categories=categories)
    metrics = None if args.format_only else engine.evaluate_detections(evaluator)
    if args.output_dir and utils.is_main_process():
        run_folder.write_evaluation_files(args, data_loader_test.dataset, evaluator, metrics, weights_identity)


USER_ERRORS = (ConfigError, coco_utils.DatasetError, models.WeightsError, models.CompileError,
               engine.NonFiniteLossError, utils.DistributedSetupError, cli.UserInputError,
               utils.OptionalDependencyError)

if __name__ == "__main__":
    cli.survive_closed_output()  # a closed terminal or `| head` must not stop training: the files are the record
    args = get_args_parser().parse_args()
    try:
        main(args)
    except utils.StopRequested as stop:
        run_folder.report_stop(stop, args)
        sys.exit(stop.exit_code)
    except USER_ERRORS as error:
        sys.exit(f"error: {cli.one_line(error)}")
    except OSError as error:
        sys.exit(f"error: {run_folder.describe_io_error(error, args)}")
    except RuntimeError as error:  # DistBackendError included
        lost_peer = utils.describe_lost_peer(error)
        if lost_peer is None:
            raise
        sys.exit(f"error: {lost_peer}; {run_folder.what_is_intact(args)}")

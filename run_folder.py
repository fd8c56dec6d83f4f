"""The run folder (--output-dir) of train.py: what each file holds, the order an epoch writes them, and every rule
that keeps the folder consistent across kills and resumes.

Files (rank 0 writes them all, each crash-safe through safe_io):

- checkpoint.pth: everything --resume needs (model, optimizer, lr scheduler, AMP scaler, epoch, flags, categories,
  the RNG states of every rank), plus the epoch's log record and the best evaluation so far;
- model_{epoch}.pth and model_best.pth: the weights with the epoch, flags and categories (model_file);
- log.jsonl: one record per epoch; curves.png drawn from it; tensorboard/ when asked for;
- detections.json and metrics.json: the result files of --test-only (write_evaluation_files).

An epoch writes checkpoint.pth first, then model_{epoch}.pth, model_best.pth, the log line, then prunes older
model_{epoch}.pth (end_epoch); a resume brings the other files back into agreement with the checkpoint
(reconcile_outputs). This module also holds the output-folder check and lock (take_output_dir) and the resolution
and checks of --resume. The training loop itself is train.py's; low-level file safety is safe_io.py's.
"""
import datetime
import json
import os
import re
import sys

import cli
import coco_utils
import models
import safe_io
import utils
from cli import ConfigError
from plot_curves import plot_curves


CHECKPOINT_NAME = "checkpoint.pth"
BEST_NAME = "model_best.pth"
LOG_NAME = "log.jsonl"
DETECTIONS_NAME = "detections.json"
METRICS_NAME = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
EPOCH_MODEL = re.compile(r"model_(\d+)\.pth")
AUTO_RESUME = "auto"
# The files a run writes into --output-dir: a folder holding any of them belongs to a run. The checkpoints and the
# log among them are also what no single-file writer may replace (safe_io.TRAINING_RUN_FILE).
RUN_FILE_PATTERN = re.compile(rf"{safe_io.TRAINING_RUN_FILE.pattern}|curves\.png|detections\.json|metrics\.json")


def check_output_dir(args):
    """Refuse a folder holding another run's files: training writes there only to continue the run it holds
    (--resume of a checkpoint in that folder). --test-only writes its own result files next to a checkpoint."""
    run_files = sorted(name for name in os.listdir(args.output_dir) if RUN_FILE_PATTERN.fullmatch(name))
    resuming_this_run = bool(args.resume) and safe_io.same_file(os.path.dirname(os.path.abspath(args.resume)),
                                                                args.output_dir)
    if args.test_only:
        check_no_earlier_evaluation(args, run_files)
        return
    if not run_files or resuming_this_run:
        return
    existing = os.path.join(args.output_dir, CHECKPOINT_NAME)
    if not args.resume and CHECKPOINT_NAME in run_files:
        raise ConfigError(f"{existing} already exists: continue that run with --resume {existing}, "
                          "or choose another --output-dir")
    shown = ", ".join(run_files[:4]) + (", ..." if len(run_files) > 4 else "")
    resuming = f" (--resume {args.resume} is another run's checkpoint)" if args.resume else ""
    raise ConfigError(f"--output-dir {args.output_dir} holds another run's files ({shown}){resuming}: "
                      "choose an empty or new --output-dir")


def check_no_earlier_evaluation(args, run_files):
    """An evaluation folder never holds the files of two evaluations: --test-only and --format-only refuse a
    folder that already holds detections.json or metrics.json, which they would replace (one of them, with
    --format-only) without having written them."""
    earlier = [name for name in (DETECTIONS_NAME, METRICS_NAME) if name in run_files]
    if earlier:
        raise ConfigError(f"--output-dir {args.output_dir} already holds an evaluation's {' and '.join(earlier)}: "
                          "choose an empty or new --output-dir (or move those files away)")


def take_output_dir(args):
    """Create --output-dir, lock it for this process's life and check it may be written; rank 0 only (the only
    writer). Returns the lock, which must stay referenced until the end."""
    safe_io.prepare_output_dir(args.output_dir)
    check_output_dir(args)  # first without the lock: a refused folder is left exactly as it was
    lock = safe_io.lock_output_dir(args.output_dir)
    check_output_dir(args)  # again under the lock, which another run may have just released
    stale = safe_io.remove_stale_temp_files(args.output_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) an interrupted write left in {args.output_dir}: "
              f"{', '.join(stale)}")
    return lock


def read_resume_checkpoint(args):
    """(checkpoint or None, finished): resolves --resume (auto included), reads the checkpoint and, for training,
    continues at the epoch after it (args.start_epoch). finished: --resume auto found a run whose last epoch is
    already saved, a requeued job that has done its work, which is not an error."""
    auto_resume = args.resume == AUTO_RESUME
    args.resume = resolve_resume(args)
    checkpoint = load_resume_checkpoint(args) if args.resume else None
    if args.test_only:
        check_something_to_evaluate(args, auto_resume)
        return checkpoint, False
    if checkpoint is not None:
        args.start_epoch = checkpoint["epoch"] + 1
        if auto_resume and args.start_epoch >= args.epochs:
            print(f"--resume auto: {args.resume} already holds the last epoch ({checkpoint['epoch']}) of "
                  f"--epochs {args.epochs}: nothing left to train")
            return checkpoint, True
    check_epochs_left(args)
    return checkpoint, False


def check_something_to_evaluate(args, auto_resume):
    """--test-only evaluates given weights: a model of random weights would write a metrics.json that looks like
    any other, so evaluating without --weights or --resume, or after --resume auto found nothing, is refused."""
    if args.resume or args.weights:
        return
    if auto_resume:
        raise ConfigError(f"--test-only --resume auto: no {os.path.join(args.output_dir, CHECKPOINT_NAME)} to "
                          "evaluate; give the checkpoint (--resume FILE) or the weights (--weights)")
    raise ConfigError("--test-only needs the model to evaluate: --weights (a file or a torchvision weights name) "
                      "or --resume CHECKPOINT")


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
        if not args.test_only:
            print(f"--resume auto: no {candidate}, starting fresh")
        return ""
    print(f"--resume auto: continuing from {candidate}")
    if args.weights:
        print(f"--resume auto: --weights {args.weights} is not used, the checkpoint restores the model")
        args.weights = None
    return candidate


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


def check_epochs_left(args):
    """Training starts below --epochs, whether the start comes from --start-epoch or from --resume."""
    if args.start_epoch < args.epochs:
        return
    if args.resume:
        raise ConfigError(f"--resume {args.resume} already finished epoch {args.start_epoch - 1}; "
                          f"--epochs {args.epochs} must be above {args.start_epoch} to train more")
    raise ConfigError(f"--start-epoch {args.start_epoch} must be below --epochs {args.epochs}")


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


def restore_training_state(args, checkpoint, optimizer, lr_scheduler, scaler):
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:  # e.g. another number of parameter groups than this run's flags give
        raise ConfigError(f"--resume {args.resume}: its optimizer state does not fit this run's optimizer "
                          f"({cli.one_line(error)})") from None
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint.get("rng_states") or []
    if len(rng_states) == utils.get_world_size():
        utils.set_rng_state(rng_states[utils.get_rank()])
    else:
        print(f"warning: {args.resume} holds RNG states for {len(rng_states)} processes, not "
              f"{utils.get_world_size()}: the resumed run will not repeat the original exactly", file=sys.stderr)


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
    earlier = [line for previous, line in safe_io.read_jsonl_lines(log_path) if previous.get("epoch", -1) < record["epoch"]]
    safe_io.write_text_atomic(log_path, "".join(line + "\n" for line in [*earlier, json.dumps(record)]))
    best = checkpoint.get("best")
    if best is not None and best["epoch"] == checkpoint["epoch"]:
        safe_io.save_atomic(model_file(checkpoint), os.path.join(args.output_dir, BEST_NAME))


def checkpoint_args(args):
    """The run's flags as plain data (checkpoints must load with weights_only=True)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


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


def log_record(args, epoch, train_stats, metrics, seconds, iterations):
    """The epoch's log.jsonl line: lr, mean training losses, time, iterations so far, seed and any evaluation."""
    return {"epoch": epoch, "lr": train_stats["lr"], "time_s": round(seconds, 3), "iterations": iterations,
            "seed": args.seed, "train": {k: v for k, v in train_stats.items() if k != "lr"}, **(metrics or {})}


def model_file(checkpoint):
    """What model_{epoch}.pth and model_best.pth hold: the weights with the epoch, flags and categories."""
    return {key: checkpoint[key] for key in ("model", "epoch", "args", "categories")}


def primary_metric(metrics):
    """(name, value) of the metric model_best.pth follows: VOC's 11-point mAP when evaluated, else COCO AP."""
    if "voc" in metrics:
        return "voc.mAP_11pt", metrics["voc"]["mAP_11pt"]
    return "coco.AP", metrics["coco"]["AP"]


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

    safe_io.save_atomic({**checkpoint, "log_record": record, "best": best},
                        os.path.join(args.output_dir, CHECKPOINT_NAME))
    safe_io.save_atomic(model_file(checkpoint), os.path.join(args.output_dir, f"model_{epoch}.pth"))
    if improved:
        safe_io.save_atomic(model_file(checkpoint), os.path.join(args.output_dir, BEST_NAME))
        print(f"{BEST_NAME}: epoch {epoch}, best {best['metric']} so far ({best['value']:.4f})")
    safe_io.append_jsonl(os.path.join(args.output_dir, LOG_NAME), record)
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


def draw_curves(output_dir):
    """Redraw curves.png; a picture is a convenience, so a log it cannot draw (an old or odd log.jsonl) warns in
    one line and training goes on."""
    log_path = os.path.join(output_dir, LOG_NAME)
    try:
        plot_curves(log_path, os.path.join(output_dir, "curves.png"))
    except Exception as error:  # noqa: BLE001 - whatever the drawing fails on, the run must continue
        print(f"warning: curves.png not drawn from {log_path}: {cli.one_line(error)}", file=sys.stderr)


def evaluated_weights(args, checkpoint):
    """What metrics.json names as evaluated, by content as well as by path, read before the evaluation starts: the
    file's SHA-256 (a run folder's checkpoint.pth is replaced every epoch of a resumed run) and, for --resume, the
    checkpoint's epoch. A torchvision weights name is its own identity (torchvision checks the file's hash)."""
    path = args.resume or args.weights
    key = "checkpoint" if args.resume else "weights"
    if not os.path.isfile(path):
        return {key: path}
    identity = {key: path, "sha256": safe_io.sha256_of_file(path)}
    if checkpoint is not None:
        identity["epoch"] = checkpoint["epoch"]
    return identity


def write_evaluation_files(args, dataset, evaluator, metrics, weights_identity):
    """detections.json (COCO results format) and, when evaluated, metrics.json, both written atomically.
    weights_identity: evaluated_weights' record of what was evaluated."""
    detections_path = os.path.join(args.output_dir, DETECTIONS_NAME)
    safe_io.write_text_atomic(detections_path, json.dumps(evaluator.coco_results()))
    print(f"wrote {detections_path}")
    if metrics is None:
        return
    evaluated = {
        **weights_identity,
        "annotation_file": coco_utils.get_annotation_file(dataset),
        "images": len(dataset),
        "model": args.model,
        "args": checkpoint_args(args),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    metrics_path = os.path.join(args.output_dir, METRICS_NAME)
    safe_io.write_text_atomic(metrics_path, json.dumps({**metrics, "evaluated": evaluated}, indent=1) + "\n")
    print(f"wrote {metrics_path}")


def report_stop(stop, args):
    """The one line a stopped run ends with, saying how to continue it."""
    checkpoint = os.path.join(args.output_dir, CHECKPOINT_NAME) if args.output_dir else ""
    hint = f"; continue with --resume {checkpoint}" if checkpoint and os.path.isfile(checkpoint) else ""
    print(f"train.py: {stop}{hint}", file=sys.stderr)

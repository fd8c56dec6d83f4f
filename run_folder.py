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

import torch

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
# Lines of log.jsonl that are not epoch records (a comment, a damaged line) are moved here on resume, never deleted.
UNREADABLE_LOG_NAME = "log.jsonl.unreadable"
CURVES_NAME = "curves.png"
DETECTIONS_NAME = "detections.json"
METRICS_NAME = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
EPOCH_MODEL = re.compile(r"model_(\d+)\.pth")
AUTO_RESUME = "auto"
# The files a run writes into --output-dir: a folder holding any of them belongs to a run. The checkpoints and the
# log among them are also what no single-file writer may replace (safe_io.TRAINING_RUN_FILE); log.jsonl.unreadable
# holds the log lines a resume could not read (kept aside, not deleted).
RUN_FILE_PATTERN = re.compile(rf"{safe_io.TRAINING_RUN_FILE.pattern}|log\.jsonl\.unreadable|curves\.png|detections\.json|"
                              r"metrics\.json")


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


def take_output_dir(args, resume_checkpoint=None):
    """Create --output-dir, lock it for this process's life, check it may be written and remove what interrupted
    writes left; rank 0 only (the only writer). Training from resume_checkpoint also checks that the folder holds no
    later epochs. Returns the lock, which must stay referenced until the end."""
    safe_io.prepare_output_dir(args.output_dir)
    check_output_dir(args)  # first without the lock: a refused folder is left exactly as it was
    lock = safe_io.lock_output_dir(args.output_dir)
    check_output_dir(args)  # again under the lock, which another run may have just released
    stale = safe_io.remove_stale_temp_files(args.output_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) an interrupted write left in {args.output_dir}: "
              f"{', '.join(stale)}")
    if resume_checkpoint is not None and not args.test_only:
        check_no_later_epochs(args, resume_checkpoint)
    return lock


def check_no_later_epochs(args, checkpoint):
    """Refuse to resume a checkpoint over a folder that holds later epochs (an older checkpoint kept in the run
    folder): training on would overwrite their checkpoint.pth, model_{epoch}.pth and log lines with another
    course of training. Refused rather than moved aside: which course to keep is the user's choice."""
    epoch = checkpoint["epoch"]
    later = [f"model_{n}.pth" for n in sorted(epoch_model_files(args.output_dir)) if n > epoch]
    records, _ = safe_io.read_jsonl_lines(os.path.join(args.output_dir, LOG_NAME), is_epoch_record)
    log_epochs = [record["epoch"] for record, _ in records]
    if log_epochs and max(log_epochs) > epoch:
        later.append(f"{LOG_NAME} up to epoch {max(log_epochs)}")
    folder_checkpoint = os.path.join(args.output_dir, CHECKPOINT_NAME)
    folder_epoch = saved_epoch(folder_checkpoint)
    if not safe_io.same_file(folder_checkpoint, args.resume) and folder_epoch is not None and folder_epoch > epoch:
        later.insert(0, f"{CHECKPOINT_NAME} of epoch {folder_epoch}")
    if later:
        raise ConfigError(f"--resume {args.resume} holds epoch {epoch}, but {args.output_dir} holds later epochs "
                          f"({', '.join(later)}) that training on would overwrite: move them out of the folder, or "
                          "resume into a new --output-dir")


def saved_epoch(path):
    """The epoch a checkpoint or model file holds; None when it is missing or unreadable (memory-mapped: the
    weights are not read)."""
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # noqa: BLE001 - torch.load reports unreadable files with many exception types
        return None
    return epoch if isinstance(epoch, int) else None


def epoch_model_files(output_dir):
    """{epoch: file name} of the model_{epoch}.pth files in output_dir."""
    return {int(match.group(1)): name for name in os.listdir(output_dir) if (match := EPOCH_MODEL.fullmatch(name))}


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
        check_checkpoint_fields(args.resume, checkpoint, ("model", "epoch"))
        return checkpoint
    if "optimizer" not in checkpoint or "lr_scheduler" not in checkpoint:
        raise ConfigError(f"--resume {args.resume} holds the weights only (like model_N.pth), not the optimizer and "
                          f"schedule: resume from the run's {CHECKPOINT_NAME}, or start a new run with --weights")
    check_checkpoint_fields(args.resume, checkpoint, CHECKPOINT_FIELDS)
    check_resume_flags(args, checkpoint["args"])
    return checkpoint


def _is_rng_state(state):
    return (isinstance(state, dict) and isinstance(state.get("torch"), torch.Tensor)
            and isinstance(state.get("cuda"), list) and isinstance(state.get("random"), list)
            and len(state["random"]) == 3 and isinstance(state.get("numpy"), dict)
            and isinstance(state["numpy"].get("keys"), torch.Tensor))


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each field of a training checkpoint must be, as (check, what it must hold); the optional ones are checked when
# present. Checked on resume, before anything is written, so that a damaged or foreign file is refused in one line
# naming the field rather than failing half-way with a traceback.
CHECKPOINT_FIELDS = {
    "model": (lambda v: isinstance(v, dict) and bool(v), "the model's state_dict"),
    "epoch": (lambda v: type(v) is int and v >= 0, "a whole number >= 0"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list)
                  and all(isinstance(group, dict) and isinstance(group.get("params"), list)
                          for group in v["param_groups"]), "an optimizer state with 'state' and 'param_groups'"),
    "lr_scheduler": (lambda v: isinstance(v, dict) and type(v.get("last_epoch")) is int,
                     "a scheduler state with its 'last_epoch'"),
    "args": (lambda v: isinstance(v, dict) and bool(v), "the run's flags"),
    "categories": (lambda v: isinstance(v, dict) and bool(v), "the category table"),
    "rng_states": (lambda v: isinstance(v, list) and bool(v) and all(_is_rng_state(state) for state in v),
                   "the RNG states of every process"),
}
OPTIONAL_CHECKPOINT_FIELDS = {
    "log_record": (lambda v: isinstance(v, dict) and type(v.get("epoch")) is int, "a log record with its 'epoch'"),
    "best": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("metric"), str)
                                     and _is_number(v.get("value")) and type(v.get("epoch")) is int),
             "the best evaluation: 'metric', a number 'value' and its 'epoch'"),
    "scaler": (lambda v: isinstance(v, dict), "the AMP scaler's state"),
}


def check_checkpoint_fields(path, checkpoint, required):
    """Refuse, in one line naming the file and the field, a checkpoint with a missing or ill-typed field."""
    fields = {name: CHECKPOINT_FIELDS[name] for name in required}
    fields.update((name, rule) for name, rule in OPTIONAL_CHECKPOINT_FIELDS.items() if name in checkpoint)
    for name, (is_valid, what) in fields.items():
        if name not in checkpoint:
            raise ConfigError(f"--resume {path}: no '{name}' ({what}); not a checkpoint train.py wrote, or damaged")
        if not is_valid(checkpoint[name]):
            raise ConfigError(f"--resume {path}: '{name}' is not {what} (a {type(checkpoint[name]).__name__}); "
                              "not a checkpoint train.py wrote, or damaged")
    for name in ("log_record", "best"):
        epoch = (checkpoint.get(name) or {}).get("epoch", checkpoint["epoch"])
        if epoch > checkpoint["epoch"] or (name == "log_record" and epoch != checkpoint["epoch"]):
            raise ConfigError(f"--resume {path}: '{name}' is of epoch {epoch}, the checkpoint of epoch "
                              f"{checkpoint['epoch']}; damaged")


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
    check_steps_per_epoch(args, saved)
    saved_norm_decay = saved.get("norm_weight_decay")
    if "norm_weight_decay" in saved and (saved_norm_decay is None) != (args.norm_weight_decay is None):
        saved_flag = "without --norm-weight-decay" if saved_norm_decay is None else \
            f"with --norm-weight-decay {saved_norm_decay}"
        raise ConfigError(f"--resume {args.resume} was trained {saved_flag}, which groups the optimizer's "
                          f"parameters differently: resume {saved_flag}")


def check_steps_per_epoch(args, saved):
    """Refuse a changed --batch-size or number of processes: both change how many steps an epoch has, so the
    schedule, the iteration counts in log.jsonl and the exact repeat of the original run would all break."""
    if "batch_size" in saved and saved["batch_size"] != args.batch_size:
        raise ConfigError(f"--resume {args.resume} was trained with --batch-size {saved['batch_size']} per process, "
                          f"not {args.batch_size}: an epoch would take another number of steps; resume with "
                          f"--batch-size {saved['batch_size']}, or start a new run with --weights")
    processes = utils.get_world_size()
    if "world_size" in saved and saved["world_size"] != processes:
        raise ConfigError(f"--resume {args.resume} was trained on {saved['world_size']} process(es), not "
                          f"{processes}: an epoch would take another number of steps; resume on "
                          f"{saved['world_size']} (torchrun --nproc_per_node), or start a new run with --weights")


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
    rng_states = checkpoint["rng_states"]
    if len(rng_states) != utils.get_world_size():
        raise ConfigError(f"--resume {args.resume}: 'rng_states' holds {len(rng_states)} process(es)' states, for a "
                          f"run of {utils.get_world_size()}; damaged")
    utils.set_rng_state(rng_states[utils.get_rank()])


def reconcile_outputs(args, checkpoint):
    """On resume, bring the folder into agreement with checkpoint.pth whatever moment the run was killed; rank 0,
    under the folder lock. Everything the checkpoint vouches for is restored from it: model_{epoch}.pth, and
    model_best.pth when its epoch was the best, log.jsonl and curves.png; older model_{epoch}.pth are pruned as the
    epoch would have. Files already in agreement are left as they are, so that requeueing a finished run once more
    changes nothing."""
    epoch = checkpoint["epoch"]
    restored = []
    model_path = os.path.join(args.output_dir, f"model_{epoch}.pth")
    if not os.path.isfile(model_path):
        safe_io.save_atomic(model_file(checkpoint), model_path)
        restored.append(os.path.basename(model_path))
    best = checkpoint.get("best")
    best_path = os.path.join(args.output_dir, BEST_NAME)
    if best is not None and best["epoch"] == epoch and saved_epoch(best_path) != epoch:
        safe_io.save_atomic(model_file(checkpoint), best_path)
        restored.append(BEST_NAME)
    if reconcile_log(args, checkpoint):
        restored.append(LOG_NAME)
    if args.keep_checkpoints is not None:
        prune_epoch_models(args.output_dir, keep=args.keep_checkpoints, newest=epoch)
    if restored or not os.path.isfile(os.path.join(args.output_dir, CURVES_NAME)):
        draw_curves(args.output_dir)
    if restored:
        print(f"restored {', '.join(restored)} of epoch {epoch} from {args.resume}")


def reconcile_log(args, checkpoint):
    """Make log.jsonl hold exactly the records of the epochs before the checkpoint's, then the checkpoint's own
    record: a kill between writing checkpoint.pth and appending its line, or a torn last line, would otherwise leave
    an epoch missing or doubled. Lines that are not epoch records are moved to log.jsonl.unreadable. Returns whether
    log.jsonl was rewritten."""
    record = checkpoint.get("log_record")
    if record is None:  # a checkpoint written before checkpoints carried their log record
        return False
    log_path = os.path.join(args.output_dir, LOG_NAME)
    records, unreadable = safe_io.read_jsonl_lines(log_path, is_epoch_record)
    earlier = [line for previous, line in records if previous["epoch"] < record["epoch"]]
    text = "".join(line + "\n" for line in [*earlier, json.dumps(record)])
    if unreadable:
        keep_unreadable_log_lines(args.output_dir, unreadable)
    if os.path.isfile(log_path) and safe_io.read_bytes(log_path) == text.encode("utf-8"):
        return False
    safe_io.write_text_atomic(log_path, text)
    return True


def is_epoch_record(record):
    return type(record.get("epoch")) is int and record["epoch"] >= 0


def keep_unreadable_log_lines(output_dir, lines):
    """Append lines (bytes) to log.jsonl.unreadable, saying so: a line someone added is kept, not deleted."""
    path = os.path.join(output_dir, UNREADABLE_LOG_NAME)
    kept = safe_io.read_bytes(path) if os.path.isfile(path) else b""
    safe_io.write_bytes_atomic(path, kept + b"".join(line + b"\n" for line in lines))
    print(f"{os.path.join(output_dir, LOG_NAME)}: {len(lines)} line(s) that are not epoch records moved to {path}")


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
    for epoch, name in epoch_model_files(output_dir).items():
        if epoch <= newest - keep:
            os.remove(os.path.join(output_dir, name))


def open_tensorboard(args, summary_writer_class, resume_checkpoint, purge_step):
    """The --tensorboard event writer (rank 0). purge_step makes TensorBoard drop whatever a killed run logged from
    the resumed checkpoint's step on; that includes the checkpoint epoch's own validation scalars, logged at that
    very step (or never, if the kill came before them), so they are written again from its log record."""
    writer = summary_writer_class(os.path.join(args.output_dir, TENSORBOARD_DIR), purge_step=purge_step)
    if resume_checkpoint is not None:
        record = resume_checkpoint["log_record"]
        write_tensorboard_metrics(writer, record if "coco" in record else None, step=purge_step)
    return writer


def reconcile_tensorboard(args, checkpoint, summary_writer_class):
    """A finished run killed during its last epoch's saves lacks that epoch's validation scalars in its events
    (they come after checkpoint.pth): written where missing, and only then, so that requeueing a finished run once
    more adds no events file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = checkpoint["log_record"]
    step = record.get("iterations")
    if "coco" not in record or type(step) is not int:
        return
    folder = os.path.join(args.output_dir, TENSORBOARD_DIR)
    if os.path.isdir(folder):
        events = EventAccumulator(folder)
        events.Reload()
        if "val/AP" in events.Tags()["scalars"] and any(event.step == step for event in events.Scalars("val/AP")):
            return
    open_tensorboard(args, summary_writer_class, checkpoint, purge_step=step).close()
    print(f"restored the validation scalars of epoch {checkpoint['epoch']} in {TENSORBOARD_DIR}/")


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
        plot_curves(log_path, os.path.join(output_dir, CURVES_NAME))
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
    annotation_file = coco_utils.get_annotation_file(dataset)
    evaluated = {
        **weights_identity,
        "annotation_file": annotation_file,
        # By content too, so that analyze.py can tell these detections from those of another annotation file.
        **({"annotation_sha256": safe_io.sha256_of_file(annotation_file)}
           if annotation_file and os.path.isfile(annotation_file) else {}),
        "images": len(dataset),
        "model": args.model,
        "args": checkpoint_args(args),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    metrics_path = os.path.join(args.output_dir, METRICS_NAME)
    safe_io.write_text_atomic(metrics_path, json.dumps({**metrics, "evaluated": evaluated}, indent=1) + "\n")
    print(f"wrote {metrics_path}")


def describe_io_error(error, args):
    """The one line a run ends with when a file operation fails (permissions, a removed folder, a read-only or full
    disk, a folder where a file should be): the path, the reason, what is intact and how to continue."""
    return f"{error.filename or 'a file'}: {error.strerror or error}; {what_is_intact(args)}"


def what_is_intact(args):
    if not args.output_dir:
        return "nothing was written"
    if not os.path.isdir(args.output_dir):
        return f"the folder {args.output_dir} is gone, and this run's files with it"
    if args.test_only:
        return f"the files in {args.output_dir} are as they were (each is replaced whole or not at all)"
    checkpoint = os.path.join(args.output_dir, CHECKPOINT_NAME)
    epoch = saved_epoch(checkpoint)
    if epoch is None:
        return "no epoch was saved yet: fix the cause and run the command again"
    return (f"{checkpoint} (epoch {epoch}) and the files written before it are intact: fix the cause and continue "
            f"with --resume {checkpoint}")


def report_stop(stop, args):
    """The one line a stopped run ends with, saying how to continue it."""
    checkpoint = os.path.join(args.output_dir, CHECKPOINT_NAME) if args.output_dir and not args.test_only else ""
    hint = f"; continue with --resume {checkpoint}" if checkpoint and os.path.isfile(checkpoint) else ""
    print(f"train.py: {stop}{hint}", file=sys.stderr)

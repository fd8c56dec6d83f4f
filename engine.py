"""The optimizer, one training epoch and one evaluation pass (COCO AP, or the VOC devkit's AP on Pascal VOC)."""
import math
import time

import torch

import models
import utils
from coco_eval import CocoEvaluator, VocEvaluator
from coco_utils import DatasetError, get_categories, get_coco_api_from_dataset, get_image_file
from voc_utils import is_voc


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; raised before backward/step, so the parameters are still the last good ones."""


def _describe_non_finite(epoch, iteration, loss, loss_dict, targets):
    """One line naming where it happened, every loss term and the images of the whole (all-rank) batch."""
    terms = ", ".join(f"{name}={value.item():.6g}" for name, value in {"loss": loss, **loss_dict}.items())
    local_ids = [int(t["image_id"]) for t in targets]
    image_ids = [image_id for rank_ids in utils.all_gather(local_ids) for image_id in rank_ids]
    return f"non-finite loss at epoch {epoch}, iteration {iteration}: {terms}; image ids {image_ids}"


OPTIMIZERS = ("sgd", "sgd_nesterov", "adamw")


def build_optimizer(model, name, lr, momentum, weight_decay, norm_weight_decay=None):
    """The optimizer train.py trains with (torchvision's reference choices). norm_weight_decay, when given, is
    the weight decay of normalisation layers' parameters (the other parameters keep weight_decay)."""
    if norm_weight_decay is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        norm_params, other_params = split_normalization_params(model)
        param_groups = [
            {"params": norm_params, "weight_decay": norm_weight_decay},
            {"params": other_params, "weight_decay": weight_decay},
        ]
        param_groups = [group for group in param_groups if group["params"]]
    # PyTorch's own choice of implementation (a per-parameter loop on CPU): on the CPU measured, foreach updates were
    # no faster, and fused ones are not bit-identical to torchvision's reference scripts.
    if name.startswith("sgd"):
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=name == "sgd_nesterov")
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)


def split_normalization_params(model):
    """Trainable parameters of normalisation layers vs all the others (torchvision's --norm-weight-decay split)."""
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
                  torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)
    norm_params, other_params = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (norm_params if isinstance(module, norm_types) else other_params).extend(params)
    return norm_params, other_params


def train_one_epoch(model, optimizer, data_loader, device, epoch, print_freq, scaler=None, amp_dtype=None,
                    warmup_iters=1000, tensorboard=None):
    """Train for one epoch; returns the epoch means of the loss terms and the lr at the epoch's end.
    With a tensorboard SummaryWriter, the losses and lr of every printed iteration go to it too."""
    model.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"

    # torchvision's linear warm-up, first epoch only, on top of the epoch scheduler. A one-batch epoch gets none:
    # LinearLR with total_iters=0 would leave the lr at start_factor for good.
    warmup = None
    if epoch == 0 and warmup_iters > 0:
        longest = len(data_loader) - 1
        if warmup_iters > longest:
            # Said, since a shorter warm-up than asked for can be what makes a from-scratch run diverge.
            print(f"--warmup-iters {warmup_iters}: the first epoch has {len(data_loader)} steps, so the warm-up takes "
                  f"{longest} (it stays within the first epoch, as torchvision's)")
            warmup_iters = longest
        if warmup_iters > 0:
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / 1000, total_iters=warmup_iters)

    for iteration, (images, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                   for t in targets]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            try:
                loss_dict = model(images, targets)
            except models.TargetError as error:
                raise refused_target_error(data_loader.dataset, int(targets[error.index]["image_id"]), error) from None
            losses = sum(loss_dict.values())

        # Every rank sees the same averaged losses and stop signal (one collective call), so all ranks stop
        # together. Reading them back is the loop's one sync.
        loss_dict_reduced, stop_signal = utils.reduce_losses_and_stop_signal(loss_dict)
        loss_reduced = sum(loss_dict_reduced.values())
        if not math.isfinite(loss_reduced.item()):
            raise NonFiniteLossError(_describe_non_finite(epoch, iteration, loss_reduced, loss_dict_reduced, targets))
        # SIGINT / SIGTERM (recorded by their handler) stop the run here, between steps, on every rank at once.
        if stop_signal:
            raise utils.StopRequested(stop_signal, f"at epoch {epoch}, iteration {iteration}")

        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(losses).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses.backward()
            optimizer.step()

        metric_logger.update(loss=loss_reduced, **loss_dict_reduced)
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])  # the lr this step used
        if tensorboard is not None and (iteration % print_freq == 0 or iteration == len(data_loader) - 1):
            # The iterations log_every prints: values it reads back from the device anyway.
            step = epoch * len(data_loader) + iteration
            for name, meter in metric_logger.meters.items():
                tensorboard.add_scalar(f"train/{name}", meter.value, step)
        if warmup is not None:
            warmup.step()

    means = {name: meter.global_avg for name, meter in metric_logger.meters.items() if name != "lr"}
    return {**means, "lr": optimizer.param_groups[0]["lr"]}


def refused_target_error(dataset, image_id, error):
    """The one-line DatasetError for a training target the model refused, naming its image id and file."""
    path = get_image_file(dataset, image_id)
    return DatasetError(f"{path or 'image'}: image id {image_id}: the model refuses its training target: {error}")


def make_evaluator(dataset, coco_backend="pycocotools", categories=None):
    """The evaluator for a dataset's ground truth (one interface: update, synchronize_between_processes,
    accumulate, summarize, metrics, coco_results): COCO's, plus the VOC devkit's AP for Pascal VOC. categories:
    the model's category table (default: the dataset's)."""
    coco_gt = get_coco_api_from_dataset(dataset)
    evaluator_class = VocEvaluator if is_voc(coco_gt) else CocoEvaluator
    # The category table maps the model's labels back to the annotation file's category ids.
    return evaluator_class(coco_gt, backend=coco_backend, categories=categories or get_categories(dataset, coco_gt))


@torch.inference_mode()
def detect(model, data_loader, device, coco_backend="pycocotools", amp_dtype=None, categories=None):
    """Run the model over data_loader's dataset (all ranks); returns its evaluator holding every rank's detections,
    ready for accumulate() or coco_results(). categories: the model's category table (default: the dataset's)."""
    model.eval()
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = "Test:"
    evaluator = make_evaluator(data_loader.dataset, coco_backend, categories)

    for images, targets in metric_logger.log_every(data_loader, 100, header):
        # Every rank has as many batches (the evaluation sampler pads), so all ranks stop at the same one.
        utils.check_stop("during evaluation", device)
        images = [image.to(device, non_blocking=True) for image in images]
        model_time = time.time()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
        # The copy to the host waits for the device, so model_time covers the whole forward.
        outputs = [{k: v.to("cpu") for k, v in output.items()} for output in outputs]
        metric_logger.update(model_time=time.time() - model_time)
        evaluator.update({target["image_id"]: output for target, output in zip(targets, outputs)})

    evaluator.synchronize_between_processes()
    return evaluator


def evaluate_detections(evaluator):
    """Evaluate the gathered detections, print the tables and return the evaluator's metrics dict."""
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.metrics()


def evaluate(model, data_loader, device, coco_backend="pycocotools", amp_dtype=None):
    """Evaluate model on data_loader's dataset (all ranks); returns {"coco": {stat name: value},
    "per_class": {category name: {"AP", "AP50"}}}, and "voc": ... for Pascal VOC."""
    return evaluate_detections(detect(model, data_loader, device, coco_backend=coco_backend, amp_dtype=amp_dtype))

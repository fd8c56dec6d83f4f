"""What the two builders share: option checks, backbone freezing as torchvision does it, and the plan for
loading weights=... (strict, or adapted to other classes for fine-tuning)."""
import warnings
from typing import NamedTuple

from torch import nn

from .weights import (
    Weights, WeightsError, load_for_new_classes, load_from_other_model, load_model_state, load_weights,
    normalize_class_name,
    class_names as weight_class_names,
)

# Options of SSD.__init__ that the builders accept as keyword arguments.
SSD_OPTIONS = (
    "score_thresh", "nms_thresh", "detections_per_img", "topk_candidates", "iou_thresh", "positive_fraction",
    "image_mean", "image_std",
)


def check_options(model_name: str, options: dict) -> None:
    unknown = sorted(set(options) - set(SSD_OPTIONS))
    if unknown:
        raise ValueError(f"{model_name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(SSD_OPTIONS)}")


def resolve_trainable_layers(pretrained: bool, trainable_layers: int | None, max_value: int, default: int) -> int:
    """torchvision's rule: without any pretrained weights everything trains (a given value only warns);
    otherwise the default freezes the first stages."""
    if not pretrained:
        if trainable_layers is not None:
            warnings.warn(
                "Changing trainable_backbone_layers has no effect if neither pretrained weights nor pretrained "
                f"backbone weights are given, falling back to trainable_backbone_layers={max_value} so that all "
                "layers are trainable"
            )
        return max_value
    if trainable_layers is None:
        return default
    if not 0 <= trainable_layers <= max_value:
        raise ValueError(f"trainable_backbone_layers must be in [0, {max_value}], got {trainable_layers}")
    return trainable_layers


def freeze_stages(layers: nn.Sequential, stage_starts: list[int], trainable_stages: int) -> None:
    """Freeze all but the last trainable_stages stages of layers (stage i starts at layers[stage_starts[i]])."""
    first_trainable = len(layers) if trainable_stages == 0 else stage_starts[len(stage_starts) - trainable_stages]
    for layer in layers[:first_trainable]:
        layer.requires_grad_(False)


class WeightsPlan(NamedTuple):
    """What a builder does with weights=...: see plan_weights."""
    weights: Weights | None  # None: no weights, the model keeps its initialisation
    num_classes: int
    new_class_names: dict[int, str] | None  # set: adapt the classification layers to these classes
    from_other_model: bool = False  # the weights are a donor's: copy what fits (load_from_other_model)


def plan_weights(weights, model_name: str, num_classes: int | None, class_names: dict | None,
                  class_key: str, anchors_per_cell: int, donors: tuple[str, ...] = ()) -> WeightsPlan:
    """Read builder weights=... for model model_name and decide how they load.

    Without class_names the load is strict, as in torchvision: num_classes must be the weights' (a local
    file without num_classes gives num_classes from its classification layer class_key). With class_names
    (the classes to predict, {label: name} or a category table) num_classes defaults to the largest label
    + 1, and weights made for other classes are adapted to them (load_for_new_classes); weights with the
    same classes (same number and, where both are named, the same names per label) still load strictly.

    donors: other models whose weights (our checkpoints recording that model, or torchvision's weights for it) a
    fine-tune (class_names given) may start from: what fits is copied, the rest initialised (SSD512 from SSD300).
    """
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes}")
    if class_names is not None:
        class_names = read_class_names(class_names)
        num_classes = num_classes or max(class_names) + 1
        if max(class_names) >= num_classes:
            raise ValueError(f"class_names has label {max(class_names)}, num_classes={num_classes} is too small")
    if weights is None:
        return WeightsPlan(None, num_classes or 91, None)
    # Only a fine-tune may start from a donor's weights: other names are refused before any download.
    loaded = load_weights(weights, (model_name, *donors) if class_names is not None else (model_name,),
                          num_classes if class_names is None else None)
    trained_classes = loaded.num_classes
    if trained_classes is None and class_key in loaded.state_dict:
        trained_classes = loaded.state_dict[class_key].shape[0] // anchors_per_cell
    from_donor = loaded.model_name in donors
    if from_donor and class_names is None:
        raise WeightsError(f"{loaded.source} are weights of {loaded.model_name}, which {model_name} only starts "
                           f"a fine-tune from (train.py --weights without --test-only), never loads as they are")
    if class_names is None:
        if num_classes is None and trained_classes is None:
            raise WeightsError(f"{loaded.source} has no {class_key} to read num_classes from")
        return WeightsPlan(loaded, num_classes or trained_classes, None)
    same_names = all(
        normalize_class_name(loaded.class_names[label]) == normalize_class_name(name)
        for label, name in class_names.items() if label in (loaded.class_names or {})
    )
    same_classes = trained_classes == num_classes and same_names
    return WeightsPlan(loaded, num_classes, None if same_classes else class_names, from_donor)


def read_class_names(class_names: dict) -> dict[int, str]:
    """{label: name} with labels >= 1, from {label: name} or a category table."""
    names = weight_class_names(class_names)
    if not names or min(names) < 1:
        raise ValueError(f"class_names needs labels >= 1 (0 is the background), got {sorted(names)}")
    return names


def load_planned_weights(model: nn.Module, plan: WeightsPlan) -> None:
    """Load the weights of plan into the model the builder made; a fine-tune prints what it kept."""
    if plan.weights is None:
        return
    if plan.from_other_model:
        print(load_from_other_model(model, plan.weights, plan.new_class_names))
    elif plan.new_class_names is None:
        load_model_state(model, plan.weights.state_dict, plan.weights.source)
    else:
        print(load_for_new_classes(model, plan.weights, plan.new_class_names))

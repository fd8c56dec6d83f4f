"""Loading weights: torchvision weights names (through its download cache) or local checkpoint files.

Every file is read with torch.load(weights_only=True), and every state_dict is loaded strictly, with one
error that lists what does not match. The one exception is fine-tuning for other classes
(load_for_new_classes): there only the classification layers may differ, and the rows of classes whose
names match are carried over.
"""
import os
import pickle
import re
from typing import NamedTuple

import torch
import torchvision
from torch import nn


class WeightsError(ValueError):
    """Weights that cannot be read, or that do not fit the model."""


class Weights(NamedTuple):
    """Weights read by load_weights."""
    state_dict: dict
    source: str  # where they came from, for messages
    num_classes: int | None  # classes (background included) of torchvision weights, from their metadata
    class_names: dict[int, str] | None  # {label: name} the weights were trained for; None when not recorded


def class_names(categories) -> dict[int, str]:
    """{label: name} from a checkpoint's "categories": the category table {label: {"id", "name"}} or the
    older {label: name}. Every reader of category names goes through this function."""
    return {int(label): str(entry["name"] if isinstance(entry, dict) else entry)
            for label, entry in (categories or {}).items()}


def normalize_class_name(name: str) -> str:
    """The form in which class names are compared: case, spaces, underscores and hyphens do not count."""
    return re.sub(r"[\s_-]+", "", name).casefold()


def load_checkpoint_file(path) -> dict:
    """torch.load(path, map_location="cpu", weights_only=True), with one-line errors naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file '{path}' does not exist" if not os.path.exists(path)
                           else f"weights file '{path}' is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # What the weights_only unpickler says when a file would import (and so could run) code.
        if "Unsupported global" in str(error):
            raise WeightsError(
                f"weights file '{path}' refused: contains non-tensor Python objects (weights_only)"
            ) from None
        raise WeightsError(f"weights file '{path}' is not a PyTorch checkpoint or is truncated") from None
    except Exception:  # torch.load reports corrupt files with many exception types
        raise WeightsError(f"weights file '{path}' is not a PyTorch checkpoint or is truncated") from None
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"weights file '{path}' holds a {type(checkpoint).__name__}, not a state_dict")
    return checkpoint


def load_weights(spec, torchvision_model: str, num_classes: int | None = None) -> Weights:
    """Read the weights named by spec: one of torchvision's weights for the model named torchvision_model
    (the enum member or its name, e.g. "SSD300_VGG16_Weights.COCO_V1"), or the path of a state_dict or of a
    training checkpoint holding one under "model" (and its class names under "categories").

    torchvision weights made for other than num_classes categories (if given) are refused before download.
    """
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _looks_like_path(spec)):
        checkpoint = load_checkpoint_file(spec)
        source = f"weights file '{os.fspath(spec)}'"
        if not isinstance(checkpoint.get("model"), dict):  # a plain state_dict
            return Weights(checkpoint, source, None, None)
        names = class_names(checkpoint["categories"]) if checkpoint.get("categories") else None
        return Weights(checkpoint["model"], source, None, names)

    weights = _torchvision_weights(spec, torchvision_model)
    categories = weights.meta.get("categories")
    num_categories = len(categories) if categories else None
    if num_classes not in (None, num_categories):
        raise WeightsError(f"{weights} predicts {num_categories} classes, num_classes={num_classes} does not fit")
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsError(f"could not get {weights} from {weights.url}: {first_line}") from None
    # The list is indexed by label; label 0 ("__background__") is not a class name.
    names = {label: name for label, name in enumerate(categories)} if categories else {}
    names.pop(0, None)
    return Weights(state_dict, str(weights), num_categories, names or None)


def read_weights_metadata(spec) -> tuple[str | None, dict[int, str]]:
    """(model name or None, {label: class name}) recorded with weights `spec`, a checkpoint file or one of
    torchvision's weights names, read without building a model. A plain state_dict records neither."""
    model_name, categories = read_weights_record(spec)
    return model_name, class_names(categories)


def read_weights_record(spec) -> tuple[str | None, dict]:
    """(model name or None, the classes as recorded) of weights `spec`, read without building a model: a
    checkpoint's "categories" as stored (the category table {label: {"id", "name"}}, or the older {label: name}),
    torchvision's names {label: name} ("__background__" at 0, "N/A" at unused labels), {} where nothing is
    recorded (a plain state_dict)."""
    if isinstance(spec, os.PathLike) or _looks_like_path(spec):
        checkpoint = load_checkpoint_file(spec)
        if not isinstance(checkpoint.get("model"), dict):
            return None, {}
        return (checkpoint.get("args") or {}).get("model"), dict(checkpoint.get("categories") or {})
    try:
        weights = torchvision.models.get_weight(spec)
    except (ValueError, KeyError):
        raise WeightsError(f"weights '{spec}' are neither an existing file nor a torchvision weights name") from None
    # SSD300_VGG16_Weights -> ssd300_vgg16: torchvision names the enum after its builder.
    model_name = type(weights).__name__.lower().removesuffix("_weights")
    return model_name, dict(enumerate(weights.meta.get("categories") or []))


def _looks_like_path(spec: str) -> bool:
    return os.path.exists(spec) or os.sep in spec or spec.endswith((".pth", ".pt"))


def _torchvision_weights(spec, torchvision_model: str) -> torchvision.models.WeightsEnum:
    enum = torchvision.models.get_model_weights(torchvision_model)
    if isinstance(spec, enum):
        return spec
    if isinstance(spec, str):
        try:
            weights = torchvision.models.get_weight(spec)
        except (ValueError, KeyError):
            weights = None
        if isinstance(weights, enum):
            return weights
    valid = ", ".join(f"{enum.__name__}.{member}" for member in enum.__members__)
    raise WeightsError(f"weights '{spec}' are neither an existing file nor one of {valid}")


def load_model_state(module: nn.Module, state_dict: dict, source: str) -> None:
    """module.load_state_dict(state_dict, strict=True), reporting every kind of mismatch in one error."""
    problems = _fit_problems(module.state_dict(), state_dict)
    if problems:
        raise WeightsError(f"{source} does not fit {type(module).__name__}: {problems}")
    module.load_state_dict(state_dict, strict=True)


def _fit_problems(expected: dict, given: dict, any_rows: frozenset = frozenset()) -> str:
    """What keeps `given` from loading into a module whose state_dict is `expected` ("" if nothing);
    keys in any_rows may differ in their first dimension."""
    def fits(key, value):
        if not isinstance(value, torch.Tensor):
            return False
        start = 1 if key in any_rows else 0
        return value.dim() == expected[key].dim() and value.shape[start:] == expected[key].shape[start:]

    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        f"{key}: {_shape(value)} in file, {list(expected[key].shape)} in model"
        for key, value in given.items() if key in expected and not fits(key, value)
    ]
    problems = [
        _summary(f"missing key{'s' * (len(missing) != 1)}", missing),
        _summary(f"unexpected key{'s' * (len(unexpected) != 1)}", unexpected),
        _summary(f"shape mismatch{'es' * (len(mismatched) != 1)}", mismatched),
    ]
    return "; ".join(problem for problem in problems if problem)


def _summary(kind: str, items: list[str], shown: int = 3) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - shown} more)" if len(items) > shown else ""
    return f"{len(items)} {kind} ({', '.join(items[:shown])}{more})"


def _shape(value) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def classifier_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The last layer of each classification predictor of an SSD, by state_dict prefix: output channel
    a * num_classes + k holds the logit of class k for the map's a-th default box at each cell."""
    layers = {}
    for index, predictor in enumerate(model.head.classification_head.module_list):
        name, layer = [(n, m) for n, m in predictor.named_modules() if isinstance(m, nn.Conv2d)][-1]
        layers[".".join(filter(None, ["head.classification_head.module_list", str(index), name]))] = layer
    return layers


def match_classes(new_names: dict[int, str], old_names: dict[int, str] | None) -> dict[int, int]:
    """{new label: old label}: the background, and each new class whose name (normalize_class_name)
    is the name of exactly one old class."""
    old_labels_by_name = {}
    for label, name in (old_names or {}).items():
        old_labels_by_name.setdefault(normalize_class_name(name), []).append(label)
    matches = {0: 0}
    for label, name in sorted(new_names.items()):
        candidates = old_labels_by_name.get(normalize_class_name(name), [])
        if len(candidates) == 1:
            matches[label] = candidates[0]
    return matches


def load_for_new_classes(model: nn.Module, weights: Weights, new_names: dict[int, str]) -> str:
    """Load weights trained for other classes into an SSD built, and initialised, for model.num_classes
    classes named new_names ({label: name}, labels >= 1).

    Every tensor loads whole except the classification layers (classifier_layers). Their rows for the
    background and for the classes matched by name (match_classes) are copied from the weights, so those
    classes score as they did; the other rows keep the model's own initialisation. Anything else that does
    not fit (weights of another model) is a WeightsError. Returns a one-line summary of what was done.
    """
    layers = classifier_layers(model)
    class_keys = frozenset(f"{prefix}.{kind}" for prefix in layers for kind in ("weight", "bias"))
    problems = _fit_problems(model.state_dict(), weights.state_dict, any_rows=class_keys)
    if problems:
        raise WeightsError(f"{weights.source} does not fit {type(model).__name__} outside its classification "
                           f"layers (weights of another model?): {problems}")
    old_classes = _classes_of(weights, layers, model.num_classes)
    model.load_state_dict({k: v for k, v in weights.state_dict.items() if k not in class_keys}, strict=False)

    # A name table longer than the layers (a damaged checkpoint) must not index past them.
    matches = {new: old for new, old in match_classes(new_names, weights.class_names).items() if old < old_classes}
    new_labels, old_labels = list(matches), list(matches.values())
    with torch.no_grad():
        for prefix, layer in layers.items():
            anchors = layer.out_channels // model.num_classes
            for kind in ("weight", "bias"):
                new = getattr(layer, kind)
                old = weights.state_dict[f"{prefix}.{kind}"].view(anchors, old_classes, *new.shape[1:])
                # Writes through the view into the parameter: rows (anchor a, class k) for the matched classes.
                new.view(anchors, model.num_classes, *new.shape[1:])[:, new_labels] = old[:, old_labels].to(new.dtype)

    copied = [f"{new_names[new]!r}<-{weights.class_names[old]!r}" for new, old in matches.items() if new]
    fresh = [repr(name) for label, name in sorted(new_names.items()) if label not in matches]
    copied_text = _summary(_plural(copied, "class matched by name", "classes matched by name"), copied, shown=8) \
        or "no class"
    if not weights.class_names:
        copied_text += " (the weights record no class names)"
    fresh_text = _summary(_plural(fresh, "class starts from scratch", "classes start from scratch"), fresh, shown=8) \
        or "no class starts from scratch"
    return (f"fine-tuning {weights.source} ({old_classes} classes) for {model.num_classes} classes: "
            f"kept {len(model.state_dict()) - len(class_keys)} of {len(model.state_dict())} tensors whole; "
            f"re-initialised the {len(class_keys)} classification tensors and copied into them the rows of the "
            f"background and of {copied_text}; {fresh_text}")


def _plural(items: list, singular: str, plural: str) -> str:
    return singular if len(items) == 1 else plural


def _classes_of(weights: Weights, layers: dict[str, nn.Conv2d], num_classes: int) -> int:
    """The number of classes the classification layers of weights were made for (background included)."""
    counts = set()
    for prefix, layer in layers.items():
        anchors = layer.out_channels // num_classes
        rows = weights.state_dict[f"{prefix}.weight"].shape[0]
        counts.add(rows // anchors if rows % anchors == 0 and weights.state_dict[f"{prefix}.bias"].shape[0] == rows
                   else None)
    if len(counts) != 1 or None in counts or counts == {0}:
        raise WeightsError(f"{weights.source}: its classification layers do not hold anchors x classes rows "
                           f"for one number of classes")
    return counts.pop()

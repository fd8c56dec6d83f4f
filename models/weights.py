"""Loading weights: torchvision weights names (through its download cache) or local checkpoint files.

Every file is read with torch.load(weights_only=True), and every state_dict is loaded strictly, with one
error that lists what does not match. The exceptions are fine-tunes: for other classes (load_for_new_classes),
only the classification layers may differ, and the rows of classes whose names match are carried over; from
another model (load_from_other_model, SSD300's weights for SSD512), what fits is copied and the rest initialised.
"""
import argparse
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
    model_name: str | None  # the model they were made for, where recorded (our checkpoints, torchvision's names)


def class_names(categories) -> dict[int, str]:
    """{label: name} from a checkpoint's "categories": the category table {label: {"id", "name"}} or the
    older {label: name}. Every reader of category names goes through this function."""
    return {int(label): str(entry["name"] if isinstance(entry, dict) else entry)
            for label, entry in (categories or {}).items()}


def category_ids(categories) -> dict[int, int]:
    """{label: category id} of the labels a checkpoint's "categories" records an id for (the category table; the
    older {label: name} and torchvision's names record none): the annotation files' ids, which labels equal only
    where build_category_table chose so."""
    return {int(label): entry["id"] for label, entry in (categories or {}).items()
            if isinstance(entry, dict) and entry.get("id") is not None}


def normalize_class_name(name: str) -> str:
    """The form in which class names are compared: case, spaces, underscores and hyphens do not count."""
    return re.sub(r"[\s_-]+", "", name).casefold()


def load_checkpoint_file(path) -> dict:
    """torch.load(path, map_location="cpu", weights_only=True), with one-line errors naming the file.

    Checkpoints of torchvision's reference train.py store its flags as an argparse.Namespace: that one class is
    allowed too (it holds plain attributes, and the weights_only unpickler still refuses anything else inside it),
    and comes back as a dict, like the flags our train.py stores.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file '{path}' does not exist" if not os.path.exists(path)
                           else f"weights file '{path}' is not a file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
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
    if isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = vars(checkpoint["args"])
    return checkpoint


def load_weights(spec, torchvision_models: tuple[str, ...], num_classes: int | None = None) -> Weights:
    """Read the weights named by spec: one of torchvision's weights for one of the models named torchvision_models
    (the enum member or its name, e.g. "SSD300_VGG16_Weights.COCO_V1"), or the path of a state_dict or of a
    training checkpoint holding one under "model" (and its class names under "categories", its model under
    "args").

    torchvision weights made for other than num_classes categories (if given) are refused before download.
    """
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _looks_like_path(spec)):
        checkpoint = load_checkpoint_file(spec)
        source = f"weights file '{os.fspath(spec)}'"
        if not isinstance(checkpoint.get("model"), dict):  # a plain state_dict
            return Weights(checkpoint, source, None, None, None)
        names = class_names(checkpoint["categories"]) if checkpoint.get("categories") else None
        return Weights(checkpoint["model"], source, None, names, (checkpoint.get("args") or {}).get("model"))

    weights = _torchvision_weights(spec, torchvision_models)
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
    return Weights(state_dict, str(weights), num_categories, names or None, _builder_name(weights))


# Builder options that shape a model outside its state_dict, as train.py records them in a checkpoint's "args".
SAVED_BUILDER_OPTIONS = ("default_boxes",)


def read_weights_record(spec) -> tuple[str | None, dict, dict]:
    """(model name or None, the classes as recorded, {builder option: value}) of weights `spec`, read without
    building a model: a checkpoint's "categories" as stored (the category table {label: {"id", "name"}}, or the
    older {label: name}), torchvision's names {label: name} ("__background__" at 0, "N/A" at unused labels), {}
    where nothing is recorded (a plain state_dict)."""
    if isinstance(spec, os.PathLike) or _looks_like_path(spec):
        checkpoint = load_checkpoint_file(spec)
        if not isinstance(checkpoint.get("model"), dict):
            return None, {}, {}
        args = checkpoint.get("args") or {}
        options = {name: args[name] for name in SAVED_BUILDER_OPTIONS if args.get(name) is not None}
        return args.get("model"), dict(checkpoint.get("categories") or {}), options
    try:
        weights = torchvision.models.get_weight(spec)
    except (ValueError, KeyError):
        raise WeightsError(f"weights '{spec}' are neither an existing file nor a torchvision weights name") from None
    return _builder_name(weights), dict(enumerate(weights.meta.get("categories") or [])), {}


def _builder_name(weights: torchvision.models.WeightsEnum) -> str:
    # SSD300_VGG16_Weights -> ssd300_vgg16: torchvision names the enum after its builder.
    return type(weights).__name__.lower().removesuffix("_weights")


def _looks_like_path(spec: str) -> bool:
    return os.path.exists(spec) or os.sep in spec or spec.endswith((".pth", ".pt"))


def _torchvision_weights(spec, torchvision_models: tuple[str, ...]) -> torchvision.models.WeightsEnum:
    published = set(torchvision.models.list_models())
    enums = tuple(torchvision.models.get_model_weights(name) for name in torchvision_models if name in published)
    if isinstance(spec, enums):
        return spec
    if isinstance(spec, str):
        try:
            weights = torchvision.models.get_weight(spec)
        except (ValueError, KeyError):
            weights = None
        if isinstance(weights, enums):
            return weights
    valid = ", ".join(f"{enum.__name__}.{member}" for enum in enums for member in enum.__members__)
    unpublished = [name for name in torchvision_models if name not in published]
    note = f"torchvision publishes no {' or '.join(unpublished)} weights" if unpublished else ""
    if not valid:
        raise WeightsError(f"weights '{spec}' are not an existing file, and {note}")
    raise WeightsError(f"weights '{spec}' are neither an existing file nor one of {valid}"
                       + (f" ({note})" if note else ""))


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
    class_keys = _tensor_keys(layers)
    problems = _fit_problems(model.state_dict(), weights.state_dict, any_rows=class_keys)
    if problems:
        raise WeightsError(f"{weights.source} does not fit {type(model).__name__} outside its classification "
                           f"layers (weights of another model?): {problems}")
    old_classes = _classes_of(weights, layers, model.num_classes)
    model.load_state_dict({k: v for k, v in weights.state_dict.items() if k not in class_keys}, strict=False)
    matches = _matched_labels(new_names, weights, old_classes)
    _copy_class_rows(model, weights, layers, old_classes, matches)
    return (f"fine-tuning {weights.source} ({old_classes} classes) for {model.num_classes} classes: "
            f"kept {len(model.state_dict()) - len(class_keys)} of {len(model.state_dict())} tensors whole; "
            f"re-initialised the {len(class_keys)} classification tensors and copied into them "
            f"{_class_rows_text(new_names, matches, weights)}")


def load_from_other_model(model: nn.Module, weights: Weights, new_names: dict[int, str] | None) -> str:
    """Load the weights of another SSD (SSD300's into SSD512, whose trunk, first extra layers and most heads
    have the same names and shapes) into `model`, built and initialised for model.num_classes classes named
    new_names (None: the weights' own classes).

    Every tensor whose name and shape fit loads; the rest keeps the model's initialisation. The classification
    layers of the maps with as many default boxes per location in both models get the rows of the background and
    of the classes matched by name, as in load_for_new_classes (every row where the classes are the same). Returns
    a one-line summary of what was copied and what was initialised."""
    state = model.state_dict()
    layers = classifier_layers(model)
    class_keys = _tensor_keys(layers)
    fitting = [key for key, value in weights.state_dict.items() if key in state and key not in class_keys
               and isinstance(value, torch.Tensor) and value.shape == state[key].shape]
    model.load_state_dict({key: weights.state_dict[key] for key in fitting}, strict=False)
    same_boxes = {prefix: layer for prefix, layer in layers.items()
                  if _boxes_per_location(weights, prefix) == layer.out_channels // model.num_classes}
    copied = set(fitting) | _tensor_keys(same_boxes)
    initialised = [key for key in state if key not in copied]
    summary = (f"fine-tuning {weights.source}, weights of {weights.model_name}, for {model.num_classes} classes: "
               f"copied the {len(fitting)} of {len(state)} tensors whose names and shapes fit")
    if same_boxes:
        old_classes = _classes_of(weights, same_boxes, model.num_classes)
        matches = (_matched_labels(new_names, weights, old_classes) if new_names is not None
                   else {label: label for label in range(model.num_classes)})
        _copy_class_rows(model, weights, same_boxes, old_classes, matches)
        rows = (_class_rows_text(new_names, matches, weights) if new_names is not None
                else f"the rows of all {model.num_classes} classes")
        summary += f", and into the {len(same_boxes) * 2} classification tensors of maps with as many default " \
                   f"boxes per location ({old_classes} classes there) {rows}"
    return f"{summary}; initialised {_summary('tensors', initialised, shown=4) or 'no tensor'}"


def _tensor_keys(layers: dict[str, nn.Conv2d]) -> frozenset:
    return frozenset(f"{prefix}.{kind}" for prefix in layers for kind in ("weight", "bias"))


def _boxes_per_location(weights: Weights, classifier_prefix: str) -> int | None:
    """Default boxes per location of the weights' map whose classifier is classifier_prefix, read off the
    regression layer beside it (4 rows per box); None where the weights have no such map."""
    keys = [f"{classifier_prefix.replace('classification_head', 'regression_head')}.weight",
            f"{classifier_prefix}.weight", f"{classifier_prefix}.bias"]
    if not all(isinstance(weights.state_dict.get(key), torch.Tensor) for key in keys):
        return None
    return weights.state_dict[keys[0]].shape[0] // 4


def _matched_labels(new_names: dict[int, str], weights: Weights, old_classes: int) -> dict[int, int]:
    # A name table longer than the layers (a damaged checkpoint) must not index past them.
    return {new: old for new, old in match_classes(new_names, weights.class_names).items() if old < old_classes}


def _copy_class_rows(model: nn.Module, weights: Weights, layers: dict[str, nn.Conv2d], old_classes: int,
                     matches: dict[int, int]) -> None:
    """Copy into each of layers the weights' rows (anchor a, old class) to rows (anchor a, new class) of matches."""
    new_labels, old_labels = list(matches), list(matches.values())
    with torch.no_grad():
        for prefix, layer in layers.items():
            anchors = layer.out_channels // model.num_classes
            for kind in ("weight", "bias"):
                new = getattr(layer, kind)
                old = weights.state_dict[f"{prefix}.{kind}"].view(anchors, old_classes, *new.shape[1:])
                # Writes through the view into the parameter: rows (anchor a, class k) for the matched classes.
                new.view(anchors, model.num_classes, *new.shape[1:])[:, new_labels] = old[:, old_labels].to(new.dtype)


def _class_rows_text(new_names: dict[int, str], matches: dict[int, int], weights: Weights) -> str:
    """'the rows of the background and of ...; ...' for a fine-tune's one-line summary."""
    copied = [f"{new_names[new]!r}<-{weights.class_names[old]!r}" for new, old in matches.items() if new]
    fresh = [repr(name) for label, name in sorted(new_names.items()) if label not in matches]
    copied_text = _summary(_plural(copied, "class matched by name", "classes matched by name"), copied, shown=8) \
        or "no class"
    if not weights.class_names:
        copied_text += " (the weights record no class names)"
    fresh_text = _summary(_plural(fresh, "class starts from scratch", "classes start from scratch"), fresh, shown=8) \
        or "no class starts from scratch"
    return f"the rows of the background and of {copied_text}; {fresh_text}"


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

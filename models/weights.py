"""Loading weights: torchvision weights names (through its download cache) or local checkpoint files.

Every file is read with torch.load(weights_only=True), and every state_dict is loaded strictly, with one
error that lists what does not match.
"""
import os
import pickle

import torch
import torchvision
from torch import nn


class WeightsError(ValueError):
    """Weights that cannot be read, or that do not fit the model."""


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


def load_weights(spec, torchvision_model: str, num_classes: int | None = None) -> tuple[dict, str, int | None]:
    """Read the weights named by spec: one of torchvision's weights for the model named torchvision_model
    (the enum member or its name, e.g. "SSD300_VGG16_Weights.COCO_V1"), or the path of a state_dict or of a
    training checkpoint holding one under "model".

    Returns (state_dict, where it came from, number of categories for torchvision weights else None).
    torchvision weights made for other than num_classes categories (if given) are refused before download.
    """
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _looks_like_path(spec)):
        checkpoint = load_checkpoint_file(spec)
        state_dict = checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint
        return state_dict, f"weights file '{os.fspath(spec)}'", None

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
    return state_dict, str(weights), num_categories


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
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: {_shape(value)} in file, {list(expected[key].shape)} in model"
        for key, value in state_dict.items()
        if key in expected and (not isinstance(value, torch.Tensor) or value.shape != expected[key].shape)
    ]
    problems = [
        _summary(f"missing key{'s' * (len(missing) != 1)}", missing),
        _summary(f"unexpected key{'s' * (len(unexpected) != 1)}", unexpected),
        _summary(f"shape mismatch{'es' * (len(mismatched) != 1)}", mismatched),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise WeightsError(f"{source} does not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict(state_dict, strict=True)


def _summary(kind: str, items: list[str], shown: int = 3) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - shown} more)" if len(items) > shown else ""
    return f"{len(items)} {kind} ({', '.join(items[:shown])}{more})"


def _shape(value) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__

"""The optimizer train.py builds (engine.build_optimizer): its multi-tensor (foreach) updates are PyTorch's
per-parameter loop, bit for bit."""
import copy

import pytest
import torch

import engine
import models
from helpers import LITE


@pytest.mark.parametrize("name, lr, weight_decay, norm_weight_decay", [
    ("sgd", 0.15, 4e-5, None),
    ("sgd_nesterov", 0.02, 1e-4, 0.0),
    ("adamw", 1e-3, 0.05, None),
])
def test_optimizer_updates_equal_the_per_parameter_loop(name, lr, weight_decay, norm_weight_decay):
    model = models.get_model(LITE, num_classes=4)
    reference_model = copy.deepcopy(model)
    optimizer = engine.build_optimizer(model, name, lr, 0.9, weight_decay, norm_weight_decay)
    assert all(group["foreach"] for group in optimizer.param_groups)
    reference = engine.build_optimizer(reference_model, name, lr, 0.9, weight_decay, norm_weight_decay)
    for group in reference.param_groups:
        group["foreach"] = False  # what PyTorch does on CPU by default: a Python loop over the parameters

    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # the first step creates the momentum / moment buffers, later ones use them
        for mine, theirs in zip(model.parameters(), reference_model.parameters()):
            mine.grad = torch.randn(mine.shape, generator=generator)
            theirs.grad = mine.grad.clone()
        optimizer.step()
        reference.step()
    for (parameter_name, mine), theirs in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(mine, theirs), parameter_name

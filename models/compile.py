"""torch.compile for our scripts' --compile flags: the network (backbone and heads) only.

Anchors, post-processing and the loss stay eager: their shapes depend on the data (how many scores pass the
threshold, how many anchors match), so a compiled version would recompile or break its graph on every batch.
"""
import functools

import torch

from .ssd import SSD


class CompileError(RuntimeError):
    """torch.compile cannot compile the network here (no C++ compiler, no Triton, an unsupported operation...).
    The message names --compile, the flag of every script that calls compile_network."""


def compile_network(model: SSD, training: bool = False) -> None:
    """Run model's backbone and heads compiled by torch.compile in eval mode, and in training mode too where
    `training`. In place and without a new submodule: the state_dict keeps its keys, so checkpoints of a compiled
    model load strictly into an eager one and into torchvision. Compiling happens on the first call in each mode
    (train/eval, autocast on/off, grad/inference); call it after moving the model to its device and memory format.
    Raises CompileError at once where torch.compile cannot work on the model's device."""
    check_compiler(next(model.parameters()).device)
    # dynamic=False: every shape is static, so each kernel is specialised for it. Our loops feed at most two batch
    # sizes (the batch size and a smaller last batch) to each mode, so this costs at most one extra compile in a
    # loop, and full batches, nearly all of the work, run the fastest kernels. (A batch dimension marked dynamic
    # would still recompile for a last batch of one image, which torch.compile always specialises.)
    compiled = torch.compile(SSD.network, dynamic=False)
    # Unbound, called with the model as argument: a deepcopy of the model runs its own weights, not this one's.
    model.compiled_network = functools.partial(call_compiled, compiled, failure="torch.compile failed on the network")
    model.compiled_for_training = training


def check_compiler(device: torch.device) -> None:
    """Compile and run a one-line function on `device`: torch.compile's toolchain (a C++ compiler for CPU
    kernels, Triton for GPU ones) works there, or CompileError says why. Costs a few seconds, most of them the
    set-up the network's compile would pay anyway."""
    compiled = torch.compile(lambda x: x * 2 + 1, dynamic=False)
    call_compiled(compiled, torch.ones(4, device=device), failure=f"torch.compile cannot compile for {device} here")


def call_compiled(compiled, *args, failure):
    """compiled(*args), where torch.compile's errors (raised while compiling, on the first call of each mode) become
    one CompileError line starting with `failure`."""
    from torch._dynamo.exc import TorchDynamoException  # seconds to import: only once something is compiled

    try:
        return compiled(*args)
    except TorchDynamoException as error:
        raise CompileError(f"--compile: {failure}: {first_line(error)}") from error


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__

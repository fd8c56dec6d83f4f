"""Command-line helpers shared by the entry points: the one-line error every script reports bad input with, the
argument parser that reports its own errors in one line, and checks of flag values (devices, thresholds)."""
import argparse

import torch


class UserInputError(ValueError):
    """A bad flag value or path given on the command line; the entry points report it in one line."""


def check_device(spec, flag="--device"):
    """torch.device(spec), or a one-line UserInputError when spec is malformed or names a device not present."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserInputError(f"{flag} {spec}: not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserInputError(f"{flag} {spec}: no CUDA GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise UserInputError(f"{flag} {spec}: this machine has {count} CUDA GPU(s), numbered from 0")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            raise UserInputError(f"{flag} {spec}: {str(error).splitlines()[0]}") from None
    return device


def check_score_thresh(score_thresh, flag="--score-thresh"):
    if not 0.0 <= score_thresh < 1.0:
        raise UserInputError(f"{flag} {score_thresh}: must be at least 0 and below 1")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(error):
    """The message of a user-facing error, without the traceback a DataLoader worker wraps around it."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
        last = last.removeprefix(prefix)
    return last


class ConfigError(ValueError):
    """A flag, or a combination of flags, that cannot work; reported in one line without a traceback."""

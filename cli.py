"""Command-line helpers shared by the entry points: the one-line error every script reports bad input with, the
argument parser that reports its own errors in one line, argparse types that range-check flag values before any
work starts (numbers, seeds, devices, --dist-url), and the handling of a closed stdout."""
import argparse
import math
import os
import sys
import urllib.parse

import torch


class UserInputError(ValueError):
    """A bad flag value or path given on the command line; the entry points report it in one line."""


# The device types the scripts are written and tested for; torch knows many more (mps, xla, meta, ...).
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def check_device(spec, flag="--device"):
    """torch.device(spec), or a one-line UserInputError when spec is malformed, names a device type the scripts do
    not support, or names a device this machine does not have."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserInputError(f"{flag} {spec}: not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type not in SUPPORTED_DEVICE_TYPES:
        raise UserInputError(f"{flag} {spec}: not available here; the scripts run on "
                             f"{' or '.join(SUPPORTED_DEVICE_TYPES)}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserInputError(f"{flag} {spec}: no CUDA GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise UserInputError(f"{flag} {spec}: this machine has {count} CUDA GPU(s), numbered from 0")
    return device


# ------------------------------------------------------------------------------------- argparse types of flags
# Each raises argparse.ArgumentTypeError, which the parser reports in one line naming the flag, before any file
# is touched. The upper bounds are far beyond any real use; they exist so that a typo (an extra digit, a
# pasted number) stops at once instead of an hour into the work, or inside a library with a traceback.
MAX_BATCH_SIZE = 4096  # images per forward pass
MAX_PROCESSES = 1024  # worker processes, or processes of a run: one per core of the largest machines


def whole_number(minimum, maximum):
    """An argparse type: a whole number from minimum to maximum (inclusive)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a whole number from {minimum} to "
                                             f"{maximum}")
        return value
    return parse


def real_number(minimum, maximum, *, above_minimum=False, below_maximum=False):
    """An argparse type: a finite number within [minimum, maximum], either end excluded where asked."""
    low = f"above {minimum:g}" if above_minimum else f"at least {minimum:g}"
    high = f"below {maximum:g}" if below_maximum else f"at most {maximum:g}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= minimum if above_minimum else value < minimum
        too_high = value >= maximum if below_maximum else value > maximum
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number {low} and {high}")
        return value
    return parse


# numpy's legacy seeding (np.random.seed, used by seed_everything) takes 0 .. 2**32 - 1; every rank's seed is
# derived from --seed within that range (see rank_seed).
SEED_LIMIT = 2**32
seed = whole_number(0, SEED_LIMIT - 1)


def rank_seed(base_seed, rank):
    """The seed of process `rank` from the run's seed: distinct per rank, and within numpy's range for every rank
    and every valid --seed (the sum wraps around instead of overflowing)."""
    return (base_seed + rank) % SEED_LIMIT


score_threshold = real_number(0.0, 1.0, below_maximum=True)


def device_name(spec):
    """An argparse type: a device spec the scripts support and this machine has (see check_device), kept as the
    string the user gave."""
    try:
        check_device(spec, flag="")
    except UserInputError as error:
        raise argparse.ArgumentTypeError(str(error).strip()) from None
    return spec


# The init_method schemes torch.distributed's rendezvous knows.
DIST_URL_SCHEMES = ("env", "tcp", "file")


def dist_url(text):
    """An argparse type: an init_method torch.distributed can use (env://, tcp://HOST:PORT or file:///PATH)."""
    try:
        url = urllib.parse.urlparse(text)
        port = url.port
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text}: {error}") from None
    if url.scheme not in DIST_URL_SCHEMES or not text.startswith(f"{url.scheme}://"):
        raise argparse.ArgumentTypeError(f"{text}: give env://, tcp://HOST:PORT or file:///PATH")
    if url.scheme == "tcp" and (not url.hostname or port is None):
        raise argparse.ArgumentTypeError(f"{text}: a tcp:// address needs a host and a port, e.g. tcp://node1:29500")
    if url.scheme == "file" and not url.path:
        raise argparse.ArgumentTypeError(f"{text}: a file:// address needs a path, e.g. file:///tmp/rendezvous")
    return text


# ------------------------------------------------------------------------------------------- a closed stdout


class _WritesOnWhenClosed:
    """A text stream that keeps working after the reader at the other end of its pipe has gone (`| head`, a closed
    pager or terminal): the first BrokenPipeError points the stream's file descriptor at os.devnull, as the
    Python documentation recommends (signal module, "Note on SIGPIPE"), and every later write goes there."""

    def __init__(self, stream):
        self._stream = stream

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()
            self._stream.flush()  # what was buffered for the pipe goes to os.devnull now

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_closed_output():
    """Let the script go on, and end with its own exit status, when stdout or stderr is a pipe whose reader has
    closed it: the output of a run is its files, so a closed terminal must not stop or fail the work. Call it first
    thing in a script's `if __name__ == "__main__":` block."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _WritesOnWhenClosed):
            setattr(sys, name, _WritesOnWhenClosed(stream))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(error):
    """The message of a user-facing error, without the traceback a DataLoader worker wraps around it; for an
    OSError its reason and the path it names, without the errno."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
        last = last.removeprefix(prefix)
    return last


class ConfigError(ValueError):
    """A flag, or a combination of flags, that cannot work; reported in one line without a traceback."""

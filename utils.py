"""Logging, distributed and process helpers shared by train.py and engine.py: progress logging, the process group
(torchrun, SLURM) and its collectives, stop signals, optional packages, autocast dtypes and RNG state.

File writing is in safe_io.py, command-line checks in cli.py."""
import builtins
import datetime
import os
import random
import re
import signal
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist


class SmoothedValue:
    """Track a series of values; report the median/average over a window and the global average.

    Values may be device tensors: they stay on the device until something is read (at print time), when the whole
    window and the running total are copied to the host in one transfer. The training loop thus pays no host sync
    per logged value.
    """

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"
        self._device_total = None  # sum of the tensor values not yet added to total

    def update(self, value, n=1):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            self._device_total = value * n if self._device_total is None else self._device_total + value * n
        else:
            self.total += value * n
        self.deque.append(value)
        self.count += n

    def _to_host(self):
        if self._device_total is None:
            return
        window = list(self.deque)
        on_device = [v for v in window if isinstance(v, torch.Tensor)] + [self._device_total]
        host_values = torch.stack([v.float().reshape(()) for v in on_device]).tolist()
        self.total += host_values.pop()
        self._device_total = None
        host_values = iter(host_values)
        self.deque.clear()
        self.deque.extend(next(host_values) if isinstance(v, torch.Tensor) else v for v in window)

    @property
    def median(self):
        self._to_host()
        return sorted(self.deque)[(len(self.deque) - 1) // 2]  # the lower median, like torch.median

    @property
    def avg(self):
        self._to_host()
        return sum(self.deque) / len(self.deque)

    @property
    def global_avg(self):
        self._to_host()
        return self.total / self.count

    @property
    def max(self):
        self._to_host()
        return max(self.deque)

    @property
    def value(self):
        self._to_host()
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


class MetricLogger:
    def __init__(self, delimiter="\t"):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if value is None:
                continue
            if not isinstance(value, (torch.Tensor, float, int)):
                raise TypeError(f"MetricLogger.update({name}=...) expects a number or a tensor, got {type(value)}")
            self.meters[name].update(value)

    def __getattr__(self, attr):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=None):
        """Yield from iterable, printing torchvision's progress line every print_freq iterations and at the end."""
        header = header or ""
        start_time = time.time()
        end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        total = len(iterable)
        counter = "[{0:" + str(len(str(total))) + "d}/{1}]"
        parts = [header, counter, "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        if torch.cuda.is_available():
            parts.append("max mem: {memory:.0f}")
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                fields = {"meters": str(self), "time": str(iter_time), "data": str(data_time), "eta": str(eta)}
                if torch.cuda.is_available():
                    fields["memory"] = torch.cuda.max_memory_allocated() / (1024 * 1024)
                # Meters may be empty (nothing logged yet): drop empty parts instead of doubling the delimiter.
                line = self.delimiter.join(p for p in parts if p and (p != "{meters}" or self.meters))
                print(line.format(i, total, **fields))
            end = time.time()
        total_time = time.time() - start_time
        total_time_str = str(datetime.timedelta(seconds=int(total_time)))
        print(f"{header} Total time: {total_time_str} ({total_time / max(total, 1):.4f} s / it)".lstrip())


def collate_fn(batch):
    return tuple(zip(*batch))


# ---------------------------------------------------------------------------------------------- distributed


class DistributedSetupError(RuntimeError):
    """The launch environment cannot form a process group (reported in one line)."""


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def finish_distributed():
    """Wait for every process (rank 0 may still be writing files) and leave the process group. A process that
    exits while another still uses the group can be aborted in gloo's teardown ("terminate called without an
    active exception"), which torchrun then reports as a failed run."""
    if is_dist_avail_and_initialized():
        dist.barrier()
        dist.destroy_process_group()


# What gloo and NCCL say when another process of the group has gone (killed, crashed, its node lost).
PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|NCCL communicator was aborted|"
                       r"remote process exited|ProcessGroupNCCL.*(?:watchdog|abort)", re.IGNORECASE)


def describe_lost_peer(error):
    """The first half of the one line a process ends with when a collective failed because another process of the
    run stopped (instead of the backend's traceback); None when error is not that."""
    if not is_dist_avail_and_initialized() or not PEER_LOST.search(str(error)):
        return None
    world_size = get_world_size()
    who = f"rank {1 - get_rank()}" if world_size == 2 else f"another of the {world_size} processes"
    reason = PEER_LOST.search(str(error)).group(0)
    return f"{who} of this run stopped ({reason}), so rank {get_rank()} stops too"


def all_gather(data):
    """Gather any picklable object from every process; returns a list with one entry per rank."""
    if get_world_size() == 1:
        return [data]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


def broadcast_object(obj, src=0):
    """Every process gets rank src's obj (any picklable object), so all ranks act on one decision."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def reduce_dict(input_dict, average=True):
    """Sum (or average) a dict of scalar tensors over all processes; every process gets the same result."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())  # same order on every rank
        values = torch.stack([input_dict[k] for k in names])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))


def reduce_losses_and_stop_signal(loss_dict):
    """The loss terms averaged over all processes, and the stop signal any process received (0 if none; SIGTERM
    before SIGINT), the same on every rank, so that all processes stop at the same training step instead of leaving
    the others waiting in a collective. One collective call for both: each stop signal is a 0/1 term in the sum."""
    signum = _stop["signal"] or 0
    if get_world_size() < 2:
        return loss_dict, signum
    a_loss = next(iter(loss_dict.values()))
    flag_names = [f"stop signal {s}" for s in STOP_SIGNALS]
    flags = torch.tensor([float(signum == s) for s in STOP_SIGNALS], dtype=a_loss.dtype, device=a_loss.device)
    reduced = reduce_dict({**loss_dict, **dict(zip(flag_names, flags))})
    received = torch.stack([reduced.pop(name) for name in flag_names]).tolist()  # one read back for all flags
    return reduced, int(max((s for s, share in zip(STOP_SIGNALS, received) if share > 0), default=0))


def setup_for_distributed(is_master):
    """Silence print() on every process but the master; print(..., force=True) still prints everywhere."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print


def _launch_environment():
    """(rank, world_size, local_rank) from torchrun or SLURM, or None when not launched distributed."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_LOCALID", 0))
    return None


def init_distributed_mode(args):
    """Join the process group described by torchrun's or SLURM's environment; sets args.distributed/rank/gpu."""
    launch = _launch_environment()
    if launch is None:
        print("Not using distributed mode")
        args.distributed = False
        args.world_size = 1  # what checkpoints record, whatever --world-size said
        return
    args.rank, args.world_size, args.gpu = launch
    if args.dist_url == "env://":
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise DistributedSetupError(
                f"--dist-url env:// needs {' and '.join(missing)} in the environment (torchrun sets them; under "
                "SLURM export MASTER_ADDR=<first node's hostname> MASTER_PORT=<free port>)"
            )
    args.distributed = True
    on_cuda = torch.device(args.device).type == "cuda"
    args.dist_backend = "nccl" if on_cuda else "gloo"
    device_id = None
    if on_cuda:
        torch.cuda.set_device(args.gpu)
        device_id = torch.device("cuda", args.gpu)
    print(f"| distributed init (rank {args.rank}): {args.dist_url}", flush=True)
    dist.init_process_group(
        backend=args.dist_backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank,
        device_id=device_id,
    )
    dist.barrier()
    setup_for_distributed(args.rank == 0)


# ----------------------------------------------------------------------------------------------------- signals


class StopRequested(BaseException):
    """SIGINT or SIGTERM asked the run to stop; exit_code is the shell's convention, 128 + the signal number.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on its way turns it into another error.
    """

    def __init__(self, signum, where=""):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}{' ' + where if where else ''}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stop = {"signal": None}


def _record_stop_signal(signum, frame):
    # Only recorded: an exception raised from here would strike whatever bytecode runs at that moment (a file write,
    # a DataLoader's shutdown, a finaliser that swallows it), so the run acts on it at its own checks instead.
    _stop["signal"] = _stop["signal"] or signum


def record_stop_signals():
    """From now on SIGINT and SIGTERM are only recorded: the run stops at its next check (check_stop, or the
    collective check of every training step), so that no write is cut short."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record_stop_signal)


def check_stop(where, device):
    """Raise StopRequested on every rank when any process has received a stop signal. A collective call: every rank
    must make it at the same point, and then all stop there together instead of one leaving the others waiting."""
    stop_signal = stop_signal_of_any_rank(device)
    if stop_signal:
        raise StopRequested(stop_signal, where)


def stop_signal_of_any_rank(device):
    """The stop signal any process received (0 if none), the same on every rank: one collective call outside the
    training steps, so that all processes stop together there too."""
    return reduce_losses_and_stop_signal({"none": torch.zeros((), device=device)})[1]


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: workers leave SIGINT / SIGTERM to the main process, which stops them; otherwise
    a Ctrl-C reaches the workers too and the main process fails on their death instead of stopping cleanly."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


# ------------------------------------------------------------------------------------------ optional packages


class OptionalDependencyError(ImportError):
    """A flag asked for a package that is not installed (reported in one line with the command to install it)."""


def tensorboard_writer_class():
    """torch's SummaryWriter, imported only when --tensorboard asks for it (tensorboard is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise OptionalDependencyError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


# ----------------------------------------------------------------------------------------------------- RNG


def autocast_dtype(device_type):
    """The --amp autocast dtype: float16 on CUDA (with loss scaling), bfloat16 elsewhere (CPU autocast's own)."""
    return torch.float16 if device_type == "cuda" else torch.bfloat16


def cpu_has_bfloat16_instructions(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU reports AVX512-BF16 or AMX-BF16, the instructions that run --amp's bfloat16 autocast natively
    (without them bfloat16 is emulated, several times slower than float32). Reads Linux's cpuinfo; False where there
    is none to read."""
    try:
        with open(cpuinfo) as file:
            words = set(file.read().split())
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16"})


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_rng_state():
    """The state of torch (CPU and CUDA), numpy and random as tensors and plain Python data, so a checkpoint
    holding it loads with torch.load(weights_only=True)."""
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "algorithm": algorithm,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "random": [version, list(internal_state), gauss_next],
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["algorithm"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    version, internal_state, gauss_next = state["random"]
    random.setstate((version, tuple(internal_state), gauss_next))

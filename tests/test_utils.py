"""utils.py and safe_io.py: meters and progress lines, crash-safe writes, RNG state round trips, distributed helpers (2 gloo ranks)."""
import builtins
import errno
import json
import os
import random
import re
import signal
import socket
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import safe_io
import utils


def test_smoothed_value_statistics_and_format():
    meter = utils.SmoothedValue(window_size=3)
    for v in [1.0, 5.0, 2.0, 4.0]:
        meter.update(v)
    assert (meter.median, meter.max, meter.value) == (4.0, 5.0, 4.0)  # window holds 5, 2, 4
    assert meter.avg == pytest.approx(11 / 3)
    assert meter.global_avg == pytest.approx(3.0)
    assert str(meter) == "4.0000 (3.0000)"
    meter.update(10.0, n=2)  # a batch mean over 2 samples weighs twice
    assert meter.global_avg == pytest.approx((12 + 2 * 10) / 6)
    even = utils.SmoothedValue(window_size=4)
    for v in [3.0, 1.0, 4.0, 2.0]:
        even.update(v)
    assert even.median == torch.tensor([3.0, 1.0, 4.0, 2.0]).median().item() == 2.0  # the lower middle


def test_tensor_updates_defer_the_host_copy_to_print_time(monkeypatch):
    host_copies = []
    for method in ("item", "tolist", "__float__"):
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, _method=method):
            host_copies.append(_method)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counting)

    from_tensors, from_floats = utils.SmoothedValue(), utils.SmoothedValue()
    values = torch.linspace(0.5, 3.0, 50)
    for value in values:
        from_tensors.update(value.clone())
        from_floats.update(value.tolist())
    host_copies.clear()
    for _ in range(50):
        from_tensors.update(torch.tensor(1.5))
        from_floats.update(1.5)
    assert host_copies == []  # updating never copied a value to the host

    assert str(from_tensors) == str(from_floats)
    assert host_copies == ["tolist"]  # reading the window and the total: one transfer
    assert from_tensors.global_avg == pytest.approx(from_floats.global_avg)


def test_metric_logger_progress_lines(capsys):
    logger = utils.MetricLogger(delimiter="  ")
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    for i in logger.log_every(range(5), print_freq=2, header="Epoch: [3]"):
        logger.update(lr=0.01 * (i + 1), loss=torch.tensor(float(i)))
    lines = capsys.readouterr().out.splitlines()

    number = r"\d+\.\d{4}"
    progress = re.compile(
        rf"Epoch: \[3\]  \[(\d)/5\]  eta: \d+:\d\d:\d\d  lr: (\d\.\d{{6}})  loss: ({number}) \(({number})\)"
        rf"  time: {number}  data: {number}(  max mem: \d+)?$"  # max mem only where CUDA is available
    )
    matches = [progress.match(line) for line in lines[:-1]]
    assert all(matches), lines
    assert [m.group(1) for m in matches] == ["0", "2", "4"]  # every print_freq iterations and the last one
    assert [m.group(2) for m in matches] == ["0.010000", "0.030000", "0.050000"]
    assert [m.group(3, 4) for m in matches][-1] == ("2.0000", "2.0000")  # median of window 0..4, global mean
    assert re.fullmatch(r"Epoch: \[3\] Total time: 0:00:00 \(\d+\.\d{4} s / it\)", lines[-1])


def test_metric_logger_rejects_non_numbers():
    with pytest.raises(TypeError, match="loss"):
        utils.MetricLogger().update(loss="1.0")


def test_collate_fn_keeps_samples_separate():
    images, targets = utils.collate_fn([("a", {"id": 1}), ("b", {"id": 2})])
    assert images == ("a", "b") and targets == ({"id": 1}, {"id": 2})


class _FailingWriter:
    """A file that accepts `budget` bytes, then fails like a full disk."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        if len(data) > self.budget:
            self.f.write(bytes(data[: self.budget]))
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("failure", ["disk_full", "interrupt"])
def test_save_atomic_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint.pth"
    safe_io.save_atomic({"epoch": 1, "weights": torch.arange(10.0)}, path)
    real_save = torch.save

    def failing_save(obj, f):
        if failure == "interrupt":
            f.write(b"partial")
            raise KeyboardInterrupt
        real_save(obj, _FailingWriter(f, budget=4096))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError if failure == "disk_full" else KeyboardInterrupt) as raised:
        safe_io.save_atomic({"epoch": 2, "weights": torch.zeros(100_000)}, path)
    if failure == "disk_full":  # torch.save itself turns it into a RuntimeError about zip offsets
        assert raised.value.errno == errno.ENOSPC and str(path) in str(raised.value)

    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind
    previous = torch.load(path, weights_only=True)
    assert previous["epoch"] == 1 and torch.equal(previous["weights"], torch.arange(10.0))


def test_save_atomic_and_write_text_atomic_replace_the_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    safe_io.save_atomic({"epoch": 1}, path)
    safe_io.save_atomic({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 2}
    safe_io.write_text_atomic(tmp_path / "note.txt", "first")
    safe_io.write_text_atomic(tmp_path / "note.txt", "second")
    assert (tmp_path / "note.txt").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "note.txt"]


def test_append_jsonl_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    safe_io.append_jsonl(log, {"epoch": 0, "loss": 1.5})
    safe_io.append_jsonl(log, {"epoch": 1, "loss": 1.25})
    with open(log, "ab") as f:  # a crash in the middle of the next append
        f.write(b'{"epoch": 2, "lo')
    safe_io.append_jsonl(log, {"epoch": 2, "loss": 1.0})
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records == [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 1.25}, {"epoch": 2, "loss": 1.0}]


def _draws():
    return (torch.rand(5).tolist(), torch.randn(3).tolist(), np.random.rand(4).tolist(),
            np.random.randn(3).tolist(), [random.random() for _ in range(3)], random.gauss(0, 1))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    utils.seed_everything(123)
    _draws()
    # Leave cached Gaussians pending: numpy's and random's states then carry more than the key array.
    np.random.randn()
    random.gauss(0, 1)
    safe_io.save_atomic({"rng": utils.get_rng_state()}, tmp_path / "ckpt.pth")
    expected = _draws()

    utils.seed_everything(999)  # move every generator elsewhere
    state = torch.load(tmp_path / "ckpt.pth", weights_only=True)["rng"]
    utils.set_rng_state(state)
    assert _draws() == expected


def test_seed_everything_is_reproducible():
    utils.seed_everything(7)
    first = _draws()
    utils.seed_everything(7)
    assert _draws() == first


def test_bfloat16_instructions_are_read_from_the_cpu_flags(tmp_path):
    """train.py warns that --amp on CPU is slow only where the CPU lacks native bfloat16 (AVX512-BF16 or AMX)."""
    def cpuinfo(flags):
        path = tmp_path / f"cpuinfo-{len(flags)}"
        path.write_text("".join(f"processor\t: {cpu}\nflags\t\t: fpu sse2 avx2 {flags}\n\n" for cpu in range(2)))
        return path

    assert not utils.cpu_has_bfloat16_instructions(cpuinfo("avx512f avx512bw"))
    assert utils.cpu_has_bfloat16_instructions(cpuinfo("avx512f avx512_bf16"))
    assert utils.cpu_has_bfloat16_instructions(cpuinfo("amx_tile amx_bf16"))
    assert not utils.cpu_has_bfloat16_instructions(tmp_path / "no such file")


def test_setup_for_distributed_silences_non_master(monkeypatch, capsys):
    monkeypatch.setattr(builtins, "print", builtins.print)  # restored after the test
    utils.setup_for_distributed(is_master=False)
    print("hidden")
    print("shown", force=True)
    assert capsys.readouterr().out == "shown\n"


def test_init_distributed_mode_without_launcher_and_slurm_without_master(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = types.SimpleNamespace(dist_url="env://", device="cpu")
    utils.init_distributed_mode(args)
    assert args.distributed is False and utils.get_world_size() == 1 and utils.get_rank() == 0

    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(utils.DistributedSetupError, match="MASTER_ADDR and MASTER_PORT") as raised:
        utils.init_distributed_mode(args)
    assert "\n" not in str(raised.value)
    assert (args.rank, args.world_size, args.gpu) == (3, 8, 1)


# ------------------------------------------------------------------------------------ two gloo processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, port, out_dir, gt_path, predictions):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import coco_eval
    from pycocotools.coco import COCO

    args = types.SimpleNamespace(dist_url="env://", device="cpu")
    utils.init_distributed_mode(args)
    losses = {"b": torch.tensor(10.0 * rank), "a": torch.tensor(rank + 1.0)}
    reduced, no_signal = utils.reduce_losses_and_stop_signal(losses)
    utils.check_stop("during evaluation", torch.device("cpu"))  # no rank has a signal: goes on
    # A SIGTERM that only rank 1 receives, during a training step, is recorded and reaches rank 0 through the same
    # reduction.
    utils.record_stop_signals()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    reduced_again, stop_signal = utils.reduce_losses_and_stop_signal(losses)
    # The evaluation's check stops both ranks at the same batch, not only the one that received the signal.
    try:
        utils.check_stop("during evaluation", torch.device("cpu"))
        evaluation_stop = None
    except utils.StopRequested as stop:
        evaluation_stop = (str(stop), stop.exit_code)

    # What DistributedSampler(shuffle=False) gives each rank for an odd dataset: rank 0 repeats image 0 as padding.
    image_ids = sorted(predictions)
    padded = image_ids + image_ids[: len(image_ids) % 2]
    evaluator = coco_eval.CocoEvaluator(COCO(gt_path))
    for image_id in padded[rank::2]:
        evaluator.update({image_id: predictions[image_id]})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    result = {"reduced": [{k: v.item() for k, v in r.items()} for r in (reduced, reduced_again)],
              "signals": [no_signal, stop_signal], "evaluation_stop": evaluation_stop, "gathered": utils.all_gather(rank * 7), "stats": evaluator.stats}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pth"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_reduce_stop_gather_and_evaluate_like_one(tmp_path):
    # Imported here, not at the top: the spawned workers import this module and need none of it.
    from helpers import evaluate, jittered_evaluation

    gt_path, predictions = jittered_evaluation(tmp_path, num_images=9, detections_per_image=5)
    single_process = evaluate(gt_path, predictions)

    mp.spawn(_distributed_worker, args=(_free_port(), str(tmp_path), str(gt_path), predictions), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pth", weights_only=True)
        assert result["reduced"] == [{"a": 1.5, "b": 5.0}] * 2
        assert result["signals"] == [0, signal.SIGTERM]
        assert result["evaluation_stop"] == ("stopped by SIGTERM during evaluation", 143)
        assert result["gathered"] == [0, 7]
        assert result["stats"] == single_process  # padding repeats dropped: exactly the single-process numbers
    assert 0.1 < single_process[0] < 0.9

"""Issue 5's promises, through the real command line: exact resume after SIGKILL, no silent overwrite, safe loading,
bad input reported in one line with nothing damaged, non-finite loss, and no hang when a rank dies."""
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import (LITE, REPO, SCRIPT_TIMEOUT, assert_ok, read_log, run_in_one_interpreter, run_script, torchrun,
                     train_args)
from safe_io import LOCK_NAME

# Left out of the quick loop (pytest -m "not slow"): every test runs train.py in a subprocess (torchrun too), most
# of them training.
pytestmark = pytest.mark.slow


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(directory):
    """sha256 of the files in directory, but for the lock file that train.py takes in its --output-dir."""
    return {p.name: digest(p) for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != LOCK_NAME}


def final_parameters(output_dir):
    return torch.load(Path(output_dir) / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]


def assert_user_error(result, *fragments):
    """Non-zero exit, no traceback, and one stderr line that names what is wrong."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def start_and_kill_mid_epoch(command_args, epoch, launcher=None):
    """Start train.py, SIGKILL its whole process group once `epoch` has started, and wait for it to die."""
    command = (launcher or [sys.executable]) + [str(REPO / "train.py"), *map(str, command_args)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        # After the epoch's first step: under torchrun an epoch of the tiny set is 3 steps per rank, so a later
        # progress line can be the last step's, and the kill would land in the epoch's saves instead.
        if re.search(rf"Epoch: \[{epoch}\]\s+\[\s*0/", line):
            os.killpg(process.pid, signal.SIGKILL)
            # torchrun's workers may sit in process groups of their own: a rank left alive would go on writing.
            kill_processes_writing_into(str(command_args[command_args.index("--output-dir") + 1]))
            break
    process.wait(timeout=SCRIPT_TIMEOUT)
    assert process.returncode != 0, "".join(seen[-50:])


def kill_processes_writing_into(output_dir):
    """SIGKILL every process whose command line names output_dir, and wait until none is left."""
    deadline = time.monotonic() + SCRIPT_TIMEOUT
    while time.monotonic() < deadline:
        alive = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if pid != os.getpid() and output_dir in command_line(pid)]
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes writing into {output_dir} outlived SIGKILL")


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def without_times(log):
    return [{k: v for k, v in record.items() if k != "time_s"} for record in log]


@pytest.mark.parametrize("launcher", [None, torchrun(2)], ids=["single", "torchrun2"])
def test_resume_after_sigkill_is_bit_identical(shapes_root, tmp_path, launcher):
    """A requeued job reruns its own command: --resume auto starts fresh, then continues after the kill."""
    flags = ["--use-deterministic-algorithms", "-j", 1]
    reference = tmp_path / "reference"
    assert_ok(run_script("train.py", *train_args(shapes_root, reference, *flags), launcher=launcher))

    interrupted = tmp_path / "interrupted"
    command = train_args(shapes_root, interrupted, *flags, "--resume", "auto")
    start_and_kill_mid_epoch(command, epoch=1, launcher=launcher)
    log_path = interrupted / "log.jsonl"
    assert [r["epoch"] for r in read_log(interrupted)] == [0]
    assert torch.load(interrupted / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"] == 0
    # What a kill while appending epoch 0's line leaves (checkpoint.pth already holds epoch 0): a torn line.
    log_path.write_text(log_path.read_text()[:50])
    resumed = run_script("train.py", *command, launcher=launcher)
    assert_ok(resumed)
    assert f"--resume auto: continuing from {interrupted / 'checkpoint.pth'}" in resumed.stdout
    assert "Epoch: [0]" not in resumed.stdout

    expected, actual = final_parameters(reference), final_parameters(interrupted)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert without_times(read_log(interrupted)) == without_times(read_log(reference))  # no epoch missing or doubled
    best = [torch.load(d / "model_best.pth", map_location="cpu", weights_only=True) for d in (reference, interrupted)]
    assert best[0]["epoch"] == best[1]["epoch"]
    assert all(torch.equal(best[0]["model"][k], best[1]["model"][k]) for k in best[0]["model"])

    if launcher is None:  # a job requeued once more after its last epoch: nothing to do, not an error
        before = snapshot(interrupted)
        finished = run_script("train.py", *command)
        assert_ok(finished)
        assert "nothing left to train" in finished.stdout and "Epoch:" not in finished.stdout
        assert snapshot(interrupted) == before


def test_existing_checkpoint_is_never_overwritten_without_resume(trained_run, shapes_root):
    output_dir, _ = trained_run
    before = snapshot(output_dir)
    result = run_script("train.py", *train_args(shapes_root, output_dir))
    assert_user_error(result, str(output_dir / "checkpoint.pth"), "--resume")
    assert snapshot(output_dir) == before


def test_malicious_checkpoint_is_refused_and_never_runs(shapes_root, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Exploit(), "epoch": 0}, evil)
    for flag in ("--resume", "--weights"):
        result = run_script("train.py", *train_args(shapes_root, tmp_path / "out", flag, evil))
        assert_user_error(result, str(evil))
        assert not marker.exists()


def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(trained_run, shapes_root, tmp_path):
    output_dir, _ = trained_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("checkpoint.pth", "log.jsonl"):
        (run_dir / name).write_bytes((output_dir / name).read_bytes())
    poisoned = torch.load(output_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    bias = next(k for k in poisoned["model"] if k.startswith("head.classification_head") and k.endswith(".1.bias"))
    poisoned["model"][bias].fill_(float("nan"))
    torch.save(poisoned, run_dir / "poisoned.pth")  # in the run's folder: another run's folder is refused
    before = snapshot(run_dir)

    result = run_script("train.py", *train_args(shapes_root, run_dir, "--resume", run_dir / "poisoned.pth", epochs=3))
    assert_user_error(result, "epoch 2", "iteration 0", "classification", "image ids")
    after = snapshot(run_dir)  # the resume healed the folder first (model_1.pth, curves.png) but changed no file
    assert {name: after[name] for name in before} == before and set(after) - set(before) == {"model_1.pth",
                                                                                              "curves.png"}
    resumed = run_script("train.py", *train_args(shapes_root, run_dir, "--resume", run_dir / "checkpoint.pth",
                                                 epochs=3))
    assert_ok(resumed)
    assert [r["epoch"] for r in read_log(run_dir)] == [0, 1, 2]


# A valid two-split COCO folder: two 64x48 images, one box each, per split (SSDlite trains on 2 at least).
PURPLE = Image.new("RGB", (64, 48), (120, 30, 200))
PICTURES = {"a.jpg": PURPLE, "b.jpg": PURPLE}
BOXES = [{"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0} for i in (1, 2)]


def train_file_with(annotation):
    """A break_it that replaces the training annotation file by one listing a.jpg with this annotation."""
    return lambda root, coco_folder: coco_folder(root, {"a.jpg": PURPLE}, [annotation], splits=("train",))


def coco_run(root, output_dir, *extra):
    return ["--dataset", "coco", "--data-path", root, "--model", LITE, "--epochs", 1, "-b", 2, "-j", 0,
            "--output-dir", output_dir, *extra]


BAD_DATA_CASES = {
    "missing_dir": (lambda root, coco_folder: None, ["instances_val2017.json"]),
    "malformed_json": (lambda root, coco_folder: (root / "annotations" / "instances_val2017.json").write_text(
        "{\"images\": [,"), ["instances_val2017.json"]),
    "missing_image": (lambda root, coco_folder: (root / "train2017" / "a.jpg").unlink(), ["a.jpg", "1"]),
    "corrupt_image": (lambda root, coco_folder: (root / "train2017" / "a.jpg").write_bytes(
        b"\xff\xd8\xff\xe0 not a jpeg"), ["a.jpg"]),
    "bad_bbox": (train_file_with({"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, "x", 20], "area": 1,
                                  "iscrowd": 0}), ["bbox", "instances_train2017.json"]),
    "unknown_category": (train_file_with({"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 5, 9, 9], "area": 81,
                                          "iscrowd": 0}), ["7", "instances_train2017.json"]),
    "no_usable_training_image": (train_file_with({"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 9],
                                                  "area": 0, "iscrowd": 0}), ["instances_train2017.json"]),
}


@pytest.fixture(scope="module")
def bad_data_results(tmp_path_factory, coco_folder):
    """{case: (result, sha256 of its output folder before, after)}: each case's train.py run on a folder with the
    defect, all in one interpreter. The output folders hold a file of the user's."""
    root = tmp_path_factory.mktemp("bad_data")
    cases, before = {}, {}
    for case, (break_it, _) in BAD_DATA_CASES.items():
        data_root, output_dir = root / case / "coco", root / case / "out"
        if case != "missing_dir":
            coco_folder(data_root, PICTURES, BOXES)
            break_it(data_root, coco_folder)
        output_dir.mkdir(parents=True)
        (output_dir / "notes.txt").write_text("the user's\n")
        before[case] = snapshot(output_dir)
        cases[case] = ("train.py", coco_run(data_root, output_dir))
    results = run_in_one_interpreter(cases, root / "runner")
    return {case: (results[case], before[case], snapshot(root / case / "out")) for case in cases}


@pytest.mark.parametrize("case", BAD_DATA_CASES)
def test_bad_data_is_reported_in_one_line(case, bad_data_results):
    result, before, after = bad_data_results[case]
    assert_user_error(result, *BAD_DATA_CASES[case][1])
    assert after == before


def test_bad_flags_are_reported_in_one_line(trained_run, shapes_root, tmp_path):
    output_dir, _ = trained_run
    checkpoint = output_dir / "checkpoint.pth"
    cases = [
        (["--batch-size", 0], ["--batch-size"]),
        (["--model", "yolo"], ["--model", "yolo"]),
        (["--data-augmentation", "mosaic"], ["--data-augmentation", "mosaic"]),
        (["--lr-scheduler", "steplr"], ["--lr-scheduler", "steplr"]),
        (["--backend", "tv_tensor"], ["--use-v2"]),
        (["--weights", tmp_path / "missing.pth"], ["missing.pth"]),
        (["--resume", checkpoint, "--model", "ssd300_vgg16"], [str(checkpoint), LITE, "ssd300_vgg16"]),
        (["--resume", checkpoint, "--epochs", 2], [str(checkpoint), "--epochs"]),
        (["--keep-checkpoints", 0], ["--keep-checkpoints"]),
        (["--resume", "auto", "--output-dir", ""], ["--resume auto", "--output-dir"]),
        (["--format-only", "--output-dir", ""], ["--format-only", "--output-dir"]),
    ]
    results = run_in_one_interpreter(
        {index: ("train.py", [*train_args(shapes_root, tmp_path / "out", epochs=2), *extra])
         for index, (extra, _) in enumerate(cases)}, tmp_path / "runner")
    for index, (extra, fragments) in enumerate(cases):
        assert_user_error(results[index], *fragments)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_another_models_checkpoint_is_rejected_with_the_mismatch(trained_run, shapes_root, tmp_path):
    output_dir, _ = trained_run
    args = train_args(shapes_root, tmp_path / "out", "--model", "ssd300_vgg16", "--weights", output_dir / "model_1.pth")
    result = run_script("train.py", *args)
    assert_user_error(result, "model_1.pth", "missing")


def rank_of(pid):
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(entry for entry in environ if entry.startswith(b"RANK=")).split(b"=")[1])


def test_when_one_rank_dies_the_other_exits_promptly_in_one_line(shapes_root, tmp_path):
    logs = tmp_path / "logs"
    command = torchrun(2) + ["--log-dir", str(logs), "--tee", "3", str(REPO / "train.py"),
                             *map(str, train_args(shapes_root, tmp_path / "out", epochs=50))]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        for line in process.stdout:
            if re.search(r"Epoch: \[0\]\s+\[\s*2/", line):
                break
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(next(int(pid) for pid in workers if rank_of(pid) == 1), signal.SIGKILL)
        after_the_kill, _ = process.communicate(timeout=SCRIPT_TIMEOUT)
        assert process.returncode != 0
        # Promptly: rank 0 stops at its next collective, in the epoch of the kill, instead of training on through
        # the 50 epochs (or waiting out gloo's timeout), however busy the machine.
        epochs_after = [int(epoch) for epoch in re.findall(r"Epoch: \[(\d+)\]", after_the_kill)]
        assert max(epochs_after, default=0) == 0, after_the_kill[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    # What rank 0 printed (torchrun's own report of the failure is torchrun's): one line, no gloo traceback.
    stderr = next(logs.rglob("attempt_0/0/stderr.log")).read_text()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    assert "rank 1 of this run stopped" in lines[0] or "stopped by SIGTERM" in lines[0], lines[0]

"""Issue 24's promises, through the real command line: a requeued job heals whatever a kill left, at any of an
epoch's saves, and never overwrites later epochs with an older checkpoint's; files read back are checked; signals
are recorded and acted on at known points; an I/O error ends a run in one line."""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import models
import run_folder
import safe_io
import shapes
from helpers import (REPO, SLOW_SAVE_LAUNCHER, SLOW_STEP_LAUNCHER, assert_ok, assert_one_line, finish,
                     launcher, permission_bits_bind, read_log, run_in_one_interpreter, run_script, snapshot,
                     start_train, stderr_lines, temp_files, tiny_run_args, wait_for_line)

# The last epoch of a 2-epoch tiny run writes four files: checkpoint.pth, model_1.pth, model_best.pth (with
# --eval-freq 2 the last epoch is the first evaluated, so the best) and its log line.
LAST_EPOCH_SAVES = ["checkpoint.pth", "model_1.pth", "model_best.pth", "log.jsonl"]
EARLIER_SAVE = "model_0.pth"

# Runs train.py unchanged and, at each save of interest, copies the output folder as a SIGKILL at that instant would
# leave it: every earlier file complete, the file being written cut in half (a temporary file, or for the log an
# unterminated last line). The run itself goes on to the end: the uninterrupted run the healed folders must equal.
KILL_SNAPSHOT_LAUNCHER = """
import os, runpy, shutil, sys
sys.path.insert(0, {repo!r})
import torch
output_dir, wanted = {output_dir!r}, {wanted!r}
real_save, real_fsync = torch.save, os.fsync

def leave_as_a_kill_would(name, partial, written_from):
    copy = os.path.join(os.path.dirname(output_dir), "killed-at-" + name)
    shutil.copytree(output_dir, copy)
    cut = os.path.join(copy, os.path.basename(partial))
    with open(cut, "r+b") as f:
        f.truncate((written_from + os.path.getsize(cut)) // 2)
    wanted.remove(name)

def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    f.flush()
    name = os.path.basename(f.name).split(".")[1] + ".pth"  # replacing()'s temporary name: .NAME.pth.XXXXXXXX.tmp
    if name in wanted and (name == "model_0.pth" or obj["epoch"] == {last_epoch}):
        leave_as_a_kill_would(name, f.name, written_from=0)

def fsync(fd):
    real_fsync(fd)
    path = os.readlink(f"/proc/self/fd/{{fd}}")
    if path.endswith("/log.jsonl") and wanted == ["log.jsonl"]:  # the last epoch's line, after its other saves
        with open(path, "rb") as f:
            last_line_start = f.read().rstrip(b"\\n").rfind(b"\\n") + 1
        leave_as_a_kill_would("log.jsonl", path, written_from=last_line_start)

torch.save, os.fsync = save, fsync
sys.argv = sys.argv[1:]  # run_script's: [launcher, train.py, flags...]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def requeue_command(tiny_root, output_dir):
    """What a cluster reruns after a kill: the job's own command, with --resume auto."""
    return tiny_run_args(tiny_root, output_dir, "--resume", "auto", "--use-deterministic-algorithms")


@pytest.fixture(scope="module")
def killed_folders(tiny_root, tmp_path_factory):
    """(the uninterrupted run's folder, {save: the folder a kill during that save left})."""
    root = tmp_path_factory.mktemp("requeue")
    output_dir = root / "uninterrupted"
    wanted = [EARLIER_SAVE, *LAST_EPOCH_SAVES]
    (root / "launcher.py").write_text(KILL_SNAPSHOT_LAUNCHER.format(
        repo=str(REPO), output_dir=str(output_dir), wanted=wanted, last_epoch=1))
    assert_ok(run_script("train.py", *requeue_command(tiny_root, output_dir),
                         launcher=[sys.executable, str(root / "launcher.py")]))
    return output_dir, {name: root / f"killed-at-{name}" for name in wanted}


def without_lock(digests):
    """A snapshot but for the lock file, which names its latest holder."""
    return {name: digest for name, digest in digests.items() if name != ".train.lock"}


def weights(path):
    checkpoint = models.load_checkpoint_file(path)
    return checkpoint["epoch"], checkpoint["model"]


def assert_same_run(actual_dir, expected_dir):
    """The same files; the same weights and epochs in every .pth; the same log but for the times."""
    def names(directory):
        return sorted(name for name in os.listdir(directory) if name != ".train.lock")

    assert names(actual_dir) == names(expected_dir)
    for name in names(expected_dir):
        if name.endswith(".pth"):
            (expected_epoch, expected), (actual_epoch, actual) = (weights(d / name) for d in (expected_dir, actual_dir))
            assert actual_epoch == expected_epoch, name
            assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected), name

    def without_times(directory):
        return [{k: v for k, v in record.items() if k != "time_s"} for record in read_log(directory)]

    assert without_times(actual_dir) == without_times(expected_dir)


@pytest.mark.slow
@pytest.mark.parametrize("save", [EARLIER_SAVE, *LAST_EPOCH_SAVES])
def test_a_requeued_job_heals_a_kill_at_any_save(save, killed_folders, tiny_root, tmp_path):
    uninterrupted, killed = killed_folders
    folder = tmp_path / "run"
    shutil.copytree(killed[save], folder)
    assert len(temp_files(folder)) == (save != "log.jsonl")
    requeued = run_script("train.py", *requeue_command(tiny_root, folder))
    assert_ok(requeued)
    assert temp_files(folder) == []
    assert_same_run(folder, uninterrupted)
    retrained = save in (EARLIER_SAVE, "checkpoint.pth")
    assert ("nothing left to train" in requeued.stdout) != retrained
    if not retrained:  # the folder healed without training: what was restored is said
        assert f"of epoch 1 from {folder / 'checkpoint.pth'}" in requeued.stdout
        assert "Epoch:" not in requeued.stdout
        before = snapshot(folder)
        assert_ok(run_script("train.py", *requeue_command(tiny_root, folder)))  # and once more: nothing changes
        assert without_lock(snapshot(folder)) == without_lock(before)


@pytest.mark.slow
def test_an_older_checkpoint_is_refused_over_later_epochs(killed_folders, tiny_root, tmp_path):
    uninterrupted, killed = killed_folders
    folder = tmp_path / "run"
    shutil.copytree(uninterrupted, folder)
    shutil.copy(killed["checkpoint.pth"] / "checkpoint.pth", folder / "epoch0.pth")  # epoch 0's checkpoint
    before = snapshot(folder)
    result = run_script("train.py", *tiny_run_args(tiny_root, folder, "--resume", folder / "epoch0.pth"))
    assert_one_line(result.returncode, result.stderr, 1, "epoch0.pth holds epoch 0", "checkpoint.pth of epoch 1",
                    "model_1.pth", "log.jsonl up to epoch 1", "new --output-dir")
    assert without_lock(snapshot(folder)) == without_lock(before)


@pytest.mark.slow
def test_lines_of_the_log_that_are_not_records_are_kept_aside(killed_folders, tiny_root, tmp_path):
    uninterrupted, killed = killed_folders
    folder = tmp_path / "run"
    shutil.copytree(killed["log.jsonl"], folder)
    log = folder / "log.jsonl"
    first, torn = log.read_bytes().split(b"\n", 1)
    foreign = [b"# resumed after the outage of monday", b'{"epoch": "x"}', b"\xff\xfe not UTF-8", b"[1, 2]"]
    log.write_bytes(b"\n".join([first, *foreign, torn]))
    result = run_script("train.py", *requeue_command(tiny_root, folder))
    assert_ok(result)
    assert "4 line(s) that are not epoch records moved to" in result.stdout
    assert (folder / "log.jsonl.unreadable").read_bytes() == b"\n".join(foreign) + b"\n"
    assert json.loads(log.read_text().splitlines()[-1])["epoch"] == 1
    (folder / "log.jsonl.unreadable").unlink()
    assert_same_run(folder, uninterrupted)


# ------------------------------------------------------------------------------- files read back are checked

def changed_checkpoint(change):
    """A case: the finished run's checkpoint.pth with change(checkpoint) applied, resumed for one more epoch in its
    own folder."""
    def build(folder, uninterrupted):
        checkpoint = torch.load(uninterrupted / "checkpoint.pth", map_location="cpu", weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, folder / "checkpoint.pth")
        shutil.copy(uninterrupted / "log.jsonl", folder / "log.jsonl")
        return ["--resume", folder / "checkpoint.pth", "--epochs", 3]
    return build


def with_a_folder_named(name):
    """A case: the finished run's folder with `name` a directory, resumed for one more epoch."""
    def build(folder, uninterrupted):
        for file in ("checkpoint.pth", "log.jsonl"):
            shutil.copy(uninterrupted / file, folder / file)
        (folder / name).unlink(missing_ok=True)
        (folder / name).mkdir()
        return ["--resume", folder / "checkpoint.pth", "--epochs", 3]
    return build


REFUSED_ON_RESUME = {
    "no_args": (changed_checkpoint(lambda c: c.pop("args")), ["no 'args'"]),
    "string_epoch": (changed_checkpoint(lambda c: c.update(epoch="1")), ["'epoch' is not a whole number", "str"]),
    "no_param_groups": (changed_checkpoint(lambda c: c["optimizer"].pop("param_groups")), ["'optimizer'"]),
    "bad_rng_states": (changed_checkpoint(lambda c: c.update(rng_states=[{"torch": 1}])), ["'rng_states'"]),
    "log_record_without_epoch": (changed_checkpoint(lambda c: c["log_record"].pop("epoch")), ["'log_record'"]),
    "string_best_value": (changed_checkpoint(lambda c: c["best"].update(value="0.5")), ["'best'", "number 'value'"]),
    "empty_scheduler_state": (changed_checkpoint(lambda c: c.update(lr_scheduler={})), ["'lr_scheduler'"]),
    "no_categories": (changed_checkpoint(lambda c: c.pop("categories")), ["no 'categories'"]),
    "another_batch_size": (lambda folder, run: [*changed_checkpoint(lambda c: None)(folder, run), "-b", 4],
                           ["--batch-size 2 per process, not 4", "resume with --batch-size 2"]),
    "another_world_size": (changed_checkpoint(lambda c: c["args"].update(world_size=2)),
                           ["on 2 process(es), not 1", "torchrun"]),
    "log_is_a_folder": (with_a_folder_named("log.jsonl"), ["log.jsonl", "Is a directory", "epoch 1", "intact"]),
    "lock_is_a_folder": (with_a_folder_named(".train.lock"), [".train.lock", "Is a directory", "epoch 1"]),
}


@pytest.fixture(scope="module")
def refused_on_resume(killed_folders, tiny_root, tmp_path_factory):
    """{case: (exit code, stderr, sha256 of the case folder before, after)}, all run in one interpreter."""
    uninterrupted, _ = killed_folders
    root = tmp_path_factory.mktemp("refused")
    cases, before = {}, {}
    for name, (build, _) in REFUSED_ON_RESUME.items():
        (root / name).mkdir()
        extra = build(root / name, uninterrupted)
        cases[name] = ("train.py", tiny_run_args(tiny_root, root / name, *extra))
        before[name] = snapshot(root / name)
    results = run_in_one_interpreter(cases, root / "runner")
    return {name: (results[name].returncode, results[name].stderr, before[name], snapshot(root / name))
            for name in cases}


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSED_ON_RESUME)
def test_a_damaged_checkpoint_or_changed_steps_are_refused_in_one_line(case, refused_on_resume):
    code, stderr, before, after = refused_on_resume[case]
    assert_one_line(code, stderr, 1, "checkpoint.pth", *REFUSED_ON_RESUME[case][1])
    assert {name: digest for name, digest in after.items() if name in before} == before


# ------------------------------------------------------------------------------------- signals are recorded

def catches_sigterm(pid):
    """Whether the process has a handler for SIGTERM, which Python itself never installs: train.py's first lines
    have run. A Ctrl-C before that (while the interpreter starts and loads site-packages) is Python's own."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


# From train.py's first line: plain launches for its imports and start-up, which no machine ends within these; then
# launches with 2-second SGD steps for the start-up's end and the first training steps, which the first save (after
# four steps) follows on any machine.
IMPORT_DELAYS = [0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7]
TRAINING_DELAYS = [1, 2.5, 6]


@pytest.mark.slow
def test_ctrl_c_at_any_moment_of_the_start_up_is_one_line(tiny_root, tmp_path):
    """No launch sent SIGINT may print a traceback, ignore the signal or go on: each ends at once with one line."""
    slow_steps = launcher(SLOW_STEP_LAUNCHER, tmp_path, step_seconds=2)
    outcomes = {}
    for delay in IMPORT_DELAYS + TRAINING_DELAYS:
        output_dir = tmp_path / f"run-after-{delay}s"
        process = start_train(*tiny_run_args(tiny_root, output_dir),
                              launcher=slow_steps if delay in TRAINING_DELAYS else None)
        while process.poll() is None and not catches_sigterm(process.pid):
            time.sleep(0.001)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        returncode, stdout, stderr = finish(process)
        clean = (returncode == 130 and "Traceback" not in stderr and len(stderr_lines(stderr)) == 1
                 and "stopped by SIGINT" in stderr and not (output_dir / "checkpoint.pth").exists())
        outcomes[delay] = "clean" if clean else f"exit {returncode}: {stderr[-500:]}"
    assert {delay: outcome for delay, outcome in outcomes.items() if outcome != "clean"} == {}


@pytest.mark.slow
def test_sigterm_during_the_last_save_finishes_the_run(tiny_root, tmp_path):
    output_dir = tmp_path / "out"
    process = start_train(*tiny_run_args(tiny_root, output_dir, epochs=1),
                          launcher=launcher(SLOW_SAVE_LAUNCHER, tmp_path))
    wait_for_line(process, "SAVE-IN-PROGRESS")  # writing checkpoint.pth of epoch 0, the last
    process.send_signal(signal.SIGTERM)
    returncode, stdout, stderr = finish(process)
    assert returncode == 0, stderr[-3000:]
    assert "SIGTERM came while the last epoch was saved: the run is finished" in stdout
    assert sorted(name for name in os.listdir(output_dir) if not name.startswith(".")) == \
        ["checkpoint.pth", "curves.png", "log.jsonl", "model_0.pth", "model_best.pth"]
    assert [record["epoch"] for record in read_log(output_dir)] == [0]


# ---------------------------------------------------------------------------------- I/O errors in one line

@pytest.mark.slow
def test_a_folder_removed_mid_run_is_one_line(tiny_root, tmp_path):
    output_dir = tmp_path / "out"
    process = start_train(*tiny_run_args(tiny_root, output_dir, epochs=1), launcher=launcher(SLOW_STEP_LAUNCHER,
                                                                                             tmp_path))
    wait_for_line(process, r"Epoch: \[0\]\s+\[0/")
    shutil.rmtree(output_dir)
    returncode, _, stderr = finish(process)
    assert_one_line(returncode, stderr, 1, f"{output_dir / 'checkpoint.pth'}: No such file or directory",
                    f"the folder {output_dir} is gone")


@pytest.mark.slow
def test_a_folder_made_read_only_mid_run_is_one_line(tiny_root, tmp_path):
    output_dir = tmp_path / "out"
    process = start_train(*tiny_run_args(tiny_root, output_dir, epochs=1),
                          launcher=launcher(SLOW_STEP_LAUNCHER, tmp_path), prefix=permission_bits_bind())
    wait_for_line(process, r"Epoch: \[0\]\s+\[0/")
    output_dir.chmod(0o555)
    try:
        returncode, _, stderr = finish(process)
    finally:
        output_dir.chmod(0o755)
    assert_one_line(returncode, stderr, 1, f"{output_dir / 'checkpoint.pth'}: Permission denied",
                    "no epoch was saved yet")
    assert sorted(path.name for path in output_dir.iterdir()) == [".train.lock"]


def test_a_killed_dataset_generation_leaves_nothing_behind_the_next_one(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    prefix = f".tiny.tmp-{socket.gethostname()}-"
    left_by_a_kill = tmp_path / f"{prefix}{int(dead.stdout)}-k3x9a2b"
    in_progress = tmp_path / f"{prefix}{os.getpid()}-a8b7c6d5"  # a live process's generation
    for folder in (left_by_a_kill, in_progress):
        (folder / "train2017").mkdir(parents=True)
    shapes.ensure_shapes_dataset(tmp_path / "tiny", num_train=2, num_val=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([in_progress.name, "tiny"])


FULL_PAGE_LINE = '{"epoch": 0, "note": "%s"}\n' % ("x" * (4096 - 25))


@pytest.fixture
def full_disk(tmp_path):
    """A folder holding a one-line log.jsonl on a 64 KiB file system then filled up (mounting a tmpfs needs root;
    skipped otherwise)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        (folder / "log.jsonl").write_text(FULL_PAGE_LINE)  # so that any append needs a new page
        with pytest.raises(OSError), open(folder / "filler", "wb") as filler:
            for _ in range(100):
                filler.write(b"\0" * 4096)
                filler.flush()
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_at_the_log_or_the_results_is_one_line_naming_the_file(full_disk):
    log = full_disk / "log.jsonl"
    with pytest.raises(OSError) as raised:
        safe_io.append_jsonl(log, {"epoch": 1, "lr": 0.1})
    line = run_folder.describe_io_error(raised.value, argparse.Namespace(output_dir=str(full_disk), test_only=False))
    assert line.startswith(f"{log}: No space left on device; no epoch was saved yet"), line
    assert log.read_text() == FULL_PAGE_LINE

    detections = full_disk / "detections.json"
    with pytest.raises(OSError) as raised:
        safe_io.write_text_atomic(detections, "[]" * 10_000)
    line = run_folder.describe_io_error(raised.value, argparse.Namespace(output_dir=str(full_disk), test_only=True))
    assert line.startswith(f"{detections}: No space left on device; the files in {full_disk} are as they were"), line
    assert sorted(path.name for path in full_disk.iterdir()) == ["filler", "log.jsonl"]


# train.py unchanged, with every image that PIL opens (in the DataLoader's workers too) one second slow, so that a
# signal sent after the first evaluation batch lands while the next one loads.
SLOW_IMAGE_LAUNCHER = """
import runpy, sys, time
sys.path.insert(0, {repo!r})
from PIL import Image
real_open = Image.open
def slow_open(*args, **kwargs):
    time.sleep(1)
    return real_open(*args, **kwargs)
Image.open = slow_open
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_during_an_evaluation_with_workers_is_one_line(killed_folders, tiny_root, tmp_path):
    uninterrupted, _ = killed_folders
    process = start_train(*tiny_run_args(tiny_root, tmp_path / "out", "--test-only", "--resume",
                                         uninterrupted / "checkpoint.pth", "--eval-batch-size", 1, "-j", 2),
                          launcher=launcher(SLOW_IMAGE_LAUNCHER, tmp_path))
    wait_for_line(process, r"Test:\s+\[0/2\]")
    process.send_signal(signal.SIGINT)
    returncode, _, stderr = finish(process)
    assert_one_line(returncode, stderr, 130, "stopped by SIGINT during evaluation")
    assert not (tmp_path / "out" / "detections.json").exists()

"""Issue 16's promises, through the real command line: no user file is ever overwritten (output folder lock, another
run's folder, predict / export outputs), SIGINT and SIGTERM stop cleanly, bad input stops at start-up in one line,
one image decoder everywhere, annotation paths stay in the image folder, files follow the umask."""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import coco_utils
import models
import presets
import run_folder
import safe_io
from helpers import (LITE, SCRIPT_TIMEOUT, SLOW_SAVE_LAUNCHER, SLOW_STEP_LAUNCHER, assert_ok, assert_one_line,
                     finish, launcher, read_log, run_in_one_interpreter, run_script, snapshot, start_train,
                     stderr_lines, temp_files, tiny_run_args, wait_for_line, write_coco_folder)
from models.postprocess import match_detections


def stop_during_save(tiny_root, folder, stop_signal):
    """A run sent stop_signal while it wrote epoch 0's checkpoint.pth (the first file an epoch writes): (output_dir,
    exit code, stderr, the temporary files present when the signal was sent)."""
    output_dir = folder / "out"
    process = start_train(*tiny_run_args(tiny_root, output_dir), launcher=launcher(SLOW_SAVE_LAUNCHER, folder))
    wait_for_line(process, "SAVE-IN-PROGRESS")
    in_progress = temp_files(output_dir)
    process.send_signal(stop_signal)
    returncode, _, stderr = finish(process)
    return output_dir, returncode, stderr, in_progress


@pytest.fixture(scope="module")
def stopped_during_save(tiny_root, tmp_path_factory):
    return stop_during_save(tiny_root, tmp_path_factory.mktemp("run"), signal.SIGTERM)


def assert_save_finished_then_stopped(stopped, stop_signal):
    output_dir, returncode, stderr, in_progress = stopped
    assert len(in_progress) == 1 and in_progress[0].startswith(".checkpoint.pth.")  # the signal came mid-save
    checkpoint = output_dir / "checkpoint.pth"
    assert_one_line(returncode, stderr, 128 + stop_signal, stop_signal.name, "after saving epoch 0",
                    f"--resume {checkpoint}")
    assert temp_files(output_dir) == []
    assert models.load_checkpoint_file(output_dir / "model_0.pth")["epoch"] == 0
    assert models.load_checkpoint_file(checkpoint)["epoch"] == 0
    assert [record["epoch"] for record in read_log(output_dir)] == [0]


@pytest.mark.slow
def test_sigterm_during_a_save_finishes_it_and_stops(stopped_during_save):
    assert_save_finished_then_stopped(stopped_during_save, signal.SIGTERM)


@pytest.mark.slow
def test_ctrl_c_during_a_save_finishes_it_and_stops(tiny_root, tmp_path):
    assert_save_finished_then_stopped(stop_during_save(tiny_root, tmp_path, signal.SIGINT), signal.SIGINT)


@pytest.mark.slow
def test_rerun_after_preemption_resumes_cleans_stale_temp_files_and_stops_on_sigterm(stopped_during_save, tiny_root,
                                                                                      tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_during_save[0], run_dir)
    # What a SIGKILL mid-write leaves (safe_io.replacing's names), next to files that only look alike.
    (run_dir / ".checkpoint.pth.k3x_9a2b.tmp").write_bytes(b"half a checkpoint")
    look_alikes = (".notes.tmp", "notes.k3x_9a2b.tmp", ".model_0.pth.K3X9A2BC.tmp", "my.txt")
    for name in look_alikes:
        (run_dir / name).write_text("the user's")
    users = {name: digest for name, digest in snapshot(run_dir).items() if name in look_alikes}
    process = start_train(*tiny_run_args(tiny_root, run_dir, "--resume", run_dir / "checkpoint.pth"),
                          launcher=launcher(SLOW_STEP_LAUNCHER, tmp_path))
    seen = wait_for_line(process, r"Epoch: \[1\]\s+\[0/")
    assert "removed 1 temporary file(s)" in "".join(seen)
    assert not (run_dir / ".checkpoint.pth.k3x_9a2b.tmp").exists()
    process.send_signal(signal.SIGTERM)
    returncode, _, stderr = finish(process)
    assert_one_line(returncode, stderr, 143, "SIGTERM", "at epoch 1, iteration", "--resume")
    assert {name: digest for name, digest in snapshot(run_dir).items() if name in users} == users
    assert models.load_checkpoint_file(run_dir / "checkpoint.pth")["epoch"] == 0


@pytest.mark.slow
def test_two_runs_into_one_folder_one_runs_the_other_stops_at_once(tiny_root, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    before = snapshot(output_dir)
    slow_steps = launcher(SLOW_STEP_LAUNCHER, tmp_path)
    first, second = (start_train(*tiny_run_args(tiny_root, output_dir), launcher=slow_steps) for _ in range(2))
    try:
        deadline = time.monotonic() + SCRIPT_TIMEOUT
        while first.poll() is None and second.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        loser, winner = (first, second) if first.poll() is not None else (second, first)
        returncode, _, stderr = finish(loser)
        assert winner.poll() is None  # the loser stopped while the winner was still running
        assert_one_line(returncode, stderr, 1, str(output_dir), "in use by another run", f"pid {winner.pid} ")
        wait_for_line(winner, r"Epoch: \[0\]\s+\[0/")
        winner.send_signal(signal.SIGINT)
        returncode, _, stderr = finish(winner)
        assert_one_line(returncode, stderr, 130, "SIGINT", "at epoch 0, iteration")
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
    after = snapshot(output_dir)
    assert after["notes.txt"] == before["notes.txt"]
    assert temp_files(output_dir) == [] and not (output_dir / "checkpoint.pth").exists()


@pytest.mark.slow
def test_ctrl_c_while_train_py_starts_is_one_line(tmp_path):
    process = start_train("--output-dir", tmp_path / "out")
    time.sleep(1.0)  # inside the imports of torch and friends, or just after them
    process.send_signal(signal.SIGINT)
    returncode, _, stderr = finish(process)
    assert_one_line(returncode, stderr, 130, "stopped by SIGINT")


# ------------------------------------------------------------------------------------ refused at start-up


def other_run(folder):
    """A folder holding a finished run's files (no checkpoint.pth)."""
    folder.mkdir()
    (folder / "model_3.pth").write_bytes(b"weights of another run")
    (folder / "log.jsonl").write_text('{"epoch": 3}\n')
    return folder


def train_case(*extra, output="out"):
    return lambda tmp, run: ("train.py", ["--dataset", "coco", "--data-path", tmp / "coco", "--model", LITE,
                                          "-b", 2, "-j", 0, "--epochs", 1, "--output-dir", tmp / output, *extra])


def with_data(case, file_name="a.png", bbox=(5, 5, 20, 20), annotations_text=None):
    """case, given a COCO folder with one 64x48 image per split: the file name its annotation files give, its
    bbox, or the whole val file text can be bad."""
    def build(tmp, run):
        write_coco_folder(tmp / "coco", {"a.png": Image.new("RGB", (64, 48), (120, 30, 200))},
                          [{"id": 1, "image_id": 1, "category_id": 1, "bbox": list(bbox)}],
                          images=[{"id": 1, "file_name": file_name, "width": 64, "height": 48}],
                          annotation_text=None if annotations_text is None else {"val": annotations_text})
        return case(tmp, run)
    return build


def predict_into_shots(listed_by_an_earlier_run):
    """predict.py photos/ into shots/, which already holds an a.png, listed or not in an earlier detections.json."""
    def build(tmp, run):
        (tmp / "shots").mkdir()
        (tmp / "shots" / "a.png").write_text("the user's a.png")
        if listed_by_an_earlier_run:
            (tmp / "shots" / "detections.json").write_text(json.dumps({"images": [{"picture": "a.png"}]}))
        return "predict.py", ["--weights", run / "model_0.pth", "--output-dir", tmp / "shots", tmp / "photos"]
    return build


STARTUP_CASES = {
    # train.py: output folders
    "output_dir_is_a_file": (train_case(output="user.txt"), ["user.txt", "is a file"]),
    "output_dir_parent_is_a_file": (train_case(output="user.txt/out"), ["user.txt", "is a file"]),
    "folder_of_another_run": (train_case(output="other"), ["other", "model_3.pth", "log.jsonl"]),
    "resume_into_another_runs_folder": (lambda tmp, run: train_case(
        "--resume", run / "checkpoint.pth", "--lr-scheduler", "cosineannealinglr", "--epochs", 5,
        output="other")(tmp, run),
                                        ["other", "another run's checkpoint"]),
    "resume_a_finished_run": (lambda tmp, run: train_case(
        "--resume", run / "checkpoint.pth", "--lr-scheduler", "cosineannealinglr", output=run)(tmp, run),
                              ["checkpoint.pth already finished epoch 0", "--epochs 1 must be above 1"]),
    # flag combinations (each flag's own range is the parser's: tests/test_entry_points.py)
    "ssdlite_batch_of_one": (train_case("-b", 1), ["--batch-size 1", "BatchNorm", "at least 2"]),
    # resume mismatches
    "resume_model_only_file": (lambda tmp, run: train_case("--resume", run / "model_0.pth")(tmp, run),
                               ["model_0.pth", "weights only"]),
    "resume_with_another_optimizer": (lambda tmp, run: train_case("--resume", run / "checkpoint.pth", "--opt",
                                                                  "adamw")(tmp, run), ["--opt sgd", "--opt adamw"]),
    "resume_with_another_scheduler": (lambda tmp, run: train_case("--resume", run / "checkpoint.pth")(tmp, run),
                                      ["--lr-scheduler cosineannealinglr", "--lr-scheduler multisteplr"]),
    "resume_with_another_grouping": (lambda tmp, run: train_case(
        "--resume", run / "checkpoint.pth", "--lr-scheduler", "cosineannealinglr", "--norm-weight-decay", 0)(tmp, run),
        ["without --norm-weight-decay"]),
    # annotation files (training reads its file first; both have the same fault here)
    "deeply_nested_json": (with_data(train_case(), annotations_text="[" * 100_000 + "]" * 100_000),
                           ["instances_val2017.json", "nested too deeply"]),
    "absolute_file_name": (with_data(train_case(), file_name="/etc/hostname"),
                           ["instances_train2017.json", "image id 1", "/etc/hostname",
                            "--allow-image-paths-outside-folder"]),
    "dot_dot_file_name": (with_data(train_case(), file_name="../../secret.png"),
                          ["instances_train2017.json", "image id 1", "../../secret.png"]),
    "bbox_overflowing": (with_data(train_case(), bbox=(0, 0, 1e308, 1e308)),
                         ["instances_train2017.json", "image id 1", "overflow"]),
    # predict.py and export.py: outputs that are, or would replace, inputs
    "predict_into_the_input_folder": (lambda tmp, run: ("predict.py", ["--weights", run / "model_0.pth",
                                                                       "--output-dir", tmp / "photos",
                                                                       tmp / "photos"]),
                                      ["--output-dir", "is the input"]),
    "predict_into_a_folder_holding_an_input": (lambda tmp, run: ("predict.py", [
        "--weights", run / "model_0.pth", "--output-dir", tmp, tmp / "photos" / "a.png"]), ["holds the input"]),
    "predict_over_a_file_it_did_not_write": (predict_into_shots(False), ["already holds a.png", "no earlier"]),
    "predict_into_a_file": (lambda tmp, run: ("predict.py", ["--weights", run / "model_0.pth", "--output-dir",
                                                             tmp / "user.txt", tmp / "photos"]), ["is a file"]),
    "export_over_the_weights": (lambda tmp, run: ("export.py", ["--weights", tmp / "model.pth", "--output",
                                                                tmp / "model.pth"]), ["--weights"]),
    "export_over_a_check_image": (lambda tmp, run: ("export.py", ["--weights", run / "model_0.pth", "--output",
                                                                  tmp / "photos" / "a.png", "--check",
                                                                  tmp / "photos" / "a.png"]), ["--check"]),
    "export_into_a_missing_folder": (lambda tmp, run: ("export.py", ["--weights", run / "model_0.pth", "--output",
                                                                     tmp / "missing" / "m.onnx"]),
                                     ["missing", "does not exist"]),
}


def prepare_case(folder, run):
    """A case's folder: user files that must survive, a photo, a copy of weights and another run's folder."""
    folder.mkdir()
    (folder / "user.txt").write_text("the user's notes")
    (folder / "photos").mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(folder / "photos" / "a.png")
    shutil.copy(run / "model_0.pth", folder / "model.pth")
    other_run(folder / "other")


@pytest.fixture(scope="module")
def start_up_results(stopped_during_save, tiny_root, tmp_path_factory):
    """{case: (exit code, stderr, sha256 of the case folder before, after, the run's folder before, after)} for
    STARTUP_CASES, PREDICT_AGAIN and TEST_ONLY (evaluating a checkpoint with --output-dir its own run's folder)."""
    run = stopped_during_save[0]
    root = tmp_path_factory.mktemp("cases")
    cases, before = {}, {}
    for name, (build, _) in STARTUP_CASES.items():
        prepare_case(root / name, run)
        script, args = build(root / name, run)
        cases[name] = (script, args)
        before[name] = snapshot(root / name)
    prepare_case(root / PREDICT_AGAIN, run)
    script, args = predict_into_shots(True)(root / PREDICT_AGAIN, run)
    cases[PREDICT_AGAIN] = (script, args)
    before[PREDICT_AGAIN] = snapshot(root / PREDICT_AGAIN)
    shutil.copytree(run, root / TEST_ONLY)
    args = tiny_run_args(tiny_root, root / TEST_ONLY, "--test-only", "--resume", root / TEST_ONLY / "checkpoint.pth")
    cases[TEST_ONLY] = ("train.py", args)
    before[TEST_ONLY] = snapshot(root / TEST_ONLY)
    run_before = snapshot(run)
    results = run_in_one_interpreter(cases, root / "runner")
    return {name: (results[name].returncode, results[name].stderr, before[name], snapshot(root / name), run_before,
                   snapshot(run)) for name in cases}


TEST_ONLY = "test_only_next_to_a_checkpoint"
PREDICT_AGAIN = "predict_again_over_its_own_pictures"


@pytest.mark.slow
def test_predict_may_replace_what_an_earlier_run_wrote(start_up_results):
    code, stderr, before, after, _, _ = start_up_results[PREDICT_AGAIN]
    assert code == 0, stderr[-3000:]
    replaced = {"shots/a.png", "shots/detections.json"}
    assert replaced <= set(before) and all(after[name] != before[name] for name in replaced)
    assert {name: digest for name, digest in after.items() if name in before and name not in replaced} == \
        {name: digest for name, digest in before.items() if name not in replaced}


@pytest.mark.slow
def test_test_only_may_write_next_to_a_checkpoint_and_leaves_it_alone(start_up_results):
    code, stderr, before, after, _, _ = start_up_results[TEST_ONLY]
    assert code == 0, stderr[-3000:]
    assert "checkpoint.pth" in before
    # Every file but the lock, which now names this evaluation as its last holder.
    assert {name: digest for name, digest in after.items() if name in before and name != safe_io.LOCK_NAME} == \
        {name: digest for name, digest in before.items() if name != safe_io.LOCK_NAME}


@pytest.mark.slow
@pytest.mark.parametrize("case", STARTUP_CASES)
def test_bad_input_stops_at_start_up_in_one_line_and_touches_nothing(case, start_up_results):
    code, stderr, before, after, run_before, run_after = start_up_results[case]
    assert_one_line(code, stderr, 1, *STARTUP_CASES[case][1])
    assert {name: digest for name, digest in after.items() if name in before} == before
    assert set(after) - set(before) <= {"out/.train.lock"}  # at most a new folder and its lock
    assert run_after == run_before


@pytest.mark.slow
def test_a_refusal_from_a_real_process(stopped_during_save, tmp_path):
    run = stopped_during_save[0]
    prepare_case(tmp_path / "case", run)
    build, fragments = STARTUP_CASES["output_dir_is_a_file"]
    before = snapshot(tmp_path / "case")
    script, args = build(tmp_path / "case", run)
    result = run_script(script, *args)
    assert_one_line(result.returncode, result.stderr, 1, *fragments)
    assert snapshot(tmp_path / "case") == before


# ----------------------------------------------------------------------------------------- one decoder


def odd_pictures():
    """A 16-bit grayscale PNG, a CMYK JPEG, a palette PNG with a transparent colour and a JPEG whose EXIF says
    'rotate 90 degrees', by file name, in write_coco_folder's (image, save options) form."""
    gradient = np.linspace(0, 65535, 96 * 64).reshape(64, 96).astype(np.uint16)
    cmyk = Image.new("CMYK", (80, 60), (0, 200, 255, 30))
    cmyk.paste((200, 0, 50, 0), (10, 10, 50, 40))
    palette = Image.new("P", (70, 50), 0)
    palette.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    palette.paste(1, (20, 10, 50, 40))
    rotated = Image.new("RGB", (90, 40), (30, 160, 60))
    rotated.paste((230, 230, 20), (5, 5, 40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: viewers turn it 90 degrees clockwise
    return {"cmyk.jpg": (cmyk, {}), "exif.jpg": (rotated, {"exif": exif}),
            "palette.png": (palette, {"transparency": 0}), "sixteen.png": (Image.fromarray(gradient), {})}


@pytest.mark.slow
def test_predict_sees_the_pixels_the_loader_sees(stopped_during_save, coco_folder, tmp_path):
    weights = stopped_during_save[0] / "model_0.pth"
    pictures = odd_pictures()
    coco_folder(tmp_path / "coco", pictures, splits=("val",))
    sizes = {name: image.size for name, (image, _) in pictures.items()}  # (width, height) as stored
    names = sorted(sizes)
    result = run_script("predict.py", "--weights", weights, "--score-thresh", 0.01, "-b", 1, "--output-dir",
                        tmp_path / "predictions", tmp_path / "coco" / "val2017")
    assert_ok(result)
    predicted = {Path(r["file"]).name: r for r in json.loads((tmp_path / "predictions" / "detections.json")
                                                            .read_text())["images"]}

    dataset = coco_utils.get_coco(tmp_path / "coco", "val", presets.DetectionPresetEval())
    model = models.get_model(LITE, weights=str(weights), score_thresh=0.01).eval()
    if models.prefers_channels_last(LITE, "cpu", training=False):
        model.to(memory_format=torch.channels_last)
    gray = dataset[names.index("sixteen.png")][0]
    assert gray[:, 0, -1].tolist() == [round(65535 * 95 / (96 * 64 - 1) / 257)] * 3  # rescaled, not clipped
    assert dataset[names.index("palette.png")][0][:, 0, 0].tolist() == [255, 255, 255]  # transparent: white
    assert dataset[names.index("palette.png")][0][:, 20, 30].tolist() == [250, 20, 20]
    total = 0
    for index, name in enumerate(names):
        image, _ = dataset[index]
        assert (image.shape[2], image.shape[1]) == sizes[name]  # as stored: EXIF orientation is not applied
        record = predicted[name]
        assert (record["width"], record["height"]) == sizes[name]
        with torch.inference_mode():
            expected = model([image])[0]
        found = {"boxes": torch.tensor([d["box"] for d in record["detections"]]).reshape(-1, 4),
                 "scores": torch.tensor([d["score"] for d in record["detections"]]),
                 "labels": torch.tensor([d["label"] for d in record["detections"]], dtype=torch.int64)}
        matched, _, _ = match_detections(expected, found, box_tolerance=0.05, score_tolerance=5e-4)
        assert matched == len(expected["boxes"]) == len(found["boxes"]), name
        total += matched
    assert total > 0


# --------------------------------------------------------------------------------------- smaller promises


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        safe_io.save_atomic({"x": torch.zeros(1)}, tmp_path / "a.pth")
        safe_io.write_text_atomic(tmp_path / "b.json", "{}")
    finally:
        os.umask(previous)
    for name in ("a.pth", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_odd_log_warns_in_one_line_and_does_not_stop_training(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_text('{"epoch": 0, "loss": 1.0}\n{"epoch": 1, "lr": 0.1, "train": {"loss": 2}}\n')
    run_folder.draw_curves(str(tmp_path))
    captured = capsys.readouterr()
    assert len(stderr_lines(captured.err)) == 1 and "warning: curves.png not drawn" in captured.err
    assert "log.jsonl:1" in captured.err and not (tmp_path / "curves.png").exists()
    assert temp_files(tmp_path) == []

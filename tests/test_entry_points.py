"""Issue 25's promises for every entry point (train.py, predict.py, export.py, plot_curves.py, bench.py, shapes.py,
browse.py, analyze.py):
every flag range-checked by its parser before any file is touched (a table of every numeric flag against 0, a
negative, nan, inf, a huge value and a non-number), the one output rule of single-file writers (safe_io.
check_output_file), a closed stdout is not a crash (real pipes), and torchvision's reference checkpoints load."""
import argparse
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import analyze
import bench
import browse
import cli
import export
import models
import plot_curves
import predict
import safe_io
import shapes
import train
from helpers import LITE, REPO, SCRIPT_TIMEOUT, save_lively_checkpoint

# ------------------------------------------------------------------------------------------- the flag table

BAD_VALUES = {"zero": "0", "negative": "-1", "nan": "nan", "inf": "inf", "huge": "1" + "0" * 30,
              "non-number": "x"}

# script: (its parser, the arguments it needs besides the flag under test, {numeric flag: values of BAD_VALUES
# that are legitimate for it, and why}). Every flag of a parser with a type= must be listed (checked below).
FLAG_TABLE = {
    "train.py": (train.get_args_parser, ["--output-dir", "{tmp}/out"], {
        "--shapes-num-train": {}, "--shapes-num-val": {},
        "--workers": {"zero": "loads in the training process"},
        "--aspect-ratio-group-factor": {"zero": "two groups (portrait, landscape)", "negative": "-1 disables"},
        "--trainable-backbone-layers": {"zero": "a frozen backbone"},
        "--batch-size": {}, "--epochs": {},
        "--lr": {}, "--momentum": {"zero": "plain SGD"}, "--weight-decay": {"zero": "no decay"},
        "--norm-weight-decay": {"zero": "no decay on normalisation layers"},
        "--lr-steps": {}, "--lr-gamma": {}, "--warmup-iters": {"zero": "no warm-up"},
        "--seed": {"zero": "a seed like any other"},
        "--start-epoch": {"zero": "the first epoch"}, "--print-freq": {}, "--keep-checkpoints": {},
        "--eval-freq": {}, "--eval-batch-size": {}, "--world-size": {},
    }),
    "predict.py": (predict.get_args_parser, ["--weights", "w.pth", "--output-dir", "{tmp}/out", "photos"], {
        "--score-thresh": {"zero": "keep every detection"}, "--batch-size": {}, "--print-freq": {},
    }),
    "export.py": (export.get_args_parser, ["--weights", "w.pth", "--output", "{tmp}/m.onnx"], {
        "--opset": {}, "--score-thresh": {"zero": "keep every detection"},
    }),
    "bench.py": (bench.get_args_parser, [], {"--repeats": {}, "--profile": {"zero": "no profile (the default)"}}),
    "browse.py": (browse.get_args_parser, ["--dataset", "shapes", "--output-dir", "{tmp}/out"], {
        "--limit": {"zero": "draw every image"}, "--seed": {"zero": "the default seed"},
    }),
    "analyze.py": (analyze.get_args_parser, ["--annotations", "gt.json", "--detections", "d.json", "--output-dir",
                                             "{tmp}/out"], {
        "--score-thresh": {"zero": "count every detection"}, "--iou-thresh": {}, "--worst": {"zero": "list none"},
    }),
    "shapes.py": (shapes.get_args_parser, ["--output", "{tmp}/shapes"], {
        "--num-train": {}, "--num-val": {}, "--seed": {"zero": "the default seed"}, "--image-size": {},
        "--workers": {},
    }),
}
# Flags with a type= that are not numbers: checked by the device and --dist-url tables below.
NON_NUMERIC = {"--device", "--dist-url"}


def flag_cases():
    for script, (_, _, flags) in FLAG_TABLE.items():
        for flag, legitimate in flags.items():
            for name in BAD_VALUES:
                yield pytest.param(script, flag, name, name in legitimate, id=f"{script} {flag} {name}")


def parse(script, tmp_path, *flags):
    """Parse the command line `script REQUIRED FLAGS` with the script's own parser: (namespace or None, exit code
    or None, stderr)."""
    make_parser, required, _ = FLAG_TABLE[script]
    argv = [arg.format(tmp=tmp_path) for arg in required] + list(flags)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return make_parser().parse_args(argv), None, stderr.getvalue()
        except SystemExit as exit:
            return None, exit.code, stderr.getvalue()


def values_for(script, flag, value):
    """The flag with the value as many times as the flag takes values (--image-size takes two)."""
    action = next(a for a in FLAG_TABLE[script][0]()._actions if flag in a.option_strings)
    return [flag] + [value] * (action.nargs if isinstance(action.nargs, int) else 1)


@pytest.mark.parametrize("script, flag, bad, legitimate", flag_cases())
def test_every_numeric_flag_is_range_checked_by_its_parser(script, flag, bad, legitimate, tmp_path):
    args, code, stderr = parse(script, tmp_path, *values_for(script, flag, BAD_VALUES[bad]))
    if legitimate:
        assert code is None, stderr
        return
    assert code == 2 and args is None
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error: argument " in lines[0] and flag in lines[0], stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", FLAG_TABLE)
def test_the_flag_table_lists_every_checked_flag(script):
    make_parser, _, flags = FLAG_TABLE[script]
    typed = [action.option_strings for action in make_parser()._actions
             if action.type is not None and action.option_strings and action.type is not str.lower]
    named = [set(names) & (set(flags) | NON_NUMERIC) for names in typed]
    assert all(len(names) == 1 for names in named), typed
    assert set().union(*named) - NON_NUMERIC == set(flags)
    assert all(action.type is not int and action.type is not float for action in make_parser()._actions)


@pytest.mark.parametrize("spec, fragment", [
    ("meta", "meta: not available here; the scripts run on cpu or cuda"),
    ("mps", "mps: not available here"),
    ("xla", "xla: not available here"),
    ("gpu0", "gpu0: not a device name"),
    ("cuda:99", "cuda:99"),
])
@pytest.mark.parametrize("script", ["train.py", "predict.py", "bench.py"])
def test_devices_not_supported_or_not_present_are_one_short_line(script, spec, fragment, tmp_path):
    if spec == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has a GPU 99")
    _, code, stderr = parse(script, tmp_path, "--device", spec)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "argument --device" in lines[0] and fragment in lines[0], stderr
    assert len(lines[0]) < 200  # not torch's dispatcher text


@pytest.mark.parametrize("url, accepted", [
    ("env://", True), ("tcp://node1:29500", True), ("file:///tmp/rendezvous", True),
    ("http://node1:29500", False), ("tcp://node1", False), ("tcp://node1:port", False), ("node1:29500", False),
    ("file://", False),
])
def test_dist_url_needs_a_scheme_torch_distributed_knows(url, accepted, tmp_path):
    _, code, stderr = parse("train.py", tmp_path, "--dist-url", url)
    assert (code is None) == accepted, stderr
    if not accepted:
        assert len(stderr.strip().splitlines()) == 1 and "argument --dist-url" in stderr


def test_the_largest_seed_is_valid_for_numpy_on_every_rank():
    largest = cli.SEED_LIMIT - 1
    assert train.get_args_parser().parse_args(["--seed", str(largest)]).seed == largest
    seeds = [cli.rank_seed(largest, rank) for rank in range(8)]
    assert len(set(seeds)) == 8
    for seed in seeds:
        np.random.seed(seed)  # raises for a seed outside 0 .. 2**32 - 1
    assert cli.rank_seed(5, 3) == 8  # within range, the seeds are the familiar seed + rank


def test_opset_range_is_the_installed_onnx_s(tmp_path):
    onnx = pytest.importorskip("onnx")
    newest = onnx.defs.onnx_opset_version()
    for opset in (export.MIN_OPSET, newest):
        assert parse("export.py", tmp_path, "--opset", str(opset))[0].opset == opset
    for opset in (export.MIN_OPSET - 1, newest + 1, 99):
        _, code, stderr = parse("export.py", tmp_path, "--opset", str(opset))
        assert code == 2 and f"from {export.MIN_OPSET} to {newest}" in stderr


def parsed_train_args(tmp_path, *flags):
    args, code, stderr = parse("train.py", tmp_path, *flags)
    assert code is None, stderr
    return args


@pytest.mark.parametrize("flags, fragment", [
    (["--lr-steps", "-1"], "argument --lr-steps"),  # the parser's
    (["--epochs", "10", "--lr-steps", "5", "10"], "epoch 10 is never reached with --epochs 10"),
    (["--epochs", "10", "--lr-steps", "8", "3"], "increasing order"),
    (["--model", "ssd300_vgg16", "--trainable-backbone-layers", "6"], "ssd300_vgg16 has 5 backbone stages"),
])
def test_flags_checked_against_each_other_stop_before_any_file(flags, fragment, tmp_path):
    args, code, stderr = parse("train.py", tmp_path, *flags)
    if code is not None:
        assert code == 2 and fragment in stderr
    else:
        with pytest.raises(train.ConfigError, match=fragment):
            train.validate_args(args)
    assert list(tmp_path.iterdir()) == []


def test_lr_steps_default_to_torchvision_s_and_given_ones_are_kept(tmp_path):
    default = parsed_train_args(tmp_path, "--epochs", "2")  # torchvision's default steps lie beyond a short run
    train.validate_args(default)
    train.fill_in_implied_flags(default)
    assert default.lr_steps == [16, 22]
    given = parsed_train_args(tmp_path, "--epochs", "10", "--lr-steps", "4", "9")
    train.validate_args(given)
    train.fill_in_implied_flags(given)
    assert given.lr_steps == [4, 9]
    cosine = parsed_train_args(tmp_path, "--epochs", "2", "--lr-steps", "30", "--lr-scheduler", "cosineannealinglr")
    train.validate_args(cosine)  # the steps are MultiStepLR's; cosine ignores them


def snapshot(directory):
    root = Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# One real process per entry point: the parser's line reaches the terminal alone, and nothing is written.
PROCESS_CASES = {
    "train.py": ["--output-dir", "out", "--seed", "-1"],
    "predict.py": ["--weights", "w.pth", "--output-dir", "out", "photos", "--device", "meta"],
    "export.py": ["--weights", "w.pth", "--output", "m.onnx", "--opset", "99"],
    "plot_curves.py": ["log.jsonl", "-o", "notes.txt"],
    "bench.py": ["--json", "photos"],
    "shapes.py": ["--output", "out", "--num-train", "100000000000"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", PROCESS_CASES)
def test_a_refused_command_line_is_one_line_and_touches_nothing(script, tmp_path):
    (tmp_path / "notes.txt").write_text("the user's notes")
    (tmp_path / "log.jsonl").write_text('{"epoch": 0, "lr": 0.1, "train": {"loss": 1.0}}\n')
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "photos" / "a.png")
    before = snapshot(tmp_path)
    result = subprocess.run([sys.executable, str(REPO / script), *PROCESS_CASES[script]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["log.jsonl", "notes.txt", "photos"]


# ------------------------------------------------------------------------------------------ the output rule


def matplotlib_png(path):
    figure = Figure(figsize=(1, 1))
    figure.subplots().plot([0, 1])
    figure.savefig(path, format="png")


def check(path, **kwargs):
    safe_io.check_output_file(str(path), **kwargs)


@pytest.mark.parametrize("name", ["checkpoint.pth", "model_7.pth", "model_best.pth", "log.jsonl"])
def test_a_training_run_s_files_are_never_an_output(name, tmp_path):
    (tmp_path / name).write_bytes(b"a run's file")
    for overwrite in (False, True):
        with pytest.raises(cli.UserInputError, match=f"{name} is the name of a training run's file"):
            check(tmp_path / name, overwrite=overwrite)
    with pytest.raises(cli.UserInputError, match="training run's file"):
        check(tmp_path / "new" / name)  # refused by name, before the folder is looked at


@pytest.mark.parametrize("name", ["notes.txt", "photo.jpg"])
def test_an_existing_file_is_replaced_only_when_it_is_the_script_s_own_kind_or_with_overwrite(name, tmp_path):
    (tmp_path / name).write_text("the user's")
    with pytest.raises(cli.UserInputError, match=f"{name} already exists and is not a PNG.*--overwrite"):
        check(tmp_path / name, kind="a PNG", is_kind=plot_curves.is_matplotlib_png)
    check(tmp_path / name, kind="a PNG", is_kind=plot_curves.is_matplotlib_png, overwrite=True)
    matplotlib_png(tmp_path / "curves.png")
    check(tmp_path / "curves.png", kind="a PNG", is_kind=plot_curves.is_matplotlib_png)
    assert (tmp_path / name).read_text() == "the user's"
    assert sorted(os.listdir(tmp_path)) == sorted([name, "curves.png"])  # the probes are gone


def test_an_input_a_folder_a_special_file_or_a_missing_folder_is_refused(tmp_path):
    (tmp_path / "model.pth").write_bytes(b"weights")
    with pytest.raises(cli.UserInputError, match="is the --weights input"):
        check(tmp_path / "model.pth", inputs=[("--weights", tmp_path / "model.pth")], overwrite=True)
    with pytest.raises(cli.UserInputError, match="is a folder"):
        check(tmp_path, overwrite=True)
    with pytest.raises(cli.UserInputError, match="not a regular file"):
        check("/dev/null", overwrite=True)
    with pytest.raises(cli.UserInputError, match=f"the folder {tmp_path / 'missing'} does not exist"):
        check(tmp_path / "missing" / "a.png")


def test_a_folder_that_takes_no_file_is_found_by_a_probe_not_os_access(tmp_path):
    # /proc passes os.access for root, and takes no new file.
    with pytest.raises(cli.UserInputError, match="--output /proc/x.onnx: cannot write in /proc"):
        check("/proc/x.onnx")


def test_a_final_write_that_fails_names_the_user_s_path(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"epoch": 0, "lr": 0.1, "train": {"loss": 1.0}}) + "\n")
    with pytest.raises(OSError) as failure:
        plot_curves.plot_curves(log, "/proc/curves.png")
    assert cli.one_line(failure.value).startswith("/proc/curves.png: ")


def plot_main(*argv):
    plot_curves.main(plot_curves.get_args_parser().parse_args([str(arg) for arg in argv]))


@pytest.fixture
def two_logs(tmp_path):
    record = json.dumps({"epoch": 0, "lr": 0.1, "train": {"loss": 1.0}}) + "\n"
    for run in ("runA", "runB"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "log.jsonl").write_text(record)
    return tmp_path / "runA" / "log.jsonl", tmp_path / "runB" / "log.jsonl"


def test_plot_curves_never_writes_over_a_log_it_reads(two_logs, tmp_path):
    log_a, log_b = two_logs
    os.symlink(log_b, tmp_path / "latest.txt")  # a log under another name is still an input
    before = snapshot(tmp_path)
    with pytest.raises(cli.UserInputError, match="is the log input"):
        plot_main(log_a, "-o", log_a)
    with pytest.raises(cli.UserInputError, match="is the log input"):
        plot_main(log_a, log_b, "-o", log_b, "--overwrite")
    with pytest.raises(cli.UserInputError, match="is the log input"):
        plot_main(log_a, log_b, "-o", tmp_path / "latest.txt", "--overwrite")
    assert snapshot(tmp_path) == before


def test_plot_curves_replaces_its_own_picture_and_a_user_s_file_only_when_told(two_logs, tmp_path):
    log_a, _ = two_logs
    plot_main(log_a)  # curves.png next to the log, new
    plot_main(log_a)  # again: a matplotlib PNG, replaced
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8 the user's photo")
    with pytest.raises(cli.UserInputError, match="photo.jpg already exists and is not a matplotlib PNG"):
        plot_main(log_a, "-o", tmp_path / "photo.jpg")
    assert (tmp_path / "photo.jpg").read_bytes() == b"\xff\xd8 the user's photo"
    plot_main(log_a, "-o", tmp_path / "photo.jpg", "--overwrite")
    assert plot_curves.is_matplotlib_png(tmp_path / "photo.jpg")


def test_plot_curves_names_a_binary_log(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"{binary}: not a text file"):
        plot_curves.read_log(binary)


def onnx_file(path, metadata):
    onnx = pytest.importorskip("onnx")
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])],
                                   [value("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, path)


def test_export_replaces_only_an_onnx_file_it_wrote(tmp_path):
    ours = {"model": LITE, "input_size": "[320, 320]", "categories": "{}"}
    onnx_file(tmp_path / "ours.onnx", ours)
    onnx_file(tmp_path / "theirs.onnx", {"producer": "someone else"})
    (tmp_path / "notes.txt").write_text("hello, protobuf")
    assert export.is_exported_onnx(tmp_path / "ours.onnx")
    assert not export.is_exported_onnx(tmp_path / "theirs.onnx")
    assert not export.is_exported_onnx(tmp_path / "notes.txt")

    def check_export(*argv):
        export.check_output(export.get_args_parser().parse_args(["--weights", "w.pth", *map(str, argv)]))

    check_export("--output", tmp_path / "ours.onnx")
    for name in ("theirs.onnx", "notes.txt"):
        with pytest.raises(cli.UserInputError, match=f"{name} already exists and is not {export.OUTPUT_KIND}"):
            check_export("--output", tmp_path / name)
        check_export("--output", tmp_path / name, "--overwrite")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(b"a training checkpoint")
    with pytest.raises(cli.UserInputError, match="checkpoint.pth is the name of a training run's file"):
        check_export("--output", run / "checkpoint.pth", "--overwrite")


def bench_main_until_the_work(tmp_path, *argv):
    """bench.main up to its first measurement: the --json check comes before it."""
    args = bench.get_args_parser().parse_args([str(arg) for arg in argv] + ["--rows", "eval", "--quick"])
    args.rows = []  # nothing to measure: main returns after its checks and an empty table
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        bench.main(args)


def test_bench_json_is_checked_before_the_benchmark(tmp_path):
    with pytest.raises(cli.UserInputError, match="--json .* is a folder"):
        bench_main_until_the_work(tmp_path, "--json", tmp_path)
    (tmp_path / "figures.json").write_text('{"mine": 1}')
    with pytest.raises(cli.UserInputError, match="figures.json already exists and is not a bench.py report"):
        bench_main_until_the_work(tmp_path, "--json", tmp_path / "figures.json")
    bench_main_until_the_work(tmp_path, "--json", tmp_path / "report.json")
    assert bench.is_bench_report(tmp_path / "report.json")
    bench_main_until_the_work(tmp_path, "--json", tmp_path / "report.json")  # its own report: replaced
    assert json.loads((tmp_path / "figures.json").read_text()) == {"mine": 1}


# ------------------------------------------------------------------------------------- a closed stdout


def run_with_closed_stdout(script, *args, cwd, read_first_line=False, python_flags=(), timeout=SCRIPT_TIMEOUT):
    """Run script with stdout a pipe whose reader goes away: at once, or after the first line (`| head -1`).
    Returns (exit code, stderr)."""
    process = subprocess.Popen([sys.executable, *python_flags, str(REPO / script), *map(str, args)], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if read_first_line:
        process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    return process.wait(timeout=timeout), stderr


def test_shapes_and_plot_curves_finish_when_stdout_is_closed(tmp_path):
    code, stderr = run_with_closed_stdout("shapes.py", "--output", tmp_path / "s", "--num-train", 2, "--num-val", 1,
                                          "--workers", 1, cwd=tmp_path)
    assert code == 0 and stderr == "", stderr
    assert (tmp_path / "s" / shapes.MANIFEST).is_file()
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 0, "lr": 0.1, "train": {"loss": 1.0}}) + "\n")
    code, stderr = run_with_closed_stdout("plot_curves.py", tmp_path / "log.jsonl", cwd=tmp_path)
    assert code == 0 and stderr == "", stderr
    assert plot_curves.is_matplotlib_png(tmp_path / "curves.png")


@pytest.mark.slow
def test_predict_and_export_finish_their_work_when_stdout_is_closed(tmp_path):
    save_lively_checkpoint(tmp_path / "model_0.pth")
    (tmp_path / "photos").mkdir()
    for index in range(3):
        Image.new("RGB", (64, 48), (40 * index, 90, 200)).save(tmp_path / "photos" / f"{index}.png")
    code, stderr = run_with_closed_stdout("predict.py", "--weights", "model_0.pth", "--output-dir", "out",
                                          "--print-freq", 1, "-b", 1, "photos", cwd=tmp_path)
    assert code == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert len(json.loads((tmp_path / "out" / "detections.json").read_text())["images"]) == 3
    code, stderr = run_with_closed_stdout("export.py", "--weights", "model_0.pth", "--output", "m.onnx", cwd=tmp_path)
    assert code == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert export.is_exported_onnx(tmp_path / "m.onnx")


@pytest.mark.slow
def test_train_goes_on_training_when_stdout_is_closed_and_closes_its_lock(tmp_path):
    """`train.py ... | head -1`, under python -W error::ResourceWarning (an unclosed lock file would print one)."""
    data = tmp_path / "data"
    shapes.ensure_shapes_dataset(data, num_train=4, num_val=2)
    code, stderr = run_with_closed_stdout(
        "train.py", "--dataset", "shapes", "--data-path", data, "--shapes-num-train", 4, "--shapes-num-val", 2,
        "--model", LITE, "--epochs", 1, "-b", 2, "--lr", 0.01, "--lr-scheduler", "cosineannealinglr",
        "--warmup-iters", 1, "-j", 0, "--print-freq", 1, "--seed", 0, "--eval-batch-size", 2,
        "--output-dir", tmp_path / "out", cwd=tmp_path, read_first_line=True,
        python_flags=("-W", "error::ResourceWarning"))
    assert code == 0 and "Traceback" not in stderr and "ResourceWarning" not in stderr, stderr[-3000:]
    assert models.load_checkpoint_file(tmp_path / "out" / "checkpoint.pth")["epoch"] == 0
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 1


# ---------------------------------------------------------------------- torchvision's reference checkpoints


def torchvision_reference_checkpoint(path, state_dict, **extra_args):
    """What torchvision's references/detection/train.py saves: its flags as an argparse.Namespace."""
    flags = argparse.Namespace(model=LITE, lr=0.15, epochs=660, lr_steps=[16, 22], weights=None, **extra_args)
    torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 3}, "args": flags, "epoch": 3}, path)


def test_a_torchvision_reference_checkpoint_loads_under_weights_only(tmp_path):
    model = models.get_model(LITE, num_classes=5).eval()
    torchvision_reference_checkpoint(tmp_path / "model_3.pth", model.state_dict())
    checkpoint = models.load_checkpoint_file(tmp_path / "model_3.pth")
    assert checkpoint["args"]["model"] == LITE and checkpoint["args"]["lr_steps"] == [16, 22]
    loaded, name, _ = models.load_detector(tmp_path / "model_3.pth")  # the model's name comes from its flags
    assert name == LITE
    image = torch.rand(3, 120, 160)
    with torch.inference_mode():
        expected, actual = model([image])[0], loaded([image])[0]
    torch.testing.assert_close(actual, expected)


def test_a_namespace_does_not_open_the_door_to_other_objects(tmp_path):
    import datetime

    torchvision_reference_checkpoint(tmp_path / "odd.pth", {}, started=datetime.date(2024, 1, 1))
    with pytest.raises(models.WeightsError, match="odd.pth' refused: contains non-tensor Python objects"):
        models.load_checkpoint_file(tmp_path / "odd.pth")

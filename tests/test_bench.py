"""bench.py as a user runs it: a quick run's report is well-formed and its parity checks hold; bad flags fail in
one line. No timing assertions: the figures depend on the machine."""
import json
import math
import re

import pytest

from helpers import LITE, assert_ok, run_script

# Left out of the quick loop (pytest -m "not slow"): every test runs bench.py in a subprocess.
pytestmark = pytest.mark.slow

SPEED_UNITS = ("img/s", "samples/s")
TIME_UNITS = ("ms/batch", "s")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    report = tmp_path_factory.mktemp("bench") / "bench.json"
    # SSDlite only: SSD300's VGG16 would take minutes on 2 CPU cores even at the quick sizes.
    result = run_script("bench.py", "--quick", "--model", LITE, "--json", report, "--profile", 6, "--amp-vs-float32")
    assert_ok(result)
    return json.loads(report.read_text()), result.stdout


AUTOCAST_ROWS = ["training step, batch 2, ours bfloat16 vs ours float32",
                 "training step, batch 3, ours bfloat16 vs ours float32",
                 "inference end to end, batch 1, ours bfloat16 vs ours float32",
                 "inference end to end, batch 2, ours bfloat16 vs ours float32"]


def test_report_has_every_row_with_positive_figures_and_exact_ratios(quick_run):
    report, _ = quick_run
    assert {"date", "command", "machine", "sizes", "flags", "rows"} <= set(report)
    assert report["machine"]["versions"]["torch"] and report["machine"]["cpu_count"] >= 1
    assert "--quick" in report["command"] and report["flags"] == {"device": "cpu", "amp": False, "channels_last": None,
                                                                   "compile": False, "amp_vs_float32": True}
    kinds = ["training step, batch 2", "training step, batch 3", *AUTOCAST_ROWS[:2], "inference end to end, batch 1",
             "inference end to end, batch 2", *AUTOCAST_ROWS[2:], "post-processing, batch 2", "loss, batch 2",
             "ssdlite policy, 0 workers", "ssdlite policy, 2 workers", "pycocotools", "faster-coco-eval"]
    names = [row["name"] for row in report["rows"]]
    assert len(names) == len(kinds) == len(set(names))
    for kind, name in zip(kinds, names):
        assert kind in name
    for row in report["rows"]:
        for key in ("ours", "torchvision", "ratio", "speedup"):
            assert math.isfinite(row[key]) and row[key] > 0, row
        assert row["unit"] in SPEED_UNITS + TIME_UNITS, row
        assert row["ratio"] == pytest.approx(row["ours"] / row["torchvision"], rel=1e-12)
        speedup = row["ratio"] if row["unit"] in SPEED_UNITS else 1 / row["ratio"]
        assert row["speedup"] == pytest.approx(speedup, rel=1e-12)


def test_model_rows_report_achieved_gflops_against_the_measured_peak(quick_run):
    report, _ = quick_run
    peak = report["machine"]["peak_gflops"]
    by_operation = report["machine"]["peak_gflops_by_operation"]
    assert set(by_operation) == {"matmul", "convolution"} and peak == max(by_operation.values())
    assert math.isfinite(peak) and peak > 0
    assert report["machine"]["peak_dtype"] == "float32"  # the rows' precision: no --amp
    # --amp-vs-float32 measures the autocast precision's peak too; its rows' ours column is a share of that one.
    by_dtype = report["machine"]["peak_gflops_by_dtype"]
    assert list(by_dtype) == ["float32", "bfloat16"] and by_dtype["float32"] == by_operation
    column_peaks = {"ours": max(by_dtype["bfloat16"].values()), "torchvision": peak}
    # SSDlite320 is 0.58 GMAC per image (torchvision's published figure): 1.17 GFLOP forward, 3x that for a step.
    expected_gflop_per_image = {"inference": 1.166, "training": 3 * 1.166}
    model_rows = [row for row in report["rows"] if "training step" in row["name"] or "inference" in row["name"]]
    assert len(model_rows) == 8
    for row in model_rows:
        kind = "training" if "training" in row["name"] else "inference"
        autocast = row["name"].endswith("ours bfloat16 vs ours float32")
        assert (row["note"] == "torchvision column: ours float32") == autocast
        for side in ("ours", "torchvision"):
            assert row["gflops"][side] / row[side] == pytest.approx(expected_gflop_per_image[kind], rel=0.01)
            side_peak = column_peaks[side] if autocast else peak
            assert row["peak_share"][side] == pytest.approx(row["gflops"][side] / side_peak, rel=1e-9)
    assert all("gflops" not in row for row in report["rows"] if row not in model_rows)


def test_profiles_show_where_each_side_spends_its_time(quick_run):
    _, stdout = quick_run
    sections = stdout.split("\n## profile: ")[1:]
    titles = [section.splitlines()[0] for section in sections]
    assert titles == ["SSDlite training step, batch 2, ours", "SSDlite training step, batch 2, torchvision",
                      "SSDlite inference end to end, batch 2, ours", "SSDlite inference end to end, batch 2, torchvision"]
    for title, section in zip(titles, sections):
        share, total = re.search(r"convolutions \(forward and backward kernels\): ([\d.]+)% of ([\d.]+) ms",
                                 section).groups()
        assert 10 < float(share) < 100 and float(total) > 0, title
        top_operators = [line.split()[0] for line in section.splitlines()[5:11]]
        assert len(top_operators) == 6 and all(name.startswith(("aten::", "torchvision::", "Optimizer"))
                                               for name in top_operators), section
        if "training" in title:  # the backward convolutions are among the largest costs of a step
            assert "aten::convolution_backward" in top_operators, section


def test_both_sides_did_the_same_work(quick_run):
    """The rows' own checks: identical detections, losses and COCO stats, and peaked (not random-init) scores."""
    notes = {row["name"]: row["note"] for row in quick_run[0]["rows"]}
    note_of = lambda kind: next(note for name, note in notes.items() if kind in name)  # noqa: E731
    assert "same detections" in note_of("post-processing") and "WARNING" not in note_of("post-processing")
    candidates = int(note_of("post-processing").split(" candidates/image")[0])
    assert 1000 <= candidates <= 5000
    assert note_of("loss") == "same losses"
    assert "same 12 stats" in note_of("pycocotools")
    # Without --channels-last each side runs in its training script's layout: for SSDlite on CPU, ours is NHWC.
    assert "ours channels_last" in note_of("training step, batch 2")
    assert "ours channels_last" in note_of("inference end to end, batch 1")


def test_table_lists_every_row(quick_run):
    report, stdout = quick_run
    lines = stdout.splitlines()
    assert lines[0].startswith("# python") and "bench.py --quick" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("row "))
    table = lines[header + 2:lines.index("", header)]  # the --profile reports follow after a blank line
    assert len(table) == len(report["rows"])
    for line, row in zip(table, report["rows"]):
        cells = [cell.strip() for cell in line.split("|")]
        assert cells[0] == row["name"] and cells[3] == row["unit"]
        assert float(cells[1]) == pytest.approx(row["ours"], rel=0.01)
        assert float(cells[2]) == pytest.approx(row["torchvision"], rel=0.01)


@pytest.mark.parametrize("flags, fragment", [
    (["--repeats", "0"], "argument --repeats: 0 is out of range"),
    (["--data-path", "/nonexistent/coco"], "--data-path: /nonexistent/coco: data folder not found"),
    (["--amp-vs-float32"], "--amp-vs-float32 times training and inference: --rows data has neither"),
])
def test_bad_flags_fail_in_one_line(flags, fragment):
    result = run_script("bench.py", "--quick", "--rows", "data", "--model", LITE, *flags)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]


@pytest.mark.slow
def test_ssd512_rows_give_absolute_figures_and_the_ratio_to_our_ssd300(tmp_path):
    """torchvision has no SSD512: its rows hold our SSD300 in the torchvision column. Inference, post-processing and
    loss rows, one repeat: SSD512's VGG16 at 512 px is heavy on 2 CPU cores (the training rows take the same path as
    inference's, through ModelPair, and SSD512 trains in tests/test_ssd512.py)."""
    report = tmp_path / "bench.json"
    result = run_script("bench.py", "--quick", "--model", "ssd512_vgg16", "--rows", "infer", "postprocess", "loss",
                        "--json", report)
    assert_ok(result)
    rows = json.loads(report.read_text())["rows"]
    assert [row["name"] for row in rows] == [
        "SSD512 inference end to end, batch 1", "SSD512 inference end to end, batch 2",
        "SSD512 post-processing, batch 2", "SSD512 loss, batch 2"]
    for row in rows:
        assert math.isfinite(row["ours"]) and row["ours"] > 0 and row["torchvision"] > 0, row
        assert row["ratio"] == pytest.approx(row["ours"] / row["torchvision"], rel=1e-12)
        assert "torchvision column: our SSD300 (torchvision has no SSD512)" in row["note"], row
    # FLOPs counted on each side: SSD512's network is 200.1 GFLOP per image forward, SSD300's 69.7 (2.87x).
    for row in rows[:2]:
        flops = {side: row["gflops"][side] / row[side] for side in ("ours", "torchvision")}
        assert flops["ours"] / flops["torchvision"] == pytest.approx(2.87, rel=0.02), row
    assert re.search(r"\d+ / \d+ candidates/image", rows[2]["note"])

"""plot_curves.py: reading a (possibly torn) log.jsonl and drawing a real PNG."""
import json

import matplotlib.image
import pytest

from coco_eval import COCO_STAT_NAMES
from helpers import assert_ok, run_script
from plot_curves import plot_curves, read_log, run_labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def epoch_record(epoch, evaluated):
    record = {"epoch": epoch, "lr": 0.01 / (epoch + 1), "time_s": 2.5,
              "train": {"loss": 9.0 - epoch, "bbox_regression": 3.0 - epoch / 2, "classification": 6.0 - epoch / 2}}
    if evaluated:
        record["coco"] = {name: 0.1 * epoch for name in COCO_STAT_NAMES}
    return record


@pytest.fixture
def torn_log(tmp_path):
    """Four epochs (evaluated on 1 and 3) and the first half of a fifth line, as a crash mid-write leaves it."""
    lines = [json.dumps(epoch_record(epoch, evaluated=epoch % 2 == 1)) for epoch in range(4)]
    torn = json.dumps(epoch_record(4, evaluated=False))[:40]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n" + torn)
    return path


def test_read_log_skips_torn_line_and_keeps_latest_record_per_epoch(torn_log, capsys):
    # A resumed run may log an epoch again after the torn line; the later record wins.
    with open(torn_log, "a") as f:
        f.write("\n" + json.dumps({**epoch_record(2, evaluated=True), "lr": 0.5}) + "\n")
    records = read_log(torn_log)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[2]["lr"] == 0.5 and records[2]["coco"]["AP"] == pytest.approx(0.2)
    assert f"{torn_log}:5: skipping" in capsys.readouterr().err


def test_plot_curves_writes_a_png_that_matplotlib_reads(torn_log, tmp_path):
    output = tmp_path / "curves.png"
    plot_curves(torn_log, output)
    assert output.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(output)
    assert pixels.shape[:2] == (450, 1500)  # figsize 15 x 4.5 inches at 100 dpi
    assert pixels.std() > 0.05  # curves, labels and legends were drawn, not a blank canvas
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_curves_rejects_a_log_without_a_complete_record(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 0, "lr"')
    with pytest.raises(ValueError, match="no complete epoch record"):
        plot_curves(log, tmp_path / "curves.png")


def test_cli_writes_curves_next_to_the_log(torn_log):
    result = run_script("plot_curves.py", torn_log)
    assert_ok(result)
    assert (torn_log.parent / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    missing = run_script("plot_curves.py", torn_log.parent / "missing.jsonl")
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "missing.jsonl" in missing.stderr


def test_runs_are_labelled_by_the_folders_that_tell_them_apart():
    assert run_labels(["runs/lr0.01/log.jsonl", "runs/lr0.05/log.jsonl"]) == ["lr0.01", "lr0.05"]
    assert run_labels(["a/out/log.jsonl", "b/out/log.jsonl"]) == ["a/out", "b/out"]


def test_cli_compares_several_runs_on_one_figure(torn_log, tmp_path):
    other = tmp_path / "other" / "log.jsonl"
    other.parent.mkdir()
    other.write_text("".join(json.dumps({**epoch_record(e, evaluated=True), "lr": 0.05}) + "\n" for e in range(3)))
    output = tmp_path / "compare.png"
    result = run_script("plot_curves.py", torn_log, other, "--output", output)
    assert_ok(result)
    pixels = matplotlib.image.imread(output)
    assert pixels.shape[:2] == (450, 1500) and pixels.std() > 0.05
    assert not (tmp_path / "curves.png").exists()
    empty = tmp_path / "empty" / "log.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    failed = run_script("plot_curves.py", other, empty, "--output", tmp_path / "bad.png")
    assert failed.returncode == 1 and failed.stderr.strip().count("\n") == 0 and str(empty) in failed.stderr
    assert not (tmp_path / "bad.png").exists()

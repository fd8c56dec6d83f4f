"""What an evaluation leaves behind (issue 13), through the real command line: detections.json and metrics.json
of --test-only and --format-only, and the one line a missing tensorboard gives. (model_best.pth,
--keep-checkpoints and --tensorboard are checked on the resumed run of test_train.py, --resume auto on the killed
run of test_reliability.py: one training run each keeps the suite fast.)"""
import contextlib
import hashlib
import io
import json
import shutil
import sys

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coco_eval import COCO_STAT_NAMES
from helpers import LITE, assert_ok, run_script, train_args

# Left out of the quick loop (pytest -m "not slow"): every test runs train.py in a subprocess.
pytestmark = pytest.mark.slow


def hiding(package):
    """A launcher that runs a script with `package` hidden, so that importing it fails for real."""
    return [sys.executable, "-c", f"import runpy, sys; sys.modules[{package!r}] = None; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"]


def reevaluate(annotation_file, detections_file):
    """pycocotools on its own: loadRes of the detections file, COCOeval over all images and per category."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(annotation_file))
        coco_dt = coco_gt.loadRes(str(detections_file))
        overall = COCOeval(coco_gt, coco_dt, iouType="bbox")
        overall.evaluate()
        overall.accumulate()
        overall.summarize()
        per_class = {}
        for category_id, category in coco_gt.cats.items():
            alone = COCOeval(coco_gt, coco_dt, iouType="bbox")
            alone.params.catIds = [category_id]
            alone.evaluate()
            alone.accumulate()
            alone.summarize()
            per_class[category["name"]] = {"AP": alone.stats[0], "AP50": alone.stats[1]}
    return dict(zip(COCO_STAT_NAMES, overall.stats.tolist())), per_class


def image_info_copy(coco_folder, shapes_root, root):
    """A COCO folder like test-dev: the shapes val images, and an image-info file with images and categories only."""
    annotations = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    pictures = {image["file_name"]: shapes_root / "val2017" / image["file_name"] for image in annotations["images"]}
    coco_folder(root, pictures, None, annotations["categories"], splits=("val",), images=annotations["images"])
    return root


def test_test_only_writes_detections_and_metrics_that_pycocotools_confirms(trained_run, shapes_root, coco_folder,
                                                                           tmp_path):
    output_dir, _ = trained_run
    evaluation_dir = tmp_path / "evaluation"
    evaluation_dir.mkdir()
    checkpoint = evaluation_dir / "checkpoint.pth"
    shutil.copyfile(output_dir / "checkpoint.pth", checkpoint)
    checkpoint_bytes = checkpoint.read_bytes()

    result = run_script("train.py", *train_args(shapes_root, evaluation_dir, "--test-only", "--resume", checkpoint))
    assert_ok(result)
    assert checkpoint.read_bytes() == checkpoint_bytes  # never touched
    assert sorted(p.name for p in evaluation_dir.iterdir()) == [
        ".train.lock", "checkpoint.pth", "detections.json", "metrics.json"]

    annotation_file = shapes_root / "annotations" / "instances_val2017.json"
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    coco, per_class = reevaluate(annotation_file, evaluation_dir / "detections.json")
    assert metrics["coco"] == pytest.approx(coco, abs=1e-12)
    for name, values in per_class.items():
        assert metrics["per_class"][name] == pytest.approx(values, abs=1e-12), name
    assert list(metrics["per_class"]) == [c["name"] for c in json.loads(annotation_file.read_text())["categories"]]
    assert metrics["coco"]["AP50"] > 0  # detections that match something: the comparison means something
    evaluated = metrics["evaluated"]
    assert evaluated["checkpoint"] == str(checkpoint) and evaluated["annotation_file"] == str(annotation_file)
    assert evaluated["annotation_sha256"] == hashlib.sha256(annotation_file.read_bytes()).hexdigest()
    assert evaluated["model"] == LITE and evaluated["images"] == 11 and evaluated["args"]["test_only"]
    assert evaluated["time"].endswith("+00:00")

    # --format-only on an image-info file (no annotations): the same detections, no evaluation.
    image_info = image_info_copy(coco_folder, shapes_root, tmp_path / "test-dev")
    format_dir = tmp_path / "format-only"
    result = run_script("train.py", *train_args(shapes_root, format_dir, "--format-only", "--weights",
                                                output_dir / "model_1.pth", "--dataset", "coco",
                                                "--data-path", image_info))
    assert_ok(result)
    assert "Average Precision" not in result.stdout
    assert sorted(p.name for p in format_dir.iterdir()) == [".train.lock", "detections.json"]
    detections = json.loads((format_dir / "detections.json").read_text())
    assert detections == json.loads((evaluation_dir / "detections.json").read_text())
    assert set(detections[0]) == {"image_id", "category_id", "bbox", "score"}


@pytest.mark.parametrize("package, flags, message", [
    ("tensorboard", ["--tensorboard"], "--tensorboard needs the tensorboard package: pip install tensorboard"),
    ("faster_coco_eval", ["--coco-backend", "faster-coco-eval"],
     "--coco-backend faster-coco-eval needs the faster-coco-eval package: pip install faster-coco-eval"),
])
def test_missing_optional_package_is_one_line_before_anything_runs(package, flags, message, shapes_root, tmp_path):
    output_dir = tmp_path / "out"
    result = run_script("train.py", *train_args(shapes_root, output_dir, *flags), launcher=hiding(package))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {message}"
    assert not output_dir.exists()

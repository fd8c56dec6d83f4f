"""CocoEvaluator against hand-computed AP values and against plain pycocotools, for both backends."""
import contextlib
import io
import json
import re
import sys

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coco_eval import COCO_STAT_NAMES, CocoEvaluator, category_names, format_per_class_table
from helpers import evaluate, jittered_evaluation, load_gt, prediction, write_gt


def pycocotools_stats(gt_path, predictions):
    """The classic flow, independently: XYXY -> XYWH as torchvision does, json-style results, COCOeval."""
    results = []
    for image_id, p in predictions.items():
        x1, y1, x2, y2 = p["boxes"].unbind(1)
        xywh = torch.stack((x1, y1, x2 - x1, y2 - y1), dim=1).tolist()
        results += [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                    for b, s, c in zip(xywh, p["scores"].tolist(), p["labels"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        coco_eval.params.imgIds = sorted(predictions)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats.tolist()


@pytest.fixture
def two_images(tmp_path):
    """Two images with one 100x100 object each (category 1)."""
    return write_gt(tmp_path, [(1, 320, 240), (2, 320, 240)],
                    [(1, 1, [10, 10, 100, 100]), (2, 1, [50, 60, 100, 100])])


def test_perfect_detections_score_one(two_images):
    stats = evaluate(two_images, {1: prediction([[10, 10, 110, 110]], [0.9], [1]),
                                  2: prediction([[50, 60, 150, 160]], [0.8], [1])})
    ap, ap50, ap75, ap_small, ap_medium, ap_large, ar1, ar10, ar100, ar_small, ar_medium, ar_large = stats
    assert [ap, ap50, ap75, ap_large, ar1, ar10, ar100, ar_large] == pytest.approx([1.0] * 8)
    assert (ap_small, ap_medium, ar_small, ar_medium) == (-1.0,) * 4  # no small/medium objects


def test_image_without_detections_counts_as_evaluated(two_images):
    found = {1: prediction([[10, 10, 110, 110]], [0.9], [1])}
    assert evaluate(two_images, found)[0] == pytest.approx(1.0)  # image 2 never evaluated: not held against the model
    stats = evaluate(two_images, found, {2: prediction()})
    assert stats[0] == pytest.approx(51 / 101)  # precision 1 up to recall 0.5: 51 of the 101 recall points
    assert stats[8] == pytest.approx(0.5)  # AR@100


def test_false_positive_ranked_first_halves_precision(two_images):
    stats = evaluate(two_images, {1: prediction([[200, 150, 300, 230], [10, 10, 110, 110]], [0.9, 0.8], [1, 1])})
    assert stats[:2] == pytest.approx([0.5, 0.5]) and stats[8] == pytest.approx(1.0)


def test_loose_box_matches_only_low_iou_thresholds(two_images):
    stats = evaluate(two_images, {1: prediction([[10, 10, 110, 72]], [0.9], [1])})  # IoU 0.62
    assert stats[1:3] == pytest.approx([1.0, 0.0])  # AP50, AP75
    assert stats[0] == pytest.approx(0.3)  # matched at IoU 0.50, 0.55, 0.60 of the ten thresholds


def test_wrong_category_is_not_a_match(two_images):
    stats = evaluate(two_images, {1: prediction([[10, 10, 110, 110]], [0.9], [5])})
    assert stats[0] == 0.0 and stats[8] == 0.0


@pytest.mark.parametrize("backend", ["pycocotools", "faster-coco-eval"])
def test_no_detections_at_all(two_images, backend, capsys):
    stats = evaluate(two_images, {1: prediction(), 2: prediction()}, backend=backend)
    assert len(stats) == 12 and stats[0] == 0.0 and stats[8] == 0.0 and stats[3] == -1.0


def test_duplicate_and_reordered_updates_do_not_change_stats(tmp_path):
    gt_path, predictions = jittered_evaluation(tmp_path, num_images=12, detections_per_image=8)
    reference = evaluate(gt_path, predictions)
    ids = sorted(predictions)
    first_half = {i: predictions[i] for i in ids[:7]}
    second_half_reversed = {i: predictions[i] for i in reversed(ids[5:])}  # ids 6 and 7 arrive twice
    assert evaluate(gt_path, second_half_reversed, first_half, first_half) == reference


def test_matches_plain_pycocotools_and_faster_coco_eval(tmp_path, capsys):
    gt_path, predictions = jittered_evaluation(tmp_path, num_images=50, detections_per_image=20)
    expected = pycocotools_stats(gt_path, predictions)
    capsys.readouterr()

    tables = {}
    for backend in ["pycocotools", "faster-coco-eval"]:
        evaluator = CocoEvaluator(load_gt(gt_path), backend=backend)
        evaluator.update(predictions)
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats == expected, backend
        tables[backend] = capsys.readouterr().out
    assert 0.2 < expected[0] < 0.8 and all(s > 0 for s in expected)  # a fixture where every number means something

    lines = tables["pycocotools"].splitlines()
    # The 12 lines, then the per-category table (a title, a header, one row of 3 categories): no other chatter.
    assert lines[0] == "IoU metric: bbox" and len(lines) == 16 and lines[13].startswith("Per-category")
    assert re.match(r" Average Precision  \(AP\) @\[ IoU=0.50:0.95 \| area=   all \| maxDets=100 \] = 0\.\d{3}$",
                    lines[1])
    assert tables["faster-coco-eval"] == tables["pycocotools"]


def test_configuration_errors(two_images, monkeypatch):
    coco_gt = load_gt(two_images)
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'ultrafast'"):
        CocoEvaluator(coco_gt, backend="ultrafast")
    with pytest.raises(ValueError, match="only bbox"):
        CocoEvaluator(coco_gt, iou_types=("segm",))
    with pytest.raises(RuntimeError, match="summarize"):
        _ = CocoEvaluator(coco_gt).stats
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        CocoEvaluator(coco_gt, backend="faster-coco-eval")


def pycocotools_per_category(gt_path, predictions, category_id):
    """AP and AP50 of one category as pycocotools computes them when told to evaluate that category alone."""
    results = [{"image_id": image_id, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
               for image_id, p in predictions.items()
               for (x1, y1, x2, y2), s, c in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        coco_eval.params.imgIds = sorted(predictions)
        coco_eval.params.catIds = [category_id]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {"AP": coco_eval.stats[0], "AP50": coco_eval.stats[1]}


@pytest.mark.parametrize("backend", ["pycocotools", "faster-coco-eval"])
def test_per_class_ap_equals_pycocotools_per_category(tmp_path, backend, capsys):
    gt_path, predictions = jittered_evaluation(tmp_path, num_images=30, detections_per_image=12, seed=1)
    # A category without any ground truth in the file: COCOeval reports -1 for it.
    gt = json.loads(gt_path.read_text())
    gt["categories"].append({"id": 12, "name": "unseen"})
    gt_path.write_text(json.dumps(gt))

    evaluator = CocoEvaluator(load_gt(gt_path), backend=backend)
    evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    metrics = evaluator.metrics()
    out = capsys.readouterr().out

    assert list(metrics["coco"]) == list(COCO_STAT_NAMES) and list(metrics["coco"].values()) == evaluator.stats
    assert list(metrics["per_class"]) == ["class1", "class5", "class9", "unseen"]
    for category_id, name in [(1, "class1"), (5, "class5"), (9, "class9")]:
        expected = pycocotools_per_category(gt_path, predictions, category_id)
        assert metrics["per_class"][name] == pytest.approx(expected, abs=1e-12), name
        assert 0 < expected["AP"] < expected["AP50"] <= 1  # a fixture where the numbers mean something
    assert metrics["per_class"]["unseen"] == {"AP": -1.0, "AP50": -1.0}
    # The overall AP is the mean over the categories that have ground truth.
    seen = [v["AP"] for v in metrics["per_class"].values() if v["AP"] >= 0]
    assert metrics["coco"]["AP"] == pytest.approx(sum(seen) / len(seen))

    table = out[out.index("Per-category"):].splitlines()
    assert len(table) == 3  # title, header, one row of 4 categories
    assert table[2].startswith(f"class1         {metrics['per_class']['class1']['AP']:.3f} ")
    assert table[2].endswith("unseen             -     -")


def test_per_class_table_wraps_many_categories_into_rows():
    per_class = {f"category number {n}": {"AP": n / 100, "AP50": n / 80} for n in range(80)}
    table = format_per_class_table(per_class).splitlines()
    assert len(table) == 2 + 20  # COCO's 80 categories: 20 rows of 4
    assert all(len(line) == len(table[1]) for line in table[1:])  # aligned columns
    assert table[-1].split(" | ")[-1] == "category numbe 0.790 0.988"  # long names are cut to the column


def test_categories_sharing_a_name_keep_their_own_entries():
    categories = {1: {"id": 1, "name": "sign"}, 4: {"id": 4, "name": "sign"}, 7: {"id": 7, "name": "car"}}
    assert category_names(categories, [1, 4, 7]) == {1: "sign (id 1)", 4: "sign (id 4)", 7: "car"}

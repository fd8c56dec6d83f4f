"""analyze.py on hand-built ground truth and detections: the confusion matrix cell by cell, the per-class counts,
pycocotools' AP, the files it writes, the worst images and its one-line errors."""
import json

import numpy as np
import pytest
from PIL import Image

import analyze
import cli
import coco_utils
import safe_io
from helpers import assert_ok, run_script

CATEGORY_IDS = [1, 5, 9]  # non-contiguous, like COCO's; matrix positions 0, 1, 2, background 3
BG = 3
# Two images of 200 x 200; boxes [x, y, width, height] far apart (IoU 0 between any two).
BOXES = {"a": [10, 10, 40, 40], "b": [100, 10, 40, 60], "c": [10, 100, 60, 40], "d": [120, 120, 50, 50]}
# (image id, category id, box): class 1 twice, class 5 and class 9 once.
GROUND_TRUTH = [(1, 1, BOXES["a"]), (1, 5, BOXES["b"]), (2, 9, BOXES["c"]), (2, 1, BOXES["d"])]


def write_gt(tmp_path, annotations=GROUND_TRUTH, crowd=()):
    """The annotation file of the two images: annotations and crowd regions as (image id, category id, box)."""
    entries = [(a, 0) for a in annotations] + [(c, 1) for c in crowd]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2)],
        "annotations": [{"id": n, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": is_crowd} for n, ((i, c, box), is_crowd) in enumerate(entries, start=1)],
        "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def detection(image_id, category_id, box, score=0.9):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score}


def perfect_detections():
    return [detection(i, c, box) for i, c, box in GROUND_TRUTH]


def matrix_of(tmp_path, detections, crowd=(), score_thresh=0.3, iou_thresh=0.5, annotations=GROUND_TRUTH):
    coco_gt = coco_utils.load_annotation_file(write_gt(tmp_path, annotations, crowd))
    return analyze.confusion_matrix(coco_gt, detections, score_thresh, iou_thresh)[0].tolist()


def diagonal(*extra_cells):
    """The matrix of perfect detections (class 1 twice, 5 and 9 once) plus the given (row, column, count)."""
    matrix = np.diag([2, 1, 1, 0])
    for row, column, count in extra_cells:
        matrix[row, column] += count
    return matrix.tolist()


def shifted(box, dx):
    return [box[0] + dx, box[1], box[2], box[3]]


# ------------------------------------------------------------------------------------- the matrix, cell by cell


def test_perfect_detections_give_a_diagonal(tmp_path):
    assert matrix_of(tmp_path, perfect_detections()) == diagonal()


def test_one_swapped_label_gives_one_off_diagonal_count(tmp_path):
    detections = perfect_detections()
    detections[1] = detection(1, 9, BOXES["b"])  # the class-5 box detected as class 9
    assert matrix_of(tmp_path, detections) == diagonal((1, 1, -1), (1, 2, 1))


def test_one_missed_box_gives_one_class_background_count(tmp_path):
    detections = perfect_detections()[:-1]  # the second class-1 box is not found
    assert matrix_of(tmp_path, detections) == diagonal((0, 0, -1), (0, BG, 1))


def test_one_invented_box_gives_one_background_class_count(tmp_path):
    detections = perfect_detections() + [detection(2, 5, [150, 10, 30, 30])]
    assert matrix_of(tmp_path, detections) == diagonal((BG, 1, 1))


def test_detections_below_the_score_threshold_are_ignored(tmp_path):
    below = [detection(2, 5, [150, 10, 30, 30], score=0.29), detection(1, 9, BOXES["a"], score=0.1)]
    assert matrix_of(tmp_path, perfect_detections() + below, score_thresh=0.3) == diagonal()
    # At the threshold a detection counts: the invented box appears; the duplicate of box a is a second invention.
    at = [detection(2, 5, [150, 10, 30, 30], score=0.3)]
    assert matrix_of(tmp_path, perfect_detections() + at, score_thresh=0.3) == diagonal((BG, 1, 1))


def test_crowd_regions_are_neither_missed_nor_invented(tmp_path):
    crowd = [(2, 5, [0, 150, 200, 50])]
    on_crowd = detection(2, 5, [20, 160, 30, 30])  # inside the region: IoU with it (over its own area) is 1
    assert matrix_of(tmp_path, perfect_detections() + [on_crowd], crowd=crowd) == diagonal()
    # Without the region the same detection is an invention.
    assert matrix_of(tmp_path, perfect_detections() + [on_crowd]) == diagonal((BG, 1, 1))


def test_a_second_detection_of_a_box_is_an_invention_and_the_higher_score_is_matched(tmp_path):
    detections = perfect_detections()
    detections[0] = detection(1, 1, BOXES["a"], score=0.5)
    detections.append(detection(1, 5, shifted(BOXES["a"], 2), score=0.8))  # same box, wrong class, higher score
    # The higher-scoring class-5 detection takes box a first (a confusion), the exact class-1 one is left over.
    assert matrix_of(tmp_path, detections) == diagonal((0, 0, -1), (0, 1, 1), (BG, 0, 1))


def test_matching_ignores_the_class_and_takes_the_highest_iou(tmp_path):
    # One detection between two ground-truth boxes of different classes, closer to the class-5 one.
    annotations = [(1, 1, [0, 0, 100, 100]), (1, 5, [20, 0, 100, 100])]
    between = detection(1, 1, [16, 0, 100, 100])  # IoU 0.72 with the class-1 box, 0.92 with the class-5 box
    assert matrix_of(tmp_path, [between], annotations=annotations) == [
        [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_equal_ious_go_to_the_box_listed_first(tmp_path):
    annotations = [(1, 5, [0, 0, 100, 100]), (1, 1, [20, 0, 100, 100])]
    middle = detection(1, 9, [10, 0, 100, 100])  # the same IoU with both
    assert matrix_of(tmp_path, [middle], annotations=annotations) == [
        [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_iou_threshold_is_inclusive(tmp_path):
    annotations = [(1, 1, [0, 0, 48, 40])]
    half = detection(1, 1, [16, 0, 48, 40])  # intersection 32 x 40 = 1280, union 2560: IoU 0.5
    assert matrix_of(tmp_path, [half], annotations=annotations, iou_thresh=0.5)[0][0] == 1
    assert matrix_of(tmp_path, [half], annotations=annotations, iou_thresh=0.51) == [
        [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]


# ------------------------------------------------------------------------------------------------ per class


def test_per_class_counts_are_read_off_the_matrix_and_ap_comes_from_pycocotools(tmp_path):
    coco_gt = coco_utils.load_annotation_file(write_gt(tmp_path))
    detections = perfect_detections()
    detections[1] = detection(1, 9, BOXES["b"])  # class 5 seen as 9
    detections.append(detection(2, 1, [150, 10, 30, 30], score=0.95))  # an invented class-1 box, best score
    matrix, _ = analyze.confusion_matrix(coco_gt, detections, 0.3, 0.5)
    ap, mean_ap = analyze.coco_ap(coco_gt, detections)
    rows = analyze.per_class_rows(matrix, ["class1", "class5", "class9"], ap)
    assert {name: (r["ground_truth"], r["detections"], r["TP"], r["FP"], r["FN"]) for name, r in rows.items()} == {
        "class1": (2, 3, 2, 1, 0), "class5": (1, 0, 0, 0, 1), "class9": (1, 2, 1, 1, 0)}
    assert rows["class1"]["precision"] == pytest.approx(2 / 3) and rows["class1"]["recall"] == 1.0
    assert rows["class5"]["precision"] is None and rows["class5"]["recall"] == 0.0
    # pycocotools: class 5 is never detected. Class 1's invention (0.95) outranks its two hits: precision 2/3 at
    # every recall. Class 9's false positive in image 1 and its hit in image 2 tie at 0.9; COCOeval ranks ties in
    # image order, so the hit comes second: precision 1/2.
    assert rows["class5"]["AP"] == 0.0
    assert rows["class1"]["AP"] == pytest.approx(2 / 3) and rows["class1"]["AP50"] == pytest.approx(2 / 3)
    assert rows["class9"]["AP"] == pytest.approx(0.5)
    assert mean_ap[0] == pytest.approx(np.mean([rows[n]["AP"] for n in rows]))


def test_perfect_detections_have_ap_one_and_no_errors(tmp_path):
    coco_gt = coco_utils.load_annotation_file(write_gt(tmp_path))
    matrix, cells = analyze.confusion_matrix(coco_gt, perfect_detections(), 0.3, 0.5)
    rows = analyze.per_class_rows(matrix, ["class1", "class5", "class9"], analyze.coco_ap(coco_gt, perfect_detections())[0])
    assert all(r["precision"] == 1.0 and r["recall"] == 1.0 for r in rows.values())
    assert [r["AP"] for r in rows.values()] == pytest.approx([1.0, 1.0, 1.0])  # a mean of 101 ones: 1 to rounding
    assert analyze.worst_images(cells, BG, 10) == []


def test_worst_images_rank_by_errors_then_id():
    cells = {1: [(0, 0), (0, BG)], 2: [(BG, 1), (0, 2), (1, BG)], 3: [(2, 2)], 4: [(0, BG)]}
    assert analyze.worst_images(cells, BG, 2) == [
        (2, {"missed": 1, "invented": 1, "confused": 1}), (1, {"missed": 1, "invented": 0, "confused": 0})]
    assert [image_id for image_id, _ in analyze.worst_images(cells, BG, 10)] == [2, 1, 4]


def test_confusion_picture_renders_for_80_classes(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.poisson(0.3, size=(81, 81)) + np.diag(rng.integers(0, 400, size=81))
    names = [f"category number {k}" for k in range(80)]
    path = tmp_path / "confusion_matrix.png"
    analyze.plot_confusion_matrix(matrix, names, path, 0.3, 0.5)
    with Image.open(path) as picture:
        assert picture.size[0] > 2000 and picture.size[1] > 1000  # room for 81 rows of tick labels


# ---------------------------------------------------------------------------------------- the files, end to end


def write_images(folder):
    folder.mkdir()
    for image_id in (1, 2):
        Image.fromarray(np.full((200, 200, 3), 40 * image_id, dtype=np.uint8)).save(folder / f"{image_id}.png")
    return folder


def run_main(*args):
    analyze.main(analyze.get_args_parser().parse_args([str(a) for a in args]))


def test_main_writes_matrix_tables_and_worst_pictures(tmp_path, capsys):
    gt = write_gt(tmp_path)
    detections = perfect_detections()[:-1] + [detection(2, 5, [150, 10, 30, 30])]  # image 2: one missed, one invented
    detections_path = tmp_path / "detections.json"
    detections_path.write_text(json.dumps(detections))
    images = write_images(tmp_path / "images")
    out = tmp_path / "out"
    run_main("--annotations", gt, "--detections", detections_path, "--images", images, "--output-dir", out)

    matrix = json.loads((out / "confusion_matrix.json").read_text())
    assert matrix["classes"] == ["class1", "class5", "class9"]
    assert matrix["matrix"] == diagonal((0, 0, -1), (0, BG, 1), (BG, 1, 1))
    per_class = json.loads((out / "per_class.json").read_text())
    assert per_class["per_class"]["class1"]["FN"] == 1 and per_class["per_class"]["class5"]["FP"] == 1
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["worst"] == [{"image_id": 2, "file_name": "2.png", "missed": 1, "invented": 1, "confused": 0,
                                 "picture": "worst/1_2.png"}]
    with Image.open(out / "worst" / "1_2.png") as picture:
        assert picture.size == (2 * 200 + 4, 200)  # ground truth | gap | detections
    printed = capsys.readouterr().out
    assert "class1" in printed and "images with the most errors (missed + invented + confused): 2" in printed

    # A rerun into the same folder may replace what the first run wrote.
    run_main("--annotations", gt, "--detections", detections_path, "--images", images, "--output-dir", out)


def test_bad_inputs_give_one_line_errors(tmp_path):
    gt = write_gt(tmp_path)
    images = write_images(tmp_path / "images")

    def run(detections, *extra, out=tmp_path / "out"):
        path = tmp_path / "detections.json"
        path.write_text(json.dumps(detections))
        run_main("--annotations", gt, "--detections", path, "--output-dir", out, *extra)

    with pytest.raises(coco_utils.DatasetError, match=r"detections.json: detection 1: image id 7 is not in the annotation"):
        run([detection(1, 1, BOXES["a"]), detection(7, 1, BOXES["a"])])
    with pytest.raises(coco_utils.DatasetError, match="detection 0: category id 2 is not one of"):
        run([detection(1, 2, BOXES["a"])])
    with pytest.raises(coco_utils.DatasetError, match="detection 0: bbox must be 4 finite numbers"):
        run([detection(1, 1, [1, 2, 3])])
    with pytest.raises(coco_utils.DatasetError, match="detection 0: score must be a finite number"):
        run([{**detection(1, 1, BOXES["a"]), "score": None}])
    with pytest.raises(coco_utils.DatasetError, match="missing.json: cannot read results file: No such file"):
        run_main("--annotations", gt, "--detections", tmp_path / "missing.json", "--output-dir", tmp_path / "out")
    with pytest.raises(coco_utils.DatasetError, match="this is predict.py's detections.json"):
        run({"model": "x", "images": []})
    with pytest.raises(cli.UserInputError, match=f"--output-dir {images} is the input"):
        run([], "--images", images, out=images)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "per_class.json").write_text("mine")
    with pytest.raises(cli.UserInputError, match="already holds per_class.json, which no earlier analyze.py"):
        run([], out=foreign)
    assert (foreign / "per_class.json").read_text() == "mine"


def test_detections_evaluated_on_another_annotation_file_are_refused(tmp_path):
    """train.py --test-only's metrics.json beside detections.json names the annotation file they were made on by
    SHA-256; analyzing them against a file of other content (ids that overlap, boxes that do not) is refused."""
    gt = write_gt(tmp_path)
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "detections.json").write_text(json.dumps(perfect_detections()))

    def metrics_for(annotation_file):
        (evaluation / "metrics.json").write_text(json.dumps({"evaluated": {
            "annotation_file": str(annotation_file), "annotation_sha256": safe_io.sha256_of_file(annotation_file)}}))

    other = tmp_path / "other.json"
    moved = json.loads(gt.read_text())
    moved["annotations"][0]["bbox"][0] += 40
    other.write_text(json.dumps(moved))
    metrics_for(other)
    with pytest.raises(cli.UserInputError, match=f"says they were made on {other}, whose content differs from "
                                                 f"--annotations {gt}"):
        run_main("--annotations", gt, "--detections", evaluation / "detections.json", "--output-dir", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    metrics_for(gt)  # the same content, wherever it lies, is the file they were made on
    run_main("--annotations", gt, "--detections", evaluation / "detections.json", "--output-dir", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "per_class.json").read_text())["per_class"]["class1"]["FN"] == 0


@pytest.mark.slow
def test_analyze_script_runs_and_reports_errors_in_one_line(tmp_path):
    gt = write_gt(tmp_path)
    detections_path = tmp_path / "detections.json"
    detections_path.write_text(json.dumps(perfect_detections()))
    result = run_script("analyze.py", "--annotations", gt, "--detections", detections_path, "--output-dir",
                        tmp_path / "out", "--worst", 3)
    assert_ok(result)
    assert "images with the most errors (missed + invented + confused): none" in result.stdout
    assert json.loads((tmp_path / "out" / "confusion_matrix.json").read_text())["matrix"] == diagonal()

    result = run_script("analyze.py", "--annotations", tmp_path / "missing.json", "--detections", detections_path,
                        "--output-dir", tmp_path / "out2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"analyze.py: {tmp_path / 'missing.json'}: cannot read annotation file: No such file or directory"]

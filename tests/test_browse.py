"""browse.py on hand-built annotation files: the per-class table and the loader report to the exact value, the
pictures it draws (which images, which classes, after augmentation), the shapes dataset through train.py's
loading, and its one-line errors."""
import collections
import json

import numpy as np
import pytest
from PIL import Image

import browse
import cli
import coco_utils
from helpers import assert_ok, run_script, write_coco_folder

WIDTH, HEIGHT = 100, 80
CATEGORIES = [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}, {"id": 7, "name": "C"}]
# (image id, category id, [x, y, width, height], iscrowd)
ANNOTATIONS = [
    (1, 1, [10, 10, 10, 10], 0),   # side 10
    (1, 1, [30, 10, 20, 5], 0),    # side sqrt(100) = 10
    (1, 1, [40, 40, 30, 30], 0),   # side 30
    (1, 2, [0, 0, 16, 4], 0),      # side 8
    (1, 1, [0, 0, 50, 50], 1),     # crowd: dropped
    (2, 1, [90, 10, 20, 40], 0),   # clamped to 10 x 40: side 20
    (2, 2, [5, 5, 0, 10], 0),      # no width: dropped
    (2, 2, [200, 10, 5, 5], 0),    # outside the image: nothing left once clamped, dropped
]                                  # image 3 has no box; category C none


@pytest.fixture
def dataset(tmp_path):
    """(image folder, annotation file) of three 100 x 80 images: a.jpg, b.png, c.png."""
    pictures = {name: np.full((HEIGHT, WIDTH, 3), 60 * n, dtype=np.uint8) for n, name in
                enumerate(["a.jpg", "b.png", "c.png"], start=1)}
    annotations = [{"id": n, "image_id": i, "category_id": c, "bbox": box, "iscrowd": crowd}
                   for n, (i, c, box, crowd) in enumerate(ANNOTATIONS, start=1)]
    return write_coco_folder(tmp_path / "data", pictures, annotations, CATEGORIES, splits=("train",))["train"]


def run_main(*args):
    browse.main(browse.get_args_parser().parse_args([str(a) for a in args]))


def test_table_and_loader_report_match_the_annotation_file(dataset, tmp_path, capsys):
    images, annotations = dataset
    out = tmp_path / "out"
    run_main("--annotations", annotations, "--images", images, "--output-dir", out)
    summary = json.loads((out / "browse.json").read_text())
    assert summary["classes"] == {
        "A": {"id": 1, "images": 2, "instances": 4, "smallest": 10.0, "median": 15.0, "largest": 30.0},
        "B": {"id": 2, "images": 1, "instances": 1, "smallest": 8.0, "median": 8.0, "largest": 8.0},
        "C": {"id": 7, "images": 0, "instances": 0, "smallest": None, "median": None, "largest": None},
    }
    assert summary["loader"] == {"crowd_boxes": 1, "boxes_without_area": 2, "images_without_boxes": [3],
                                 "empty_categories": ["C"]}
    printed = capsys.readouterr().out
    assert f"{annotations}: 3 images, 5 boxes in 3 classes" in printed
    assert "A         1       2       4     10.0     15.0     30.0" in printed
    assert "C         7       0       0        -        -        -" in printed
    assert "The loader drops 1 crowd boxes" in printed and "drops 2 boxes without area" in printed
    assert "flags 1 of 3 images without boxes" in printed and "ids 3" in printed
    assert "flags 1 categories without a box, classes the model will never see: C" in printed

    # Every image of the file is drawn (c.png too, without boxes), under its own name.
    assert summary["pictures"] == [{"image_id": 1, "picture": "a.jpg"}, {"image_id": 2, "picture": "b.png"},
                                   {"image_id": 3, "picture": "c.png"}]
    with Image.open(out / "a.jpg") as drawn, Image.open(images / "a.jpg") as original:
        difference = np.abs(np.asarray(drawn, dtype=int) - np.asarray(original, dtype=int)).max(axis=2)
    assert (difference > 60).sum() > 100  # boxes and names are on it
    with Image.open(out / "c.png") as drawn:
        assert (np.asarray(drawn) == 180).all()  # nothing to draw on an image without boxes


def test_classes_limit_and_augment_choose_what_is_drawn(dataset, tmp_path):
    images, annotations = dataset
    common = ["--annotations", annotations, "--images", images]
    run_main(*common, "--output-dir", tmp_path / "b", "--classes", "B")
    assert [p["picture"] for p in json.loads((tmp_path / "b" / "browse.json").read_text())["pictures"]] == ["a.jpg"]
    run_main(*common, "--output-dir", tmp_path / "limit", "--limit", 2)
    assert sorted(p.name for p in (tmp_path / "limit").iterdir()) == ["a.jpg", "b.png", "browse.json"]
    run_main(*common, "--output-dir", tmp_path / "ssd", "--augment", "ssd", "--limit", 1)
    summary = json.loads((tmp_path / "ssd" / "browse.json").read_text())
    assert summary["augment"] == "ssd" and summary["pictures"] == [{"image_id": 1, "picture": "a.jpg"}]
    assert (tmp_path / "ssd" / "a.jpg").is_file()


def test_draw_ground_truth_draws_only_the_wanted_classes():
    import torch

    image = torch.zeros(3, 60, 60, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[5.0, 5, 25, 25], [35, 35, 55, 55]]), "labels": torch.tensor([1, 2])}
    drawn = browse.draw_ground_truth(image, target, {1: "A", 2: "B"}, wanted={2})
    assert drawn[:, :30, :30].eq(0).all() and drawn[:, 30:, 30:].ne(0).any()


def test_a_dataset_is_read_as_train_py_reads_it(shapes_root, tmp_path):
    out = tmp_path / "out"
    run_main("--dataset", "shapes", "--data-path", shapes_root, "--split", "val", "--output-dir", out, "--limit", 3)
    summary = json.loads((out / "browse.json").read_text())
    data = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    boxes = collections.Counter(ann["category_id"] for ann in data["annotations"])
    holding = {c: len({a["image_id"] for a in data["annotations"] if a["category_id"] == c}) for c in boxes}
    assert {row["id"]: (row["images"], row["instances"]) for row in summary["classes"].values() if row["instances"]} \
        == {c: (holding[c], boxes[c]) for c in boxes}
    assert len(summary["pictures"]) == 3 and all((out / p["picture"]).is_file() for p in summary["pictures"])


def test_bad_inputs_give_one_line_errors(dataset, tmp_path):
    images, annotations = dataset
    common = ["--annotations", annotations, "--images", images]
    with pytest.raises(cli.UserInputError, match="give either --annotations FILE --images DIR or --dataset NAME"):
        run_main("--output-dir", tmp_path / "out")
    with pytest.raises(cli.UserInputError, match="--annotations needs --images DIR"):
        run_main("--annotations", annotations, "--output-dir", tmp_path / "out")
    with pytest.raises(cli.UserInputError, match=r"--classes Z: not a class of this dataset \(A, B, C\)"):
        run_main(*common, "--output-dir", tmp_path / "out", "--classes", "Z")
    with pytest.raises(cli.UserInputError, match=f"--output-dir {images} is the input {images}"):
        run_main(*common, "--output-dir", images)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "b.png").write_text("mine")
    with pytest.raises(cli.UserInputError, match="already holds b.png, which no earlier browse.py run there wrote"):
        run_main(*common, "--output-dir", foreign)
    assert (foreign / "b.png").read_text() == "mine"
    (images / "b.png").unlink()
    with pytest.raises(coco_utils.DatasetError, match="b.png: image file not found"):
        run_main(*common, "--output-dir", tmp_path / "out")


def test_a_rerun_may_replace_its_own_pictures(dataset, tmp_path):
    images, annotations = dataset
    for _ in range(2):
        run_main("--annotations", annotations, "--images", images, "--output-dir", tmp_path / "out")


@pytest.mark.slow
def test_browse_script_draws_augmented_shapes_and_reports_errors_in_one_line(shapes_root, tmp_path):
    result = run_script("browse.py", "--dataset", "shapes", "--data-path", shapes_root, "--augment", "ssd",
                        "--limit", 4, "--output-dir", tmp_path / "out")
    assert_ok(result)
    assert "4 pictures after the ssd augmentation and browse.json in" in result.stdout
    result = run_script("browse.py", "--dataset", "shapes", "--data-path", shapes_root, "--classes", "dog",
                        "--output-dir", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "browse.py: --classes dog: not a class of this dataset (circle, rectangle, triangle, star, cross)"]

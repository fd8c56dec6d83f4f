"""Pascal VOC: the devkit's AP on hand-computed cases, the VOC reader's boxes, train.py --dataset voc end to end on the
shapes set in VOC layout, and one-line errors for bad VOC input."""
import math
import re

import pytest
import torch
from PIL import Image

import coco_utils
import voc_utils
import presets
import shapes
from coco_eval import VocEvaluator
from helpers import TINY_SHAPES, assert_ok, read_log, run_in_one_interpreter, run_script, torchrun, train_args

SHAPE_CLASSES = ["circle", "rectangle", "triangle", "star", "cross"]
MAP_LINE = re.compile(r"^mAP\s+([0-9.]+)\s+([0-9.]+)", re.MULTILINE)


def write_voc(root, images, lists, year="2007"):
    """A VOCdevkit folder: images {voc id: (width, height, [(name, (xmin, ymin, xmax, ymax), difficult)])} and
    ImageSets/Main lists {list name: [voc id, ...]}."""
    folder = root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for voc_id, (width, height, objects) in images.items():
        Image.new("RGB", (width, height), (90, 120, 150)).save(folder / "JPEGImages" / f"{voc_id}.jpg")
        xml_objects = "".join(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
            f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
            for name, box, difficult in objects
        )
        (folder / "Annotations" / f"{voc_id}.xml").write_text(
            f"<annotation><folder>VOC{year}</folder><filename>{voc_id}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{xml_objects}</annotation>"
        )
    for name, voc_ids in lists.items():
        (folder / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in voc_ids))
    return root


def detections(*rows):
    """{"boxes", "scores", "labels"} from (x1, y1, x2, y2, score, label) rows (continuous 0-based XYXY)."""
    table = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"boxes": table[:, :4], "scores": table[:, 4], "labels": table[:, 5].to(torch.int64)}


def test_voc_ap_follows_the_devkit_on_hand_computed_cases(tmp_path, capsys):
    cat, dog, bird = 1, 2, 3
    root = write_voc(tmp_path / "voc", {
        # File boxes are 1-based inclusive pixels: (1, 1, 10, 10) is the model's (0, 0, 10, 10).
        "a": (60, 60, [("cat", (1, 1, 10, 10), False), ("cat", (21, 21, 30, 30), True)]),
        "b": (60, 60, [("cat", (1, 1, 20, 20), False), ("dog", (1, 1, 10, 10), False)]),
        "c": (60, 60, [("cat", (11, 11, 20, 20), False), ("cat", (31, 31, 40, 40), False)]),
    }, {"test": ["a", "b", "c"]})
    dataset = voc_utils.get_voc(root, "val", None, classes=("cat", "dog", "bird"))
    evaluator = VocEvaluator(coco_utils.get_coco_api_from_dataset(dataset))
    evaluator.update({
        1: detections(
            (0, 0, 10, 10, 0.9, cat),     # TP
            (0, 0, 10, 10, 0.8, cat),     # the same object again: FP
            (20, 20, 30, 30, 0.7, cat),   # on the difficult cat: neither TP nor FP
            (40, 40, 50, 50, 0.6, cat),   # FP, tied with image 2's TP, ranked first (image 1 comes first)
        ),
        2: detections(
            (0, 0, 20, 10, 0.6, cat),     # IoU exactly 0.5 (200 / 400): a TP, the devkit's ">= 0.5"
            (0, 0, 10, 10, 0.95, dog),    # TP
            (0, 0, 5, 5, 0.5, bird),      # a class without ground truth: no AP, left out of the means
        ),
        3: detections(),                  # an image without detections: its two cats stay unfound
    })
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    metrics = evaluator.metrics()["voc"]

    # cat: 4 positives (the difficult one is not counted); ranked TP, FP, -, FP, TP gives recall 1/4 at precision
    # 1, 1/2, 1/2, 1/3, then recall 2/4 at precision 2/4.
    # 11-point: t = 0, 0.1, 0.2 -> 1; t = 0.3, 0.4, 0.5 -> 1/2; t >= 0.6 -> 0: (3 + 1.5) / 11.
    # area: envelope 1 over recall [0, 1/4], 1/2 over [1/4, 1/2]: 1/4 + 1/8.
    assert metrics["per_class"]["cat"] == {"AP_11pt": pytest.approx(4.5 / 11), "AP_area": pytest.approx(0.375)}
    assert metrics["per_class"]["dog"] == {"AP_11pt": pytest.approx(1.0), "AP_area": pytest.approx(1.0)}
    assert "bird" not in metrics["per_class"]
    assert metrics["mAP_11pt"] == pytest.approx((4.5 / 11 + 1) / 2)
    assert metrics["mAP_area"] == pytest.approx((0.375 + 1) / 2)

    table = capsys.readouterr().out
    assert "AP_11pt = VOC2007 11-point" in table and "AP_area = VOC2010+" in table
    assert re.search(r"^cat\s+0\.4091\s+0\.3750\s+4$", table, re.MULTILINE)
    assert re.search(r"^bird .*no ground truth", table, re.MULTILINE)
    assert MAP_LINE.search(table).groups() == ("0.7045", "0.6875")
    assert "IoU metric: bbox" in table and evaluator.metrics()["coco"]["AP50"] > 0  # the COCO-style table too


def test_voc_matching_is_the_devkits_greedy_one(tmp_path):
    # Two overlapping cats, (0, 0, 20, 20) and (0, 2, 20, 22) in the model's coordinates (IoU 360 / 440).
    root = write_voc(tmp_path / "voc", {"a": (40, 40, [("cat", (1, 1, 20, 20), False), ("cat", (1, 3, 20, 22), False)]),
                                        "b": (40, 40, [])}, {"test": ["a", "b"]})
    dataset = voc_utils.get_voc(root, "val", None, classes=["cat"])
    evaluator = VocEvaluator(coco_utils.get_coco_api_from_dataset(dataset))
    evaluator.update({
        1: detections(
            (0, 0, 20, 9.95, 0.9, 1),   # IoU 199 / 400 with the first cat, just under 0.5: FP
            (0, 0, 20, 20, 0.8, 1),     # TP on the first cat
            (0, 0, 20, 20, 0.75, 1),    # overlaps the taken first cat most: a duplicate (FP), though the second
        ),                              # cat, free, overlaps it by 0.82 (COCO's matching would take that one)
        2: detections((0, 0, 5, 5, 0.7, 1)),  # FP on an image without objects
    })
    evaluator.accumulate()
    evaluator.summarize()
    # recall 0, 1/2, 1/2, 1/2 at precision 0, 1/2, 1/3, 1/4: thresholds 0 .. 0.5 see 1/2, the others nothing;
    # the area is 1/2 * 1/2.
    cat = evaluator.metrics()["voc"]["per_class"]["cat"]
    assert cat == {"AP_11pt": pytest.approx(3 / 11), "AP_area": pytest.approx(0.25)}


@pytest.fixture(scope="module")
def voc_shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "shapes"
    shapes.ensure_shapes_dataset(root, **TINY_SHAPES, layout="voc")
    return root


def test_voc_boxes_are_the_annotated_pixels_and_difficult_objects_stay_out_of_training(voc_shapes_root, shapes_root):
    # The same shapes in both layouts: VOC's 1-based inclusive corners must come back as the COCO boxes.
    coco_train = coco_utils.get_coco(shapes_root, "train", None)
    with_difficult = voc_utils.get_voc(voc_shapes_root, "train", None, classes=SHAPE_CLASSES, keep_difficult=True)
    default = voc_utils.get_voc(voc_shapes_root, "train", None, classes=SHAPE_CLASSES)
    assert len(with_difficult) == len(coco_train) == TINY_SHAPES["num_train"]
    dropped = 0
    for index in range(len(coco_train)):
        _, expected = coco_train[index]
        _, target = with_difficult[index]
        assert torch.equal(target["boxes"], expected["boxes"]) and torch.equal(target["labels"], expected["labels"])
        assert with_difficult.get_height_and_width(index) == coco_train.get_height_and_width(index)
        sizes = expected["boxes"][:, 2:] - expected["boxes"][:, :2]
        small = sizes.amax(dim=1) < shapes.DIFFICULT_FRACTION * min(with_difficult.get_height_and_width(index))
        image_id = with_difficult.ids[index]
        if image_id in default.ids:
            _, kept = default[default.ids.index(image_id)]
            assert torch.equal(kept["boxes"], expected["boxes"][~small])
        else:
            assert small.all()  # every object difficult: the image has nothing to train on
        dropped += int(small.sum())
    assert dropped > 0

    # torchvision's v2 dataset wrapper (--use-v2) reads the same converted ground truth: the same training targets.
    v1 = voc_utils.get_voc(voc_shapes_root, "train", presets.DetectionPresetEval(), classes=SHAPE_CLASSES)
    v2 = voc_utils.get_voc(voc_shapes_root, "train", presets.DetectionPresetEval(use_v2=True), use_v2=True,
                           classes=SHAPE_CLASSES)
    assert v1.ids == default.ids and len(v2) == len(v1)
    for index in range(len(v1)):
        (_, expected), (_, target) = v1[index], v2[index]
        assert torch.equal(target["boxes"].as_subclass(torch.Tensor), expected["boxes"])
        assert torch.equal(target["labels"], expected["labels"])

    # Evaluation keeps the difficult objects, flagged, for the devkit's ignore rule; test.txt holds the val images.
    val = voc_utils.get_voc(voc_shapes_root, "val", None, classes=SHAPE_CLASSES)
    ground_truth = coco_utils.get_coco_api_from_dataset(val)
    coco_val = coco_utils.get_coco_api_from_dataset(coco_utils.get_coco(shapes_root, "val", None))
    assert len(ground_truth.anns) == len(coco_val.anns)
    assert [a["bbox"] for a in ground_truth.anns.values()] == [a["bbox"] for a in coco_val.anns.values()]
    assert any(a["difficult"] for a in ground_truth.anns.values())


def test_voc_default_classes_are_the_devkits_twenty_in_order(tmp_path):
    objects = [("person", (5, 6, 30, 40), False), ("tvmonitor", (1, 1, 50, 40), False)]
    root = write_voc(tmp_path / "voc", {"x": (50, 40, objects)}, {"trainval": ["x"]})
    dataset = voc_utils.get_voc(root, "train", None)
    _, target = dataset[0]
    assert target["labels"].tolist() == [15, 20]
    assert target["boxes"].tolist() == [[4, 5, 30, 40], [0, 0, 50, 40]]  # (1, 1, W, H) is the whole image
    assert coco_utils.get_num_classes(dataset) == 21
    assert list(coco_utils.get_category_names(dataset).values()) == list(voc_utils.VOC_CLASSES)


def test_voc_image_size_must_match_its_annotation_file(tmp_path):
    root = write_voc(tmp_path / "voc", {"x": (50, 40, [("cat", (5, 6, 30, 40), False)])}, {"trainval": ["x"]})
    Image.new("RGB", (40, 50)).save(root / "VOC2007" / "JPEGImages" / "x.jpg")
    # Found at start-up, from the image's header (issue 23).
    with pytest.raises(coco_utils.DatasetError, match=r"x\.jpg: .* 40x50 pixels but .*x\.xml says 50x40"):
        voc_utils.get_voc(root, "train", None, classes=["cat"])


def voc_run(root, output_dir, *extra, epochs=1):
    # train_args' tiny seeded run; the later --dataset overrides its "shapes" (argparse keeps the last value).
    return [*train_args(root, output_dir, epochs=epochs), "--dataset", "voc", "--voc-classes", *SHAPE_CLASSES, *extra]


@pytest.mark.slow
def test_train_and_test_only_on_voc_report_the_same_map(voc_shapes_root, tmp_path):
    # Train on a list of our own with 8 of the trainval images: two iterations of 4.
    lists = voc_shapes_root / "VOC2007" / "ImageSets" / "Main"
    (lists / "first8.txt").write_text("".join((lists / "trainval.txt").read_text().splitlines(keepends=True)[:8]))
    output_dir = tmp_path / "out"
    trained = run_script("train.py", *voc_run(voc_shapes_root, output_dir, "--train-split", "2007/first8"))
    assert_ok(trained)
    (logged,) = read_log(output_dir)
    voc = logged["voc"]
    assert set(voc["per_class"]) <= set(SHAPE_CLASSES) and voc["per_class"]
    assert math.isclose(voc["mAP_11pt"], sum(c["AP_11pt"] for c in voc["per_class"].values()) / len(voc["per_class"]))
    assert (output_dir / "curves.png").is_file() and len(logged["coco"]) == 12  # COCO-style AP as well
    assert "Epoch: [0]  [1/2]" in trained.stdout

    # Two processes (the sampler pads the 11 images with a repeat the evaluator drops) reproduce the logged mAP.
    evaluated = run_script("train.py", *voc_run(voc_shapes_root, "", "--test-only", "--resume",
                                                output_dir / "checkpoint.pth"), launcher=torchrun(2))
    assert_ok(evaluated)
    assert MAP_LINE.search(evaluated.stdout).groups() == (f"{voc['mAP_11pt']:.4f}", f"{voc['mAP_area']:.4f}")


def break_xml(root):
    (root / "VOC2007" / "Annotations" / "b.xml").write_text("<annotation><size><width>9</width></annotation>")


BAD_VOC_INPUT = {
    "malformed_xml": (break_xml, [], ["b.xml", "malformed XML"]),
    "missing_jpeg": (lambda root: (root / "VOC2007" / "JPEGImages" / "b.jpg").unlink(), [], ["b.jpg", "test.txt"]),
    "unknown_class": (lambda root: None, ["--voc-classes", "dog"], ["a.xml", "object 1", "cat", "--voc-classes"]),
    "missing_list": (lambda root: (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").unlink(), [],
                     ["test.txt", "2007/test"]),
    "bad_split_flag": (lambda root: None, ["--val-split", "test"], ["--val-split", "YEAR/LIST"]),
}


@pytest.fixture(scope="module")
def bad_voc_results(tmp_path_factory):
    """{case: result} of train.py on a VOC folder with each defect, all in one interpreter."""
    root = tmp_path_factory.mktemp("bad_voc")
    cases = {}
    for case, (break_it, extra, _) in BAD_VOC_INPUT.items():
        voc_root = write_voc(root / case, {"a": (40, 30, [("cat", (2, 2, 20, 20), False)]),
                                           "b": (40, 30, [("cat", (5, 5, 30, 25), False)])},
                             {"trainval": ["a"], "test": ["a", "b"]})
        break_it(voc_root)
        cases[case] = ("train.py", ["--dataset", "voc", "--data-path", voc_root, "--voc-classes", "cat", *extra,
                                    "--model", "ssdlite320_mobilenet_v3_large", "--epochs", 1, "-b", 2, "-j", 0,
                                    "--output-dir", ""])
    return run_in_one_interpreter(cases, root / "runner")


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_VOC_INPUT)
def test_bad_voc_input_is_reported_in_one_line(case, bad_voc_results):
    result, fragments = bad_voc_results[case], BAD_VOC_INPUT[case][2]
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_shapes_command_line_writes_the_voc_layout(tmp_path, capsys):
    shapes.main(["--output", str(tmp_path / "voc"), "--num-train", "3", "--num-val", "2", "--format", "voc"])
    assert "--dataset voc" in capsys.readouterr().out
    lists = tmp_path / "voc" / "VOC2007" / "ImageSets" / "Main"
    assert (lists / "trainval.txt").read_text().split() == ["train_000001", "train_000002", "train_000003"]
    assert (lists / "test.txt").read_text().split() == ["val_000001", "val_000002"]
    assert len(voc_utils.get_voc(tmp_path / "voc", "val", None, classes=SHAPE_CLASSES)) == 2
    with pytest.raises(SystemExit, match="layout=voc, not .*layout=coco"):
        shapes.main(["--output", str(tmp_path / "voc"), "--num-train", "3", "--num-val", "2"])

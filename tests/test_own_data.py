"""Datasets as annotation tools export them: train.py's --train/--val-images/-annotations flags on FiftyOne-,
Roboflow- and sparse-id exports written from the shapes images, the category table, --keep-empty-images, and COCO
ground truth built from a custom Dataset's targets."""
import json
import re

import pytest
import torch
from PIL import Image

import coco_utils
import engine
import models
import presets
import safe_io
from coco_eval import CocoEvaluator
from helpers import LITE, assert_ok, read_log, run_script, write_coco_folder

SHAPES = ["circle", "rectangle", "triangle", "star", "cross"]  # shapes' category ids 1..5
AP_TABLE = re.compile(r"^ Average (?:Precision|Recall) .*$", re.MULTILINE)

# Each style gives the shapes categories new ids in the same order, so labels 1..5 keep meaning the shapes classes
# and a model trained on shapes must score exactly as on the original files: any label <-> id slip changes the AP.
STYLES = {
    "coco": {"ids": [1, 2, 3, 4, 5], "layout": {"train": ("train2017", "annotations/instances_train2017.json"),
                                                "val": ("val2017", "annotations/instances_val2017.json")}},
    "fiftyone": {"ids": [0, 1, 2, 3, 4], "layout": {"train": ("train/data", "train/labels.json"),
                                                    "val": ("val/data", "val/labels.json")}},
    "roboflow": {"ids": [1, 2, 3, 4, 5], "parent": "shapes-k3x9",
                 "layout": {"train": ("train", "train/_annotations.coco.json"),
                            "val": ("valid", "valid/_annotations.coco.json")}},
    "sparse": {"ids": [3, 17, 42, 1000, 10**9], "layout": {"train": ("pictures/fit", "labels/fit.json"),
                                                           "val": ("pictures/check", "labels/check.json")}},
}


@pytest.fixture(scope="module")
def model_boxes(trained_run, shapes_root):
    """{val image id: [(XYWH box, label), ...]}: the trained model's 5 best detections per shapes val image.
    As validation ground truth they give the model a high AP, which evaluation keeps only if it maps labels to the
    right ids: a model trained a few seconds is right about nothing else."""
    output_dir, _ = trained_run
    model = models.get_model(LITE, weights=str(output_dir / "model_1.pth")).eval()
    dataset = coco_utils.get_coco(str(shapes_root), "val", presets.DetectionPresetEval())
    boxes = {}
    with torch.inference_mode():
        for index, image_id in enumerate(dataset.ids):
            output = model([dataset[index][0]])[0]
            best = output["scores"].argsort(descending=True)[:5]
            xyxy, labels = output["boxes"][best], output["labels"][best]
            xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
            # On a quarter-pixel grid, exact in float32 and under addition: a dataset that rebuilds the boxes as
            # float32 XYXY targets then holds exactly the file's boxes, with no IoU moved across a threshold.
            quarter_pixels = [[round(value * 4) / 4 for value in box] for box in xywh.tolist()]
            boxes[image_id] = [(box, label) for box, label in zip(quarter_pixels, labels.tolist()) if min(box[2:]) > 1]
    assert sum(map(len, boxes.values())) > 20
    return boxes


def write_export(shapes_root, dest, style, num_train=6, edit_train=None, val_boxes=None):
    """The shapes images (the first num_train training images, every validation image) re-exported in a tool's
    style; returns the four path flags. edit_train(data) may change the training file before it is written;
    val_boxes ({image id: [(XYWH box, label)]}) replaces the validation boxes."""
    spec = STYLES[style]
    new_id = dict(zip(range(1, 6), spec["ids"]))
    flags = []
    for split, source in (("train", "train2017"), ("val", "val2017")):
        data = json.loads((shapes_root / "annotations" / f"instances_{source}.json").read_text())
        if split == "train":
            data["images"] = data["images"][:num_train]
            kept = {image["id"] for image in data["images"]}
            data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] in kept]
        elif val_boxes is not None:
            flat = [(image_id, box, label) for image_id, image_boxes in val_boxes.items() for box, label in image_boxes]
            data["annotations"] = [{"id": n + 1, "image_id": image_id, "category_id": label, "bbox": box}
                                   for n, (image_id, box, label) in enumerate(flat)]
        for ann in data["annotations"]:
            ann["category_id"] = new_id[ann["category_id"]]
        data["categories"] = [{"id": new_id[i + 1], "name": name, "supercategory": spec.get("parent", "shape")}
                              for i, name in enumerate(SHAPES)]
        if "parent" in spec:
            data["categories"].insert(0, {"id": 0, "name": spec["parent"], "supercategory": "none"})
        if split == "train" and edit_train is not None:
            edit_train(data)
        pictures = {image["file_name"]: shapes_root / source / image["file_name"] for image in data["images"]}
        top_level = {key: data[key] for key in data if key not in ("images", "annotations", "categories")}
        folder, ann_file = write_coco_folder(dest, pictures, data["annotations"], data["categories"], splits=(split,),
                                             layout=spec["layout"], images=data["images"], top_level=top_level)[split]
        flags += [f"--{split}-images", folder, f"--{split}-annotations", ann_file]
    return flags


def run_train(output_dir, *flags):
    """train.py on a tool's export: SSDlite, CPU, no --data-path (the four path flags say where the data is)."""
    return run_script("train.py", "--model", LITE, "--device", "cpu", "-j", "0", "--eval-batch-size", "4",
                      "--print-freq", "1", "--output-dir", output_dir, *flags)


def ap_table(stdout):
    lines = AP_TABLE.findall(stdout)
    assert len(lines) >= 12, stdout[-2000:]
    return lines[-12:]


def one_error_line(result):
    """The one stderr line of a refused run (non-zero exit, no traceback)."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def coco_layout_table(trained_run, model_boxes, shapes_root, tmp_path_factory):
    """The AP table of model_1.pth on the model_boxes ground truth in COCO's layout and ids (--data-path alone)."""
    output_dir, _ = trained_run
    root = tmp_path_factory.mktemp("coco_layout")
    write_export(shapes_root, root, "coco", val_boxes=model_boxes)
    result = run_train("", "--test-only", "--weights", output_dir / "model_1.pth", "--data-path", root)
    assert_ok(result)
    table = ap_table(result.stdout)
    assert float(table[0].split("=")[-1]) > 0.5, table
    return table


@pytest.mark.slow
@pytest.mark.parametrize("style", ["roboflow", "sparse"])
def test_export_evaluates_in_its_own_ids(trained_run, model_boxes, coco_layout_table, shapes_root, tmp_path, style):
    output_dir, _ = trained_run
    flags = write_export(shapes_root, tmp_path / "export", style, val_boxes=model_boxes)
    result = run_train("", "--test-only", "--weights", output_dir / "model_1.pth", *flags)
    assert_ok(result)
    assert ap_table(result.stdout) == coco_layout_table  # the same boxes under other ids: the same AP
    if style == "roboflow":  # the parent category is dropped (one line), the others keep labels = ids
        assert 'category id 0 "shapes-k3x9" is not made a class' in result.stdout
    else:
        assert "5 categories with ids 3..1000000000: the model's labels are 1..5" in result.stdout


@pytest.mark.slow
def test_fiftyone_export_trains_with_a_train_only_category_and_empty_images(shapes_root, tmp_path):
    def add_hexagon_and_empty_image(data):
        # A category only the training file has (FiftyOne's next id), on one box, and an image without boxes.
        data["categories"].append({"id": 5, "name": "hexagon"})
        data["annotations"][0]["category_id"] = 5
        data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] != data["images"][-1]["id"]]

    flags = write_export(shapes_root, tmp_path / "export", "fiftyone", num_train=8, edit_train=add_hexagon_and_empty_image)
    result = run_train(tmp_path / "kept", *flags, "--keep-empty-images", "--epochs", "1", "-b", "4",
                       "--aspect-ratio-group-factor", "-1", "--lr", "0.01", "--warmup-iters", "1", "--seed", "0")
    assert_ok(result)
    # 8 images, the empty one included: 2 batches of 4 (without the flag 7 images, 1 batch: see the v2 test)
    assert re.search(r"Epoch: \[0\]\s+\[0/2\]", result.stdout)
    checkpoint = torch.load(tmp_path / "kept" / "model_0.pth", map_location="cpu", weights_only=True)
    expected = {i + 1: {"id": i, "name": name} for i, name in enumerate(SHAPES + ["hexagon"])}
    assert checkpoint["categories"] == expected
    # SSDlite's first feature map has 6 default boxes per location, each scored for 6 classes + background
    assert checkpoint["model"]["head.classification_head.module_list.0.1.bias"].numel() == 6 * 7
    coco = read_log(tmp_path / "kept")[0]["coco"]
    assert len(coco) == 12 and all(0 <= value <= 1 or value == -1 for value in coco.values())

    # the checkpoint's labels mean FiftyOne's ids 0..5; the Roboflow-style export has ids 1..5, no hexagon: training
    # on it cannot resume, evaluating matches the classes by name and says so
    other_ids = write_export(shapes_root, tmp_path / "roboflow", "roboflow", num_train=2)
    line = one_error_line(run_train(tmp_path / "kept", "--resume", tmp_path / "kept" / "checkpoint.pth", *other_ids,
                                    "--epochs", "2", "-b", "4"))
    assert "was trained on other categories than this data's: label 1 is {'id': 0, 'name': 'circle'} there" in line
    result = run_train("", "--test-only", "--resume", tmp_path / "kept" / "checkpoint.pth", *other_ids)
    assert_ok(result)
    assert "its classes 'circle' 0->1, 'rectangle' 1->2, 'triangle' 2->3, 'star' 3->4, 'cross' 4->5 matched by " \
           "name, under this data's ids; 'hexagon' not in this data and without an id of their own here" in result.stdout


@pytest.mark.slow
def test_bad_exports_are_refused_in_one_line(shapes_root, tmp_path):
    flags = write_export(shapes_root, tmp_path / "a", "roboflow")
    other = write_export(shapes_root, tmp_path / "b", "sparse", num_train=2)
    train_file, val_file = flags[3], flags[7]

    # the validation file with the 2-image training folder of another export
    mismatched = [*flags[:4], "--val-images", other[1], "--val-annotations", val_file]
    line = one_error_line(run_train(tmp_path / "out1", *mismatched))
    assert re.search(f"{other[1]} and {val_file} do not belong together: [0-9]+ of the 11 images", line), line

    # one id, two names: the training file of one export with the validation file of the other
    colliding = [*flags[:4], *other[4:]]
    line = one_error_line(run_train(tmp_path / "out2", *colliding))
    assert f"{train_file} and {other[7]}: category id 3 is \"triangle\" in the first and \"circle\"" in line

    data = json.loads(val_file.read_text())
    data["annotations"][0]["category_id"] = 77
    val_file.write_text(json.dumps(data))
    line = one_error_line(run_train(tmp_path / "out3", *flags))
    ann = data["annotations"][0]
    assert line.startswith(f"error: {val_file}: annotation id {ann['id']} (image id {ann['image_id']}): category id 77")
    for name in ("out1", "out2", "out3"):  # nothing written but the run's own lock file
        assert [p.name for p in (tmp_path / name).iterdir() if p.name != safe_io.LOCK_NAME] == []


def coco_file(tmp_path, categories, annotations=(), name="a.json"):
    path = tmp_path / name
    images = [{"id": 1, "file_name": "x.jpg", "width": 10, "height": 10}]
    anns = [{"id": n + 1, "image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5]} for n, c in enumerate(annotations)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return str(path), coco_utils.load_annotation_file(str(path))


def table_ids(table):
    return {label: entry["id"] for label, entry in table.items()}


def test_labels_equal_ids_only_where_that_wastes_little(tmp_path, capsys):
    coco_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80 ids
    cases = [
        (coco_ids, {i: i for i in coco_ids}),
        ([1, 2, 4], {1: 1, 2: 2, 4: 4}),  # 4 <= 2 * 3
        ([1, 2, 7], {1: 1, 2: 2, 3: 7}),  # 7 > 2 * 3
        ([0, 1, 2], {1: 0, 2: 1, 3: 2}),  # an id 0 would be the background
        ([10**9, 5], {1: 5, 2: 10**9}),
    ]
    for ids, expected in cases:
        path, coco = coco_file(tmp_path, [{"id": i, "name": f"c{i}"} for i in ids])
        assert table_ids(coco_utils.build_category_table({path: coco})) == expected
    assert capsys.readouterr().out == ""


def test_parent_category_rule(tmp_path, capsys):
    children = [{"id": 1, "name": "dog", "supercategory": "pets"}, {"id": 2, "name": "cat", "supercategory": "pets"}]
    parent = {"id": 0, "name": "pets", "supercategory": "none"}
    path, coco = coco_file(tmp_path, [parent, *children], annotations=[1])
    assert table_ids(coco_utils.build_category_table({path: coco})) == {1: 1, 2: 2}
    assert capsys.readouterr().out.count('category id 0 "pets" is not made a class') == 1
    # kept: a box uses it, or not every other category lies under it
    for categories, used in (([parent, *children], [0]), ([parent, children[0], {"id": 2, "name": "cat"}], [])):
        path, coco = coco_file(tmp_path, categories, annotations=used)
        assert table_ids(coco_utils.build_category_table({path: coco})) == {1: 0, 2: 1, 3: 2}
    assert capsys.readouterr().out == ""


def test_class_set_is_the_union_of_both_files(tmp_path):
    train = coco_file(tmp_path, [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}], name="train.json")
    val = coco_file(tmp_path, [{"id": 1, "name": "dog"}, {"id": 3, "name": "owl"}], name="val.json")
    table = coco_utils.build_category_table(dict([train, val]))
    assert table == {1: {"id": 1, "name": "dog"}, 2: {"id": 2, "name": "cat"}, 3: {"id": 3, "name": "owl"}}


def test_evaluator_reports_in_the_files_ids(tmp_path):
    path, coco = coco_file(tmp_path, [{"id": 10**9, "name": "owl"}, {"id": 7, "name": "emu"}], annotations=[10**9])
    table = coco_utils.build_category_table({path: coco})
    evaluator = CocoEvaluator(coco, categories=table)
    evaluator.update({1: {"boxes": torch.tensor([[1.0, 1.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]]),
                          "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([2, 9])}})
    # label 2 is the id 10^9; label 9 stands for no category of the file and is left out
    assert [(r["category_id"], r["bbox"]) for r in evaluator.coco_results()] == [(10**9, [1.0, 1.0, 5.0, 5.0])]
    evaluator.accumulate()
    assert evaluator.coco_eval.eval["precision"].max() == pytest.approx(1.0)  # it matched the ground truth


def test_v2_path_keeps_empty_images_and_maps_ids_to_labels(shapes_root, tmp_path):
    def empty_last_image(data):
        data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] != data["images"][-1]["id"]]

    flags = write_export(shapes_root, tmp_path, "sparse", num_train=3, edit_train=empty_last_image)
    paths = {"img_folder": str(flags[1]), "ann_file": str(flags[3])}
    preset = presets.DetectionPresetTrain(data_augmentation="ssdlite", use_v2=True)
    for use_v2 in (False, True):
        dataset = coco_utils.get_coco(None, "train", preset if use_v2 else None, use_v2=use_v2,
                                      keep_empty_images=True, **paths)
        assert len(dataset) == 3
        labels = [dataset[i][1]["labels"] for i in range(3)]
        assert labels[2].shape == (0,) and dataset[2][1]["boxes"].shape == (0, 4)
        assert all(set(t.tolist()) <= {1, 2, 3, 4, 5} for t in labels) and len(labels[0]) > 0
        dropped = coco_utils.get_coco(None, "train", None, use_v2=use_v2, **paths)
        assert len(dropped) == 2


class TargetsOnly(torch.utils.data.Dataset):
    """A fork's own dataset: images from a folder and targets with only "image_id", "boxes" and "labels"."""

    def __init__(self, folder, annotation_file):
        data = json.loads(annotation_file.read_text())
        self.folder, self.images = folder, sorted(data["images"], key=lambda image: image["id"])
        self.boxes = {image["id"]: [] for image in self.images}
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            self.boxes[ann["image_id"]].append(([x, y, x + w, y + h], ann["category_id"]))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        pixels = Image.open(self.folder / image["file_name"]).convert("RGB")
        boxes = self.boxes[image["id"]]
        target = {"image_id": image["id"], "boxes": torch.tensor([b for b, _ in boxes]).reshape(-1, 4),
                  "labels": torch.tensor([label for _, label in boxes], dtype=torch.int64)}
        return presets.DetectionPresetEval()(pixels, target)


@pytest.mark.slow
def test_a_custom_dataset_evaluates_like_its_coco_file(trained_run, model_boxes, shapes_root, tmp_path, capsys):
    output_dir, _ = trained_run
    model = models.get_model(LITE, weights=str(output_dir / "model_1.pth")).eval()
    flags = write_export(shapes_root, tmp_path, "roboflow", val_boxes=model_boxes)  # labels = category ids
    images, annotations = flags[5], flags[7]
    from_file = coco_utils.get_coco(None, "val", presets.DetectionPresetEval(), img_folder=images, ann_file=annotations)
    custom = TargetsOnly(images, annotations)

    tables = {}
    for name, dataset in (("file", from_file), ("custom", custom)):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=lambda batch: tuple(zip(*batch)))
        capsys.readouterr()
        engine.evaluate(model, loader, torch.device("cpu"))
        tables[name] = ap_table(capsys.readouterr().out)
    # AP, AP50, AP75 and the three ARs do not depend on "area", which the custom targets do not carry.
    independent_of_area = [0, 1, 2, 6, 7, 8]
    assert float(tables["file"][0].split("=")[-1]) > 0.5, tables["file"]
    assert [tables["custom"][i] for i in independent_of_area] == [tables["file"][i] for i in independent_of_area]
    ground_truth = coco_utils.coco_from_targets(custom)
    assert sorted(ground_truth.imgs) == sorted(from_file.coco.imgs)
    assert len(ground_truth.anns) == len(from_file.coco.anns)

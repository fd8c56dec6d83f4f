"""Tests of coco_utils.py, group_by_aspect_ratio.py and shapes.py on real files written to tmp_path."""

import io
import json
import os
import signal
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler, Subset

import coco_utils
import group_by_aspect_ratio
import presets
import shapes
from coco_utils import DatasetError
from helpers import hang_timeout

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "kite"}]


def solid(mode, size, value):
    return Image.new(mode, size, value)


# id -> (file name, PIL image, save options). Every mode the loader must turn into RGB.
IMAGES = {
    1: ("rgb.jpg", lambda: solid("RGB", (40, 30), (200, 100, 50)), {"quality": 95}),
    2: ("gray.png", lambda: solid("L", (20, 16), 77), {}),
    3: ("rgba.png", lambda: solid("RGBA", (24, 18), (10, 20, 30, 0)), {}),
    4: ("cmyk.jpg", lambda: solid("CMYK", (32, 24), (0, 255, 255, 0)), {"quality": 95}),
    5: ("palette.png", lambda: solid("RGB", (30, 30), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE), {}),
    6: ("sixteen.png", lambda: Image.fromarray(np.full((12, 10), 32896, dtype=np.uint16)), {}),
    7: ("empty.png", lambda: solid("LA", (16, 48), (200, 255)), {}),  # no annotations at all
    8: ("crowd_only.png", lambda: solid("RGB", (20, 20), (0, 0, 0)), {}),
    9: ("zero_area_only.png", lambda: solid("RGB", (20, 20), (0, 0, 0)), {}),
}

ANNOTATIONS = [
    # image 1 (40 x 30): a normal box, a crowd box, a zero-width box, a box partly outside, a negative-size box
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5], "area": 40.0, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 20, 20], "area": 300.0, "iscrowd": 1},
    {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 8], "area": 0.0, "iscrowd": 0},
    {"id": 4, "image_id": 1, "category_id": 7, "bbox": [-5, 20, 20, 15], "area": 100.0, "iscrowd": 0},
    {"id": 5, "image_id": 1, "category_id": 1, "bbox": [10, 10, -4, 5], "area": 0.0, "iscrowd": 0},
    {"id": 6, "image_id": 2, "category_id": 7, "bbox": [1.5, 2.5, 5, 6], "area": 30.0},  # iscrowd omitted
    {"id": 7, "image_id": 3, "category_id": 3, "bbox": [0, 0, 24, 18]},  # area omitted: box area
    {"id": 8, "image_id": 4, "category_id": 1, "bbox": [4, 4, 8, 8], "area": 64.0, "iscrowd": 0},
    {"id": 9, "image_id": 5, "category_id": 1, "bbox": [28, 28, 10, 10], "area": 4.0, "iscrowd": 0},
    {"id": 10, "image_id": 6, "category_id": 3, "bbox": [1, 1, 3, 3], "area": 9.0, "iscrowd": 0},
    {"id": 11, "image_id": 8, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25.0, "iscrowd": 1},
    {"id": 12, "image_id": 9, "category_id": 1, "bbox": [3, 3, 6, 0], "area": 0.0, "iscrowd": 0},
]

# Category ids 1, 3, 7: the largest id is above twice the number of categories, so labels are 1, 2, 3.
EXPECTED = {  # image id -> (boxes, labels, area) of the v1 target
    1: ([[2, 3, 12, 8], [0, 20, 15, 30]], [1, 3], [40.0, 100.0]),
    2: ([[1.5, 2.5, 6.5, 8.5]], [3], [30.0]),
    3: ([[0, 0, 24, 18]], [2], [432.0]),
    4: ([[4, 4, 12, 12]], [1], [64.0]),
    5: ([[28, 28, 30, 30]], [1], [4.0]),
    6: ([[1, 1, 4, 4]], [2], [9.0]),
    7: ([], [], []),
    8: ([], [], []),
    9: ([], [], []),
}


@pytest.fixture
def edge_case_folder(coco_folder, tmp_path):
    """Writes the edge cases as the COCO folder tmp_path/coco, the same images in each of the given splits (and
    the given text instead of a split's annotation file); returns the folder's path as a string."""
    def write(splits=("train", "val"), annotation_text=None):
        pictures = {name: (make(), options) for name, make, options in IMAGES.values()}
        coco_folder(tmp_path / "coco", pictures, ANNOTATIONS, CATEGORIES, splits=splits,
                    annotation_text=annotation_text)
        return str(tmp_path / "coco")
    return write


@pytest.fixture
def coco_root(edge_case_folder):
    return edge_case_folder()


def edit_annotations(root, edit, split="val"):
    path = os.path.join(root, coco_utils.SPLITS[split][1])
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


# ---------------------------------------------------------------- targets and decoding


def test_val_targets_are_exact_for_every_edge_case(coco_root, capsys):
    dataset = coco_utils.get_coco(coco_root, "val", transforms=None)
    assert capsys.readouterr().out == ""  # pycocotools' chatter is silenced
    assert dataset.ids == list(range(1, 10)) and len(dataset) == 9
    for idx, image_id in enumerate(dataset.ids):
        image, target = dataset[idx]
        boxes, labels, area = EXPECTED[image_id]
        assert image.mode == "RGB" and image.size == (IMAGES[image_id][1]().width, IMAGES[image_id][1]().height)
        assert target["image_id"] == image_id and isinstance(target["image_id"], int)
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(boxes), 4)
        assert torch.equal(target["boxes"], torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        assert torch.equal(target["labels"], torch.tensor(labels, dtype=torch.int64))
        assert torch.equal(target["area"], torch.tensor(area, dtype=torch.float32))
        assert torch.equal(target["iscrowd"], torch.zeros(len(boxes), dtype=torch.int64))
        assert dataset.get_height_and_width(idx) == (image.height, image.width)


def test_targets_are_fresh_tensors(coco_root):
    dataset = coco_utils.get_coco(coco_root, "val", transforms=None)
    dataset[0][1]["boxes"] += 100  # a transform modifying its input in place must not corrupt the dataset
    assert torch.equal(dataset[0][1]["boxes"], torch.tensor(EXPECTED[1][0], dtype=torch.float32))


def test_every_image_mode_decodes_to_rgb(coco_root):
    dataset = coco_utils.get_coco(coco_root, "val", transforms=None)
    pixel = {image_id: dataset[dataset.ids.index(image_id)][0].getpixel((0, 0)) for image_id in IMAGES}
    assert pixel[2] == (77, 77, 77)  # grayscale
    assert pixel[3] == (255, 255, 255)  # RGBA, fully transparent: composited onto white (coco_utils.ALPHA_BACKGROUND)
    assert pixel[4] == Image.new("CMYK", (1, 1), (0, 255, 255, 0)).convert("RGB").getpixel((0, 0))
    assert pixel[5] == (0, 128, 255)  # palette
    assert pixel[6] == (128, 128, 128)  # 16-bit 32896 scaled down, not clipped to 255
    assert pixel[7] == (200, 200, 200)  # grayscale + alpha
    assert max(abs(a - b) for a, b in zip(pixel[1], (200, 100, 50))) <= 2  # JPEG


def test_train_split_drops_images_without_a_usable_box(coco_root):
    dataset = coco_utils.get_coco(coco_root, "train", transforms=None)
    assert dataset.ids == [1, 2, 3, 4, 5, 6]  # 7 (no annotation), 8 (crowd only), 9 (zero area only) removed
    assert all(len(dataset[i][1]["boxes"]) > 0 for i in range(len(dataset)))
    assert dataset.get_height_and_width(5) == (12, 10)


def test_transforms_are_applied(coco_root):
    dataset = coco_utils.get_coco(coco_root, "train", presets.DetectionPresetTrain(data_augmentation="ssd"))
    torch.manual_seed(0)
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and len(target["boxes"]) == len(target["labels"])


def test_v2_path_uses_torchvision_wrapper_with_the_same_images(coco_root, capsys):
    train = coco_utils.get_coco(coco_root, "train", presets.DetectionPresetTrain(data_augmentation="ssdlite", use_v2=True), use_v2=True)
    assert capsys.readouterr().out == ""
    assert list(train.ids) == [1, 2, 3, 4, 5, 6]
    assert coco_utils.get_coco_api_from_dataset(train).getAnnIds(imgIds=[3]) == [7]
    torch.manual_seed(0)
    image, target = train[0]
    assert type(image) is torch.Tensor and image.dtype == torch.uint8 and target["labels"].dtype == torch.int64
    val = coco_utils.get_coco(coco_root, "val", presets.DetectionPresetEval(use_v2=True), use_v2=True)
    v1_val = coco_utils.get_coco(coco_root, "val", presets.DetectionPresetEval())
    # One meaning of a target (issue 23): v2 clamps and ignores the crowd box as v1 does.
    for index in range(len(val)):
        (_, target), (_, expected) = val[index], v1_val[index]
        assert torch.equal(target["boxes"], expected["boxes"]) and torch.equal(target["labels"], expected["labels"])
    assert val[0][1]["boxes"].tolist() == [[2, 3, 12, 8], [0, 20, 15, 30]]


def test_coco_api_num_classes_and_names_come_from_the_annotation_file(coco_root):
    dataset = coco_utils.get_coco(coco_root, "val", transforms=None)
    for name, _, _ in IMAGES.values():
        os.remove(os.path.join(coco_root, "val2017", name))  # proves nothing is decoded
    subset = Subset(Subset(dataset, [0, 2, 4]), [1])
    assert coco_utils.get_coco_api_from_dataset(subset) is dataset.coco
    assert coco_utils.get_num_classes(subset) == 4
    assert coco_utils.get_category_names(dataset) == {1: "cat", 2: "dog", 3: "kite"}
    assert coco_utils.get_categories(subset) == {
        1: {"id": 1, "name": "cat"}, 2: {"id": 3, "name": "dog"}, 3: {"id": 7, "name": "kite"}
    }


# ---------------------------------------------------------------- bad input


def one_line_error(call):
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder_and_files_name_the_expected_paths(tmp_path, edge_case_folder):
    message = one_line_error(lambda: coco_utils.get_coco(str(tmp_path / "nowhere"), "train", None))
    assert "nowhere: data folder not found" in message and "train2017" in message and "instances_train2017.json" in message

    root = edge_case_folder(splits=("val",))
    message = one_line_error(lambda: coco_utils.get_coco(root, "train", None))
    assert message.startswith(os.path.join(root, "train2017")) and "instances_train2017.json" in message

    os.makedirs(os.path.join(root, "train2017"))
    message = one_line_error(lambda: coco_utils.get_coco(root, "train", None))
    assert message.startswith(os.path.join(root, "annotations", "instances_train2017.json") + ": not found")


@pytest.mark.parametrize("use_v2", [False, True])
def test_malformed_json_names_file_and_position(edge_case_folder, use_v2):
    root = edge_case_folder(splits=("val",), annotation_text={"val": '{"images": [\n  {"id": 1,, }]}'})
    path = os.path.join(root, "annotations", "instances_val2017.json")
    message = one_line_error(lambda: coco_utils.get_coco(root, "val", None, use_v2=use_v2))
    assert message.startswith(path) and "malformed JSON at line 2 column 12" in message


def append_annotation(**fields):
    def edit(data):
        data["annotations"].append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], **fields})

    return edit


@pytest.mark.parametrize(
    "edit, expected",
    [
        (append_annotation(image_id=42), 'annotation id 99 refers to image id 42, not in "images"'),
        (append_annotation(bbox=[1, 2, 3]), "annotation id 99 (image id 1): bbox must be 4 finite numbers"),
        (append_annotation(bbox=[1, 2, float("nan"), 4]), "annotation id 99 (image id 1): bbox must be 4 finite numbers"),
        (append_annotation(bbox=["1", 2, 3, 4]), "annotation id 99 (image id 1): bbox must be 4 finite numbers"),
        (append_annotation(category_id=2), 'annotation id 99 (image id 1): category id 2 is not in "categories"'),
        (lambda data: data["images"][0].pop("width"), 'image id 1 needs positive integer "width" and "height"'),
        (lambda data: data.pop("images"), 'expected an object with an "images" list'),
    ],
    ids=["unknown_image", "bbox_3_numbers", "bbox_nan", "bbox_string", "unknown_category", "no_width", "no_images"],
)
def test_bad_annotations_are_reported_with_file_and_ids(edge_case_folder, edit, expected):
    root = edge_case_folder(splits=("val",))
    path = edit_annotations(root, edit)
    message = one_line_error(lambda: coco_utils.get_coco(root, "val", None))
    assert message.startswith(path + ": ") and expected in message


def test_missing_image_files_are_found_at_construction(coco_root):
    os.remove(os.path.join(coco_root, "val2017", "gray.png"))
    os.remove(os.path.join(coco_root, "val2017", "cmyk.jpg"))
    for use_v2 in (False, True):
        message = one_line_error(lambda: coco_utils.get_coco(coco_root, "val", None, use_v2=use_v2))
        assert message.startswith(os.path.join(coco_root, "val2017", "gray.png") + ": image file not found (image id 2")
        assert "1 more image files are missing" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_images_fail_at_decode_time_with_file_and_id(edge_case_folder, damage):
    root = edge_case_folder(splits=("val",))
    path = os.path.join(root, "val2017", "rgb.jpg")
    noisy = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(path, quality=95)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    if damage == "garbage":  # no image header: found at start-up (issue 23)
        message = one_line_error(lambda: coco_utils.get_coco(root, "val", None))
    else:  # the header is whole: found when the image is decoded
        dataset = coco_utils.get_coco(root, "val", None)
        message = one_line_error(lambda: dataset[0])
    assert message.startswith(path + ": cannot decode image id 1: ")


def test_image_size_must_match_the_annotation_file(edge_case_folder):
    root = edge_case_folder(splits=("val",))
    edit_annotations(root, lambda data: data["images"][1].update(width=21))
    message = one_line_error(lambda: coco_utils.get_coco(root, "val", None)[1])
    assert message.startswith(os.path.join(root, "val2017", "gray.png")) and "image id 2 is 20x16 pixels" in message
    assert "says 21x16" in message


# ---------------------------------------------------------------- aspect-ratio grouping


def test_aspect_ratio_groups_use_annotation_metadata_only(coco_root):
    dataset = coco_utils.get_coco(coco_root, "val", transforms=None)
    v2_dataset = coco_utils.get_coco(coco_root, "val", transforms=None, use_v2=True)
    for name, _, _ in IMAGES.values():
        os.remove(os.path.join(coco_root, "val2017", name))
    sizes = {image_id: make().size for image_id, (_, make, _) in IMAGES.items()}
    expected = [sizes[i][0] / sizes[i][1] for i in range(1, 10)]
    assert group_by_aspect_ratio.compute_aspect_ratios(dataset) == expected
    assert group_by_aspect_ratio.compute_aspect_ratios(v2_dataset) == expected
    assert group_by_aspect_ratio.compute_aspect_ratios(Subset(dataset, [6, 0])) == [expected[6], expected[0]]
    # k=1 bins: [0.5, 1, 2] -> ratios 1.33, 1.25, 1.33, 1.33, 1, 0.83, 0.33, 1, 1
    assert group_by_aspect_ratio.create_aspect_ratio_groups(dataset, k=1) == [2, 2, 2, 2, 2, 1, 0, 2, 2]
    assert group_by_aspect_ratio.create_aspect_ratio_groups(dataset, k=0) == [1, 1, 1, 1, 1, 0, 0, 1, 1]
    with pytest.raises(TypeError, match="without decoding"):
        group_by_aspect_ratio.compute_aspect_ratios([1, 2, 3])


@pytest.mark.parametrize("sampler_type", [SequentialSampler, RandomSampler])
def test_grouped_batch_sampler_batches_are_homogeneous(sampler_type):
    group_ids = np.random.default_rng(0).integers(0, 3, size=50).tolist()
    sampler = sampler_type(range(50))
    batch_sampler = group_by_aspect_ratio.GroupedBatchSampler(sampler, group_ids, batch_size=4)
    batches = list(batch_sampler)
    assert len(batches) == len(batch_sampler) == 13
    # Full batches of one group first; then the groups' leftovers (at most 3 each), packed in group order.
    leftovers = sum(len(batch) for batch in batches if len({group_ids[i] for i in batch}) > 1)
    assert [len(batch) for batch in batches] == [4] * 12 + [2]
    assert sum(len({group_ids[i] for i in batch}) > 1 for batch in batches) <= 2 and leftovers <= 3 * 3
    assert sorted(i for batch in batches for i in batch) == list(range(50))  # every element once
    if sampler_type is SequentialSampler:
        assert batches[0] == [i for i in range(50) if group_ids[i] == group_ids[batches[0][0]]][:4]
    with pytest.raises(ValueError, match="Sampler"):
        group_by_aspect_ratio.GroupedBatchSampler(list(range(5)), group_ids, 2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_grouped_batch_sampler_uses_a_small_group_every_epoch(world_size):
    """200 landscape and 3 portrait images at batch 8 (torchvision's sampler left the portraits out of every epoch):
    every image, every epoch, on 1 or 2 ranks, with the same number of batches on each rank and in each epoch."""
    group_ids = [1] * 200 + [0] * 3
    samplers = [DistributedSampler(range(203), num_replicas=world_size, rank=rank, shuffle=True, seed=0)
                for rank in range(world_size)]
    batch_samplers = [group_by_aspect_ratio.GroupedBatchSampler(sampler, group_ids, 8, min_batch_size=2)
                      for sampler in samplers]
    for epoch in range(100):
        used = []
        for sampler, batch_sampler in zip(samplers, batch_samplers):
            sampler.set_epoch(epoch)
            batches = list(batch_sampler)
            assert len(batches) == len(batch_sampler) == -(-len(sampler) // 8)
            assert all(2 <= len(batch) <= 8 for batch in batches)
            assert sum(len({group_ids[i] for i in batch}) > 1 for batch in batches) <= 1
            used += [i for batch in batches for i in batch]
        assert set(used) == set(range(203)), f"epoch {epoch}: images {sorted(set(range(203)) - set(used))} unused"


def test_grouped_batch_sampler_completes_a_one_image_last_batch_from_its_group():
    group_ids = [0, 1, 1, 1]
    batches = list(group_by_aspect_ratio.GroupedBatchSampler(SequentialSampler(range(4)), group_ids, 3,
                                                             min_batch_size=2))
    assert batches == [[1, 2, 3], [0, 0]]
    batches = list(group_by_aspect_ratio.GroupedBatchSampler(SequentialSampler(range(3)), [0, 0, 0], 2,
                                                             min_batch_size=2))
    assert batches == [[0, 1], [2, 0]]
    assert list(group_by_aspect_ratio.GroupedBatchSampler(SequentialSampler(range(3)), [0, 0, 0], 2)) == \
        [[0, 1], [2]]


# ---------------------------------------------------------------- shapes dataset


def read_tree(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return files


def test_shapes_generation_is_deterministic_and_loads_through_get_coco(tmp_path):
    first = read_tree(shapes.ensure_shapes_dataset(tmp_path / "a", num_train=8, num_val=3, seed=0))
    second = read_tree(shapes.ensure_shapes_dataset(tmp_path / "b", num_train=8, num_val=3, seed=0))
    other = read_tree(shapes.ensure_shapes_dataset(tmp_path / "c", num_train=8, num_val=3, seed=1))
    assert first == second
    assert len([name for name in first if name.endswith(".jpg")]) == 11
    assert first["annotations/instances_train2017.json"] != other["annotations/instances_train2017.json"]
    assert first["train2017/000001.jpg"] != other["train2017/000001.jpg"]

    dataset = coco_utils.get_coco(str(tmp_path / "a"), "train", transforms=None)
    assert len(dataset) == 8 and coco_utils.get_num_classes(dataset) == 6
    assert list(coco_utils.get_category_names(dataset).values()) == shapes.CATEGORIES
    for image, target in (dataset[i] for i in range(len(dataset))):
        assert 128 <= image.width <= 320 and 128 <= image.height <= 320
        assert 1 <= len(target["boxes"]) <= 4
        boxes = target["boxes"]
        assert (boxes[:, 2] <= image.width).all() and (boxes[:, 3] <= image.height).all()
        box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert (target["area"] <= box_area).all() and (target["area"] >= 0.2 * box_area).all()  # filled shapes


def test_shapes_of_a_fixed_size_are_the_same_files_whatever_the_number_of_workers(tmp_path):
    one = read_tree(shapes.ensure_shapes_dataset(tmp_path / "one", num_train=9, num_val=2, image_size=(640, 480)))
    two = read_tree(shapes.ensure_shapes_dataset(tmp_path / "two", num_train=9, num_val=2, image_size=(640, 480),
                                                 workers=2))
    assert one == two and len([name for name in one if name.endswith(".jpg")]) == 11
    data = json.loads(one["annotations/instances_train2017.json"])
    assert {(image["width"], image["height"]) for image in data["images"]} == {(640, 480)}
    assert Image.open(io.BytesIO(one["train2017/000009.jpg"])).size == (640, 480)
    assert json.loads(one["shapes_manifest.json"])["image_size"] == [640, 480]
    # The manifest tells the sizes apart: the default (varied) sizes are refused in that folder.
    with pytest.raises(coco_utils.DatasetError, match="image_size=\\[640, 480\\], layout=coco, not .*image_size=varied"):
        shapes.ensure_shapes_dataset(tmp_path / "one", num_train=9, num_val=2)


def signal_handlers_seen(split, seed, image_size, index):
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_shapes_workers_die_on_sigterm_when_the_parent_only_records_it(monkeypatch):
    """train.py records SIGTERM without exiting (utils.record_stop_signals), and forked workers inherit handlers.
    The pool ends its workers with SIGTERM: with the parent's handler they would go on waiting for work, and the
    generation would never return. So each worker takes the default SIGTERM back and leaves Ctrl-C to the parent."""
    monkeypatch.setattr(shapes, "_render_image", signal_handlers_seen)  # what each worker sees
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        seen = list(shapes._render_split("train", 16, seed=0, workers=2))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [(True, True)] * 16


def test_shapes_boxes_are_tight():
    rng = np.random.default_rng(5)
    for _ in range(8):
        image, objects = shapes.render_sample(rng)
        pixels = np.asarray(image).astype(int)
        _, (x0, y0, x1, y1), _ = objects[-1]  # the last shape drawn is fully visible
        colour = pixels[(y0 + y1) // 2, (x0 + x1) // 2]  # the box centre lies inside every shape kind
        is_shape = (pixels == colour).all(-1)
        assert is_shape[y0, x0:x1].any() and is_shape[y1 - 1, x0:x1].any()  # each edge touches the shape
        assert is_shape[y0:y1, x0].any() and is_shape[y0:y1, x1 - 1].any()
        outside = np.ones_like(is_shape)
        outside[y0:y1, x0:x1] = False
        assert not (is_shape & outside).any()  # and nothing of it lies outside the box


def test_shapes_dataset_is_reused_and_parameters_are_checked(tmp_path, monkeypatch):
    root = shapes.ensure_shapes_dataset(tmp_path / "s", num_train=3, num_val=2, seed=4)
    monkeypatch.setattr(shapes, "_write_split", lambda *a: pytest.fail("regenerated an existing dataset"))
    assert shapes.ensure_shapes_dataset(tmp_path / "s", num_train=3, num_val=2, seed=4) == root
    message = one_line_error(lambda: shapes.ensure_shapes_dataset(root, num_train=3, num_val=2, seed=5))
    assert "made with num_train=3, num_val=2, seed=4" in message and "seed=5" in message and "another folder" in message
    other = tmp_path / "not_shapes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not a shapes dataset" in one_line_error(lambda: shapes.ensure_shapes_dataset(other))


def test_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def crash_on_third(rng, image_size=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_render(rng, image_size)

    real_render = shapes.render_sample
    monkeypatch.setattr(shapes, "render_sample", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        shapes.ensure_shapes_dataset(tmp_path / "s", num_train=4, num_val=2)
    assert os.listdir(tmp_path) == []  # no partial dataset, no temporary folder
    monkeypatch.setattr(shapes, "render_sample", real_render)
    root = shapes.ensure_shapes_dataset(tmp_path / "s", num_train=4, num_val=2)
    assert len(os.listdir(os.path.join(root, "train2017"))) == 4


def test_concurrent_generation_is_safe(tmp_path, monkeypatch):
    # Both threads reach it within milliseconds; the timeout only ends a test whose callers wait for each other.
    both_generating = threading.Barrier(2, timeout=hang_timeout(120))
    real_write = shapes._write_split

    def write_together(root, split, *args):
        if split == "train":
            both_generating.wait()  # make both callers build their own copy at the same time
        real_write(root, split, *args)

    monkeypatch.setattr(shapes, "_write_split", write_together)
    results, errors = [], []

    def call():
        try:
            results.append(shapes.ensure_shapes_dataset(tmp_path / "s", num_train=3, num_val=2))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [str(tmp_path / "s")] * 2
    assert sorted(os.listdir(tmp_path)) == ["s"]  # the loser's copy was discarded
    assert len(coco_utils.get_coco(results[0], "val", None)) == 2


def test_shapes_command_line(tmp_path, capsys):
    shapes.main(["--output", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1", "--seed", "3"])
    assert "2 train / 1 val images" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .*seed=3"):
        shapes.main(["--output", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1"])

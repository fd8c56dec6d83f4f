"""One usable-box rule for every path (issue 23): a box is usable if it has positive size in float32 after the
model's resize. The annotation file's boxes are clamped, crowd boxes ignored and slivers dropped alike on v1 and
--use-v2; the final training targets drop what augmentation and the resize collapse; tiny images do not crash v2's
crop; a target the model still refuses stops training in one line naming the image id and file."""
import numpy as np
import pytest
import torch
from PIL import Image

import coco_utils
import engine
import models
import presets
import voc_utils
from helpers import LITE, write_coco_folder
from test_voc import write_voc

# A 64 x 48 image: boxes (XYWH) the file's check must judge as the model will.
BOXES = {
    "half a pixel past the left edge": ([-0.5, 10, 20, 10], 0),
    "a sliver 1e-9 wide": ([10, 10, 1e-9, 5], 0),
    "a sliver from 63.9999999 to the right edge": ([63.9999999, 0, 5, 5], 0),
    "a crowd region": ([5, 5, 10, 10], 1),
    "an ordinary box": ([20, 20, 10, 10], 0),
}
USABLE = [[0, 10, 19.5, 20], [20, 20, 30, 30]]


def picture(width=64, height=48):
    return np.full((height, width, 3), 128, dtype=np.uint8)


@pytest.fixture
def box_folder(tmp_path):
    annotations = [{"id": n + 1, "image_id": 1, "category_id": 1, "bbox": bbox, "iscrowd": crowd}
                   for n, (bbox, crowd) in enumerate(BOXES.values())]
    # Image 2 has nothing but a sliver: nothing to train on.
    annotations.append({"id": 99, "image_id": 2, "category_id": 1, "bbox": [3, 3, 1e-9, 1e-9]})
    return write_coco_folder(tmp_path, {"a.png": picture(), "b.png": picture()}, annotations, splits=("train",))


@pytest.mark.parametrize("use_v2", [False, True])
def test_the_file_boxes_are_clamped_crowd_free_and_sliver_free_on_both_paths(box_folder, use_v2):
    folder, ann_file = box_folder["train"]
    preset = presets.DetectionPresetEval(use_v2=use_v2)
    dataset = coco_utils.get_coco(None, "train", preset, use_v2=use_v2, img_folder=str(folder), ann_file=str(ann_file))
    assert list(dataset.ids) == [1]  # the sliver-only image is left out of training, as an image without boxes
    _, target = dataset[0]
    assert target["boxes"].tolist() == USABLE and target["labels"].tolist() == [1, 1]


def test_a_voc_sliver_is_dropped(tmp_path):
    objects = [("cat", (5, 6, 5 - 1 + 1e-10, 20), False), ("cat", (10, 10, 30, 30), False)]
    root = write_voc(tmp_path / "voc", {"x": (50, 40, objects)}, {"trainval": ["x"]})
    for use_v2 in (False, True):
        dataset = voc_utils.get_voc(root, "train", presets.DetectionPresetEval(use_v2=use_v2), use_v2=use_v2,
                                    classes=["cat"])
        assert dataset[0][1]["boxes"].tolist() == [[9, 9, 30, 30]]


def test_the_final_targets_drop_the_boxes_the_models_resize_collapses():
    # Positive in float32 in this 641-pixel-wide image, zero wide once resized to 300.
    sliver = [192.96376037597656, 1.0, 192.96377563476562, 5.0]
    image = torch.zeros(3, 10, 641, dtype=torch.uint8)
    target = {"boxes": torch.tensor([sliver, [10.0, 1.0, 50.0, 9.0]]), "labels": torch.tensor([1, 2]),
              "area": torch.tensor([0.0, 320.0]), "image_id": 7}
    model = models.get_model("ssd300_vgg16", num_classes=3).train()
    with pytest.raises(models.TargetError, match="box 0"):
        model._batch_targets([target], [(10, 641)])
    _, kept = presets.DropUnusableBoxes(models.INPUT_SIZES["ssd300_vgg16"])(image, target)
    assert kept["boxes"].tolist() == [[10.0, 1.0, 50.0, 9.0]] and kept["labels"].tolist() == [2]
    assert kept["area"].tolist() == [320.0] and kept["image_id"] == 7
    model._batch_targets([kept], [(10, 641)])  # the model accepts what the rule keeps


@pytest.mark.parametrize("use_v2", [False, True])
@pytest.mark.parametrize("policy", ["ssd", "ssdlite"])
def test_images_of_a_few_pixels_survive_the_iou_crop(policy, use_v2):
    preset = presets.DetectionPresetTrain(data_augmentation=policy, use_v2=use_v2,
                                          input_size=models.INPUT_SIZES[LITE])
    torch.manual_seed(0)
    for side in (1, 2, 3):
        for _ in range(20):
            image = Image.new("RGB", (side, side + 1))
            boxes = torch.tensor([[0.0, 0.0, side, side + 1]])
            if use_v2:
                from torchvision import tv_tensors
                boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(side + 1, side))
            out_image, target = preset(image, {"boxes": boxes, "labels": torch.tensor([1])})
            assert out_image.shape[0] == 3 and len(target["boxes"]) == len(target["labels"])


def test_a_target_the_model_refuses_stops_training_in_one_line_naming_the_image(tmp_path):
    paths = write_coco_folder(tmp_path, {"a.png": picture(), "b.png": picture()},
                              [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [4, 4, 20, 20]}], splits=("train",))
    folder, ann_file = paths["train"]
    # A table that gives category 1 label 9: more than the 3-class model below has.
    dataset = coco_utils.get_coco(None, "train", presets.DetectionPresetEval(), img_folder=str(folder),
                                  ann_file=str(ann_file), categories={9: {"id": 1, "name": "thing"}},
                                  keep_empty_images=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=lambda batch: tuple(zip(*batch)))
    model = models.get_model(LITE, num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(coco_utils.DatasetError) as error:
        engine.train_one_epoch(model, optimizer, loader, torch.device("cpu"), 0, print_freq=10, warmup_iters=0)
    message = str(error.value)
    assert message.startswith(f"{folder / 'b.png'}: image id 2: the model refuses its training target")
    assert "label 9" in message and "\n" not in message

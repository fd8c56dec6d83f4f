"""COCO-format detection datasets with box-only targets.

`get_coco` reads any folder laid out like COCO 2017::

    root/train2017/*.jpg   root/annotations/instances_train2017.json
    root/val2017/*.jpg     root/annotations/instances_val2017.json

Unlike torchvision's reference, targets hold boxes only (SSD never uses masks, and rasterising polygons was
most of the reference loader's time), and all annotation parsing, validation and box clean-up happens once at
construction, so `__getitem__` only decodes the image.
"""

import contextlib
import io
import json
import math
import os

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from pycocotools.coco import COCO

SPLITS = {
    "train": ("train2017", os.path.join("annotations", "instances_train2017.json")),
    "val": ("val2017", os.path.join("annotations", "instances_val2017.json")),
}

# Pillow's RGB conversion clips 16-bit grayscale at 255 (nearly white images); these modes are rescaled instead.
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class DatasetError(ValueError):
    """Bad dataset input; the message is one line naming the file (and image id where there is one)."""


def _one_line(text, limit=200):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(path):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 JSON file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation file: {e.strerror}") from None


def _is_bbox(bbox):
    """4 finite numbers; sum() rejects non-numbers with a TypeError and propagates NaN and infinity."""
    try:
        return isinstance(bbox, list) and len(bbox) == 4 and math.isfinite(sum(bbox))
    except TypeError:
        return False


def _check_coco_dict(data, ann_file):
    """Validate a COCO detection dict in place, filling the optional fields pycocotools' evaluation needs
    ("iscrowd", "area"), so that every later step can trust it."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f'{ann_file}: not a COCO annotation file (expected an object with an "images" list)')
    data.setdefault("annotations", [])
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f'{ann_file}: "{key}" must be a list')

    image_ids = set()
    for image in data["images"]:
        image_id = image.get("id") if isinstance(image, dict) else None
        if not isinstance(image_id, int) or image_id in image_ids:
            raise DatasetError(f"{ann_file}: image entry {_one_line(repr(image), 80)} needs a unique integer id")
        if not isinstance(image.get("file_name"), str):
            raise DatasetError(f'{ann_file}: image id {image_id} has no "file_name"')
        width, height = image.get("width"), image.get("height")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise DatasetError(f'{ann_file}: image id {image_id} needs positive integer "width" and "height"')
        image_ids.add(image_id)

    category_ids = set()
    for category in data["categories"]:
        category_id = category.get("id") if isinstance(category, dict) else None
        if not isinstance(category_id, int) or category_id < 1 or category_id in category_ids:
            raise DatasetError(
                f"{ann_file}: category entry {_one_line(repr(category), 80)} needs a unique integer id >= 1 "
                "(0 is the background class)"
            )
        category.setdefault("name", str(category_id))
        category_ids.add(category_id)

    annotation_ids = set()
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if not isinstance(ann_id, int) or ann_id in annotation_ids:
            raise DatasetError(f"{ann_file}: annotation {_one_line(repr(ann), 80)} needs a unique integer id")
        annotation_ids.add(ann_id)
        image_id = ann.get("image_id")
        if image_id not in image_ids:
            raise DatasetError(f'{ann_file}: annotation id {ann_id} refers to image id {image_id!r}, not in "images"')
        where = f"{ann_file}: annotation id {ann_id} (image id {image_id})"
        bbox = ann.get("bbox")
        if not _is_bbox(bbox):
            raise DatasetError(f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {_one_line(repr(bbox), 80)}")
        if ann.get("category_id") not in category_ids:
            raise DatasetError(f'{where}: category id {ann.get("category_id")!r} is not in "categories"')
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(max(bbox[2], 0) * max(bbox[3], 0)))
        if ann["iscrowd"] not in (0, 1) or not isinstance(ann["area"], (int, float)):
            raise DatasetError(f'{where}: "iscrowd" must be 0 or 1 and "area" a number')


def _build_coco_api(data):
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return coco


def _usable_boxes(coco, image_ids):
    """Box-only targets of `image_ids`, concatenated in that order: (boxes XYXY, labels, area, first, count) with
    first[i]:first[i]+count[i] the rows of image_ids[i]. Crowd annotations are dropped, boxes are clamped to the
    image and boxes left without area (zero or negative size) are dropped."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    anns = [ann for ann in coco.dataset["annotations"] if not ann["iscrowd"] and ann["image_id"] in position]
    owner = np.array([position[ann["image_id"]] for ann in anns], dtype=np.int64)
    boxes = np.array([ann["bbox"] for ann in anns], dtype=np.float64).reshape(-1, 4)
    labels = np.array([ann["category_id"] for ann in anns], dtype=np.int64)
    area = np.array([ann["area"] for ann in anns], dtype=np.float32)

    sizes = np.array([(coco.imgs[i]["width"], coco.imgs[i]["height"]) for i in image_ids], dtype=np.float64)
    size = sizes.reshape(-1, 2)[owner]
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, size[:, :1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, size[:, 1:])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

    # A stable sort keeps each image's annotations in file order, as pycocotools' getAnnIds returns them.
    order = np.argsort(owner[keep], kind="stable")
    owner = owner[keep][order]
    count = np.bincount(owner, minlength=len(image_ids))
    first = np.cumsum(count) - count
    return boxes[keep][order].astype(np.float32), labels[keep][order], area[keep][order], first, count


def _load_coco(img_folder, ann_file):
    """Validated pycocotools COCO object and its sorted image ids, after checking every image file exists."""
    data = _read_json(ann_file)
    _check_coco_dict(data, ann_file)
    coco = _build_coco_api(data)
    ids = sorted(coco.imgs)
    missing = [i for i in ids if not os.path.isfile(os.path.join(img_folder, coco.imgs[i]["file_name"]))]
    if missing:
        more = f"; {len(missing) - 1} more image files are missing" if len(missing) > 1 else ""
        path = os.path.join(img_folder, coco.imgs[missing[0]]["file_name"])
        raise DatasetError(f"{path}: image file not found (image id {missing[0]}, listed in {ann_file}){more}")
    return coco, ids


def _to_rgb(image):
    if image.mode in _SIXTEEN_BIT_MODES:
        eight_bit = (np.asarray(image, dtype=np.float32) / 257.0).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if image.mode == "RGB":
        image.load()
        return image
    return image.convert("RGB")  # alpha is dropped, palettes / CMYK / grayscale expanded


def load_rgb_image(path, image_id):
    """Decode an image as 3-channel 8-bit RGB whatever its mode; decoding errors become one-line DatasetErrors."""
    try:
        with Image.open(path) as image:
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image id {image_id}: {_one_line(e)}") from None


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset returning (PIL RGB image, target) with target
    {"boxes": float32 [N, 4] XYXY, "labels": int64 [N], "image_id": int, "area": float32 [N], "iscrowd": int64 [N]}.

    With `drop_images_without_boxes` (training), images left without a usable box are removed, judged from the
    annotation file alone.
    """

    def __init__(self, img_folder, ann_file, transforms=None, drop_images_without_boxes=False):
        self.coco, ids = _load_coco(img_folder, ann_file)
        self.img_folder = img_folder
        self.ann_file = ann_file
        self.transforms = transforms
        # Targets live in a few flat arrays rather than per-image Python objects: cheap to build for COCO's
        # 860k boxes and not copied page by page into every forked DataLoader worker by reference counting.
        self._boxes, self._labels, self._area, first, count = _usable_boxes(self.coco, ids)
        if drop_images_without_boxes:
            has_box = count > 0
            ids = [i for i, keep in zip(ids, has_box) if keep]
            first, count = first[has_box], count[has_box]
        self.ids = ids
        self._first, self._count = first, count

    def __len__(self):
        return len(self.ids)

    def get_height_and_width(self, idx):
        info = self.coco.imgs[self.ids[idx]]
        return info["height"], info["width"]

    def __getitem__(self, idx):
        image_id = self.ids[idx]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.img_folder, info["file_name"])
        image = load_rgb_image(path, image_id)
        if image.size != (info["width"], info["height"]):
            raise DatasetError(
                f"{path}: image id {image_id} is {image.width}x{image.height} pixels but "
                f"{self.ann_file} says {info['width']}x{info['height']}"
            )
        rows = slice(self._first[idx], self._first[idx] + self._count[idx])
        target = {
            "boxes": torch.from_numpy(self._boxes[rows].copy()),
            "labels": torch.from_numpy(self._labels[rows].copy()),
            "image_id": image_id,
            "area": torch.from_numpy(self._area[rows].copy()),
            "iscrowd": torch.zeros(self._count[idx], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _get_coco_v2(img_folder, ann_file, transforms, drop_images_without_boxes):
    """torchvision's own dataset and v2 wrapper, as torchvision's references use with --use-v2.

    Its targets differ from CocoDetection above: crowd annotations stay as ordinary boxes, boxes are neither
    clamped nor filtered here (transforms.v2.SanitizeBoundingBoxes later drops those under 1 pixel, while v1 keeps
    sub-pixel boxes), there is no "area"/"iscrowd", and an image without annotations gets {"image_id"} only.
    Training images are filtered by the same rule as v1, so both paths see the same images.
    """
    import torchvision

    coco, ids = _load_coco(img_folder, ann_file)
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = torchvision.datasets.CocoDetection(img_folder, ann_file, transforms=transforms)
    # torchvision read the file a second time; use the validated copy (with "area"/"iscrowd" filled in where the
    # file omits them, which pycocotools' evaluation needs) so both paths evaluate against the same ground truth.
    dataset.coco = coco
    dataset.ids = ids
    dataset.ann_file = ann_file
    if drop_images_without_boxes:
        count = _usable_boxes(coco, ids)[4]
        dataset.ids = [i for i, n in zip(ids, count) if n > 0]
    return torchvision.datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=["boxes", "labels", "image_id"])


def get_coco(root, image_set, transforms, use_v2=False):
    if image_set not in SPLITS:
        raise ValueError(f"image_set must be one of {sorted(SPLITS)}, got {image_set!r}")
    folder, annotations = SPLITS[image_set]
    img_folder, ann_file = os.path.join(root, folder), os.path.join(root, annotations)
    expected = f"expected {img_folder}{os.sep} and {ann_file}"
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: data folder not found ({expected})")
    for path in (img_folder, ann_file):
        if not os.path.exists(path):
            raise DatasetError(f"{path}: not found ({expected})")

    drop_images_without_boxes = image_set == "train"
    if use_v2:
        dataset = _get_coco_v2(img_folder, ann_file, transforms, drop_images_without_boxes)
    else:
        dataset = CocoDetection(img_folder, ann_file, transforms, drop_images_without_boxes)
    if drop_images_without_boxes and len(dataset) == 0:
        raise DatasetError(f"{ann_file}: no training image has a usable box (non-crowd, positive width and height)")
    return dataset


def _unwrap(dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object holding the dataset's ground truth (read from its file, no image decoding)."""
    coco = getattr(_unwrap(dataset), "coco", None)
    if not isinstance(coco, COCO):
        raise TypeError(f"{type(dataset).__name__} carries no COCO annotations; build it with coco_utils.get_coco")
    return coco


def get_annotation_file(dataset):
    """The path of the annotation file the dataset was read from (None when it was built another way)."""
    return getattr(_unwrap(dataset), "ann_file", None)


def get_num_classes(dataset):
    """Largest category id + 1 (ids index the classifier directly; 0 is the background): 91 on COCO."""
    return max(get_coco_api_from_dataset(dataset).cats, default=0) + 1


def get_category_names(dataset):
    return {cat_id: cat["name"] for cat_id, cat in sorted(get_coco_api_from_dataset(dataset).cats.items())}

"""COCO-format detection datasets with box-only targets.

`get_coco` reads any folder laid out like COCO 2017::

    root/train2017/*.jpg   root/annotations/instances_train2017.json
    root/val2017/*.jpg     root/annotations/instances_val2017.json

or any other image folder and annotation file (`img_folder=`, `ann_file=`), as annotation tools export them.

Category ids become the model's labels through a category table (`build_category_table`, `get_categories`):
labels equal the ids where that wastes little (COCO), and are 1..K otherwise (ids from 0, sparse or huge ids).
The datasets' pycocotools ground truth stays in the file's own ids; the evaluator maps labels back.

Unlike torchvision's reference, targets hold boxes only (SSD never uses masks, and rasterising polygons was
most of the reference loader's time), and all annotation parsing, validation and box clean-up happens once at
construction, so `__getitem__` only decodes the image.

Pascal VOC, converted to the same in-memory COCO ground truth, is read by voc_utils.py.
"""

import contextlib
import io
import json
import math
import os
import unicodedata

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from pycocotools.coco import COCO

from models.weights import normalize_class_name

SPLITS = {
    "train": ("train2017", os.path.join("annotations", "instances_train2017.json")),
    "val": ("val2017", os.path.join("annotations", "instances_val2017.json")),
}

# Pillow's RGB conversion clips 16-bit grayscale at 255 (nearly white images); these modes are rescaled instead.
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
# Transparent pixels are composited onto white, as a browser shows them on a white page: the colour stored under a
# fully transparent pixel is arbitrary (often black), so dropping alpha would show the model whatever the encoder
# left there.
ALPHA_BACKGROUND = (255, 255, 255)


class DatasetError(ValueError):
    """Bad dataset input; the message is one line naming the file (and image id where there is one)."""


def shorten(text, limit=200):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path, what="annotation file"):
    """The content of a JSON file; an unreadable or malformed one is a one-line DatasetError naming it as `what`."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 JSON file ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to read (a COCO file is a few levels deep)") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read {what}: {e.strerror}") from None


def bbox_problem(bbox):
    """Why bbox is not [x, y, width, height] of 4 finite numbers whose corners and area are finite, or None."""
    numbers = isinstance(bbox, list) and len(bbox) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    if not (numbers and all(math.isfinite(v) for v in bbox)):
        return "must be 4 finite numbers [x, y, width, height]"
    x, y, width, height = map(float, bbox)
    if not all(math.isfinite(v) for v in (x + width, y + height, max(width, 0) * max(height, 0))):
        return "is out of range: x + width, y + height and the area width * height overflow"
    return None


def _whole_number(value):
    """value as an int where it is a whole number (64.0, as some tools write sizes, which pycocotools and
    torchvision accept), else as given."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _is_category_id(value):
    # Ids are stored in int64 arrays by the evaluation backends; bool is an int subclass but not an id.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def check_coco_dict(data, ann_file):
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
            raise DatasetError(f"{ann_file}: image entry {shorten(repr(image), 80)} needs a unique integer id")
        if not isinstance(image.get("file_name"), str):
            raise DatasetError(f'{ann_file}: image id {image_id} has no "file_name"')
        width, height = (_whole_number(image.get(key)) for key in ("width", "height"))
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise DatasetError(f'{ann_file}: image id {image_id} needs positive integer "width" and "height"')
        image["width"], image["height"] = width, height
        image_ids.add(image_id)

    category_ids = set()
    for category in data["categories"]:
        category_id = category.get("id") if isinstance(category, dict) else None
        if not _is_category_id(category_id) or category_id in category_ids:
            raise DatasetError(
                f"{ann_file}: category entry {shorten(repr(category), 80)} needs a unique integer id "
                "from 0 to 2^63 - 1"
            )
        category.setdefault("name", str(category_id))
        if not isinstance(category["name"], str):
            raise DatasetError(f'{ann_file}: category id {category_id} has a "name" that is not a string')
        category_ids.add(category_id)

    annotation_ids = set()
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if not isinstance(ann_id, int) or ann_id in annotation_ids:
            raise DatasetError(f"{ann_file}: annotation {shorten(repr(ann), 80)} needs a unique integer id")
        annotation_ids.add(ann_id)
        image_id = ann.get("image_id")
        if image_id not in image_ids:
            raise DatasetError(f'{ann_file}: annotation id {ann_id} refers to image id {image_id!r}, not in "images"')
        where = f"{ann_file}: annotation id {ann_id} (image id {image_id})"
        bbox = ann.get("bbox")
        problem = bbox_problem(bbox)
        if problem:
            raise DatasetError(f"{where}: bbox {problem}, got {shorten(repr(bbox), 80)}")
        if ann.get("category_id") not in category_ids:
            raise DatasetError(f'{where}: category id {ann.get("category_id")!r} is not in "categories"')
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(max(bbox[2], 0) * max(bbox[3], 0)))
        if ann["iscrowd"] not in (0, 1) or not isinstance(ann["area"], (int, float)):
            raise DatasetError(f'{where}: "iscrowd" must be 0 or 1 and "area" a number')


def build_coco_api(data):
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return coco


def usable_boxes(coco, image_ids, label_of, ann_file):
    """Box-only targets of `image_ids`, concatenated in that order: (boxes XYXY, labels, area, first, count) with
    first[i]:first[i]+count[i] the rows of image_ids[i]. Crowd annotations are dropped, boxes are clamped to the
    image and boxes left without area (zero or negative size) are dropped. `label_of` maps category ids to labels."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    anns = [ann for ann in coco.dataset["annotations"] if not ann["iscrowd"] and ann["image_id"] in position]
    owner = np.array([position[ann["image_id"]] for ann in anns], dtype=np.int64)
    boxes = np.array([ann["bbox"] for ann in anns], dtype=np.float64).reshape(-1, 4)
    labels = np.array([_label(label_of, ann, ann_file) for ann in anns], dtype=np.int64)
    area = np.array([ann["area"] for ann in anns], dtype=np.float32)

    sizes = np.array([(coco.imgs[i]["width"], coco.imgs[i]["height"]) for i in image_ids], dtype=np.float64)
    size = sizes.reshape(-1, 2)[owner]
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, size[:, :1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, size[:, 1:])
    # Judged in float32, the targets' type: a sliver of 1e-9 pixels, or one starting at 63.9999999 in a 64-pixel
    # image, has positive size in float64 only.
    boxes = boxes.astype(np.float32)
    keep = has_positive_size(boxes)

    # A stable sort keeps each image's annotations in file order, as pycocotools' getAnnIds returns them.
    order = np.argsort(owner[keep], kind="stable")
    owner = owner[keep][order]
    count = np.bincount(owner, minlength=len(image_ids))
    first = np.cumsum(count) - count
    return boxes[keep][order], labels[keep][order], area[keep][order], first, count


def has_positive_size(boxes):
    """Which XYXY boxes (numpy or torch, [N, 4]) have x2 > x1 and y2 > y1 (NaN fails): the one test of a usable
    box, applied to the annotation file's boxes here and to the final training targets by presets.DropUnusableBoxes."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _label(label_of, ann, ann_file):
    label = label_of.get(ann["category_id"])
    if label is None:
        raise DatasetError(
            f"{ann_file}: annotation id {ann['id']} (image id {ann['image_id']}) has category id "
            f"{ann['category_id']}, which is not one of the model's classes"
        )
    return label


def _check_image_paths(coco, ids, ann_file):
    """Refuse file_names that leave the image folder: absolute paths and '..' components."""
    for image_id in ids:
        file_name = coco.imgs[image_id]["file_name"]
        if os.path.isabs(file_name) or ".." in file_name.replace("\\", "/").split("/"):
            raise DatasetError(
                f"{ann_file}: image id {image_id} has file_name {file_name!r}, which is outside the image folder "
                "(absolute or with '..'); pass --allow-image-paths-outside-folder if that is intended"
            )


def load_annotation_file(ann_file):
    """The validated pycocotools COCO object of a COCO detection file; bad input raises a one-line DatasetError."""
    data = read_json(ann_file)
    check_coco_dict(data, ann_file)
    return build_coco_api(data)


def _load_coco(img_folder, ann_file, coco=None, allow_paths_outside=False):
    """Validated pycocotools COCO object (read from ann_file unless given) and its sorted image ids, after checking
    every image file exists (and, unless allow_paths_outside, lies inside img_folder by its name)."""
    if coco is None:
        coco = load_annotation_file(ann_file)
    ids = sorted(coco.imgs)
    if not allow_paths_outside:
        _check_image_paths(coco, ids, ann_file)
    missing = [i for i in ids if not _find_image_file(img_folder, coco.imgs[i])]
    if missing:
        path = os.path.join(img_folder, coco.imgs[missing[0]]["file_name"])
        if 2 * len(missing) > len(ids):  # not a few lost files: the wrong folder, or the wrong file for it
            raise DatasetError(
                f"{img_folder} and {ann_file} do not belong together: {len(missing)} of the {len(ids)} images the "
                f"annotation file lists are not in the image folder (first: {path})"
            )
        more = f"; {len(missing) - 1} more image files are missing" if len(missing) > 1 else ""
        raise DatasetError(f"{path}: image file not found (image id {missing[0]}, listed in {ann_file}){more}")
    _check_each_file_listed_once(coco, ids, ann_file)
    for image_id in ids:
        _check_image_header(os.path.join(img_folder, coco.imgs[image_id]["file_name"]), image_id, coco.imgs[image_id],
                            ann_file)
    return coco, ids


def _check_each_file_listed_once(coco, ids, ann_file):
    """Refuse an image file listed under two image ids: its boxes would be split between them, and each id would
    be trained and evaluated against part of them (the other part counted as background, or as missed)."""
    id_of_file = {}
    for image_id in ids:
        file_name = coco.imgs[image_id]["file_name"]
        first = id_of_file.setdefault(os.path.normpath(file_name), image_id)
        if first != image_id:
            raise DatasetError(f"{ann_file}: image ids {first} and {image_id} both name the file {file_name!r}: "
                               "list each image once, with all of its boxes")


def _find_image_file(img_folder, info):
    """Whether info's file is in img_folder, under its name or under the other Unicode normalization of it (a
    macOS export writes names decomposed, NFD, on disk and composed, NFC, in the JSON, or the reverse: the same
    name to the eye); a file found so has info["file_name"] set to the name on disk."""
    for file_name in dict.fromkeys([info["file_name"], *(unicodedata.normalize(form, info["file_name"])
                                                         for form in ("NFC", "NFD"))]):
        if os.path.isfile(os.path.join(img_folder, file_name)):
            info["file_name"] = file_name
            return True
    return False


# EXIF orientations that turn the picture by 90 degrees, so that viewers and some annotation tools see it with width
# and height exchanged.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
                             8: "rotated 90 degrees counter-clockwise"}


def _check_image_header(path, image_id, info, ann_file):
    """Compare the size in the image file's header (read without decoding the pixels) with the annotation file's,
    so that a wrong size stops the run at start-up rather than when the image is first used, mid-epoch."""
    try:
        with Image.open(path) as image:
            size, orientation = image.size, image.getexif().get(_EXIF_ORIENTATION)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image id {image_id}: {shorten(e)}") from None
    if size != (info["width"], info["height"]):
        raise DatasetError(size_mismatch_message(path, image_id, size, info, ann_file, orientation))


def size_mismatch_message(path, image_id, size, info, ann_file, orientation=None):
    """The one line for an image whose pixels are not the size its annotation file gives, naming the EXIF
    orientation where it explains the difference."""
    message = (f"{path}: image id {image_id} is {size[0]}x{size[1]} pixels but "
               f"{info.get('annotation_file', ann_file)} says {info['width']}x{info['height']}")
    if orientation in _TRANSPOSING_ORIENTATIONS and size == (info["height"], info["width"]):
        message += (f": its EXIF orientation ({orientation}, {_TRANSPOSING_ORIENTATIONS[orientation]}) explains it, "
                    "the annotation tool used the turned picture while the pixels are used as stored; "
                    "rotate the file's pixels (e.g. PIL.ImageOps.exif_transpose) and its boxes with them, or "
                    "re-export the annotations in the stored orientation")
    return message


# Labels equal category ids while the largest id is at most this many times the number of classes, i.e. while at
# most half of the classifier's outputs stand for ids that no category has. COCO (80 categories, largest id 90)
# stays as torchvision's weights index it; ids from 0, sparse or huge ids get labels 1..K instead.
IDENTITY_LABELS_MAX_ID_RATIO = 2


def _merge_categories(cocos):
    """{category id: (name, supercategory, file)} over all files; an id named differently in two files is an error."""
    merged = {}
    for ann_file, coco in cocos.items():
        for category_id, category in coco.cats.items():
            name = category["name"]
            seen = merged.setdefault(category_id, (name, category.get("supercategory"), ann_file))
            if seen[0] != name:
                raise DatasetError(
                    f'{seen[2]} and {ann_file}: category id {category_id} is "{seen[0]}" in the first and "{name}" '
                    "in the second; one id must name the same class in both files"
                )
    return merged


def _parent_category(merged, used_ids):
    """The id of a Roboflow-style parent category, or None: a category no annotation uses, whose name is the
    "supercategory" of every other category (Roboflow exports {"id": 0, "name": <project>} above the real ones)."""
    supercategories = [supercategory for _, supercategory, _ in merged.values()]
    others = len(merged) - 1
    for category_id, (name, supercategory, _) in merged.items():
        if category_id not in used_ids and others and supercategories.count(name) - (supercategory == name) == others:
            return category_id
    return None


def build_category_table(cocos):
    """The category table {label: {"id": category id, "name": name}} of the union of the categories of `cocos`
    ({annotation file: COCO object}, e.g. the training and validation files).

    - A Roboflow-style parent category (see `_parent_category`) is left out, with one printed line.
    - Labels equal category ids where every id is >= 1 and the largest id is at most
      IDENTITY_LABELS_MAX_ID_RATIO times the number of categories; otherwise the categories get labels 1..K in
      ascending id order, so ids from 0, sparse and huge ids cost nothing.
    Label 0 is the background and never in the table.
    """
    merged = _merge_categories(cocos)
    used_ids = {ann["category_id"] for coco in cocos.values() for ann in coco.dataset["annotations"]}
    parent = _parent_category(merged, used_ids)
    if parent is not None:
        name, _, ann_file = merged.pop(parent)
        print(f'{ann_file}: category id {parent} "{name}" is not made a class: no box uses it and it is the '
              "supercategory of all the others (the parent category of a Roboflow export)")
    ids = sorted(merged)
    if not ids:
        raise DatasetError(f"{' and '.join(cocos)}: no categories to learn (the \"categories\" list is empty)")
    identity = ids[0] >= 1 and ids[-1] <= IDENTITY_LABELS_MAX_ID_RATIO * len(ids)
    labels = ids if identity else range(1, len(ids) + 1)
    return {label: {"id": category_id, "name": merged[category_id][0]} for label, category_id in zip(labels, ids)}


# Names torchvision's weights give labels that stand for no class.
_UNNAMED_LABELS = ("__background__", "N/A")


def categories_for_evaluation(recorded, data_categories, source):
    """(category table, note or None): the table through which evaluation maps the model's labels to this data's
    category ids, given the classes recorded with the weights (models.read_weights_record) and the data's table.

    The weights define what their labels mean: a recorded table {label: {"id", "name"}}, or names alone
    ({label: name}: older checkpoints, torchvision's weights). Each of this data's categories is the model's class
    of the same id and name, else the one of the same name (compared as fine-tuning compares them, see
    models.weights.normalize_class_name), whose label then writes this data's id. A data category that no class
    matches is a DatasetError naming `source`: the model was trained on other classes. The model's other classes
    keep their recorded id where this data does not use it (written to detections.json, not evaluated) and are left
    out otherwise (their id names another class here, or none is recorded). Nothing recorded (a plain state_dict): this data's table is taken on trust. The note says, in one
    line, whatever is not matched by id and name.
    """
    if not recorded:
        return data_categories, f"{source} records no classes: its labels are taken to be this data's categories"
    classes = {int(label): entry if isinstance(entry, dict) else {"id": None, "name": str(entry)}
               for label, entry in recorded.items()}
    classes = {label: entry for label, entry in classes.items() if label >= 1 and entry["name"] not in _UNNAMED_LABELS}
    table, renamed = {}, []
    for data_entry in sorted(data_categories.values(), key=lambda entry: entry["id"]):
        label = _matching_class(classes, data_entry, source)
        if label in table:  # one class cannot stand for two of this data's categories: one would get no detections
            raise DatasetError(
                f"this data's categories {table[label]['name']!r} (id {table[label]['id']}) and "
                f"{data_entry['name']!r} (id {data_entry['id']}) are both the class {classes[label]['name']!r} of "
                f"{source}: merge them into one category")
        table[label] = dict(data_entry)
        if classes[label]["id"] not in (None, data_entry["id"]):  # names alone record no id to differ
            renamed.append(f"{data_entry['name']!r} {classes[label]['id']}->{data_entry['id']}")
    data_ids = {entry["id"] for entry in data_categories.values()}
    unused = {label: entry for label, entry in classes.items() if label not in table}
    table.update({label: dict(entry) for label, entry in unused.items() if entry["id"] not in (None, *data_ids)})
    dropped = [repr(entry["name"]) for label, entry in unused.items() if label not in table]
    not_evaluated = [repr(entry["name"]) for label, entry in unused.items() if label in table]
    parts = [_listed(renamed, "matched by name, under this data's ids"),
             _listed(not_evaluated, "not in this data: detections written, not evaluated"),
             _listed(dropped, "not in this data and without an id of their own here: detections left out")]
    note = "; ".join(filter(None, parts))
    return dict(sorted(table.items())), f"{source}: its classes {note}" if note else None


def _matching_class(classes, data_entry, source):
    """The label of the model's class of the data category's id and name, else of its name alone."""
    for label, entry in classes.items():
        if entry["id"] == data_entry["id"] and entry["name"] == data_entry["name"]:
            return label
    wanted = normalize_class_name(data_entry["name"])
    same_name = [label for label, entry in classes.items() if normalize_class_name(entry["name"]) == wanted]
    if len(same_name) == 1:
        return same_name[0]
    same_id = [entry["name"] for entry in classes.values() if entry["id"] == data_entry["id"]]
    there = f"category id {data_entry['id']} is {same_id[0]!r} there" if same_id else \
        f"no class is named {data_entry['name']!r} there"
    raise DatasetError(f"{source} was trained on other classes than this data's: {there}, "
                       f"{data_entry['name']!r} (category id {data_entry['id']}) here")


def _listed(items, what):
    return f"{shorten(', '.join(items), 120)} {what}" if items else ""


def _to_rgb(image):
    if image.mode in _SIXTEEN_BIT_MODES:
        eight_bit = (np.asarray(image, dtype=np.float32) / 257.0).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode == "RGB":
        image.load()
        return image
    return image.convert("RGB")  # palettes, CMYK (Pillow's formula, no colour profile) and grayscale expanded


def load_rgb_image(path, image_id=None):
    """Decode an image file as 3-channel 8-bit RGB whatever its mode: the one decoder of training, evaluation,
    predict.py and export.py --check, so all of them see the same pixels.

    - 16-bit grayscale is rescaled to 8 bits (value / 257), not clipped;
    - palette, grayscale and CMYK images are expanded to RGB;
    - transparency (an alpha channel or a palette's transparent colour) is composited onto ALPHA_BACKGROUND;
    - EXIF orientation is ignored: the pixels are used as stored, the frame that COCO annotations (width, height,
      boxes), pycocotools and torchvision's loaders use.

    Decoding errors become one-line DatasetErrors naming the file (and image id when given).
    """
    try:
        with Image.open(path) as image:
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        which = f" id {image_id}" if image_id is not None else ""
        raise DatasetError(f"{path}: cannot decode image{which}: {shorten(e)}") from None


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset returning (PIL RGB image, target) with target
    {"boxes": float32 [N, 4] XYXY, "labels": int64 [N], "image_id": int, "area": float32 [N], "iscrowd": int64 [N]}.

    "labels" are the model's labels of the category table `categories` (default: the table of this file alone,
    see build_category_table); `self.coco` keeps the file's own category ids for evaluation.
    With `drop_images_without_boxes` (training), images left without a usable box are removed, judged from the
    annotation file alone. `coco` is the file already read by load_annotation_file, to avoid reading it twice.
    """

    def __init__(self, img_folder, ann_file, transforms=None, drop_images_without_boxes=False, categories=None,
                 coco=None, allow_paths_outside=False):
        self.coco, ids = _load_coco(img_folder, ann_file, coco, allow_paths_outside)
        self.categories = categories if categories is not None else build_category_table({ann_file: self.coco})
        self.img_folder = img_folder
        self.ann_file = ann_file
        self.transforms = transforms
        # Targets live in a few flat arrays rather than per-image Python objects: cheap to build for COCO's
        # 860k boxes and not copied page by page into every forked DataLoader worker by reference counting.
        self._boxes, self._labels, self._area, first, count = usable_boxes(
            self.coco, ids, category_labels(self.categories), ann_file
        )
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
        if image.size != (info["width"], info["height"]):  # the file changed since start-up
            raise DatasetError(size_mismatch_message(path, image_id, image.size, info, self.ann_file))
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


def category_labels(categories):
    """{category id: label} of a category table {label: {"id", "name"}}."""
    return {entry["id"]: label for label, entry in categories.items()}


class _V2Targets:
    """The v2 path's first transform: replaces the "boxes" and "labels" torchvision's wrapper made from the raw
    annotations (crowd boxes included, nothing clamped, category ids as labels, none at all for an image without
    annotations) by the v1 path's targets (`usable`, usable_boxes' arrays by image id), then runs `transforms`.
    So both paths train on the same boxes: clamped, crowd ignored, slivers dropped."""

    def __init__(self, usable, transforms):
        self.boxes, self.labels, self.first, self.count, self.position = usable
        self.transforms = transforms

    def __call__(self, image, target):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        index = self.position[target["image_id"]]
        rows = slice(self.first[index], self.first[index] + self.count[index])
        target["boxes"] = tv_tensors.BoundingBoxes(torch.from_numpy(self.boxes[rows].copy()), format="XYXY",
                                                   canvas_size=tuple(F.get_size(image)))
        target["labels"] = torch.from_numpy(self.labels[rows].copy())
        return (image, target) if self.transforms is None else self.transforms(image, target)


def _get_coco_v2(img_folder, ann_file, transforms, drop_images_without_boxes, categories=None, coco=None,
                 allow_paths_outside=False):
    """torchvision's own dataset and v2 wrapper, as torchvision's references use with --use-v2.

    Its "boxes" and "labels" are CocoDetection's above (clamped, crowd annotations ignored, slivers dropped, labels
    of the same category table, see _V2Targets); there is no "area"/"iscrowd". Training images are filtered by the
    same rule, so both paths see the same images and targets.
    """
    import torchvision

    coco, ids = _load_coco(img_folder, ann_file, coco, allow_paths_outside)
    if categories is None:
        categories = build_category_table({ann_file: coco})
    boxes, labels, _, first, count = usable_boxes(coco, ids, category_labels(categories), ann_file)
    usable = boxes, labels, first, count, {image_id: index for index, image_id in enumerate(ids)}
    # No annotation file for torchvision to read: it gets the validated copy (with "area"/"iscrowd" filled in where
    # the file omits them, which pycocotools' evaluation needs) so both paths evaluate against the same ground truth.
    dataset = torchvision.datasets.CocoDetection(img_folder, None, transforms=_V2Targets(usable, transforms))
    dataset.coco = coco
    dataset.ids = ids
    dataset.categories = categories
    dataset.ann_file = ann_file
    if drop_images_without_boxes:
        dataset.ids = [i for i, n in zip(ids, count) if n > 0]
    return torchvision.datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=["boxes", "labels", "image_id"])


def dataset_class(use_v2):
    """The dataset class for transforms v1 (our CocoDetection) or v2 (torchvision's v2 wrapper of it); both take
    (img_folder, ann_file, transforms, drop_images_without_boxes, categories, coco, allow_paths_outside)."""
    return _get_coco_v2 if use_v2 else CocoDetection


def split_paths(root, image_set, img_folder=None, ann_file=None):
    """(image folder, annotation file) of a split: those given, the others from the COCO 2017 layout under root
    (root/train2017, root/annotations/instances_train2017.json, ...); a missing one is a one-line DatasetError."""
    if image_set not in SPLITS:
        raise ValueError(f"image_set must be one of {sorted(SPLITS)}, got {image_set!r}")
    folder, annotations = SPLITS[image_set]
    uses_root = img_folder is None or ann_file is None
    img_folder = img_folder or os.path.join(root, folder)
    ann_file = ann_file or os.path.join(root, annotations)
    expected = f"expected {img_folder}{os.sep} and {ann_file}"
    if uses_root and not os.path.isdir(root):
        raise DatasetError(f"{root}: data folder not found ({expected})")
    for path in (img_folder, ann_file):
        if not os.path.exists(path):
            raise DatasetError(f"{path}: not found ({expected})")
    return img_folder, ann_file


def get_coco(root, image_set, transforms, use_v2=False, *, img_folder=None, ann_file=None, categories=None,
             keep_empty_images=False, coco=None, allow_paths_outside=False):
    """The "train" or "val" split as a dataset of (image, target).

    img_folder / ann_file: the split's files (default: the COCO 2017 layout under root, see split_paths).
    categories: the category table giving the labels (default: ann_file's own, see build_category_table).
    keep_empty_images: keep training images without a usable box, as pure negatives (default: drop them, as
    torchvision does). coco: ann_file already read by load_annotation_file. allow_paths_outside: accept
    file_names that are absolute or contain '..' (refused by default: they would read outside img_folder).
    """
    img_folder, ann_file = split_paths(root, image_set, img_folder, ann_file)
    drop_images_without_boxes = image_set == "train" and not keep_empty_images
    dataset = dataset_class(use_v2)(img_folder, ann_file, transforms, drop_images_without_boxes, categories, coco,
                                    allow_paths_outside)
    if drop_images_without_boxes and len(dataset) == 0:
        raise DatasetError(f"{ann_file}: no training image has a usable box (non-crowd, positive width and height)")
    return dataset


def _unwrap(dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def _image_height_width(image):
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(int(n) for n in image.shape[-2:])  # tensors and tv_tensors: [..., H, W]


def _annotations_of_target(target, first_id):
    """COCO annotation dicts of one target (boxes XYXY -> bbox XYWH); "area" and "iscrowd" are used if present."""
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float64).reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    area = torch.as_tensor(target.get("area", xywh[:, 2] * xywh[:, 3])).reshape(-1)
    iscrowd = torch.as_tensor(target.get("iscrowd", torch.zeros(len(boxes)))).reshape(-1)
    labels = torch.as_tensor(target["labels"]).reshape(-1)
    return [
        {"id": first_id + n, "image_id": int(target["image_id"]), "category_id": label, "bbox": bbox,
         "area": float(a), "iscrowd": int(crowd)}
        for n, (bbox, label, a, crowd) in enumerate(zip(xywh.tolist(), labels.tolist(), area.tolist(), iscrowd.tolist()))
    ]


def coco_from_targets(dataset):
    """COCO ground truth (a pycocotools COCO object) built from any detection dataset's own targets.

    The dataset returns (image, target) with target["image_id"] (int), target["boxes"] (XYXY in the returned
    image's pixels) and target["labels"]; "area" and "iscrowd" are used when present (default: box area, 0).
    Every item is loaded once, images included (their sizes are the returned images'), so this is slow on a large
    dataset. Category ids are the labels. get_coco_api_from_dataset uses it for datasets not made by get_coco.
    """
    images, annotations = [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        height, width = _image_height_width(image)
        images.append({"id": int(target["image_id"]), "width": width, "height": height})
        annotations += _annotations_of_target(target, first_id=len(annotations) + 1)
    labels = sorted({ann["category_id"] for ann in annotations})
    categories = [{"id": label, "name": str(label)} for label in labels]
    return build_coco_api({"images": images, "annotations": annotations, "categories": categories})


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object holding the dataset's ground truth: for get_coco's datasets (also inside Subsets)
    the annotation file, read at construction, in the file's category ids; for any other dataset, built from its
    targets by coco_from_targets (which loads every item), with the labels as category ids."""
    coco = getattr(_unwrap(dataset), "coco", None)
    return coco if isinstance(coco, COCO) else coco_from_targets(dataset)


def get_categories(dataset, coco_gt=None):
    """The category table {label: {"id": category id, "name": name}} of the dataset's labels (the rules:
    docs/own-data.md, "Category ids and labels").

    get_coco's datasets carry theirs. For any other dataset the labels are the category ids of its ground truth
    (coco_gt, built by get_coco_api_from_dataset when not given).
    """
    unwrapped = _unwrap(dataset)
    if isinstance(getattr(unwrapped, "coco", None), COCO) and isinstance(getattr(unwrapped, "categories", None), dict):
        return unwrapped.categories
    cats = (coco_gt or get_coco_api_from_dataset(dataset)).cats
    return {category_id: {"id": category_id, "name": cat["name"]} for category_id, cat in sorted(cats.items())}


def get_image_file(dataset, image_id):
    """The image file of `image_id` in a dataset made by get_coco or get_voc (also inside Subsets); None for other
    datasets."""
    unwrapped = _unwrap(dataset)
    coco = getattr(unwrapped, "coco", None)
    # Our CocoDetection names its folder img_folder; torchvision's, behind the v2 wrapper, root.
    folder = getattr(unwrapped, "img_folder", None) or getattr(unwrapped, "root", None)
    if not isinstance(coco, COCO) or folder is None or image_id not in coco.imgs:
        return None
    return os.path.join(folder, coco.imgs[image_id]["file_name"])


def get_annotation_file(dataset):
    """The path of the annotation file the dataset was read from (None when it was built another way)."""
    return getattr(_unwrap(dataset), "ann_file", None)


def get_num_classes(dataset):
    """Largest label + 1 (label 0 is the background): 91 on COCO, whose labels are its category ids."""
    return max(get_categories(dataset), default=0) + 1


def get_category_names(dataset):
    return {label: entry["name"] for label, entry in sorted(get_categories(dataset).items())}

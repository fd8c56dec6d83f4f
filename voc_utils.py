"""Pascal VOC (VOCdevkit layout) as COCO-format datasets.

`get_voc` converts the XML annotations of the listed images into the same in-memory COCO ground truth that
coco_utils builds from an annotation file, so training, the aspect-ratio grouping and evaluation all take one path;
`is_voc` tells the evaluator to score such ground truth with the VOC devkit's AP (coco_eval.VocEvaluator).
Box conversion and the "difficult" rule follow the devkit and Detectron2 (see _voc_annotation).
"""
import math
import os
import xml.etree.ElementTree as ElementTree

from coco_utils import SPLITS, DatasetError, build_coco_api, check_coco_dict, dataset_class, shorten


VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # the devkit's order: labels 1..20


VOC_YEARS = ("2007", "2012")


VOC_DEFAULT_VAL_SPLIT = ("2007", "test")


_VOC_FORMAT = "pascal_voc"  # marks ground truth converted by get_voc: its annotations carry "difficult"


def parse_voc_split(text):
    """'2007/test' -> ('2007', 'test'): the list VOC2007/ImageSets/Main/test.txt."""
    year, _, name = text.partition("/")
    if not (year.isdigit() and len(year) == 4 and name and "/" not in name):
        raise ValueError(f"a VOC split is YEAR/LIST such as 2007/test or 2012/trainval, got {text!r}")
    return year, name


def _voc_text(element, tag, where):
    text = element.findtext(tag) if element is not None else None
    if text is None or not text.strip():
        raise DatasetError(f"{where}: missing <{tag}>")
    return text.strip()


def _voc_number(element, tag, where):
    text = _voc_text(element, tag, where)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(f"{where}: <{tag}> must be a number, got {shorten(repr(text), 40)}")
    return value


def _read_voc_xml(path, labels, listed_in):
    """(width, height, [(label, (xmin, ymin, xmax, ymax) as written: 1-based inclusive pixels, difficult)])."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from None
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found (the image is listed in {listed_in})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation file: {e.strerror}") from None
    size = root.find("size")
    width, height = (_voc_number(size, tag, f"{path}: <size>") for tag in ("width", "height"))
    if width < 1 or height < 1 or not (width.is_integer() and height.is_integer()):
        raise DatasetError(f"{path}: <size> needs positive whole <width> and <height>, got {width} x {height}")
    objects = []
    for index, element in enumerate(root.findall("object"), start=1):
        name = _voc_text(element, "name", f"{path}: object {index}")
        where = f"{path}: object {index} ({name})"
        if name not in labels:
            raise DatasetError(f"{where}: not one of the {len(labels)} classes ({shorten(', '.join(labels), 60)}); "
                               "give this dataset's class names with --voc-classes")
        difficult = (element.findtext("difficult") or "0").strip()  # absent means 0, as in the devkit
        if difficult not in ("0", "1"):
            raise DatasetError(f"{where}: <difficult> must be 0 or 1, got {shorten(repr(difficult), 40)}")
        box = element.find("bndbox")
        if box is None:
            raise DatasetError(f"{where}: missing <bndbox>")
        corners = tuple(_voc_number(box, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((labels[name], corners, difficult == "1"))
    return int(width), int(height), objects


def _read_voc_list(root, year, name):
    path = os.path.join(root, f"VOC{year}", "ImageSets", "Main", f"{name}.txt")
    try:
        with open(path) as f:
            # The first word of each line: class lists such as cat_trainval.txt add a 1/-1 column.
            return path, [line.split()[0] for line in f if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{path}: image set list not found (VOC split {year}/{name}; "
                           "--train-split and --val-split choose the lists)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read image set list: {shorten(e)}") from None


def _voc_annotation(annotation_id, image_id, label, corners, difficult, ignore_difficult):
    xmin, ymin, xmax, ymax = corners
    # 1-based inclusive pixel indices to the model's 0-based continuous XYXY: the box covers exactly the annotated
    # pixels (x from xmin - 1 to xmax, Detectron2's conversion), so its width xmax - xmin + 1 is the devkit's and
    # IoU on these boxes equals the devkit's "+1" IoU on the file's.
    width, height = xmax - xmin + 1, ymax - ymin + 1
    return {
        "id": annotation_id, "image_id": image_id, "category_id": label,
        "bbox": [xmin - 1, ymin - 1, width, height], "area": max(width, 0) * max(height, 0),
        # Marked crowd, a difficult object is left out of training targets and ignored by COCO-style evaluation.
        "iscrowd": int(difficult and ignore_difficult), "difficult": int(difficult),
    }


def _voc_coco_dict(root, splits, classes, difficult):
    """COCO ground truth of the images in `splits` [(year, list name)]; image ids 1, 2, ... in list order.
    difficult: "drop" leaves difficult objects out, "keep" makes them ordinary boxes, "ignore" marks them crowd."""
    labels = {name: label for label, name in enumerate(classes, start=1)}
    images, annotations = [], []
    for year, name in splits:
        list_path, voc_ids = _read_voc_list(root, year, name)
        for voc_id in voc_ids:
            image_id = len(images) + 1
            folder = os.path.join(root, f"VOC{year}")
            xml_path = os.path.join(folder, "Annotations", f"{voc_id}.xml")
            jpeg = os.path.join(folder, "JPEGImages", f"{voc_id}.jpg")
            if not os.path.isfile(jpeg):
                raise DatasetError(f"{jpeg}: image file not found (image {voc_id} listed in {list_path})")
            width, height, objects = _read_voc_xml(xml_path, labels, list_path)
            images.append({"id": image_id, "file_name": os.path.relpath(jpeg, root), "width": width,
                           "height": height, "annotation_file": xml_path})
            for label, corners, is_difficult in objects:
                if not (is_difficult and difficult == "drop"):
                    annotations.append(_voc_annotation(len(annotations) + 1, image_id, label, corners, is_difficult,
                                                       ignore_difficult=difficult == "ignore"))
    categories = [{"id": label, "name": name} for name, label in labels.items()]
    info = {"format": _VOC_FORMAT, "description": "Pascal VOC " + " + ".join(f"{y}/{n}" for y, n in splits)}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def voc_train_splits(root):
    """The trainval lists of every VOC year present under root (VOC2007 + VOC2012: the SSD paper's 07+12)."""
    return [(year, "trainval") for year in VOC_YEARS if os.path.isdir(os.path.join(root, f"VOC{year}"))]


def get_voc(root, image_set, transforms, use_v2=False, splits=None, classes=VOC_CLASSES, keep_difficult=False):
    """Pascal VOC in the VOCdevkit layout (root/VOC2007, root/VOC2012 with Annotations/, JPEGImages/,
    ImageSets/Main/) as a CocoDetection over the images of `splits` [(year, list name)], by default the trainval
    lists of every year present for "train" and 2007/test for "val". Labels are 1..len(classes) in the order of
    `classes`. Training leaves difficult objects out unless keep_difficult; evaluation keeps them as ignored
    ground truth, as the VOC protocol does."""
    if image_set not in SPLITS:
        raise ValueError(f"image_set must be one of {sorted(SPLITS)}, got {image_set!r}")
    is_train = image_set == "train"
    if splits is None:
        splits = voc_train_splits(root) if is_train else [VOC_DEFAULT_VAL_SPLIT]
    if not os.path.isdir(root) or not splits:
        expected = " and/or ".join(f"VOC{year}{os.sep}" for year in VOC_YEARS)
        raise DatasetError(f"{root}: not a VOC data folder (expected {expected} in it, as in VOCdevkit)")
    difficult = ("keep" if keep_difficult else "drop") if is_train else "ignore"
    data = _voc_coco_dict(root, splits, classes, difficult)
    check_coco_dict(data, root)
    coco = build_coco_api(data)
    dataset = dataset_class(use_v2)(root, root, transforms, is_train, coco=coco)
    if is_train and len(dataset) == 0:
        raise DatasetError(f"{root}: no training image of {data['info']['description']} has a usable object")
    return dataset


def is_voc(coco):
    """Whether this ground truth came from get_voc (and is evaluated with the VOC devkit's AP)."""
    info = coco.dataset.get("info")
    return isinstance(info, dict) and info.get("format") == _VOC_FORMAT

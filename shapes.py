"""The built-in "shapes" dataset: synthetic images of simple shapes in COCO layout, so that training and
evaluation can be seen working on a fresh machine without downloading COCO.

    python shapes.py --output data/shapes [--num-train 1000 --num-val 200 --seed 0] [--format voc]

writes DIR/train2017/*.jpg, DIR/val2017/*.jpg and DIR/annotations/instances_{train,val}2017.json, read through the
same coco_utils.get_coco path as real COCO. With --format voc it writes the same images and boxes in Pascal VOC's
VOCdevkit layout instead: DIR/VOC2007/{JPEGImages,Annotations}/ with the training images listed in
ImageSets/Main/trainval.txt and the validation images in test.txt, shapes smaller than a fifth of the image's
shorter side marked difficult; train.py --dataset voc --voc-classes circle rectangle triangle star cross reads it.

Content is deterministic from the seed: images of 128-320 pixels a side on flat, gradient or noisy backgrounds, each
with 1-4 filled shapes of five classes in varied colours and sizes, overlapping a little at most, with tight boxes.

ensure_shapes_dataset() generates on first use and reuses the folder afterwards. Generation happens in a temporary
folder beside the target that is renamed into place when complete, so concurrent callers (e.g. several torchrun
ranks) are safe and a killed generation never leaves a partial dataset behind under the target name.
"""

import functools
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

import numpy as np
from PIL import Image, ImageDraw

import cli
from coco_utils import SPLITS, DatasetError

CATEGORIES = ["circle", "rectangle", "triangle", "star", "cross"]  # category ids 1..5
MANIFEST = "shapes_manifest.json"
GENERATOR_VERSION = 1
_SPLIT_SEEDS = {"train": 0, "val": 1}
LAYOUTS = ("coco", "voc")
MIN_IMAGE_SIDE = 64  # --image-size: room for shapes a few default boxes wide
# Bounds far beyond use that stop a typo before gigabytes are drawn (see cli.whole_number): eight times COCO's
# training set, and sides larger than most cameras' JPEGs.
MAX_IMAGES = 1_000_000
MAX_IMAGE_SIDE = 8192
VOC_LISTS = {"train": "trainval", "val": "test"}
DIFFICULT_FRACTION = 0.2  # VOC layout: objects whose longer side is under this fraction of the shorter image side


def _background(rng, width, height):
    kind = rng.integers(3)
    base = rng.integers(0, 256, size=3)
    if kind == 0:  # flat
        pixels = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    elif kind == 1:  # linear gradient between two colours in a random direction
        angle = rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:height, 0:width]
        ramp = x * math.cos(angle) + y * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1)
        pixels = base + ramp[..., None] * (rng.integers(0, 256, size=3) - base)
    else:  # noise around a colour
        pixels = base + rng.normal(0, rng.uniform(4, 20), size=(height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _polygon(cx, cy, radii, angles):
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def _draw_shape(draw, rng, category, cx, cy, size):
    """Draw shape `category` (1-based) filled with 255, roughly `size` pixels across, centred on (cx, cy)."""
    r = size / 2
    turn = rng.uniform(0, 2 * math.pi)
    name = CATEGORIES[category - 1]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "rectangle":
        aspect = math.exp(rng.uniform(-0.7, 0.7))
        half_w, half_h = r * math.sqrt(aspect), r / math.sqrt(aspect)
        draw.rectangle([cx - half_w, cy - half_h, cx + half_w, cy + half_h], fill=255)
    elif name == "triangle":
        angles = turn + np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.3, 0.3, size=3)
        draw.polygon(_polygon(cx, cy, [r] * 3, angles), fill=255)
    elif name == "star":
        inner = r * rng.uniform(0.38, 0.5)
        draw.polygon(_polygon(cx, cy, [r, inner] * 5, turn + np.arange(10) * math.pi / 5), fill=255)
    else:  # cross: a plus sign of arm half-width t, turned by a random angle
        t = r * rng.uniform(0.25, 0.4)
        corners = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r), (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t), (-t, r)]
        radii = [math.hypot(x, y) for x, y in corners]
        draw.polygon(_polygon(cx, cy, radii, [turn + math.atan2(y, x) for x, y in corners]), fill=255)


def _overlaps(box, boxes, limit=0.1):
    """Whether `box` covers more than `limit` of itself or of any earlier box (keeps every shape visible)."""
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
            if iw * ih > limit * smaller:
                return True
    return False


def _contrasting_colour(rng, image, box):
    """A random colour far enough from the background under `box` to be clearly visible."""
    mean = np.asarray(image.crop(box), dtype=np.float32).reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - mean).sum() > 150:
            break
    return tuple(int(c) for c in colour)


def render_sample(rng, image_size=None):
    """One image and its objects [(category_id, (x0, y0, x1, y1) exclusive, pixel area)]; image_size (width,
    height) fixes the size (default: each side drawn from 128-320 pixels)."""
    width, height = (int(v) for v in rng.integers(128, 321, size=2))  # drawn either way: the same shapes follow
    if image_size is not None:
        width, height = image_size
    image = _background(rng, width, height)
    objects = []
    for _ in range(rng.integers(1, 5)):
        for _attempt in range(10):
            category = int(rng.integers(1, len(CATEGORIES) + 1))
            # mostly medium and large shapes, some small ones (still a few anchors' worth once resized to 320)
            fraction = rng.uniform(0.12, 0.2) if rng.random() < 0.15 else rng.uniform(0.2, 0.6)
            size = fraction * min(width, height)
            cx, cy = rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2)
            mask = Image.new("L", (width, height), 0)
            _draw_shape(ImageDraw.Draw(mask), rng, category, cx, cy, size)
            box = mask.getbbox()  # tight: the extent of the drawn pixels
            if box is None or _overlaps(box, [b for _, b, _ in objects]):
                continue
            image.paste(_contrasting_colour(rng, image, box), mask=mask)
            objects.append((category, box, int(np.count_nonzero(np.asarray(mask)))))
            break
    return image, objects  # the first placement always succeeds: nothing to overlap yet


def _render_image(split, seed, image_size, index):
    # One generator per image: images do not depend on how many others are generated, nor on the worker count.
    return (index + 1, *render_sample(np.random.default_rng([seed, _SPLIT_SEEDS[split], index]), image_size))


def _render_split(split, num_images, seed, image_size=None, workers=1):
    """(image number 1, 2, ..., image, objects) of each image of the split, in order, rendered by `workers`
    processes."""
    render = functools.partial(_render_image, split, seed, image_size)
    if workers <= 1:
        yield from map(render, range(num_images))
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_leave_signals_to_the_parent) as pool:
        yield from pool.imap(render, range(num_images), chunksize=8)


def _leave_signals_to_the_parent():
    # A forked worker inherits the parent's handlers: train.py's record SIGTERM without exiting, so the SIGTERM with
    # which the pool ends its workers would leave them waiting forever. Ctrl-C is the parent's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_split(root, split, num_images, seed, image_size=None, workers=1):
    folder, ann_path = SPLITS[split]
    os.makedirs(os.path.join(root, folder))
    images, annotations = [], []
    for image_id, image, objects in _render_split(split, num_images, seed, image_size, workers):
        file_name = f"{image_id:06d}.jpg"
        image.save(os.path.join(root, folder, file_name), quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for category, (x0, y0, x1, y1), area in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "area": float(area), "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]
    data = {"info": {"description": f"synthetic shapes, seed {seed}"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}
    os.makedirs(os.path.dirname(os.path.join(root, ann_path)), exist_ok=True)
    with open(os.path.join(root, ann_path), "w") as f:
        json.dump(data, f)


def _add(parent, tag, text=None):
    element = ElementTree.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def _voc_annotation(voc_id, image, objects):
    annotation = ElementTree.Element("annotation")
    _add(annotation, "folder", "VOC2007")
    _add(annotation, "filename", f"{voc_id}.jpg")
    size = _add(annotation, "size")
    for tag, value in (("width", image.width), ("height", image.height), ("depth", 3)):
        _add(size, tag, value)
    for category, (x0, y0, x1, y1), _area in objects:
        element = _add(annotation, "object")
        _add(element, "name", CATEGORIES[category - 1])
        _add(element, "difficult", int(max(x1 - x0, y1 - y0) < DIFFICULT_FRACTION * min(image.size)))
        box = _add(element, "bndbox")
        # The drawn pixels x0 .. x1 - 1 (0-based) are x0 + 1 .. x1 in VOC's 1-based inclusive indices.
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x0 + 1, y0 + 1, x1, y1)):
            _add(box, tag, value)
    ElementTree.indent(annotation)
    return ElementTree.ElementTree(annotation)


def _write_voc_split(root, split, num_images, seed, image_size=None, workers=1):
    """The split in VOC layout; image ids such as train_000001 keep the splits apart in the one JPEGImages folder."""
    folder = os.path.join(root, "VOC2007")
    for subfolder in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(folder, subfolder), exist_ok=True)
    voc_ids = []
    for number, image, objects in _render_split(split, num_images, seed, image_size, workers):
        voc_id = f"{split}_{number:06d}"
        image.save(os.path.join(folder, "JPEGImages", f"{voc_id}.jpg"), quality=92)
        _voc_annotation(voc_id, image, objects).write(os.path.join(folder, "Annotations", f"{voc_id}.xml"))
        voc_ids.append(voc_id)
    with open(os.path.join(folder, "ImageSets", "Main", f"{VOC_LISTS[split]}.txt"), "w") as f:
        f.write("".join(f"{voc_id}\n" for voc_id in voc_ids))


def _read_manifest(root):
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable shapes manifest ({e}); delete {root} to regenerate it") from None


def _temp_prefix(root):
    """What the temporary folders of root's generation are named from: the host and pid of their process follow,
    so that a later generation can tell those a killed process left."""
    return f".{os.path.basename(root)}.tmp-{socket.gethostname()}-"


def _process_is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temp_folders(root):
    """Remove the temporary folders that generations killed on this host left beside root (SIGKILL, power loss):
    those whose process is gone. A live generation's, or another host's on a shared file system, stay."""
    parent, prefix = os.path.dirname(root), _temp_prefix(root)
    for name in os.listdir(parent):
        pid = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
        if pid.isdigit() and not _process_is_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _generate(root, params, workers=1):
    """Build the dataset in a temporary folder beside `root`, then rename it into place atomically."""
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temp_folders(root)
    tmp = tempfile.mkdtemp(prefix=f"{_temp_prefix(root)}{os.getpid()}-", dir=parent)
    write = _write_voc_split if params.get("layout") == "voc" else _write_split
    try:
        write(tmp, "train", params["num_train"], params["seed"], params.get("image_size"), workers)
        write(tmp, "val", params["num_val"], params["seed"], params.get("image_size"), workers)
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: its presence marks a complete dataset
            json.dump(params, f)
        try:
            os.rename(tmp, root)  # fails if another process got there first (root no longer empty)
        except OSError:
            if _read_manifest(root) is None:
                raise DatasetError(f"{root}: cannot create the shapes dataset there (exists and is not empty)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _describe(params):
    made = ", ".join(f"{k}={params.get(k)}" for k in ("num_train", "num_val", "seed", "version"))
    return f"{made}, image_size={params.get('image_size', 'varied')}, layout={params.get('layout', 'coco')}"


def ensure_shapes_dataset(root, num_train=1000, num_val=200, seed=0, layout="coco", image_size=None, workers=1):
    """Make sure `root` holds the shapes dataset with these parameters (generating it if absent, with `workers`
    processes: the same files whatever their number) in the layout "coco" or "voc", with images of 128-320 pixels
    a side or all of image_size (width, height); returns root."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    root = os.path.abspath(root)
    params = {"generator": "shapes", "version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed}
    if layout != "coco":  # COCO-layout manifests predate the layouts and stay as they were
        params["layout"] = layout
    if image_size is not None:  # likewise: manifests of varied sizes stay as they were
        params["image_size"] = [int(v) for v in image_size]
    manifest = _read_manifest(root)
    if manifest is None:
        if os.path.isdir(root) and os.listdir(root):
            raise DatasetError(f"{root}: exists but is not a shapes dataset (no {MANIFEST}); choose another folder")
        _generate(root, params, workers)
        manifest = _read_manifest(root)
    if manifest != params:
        raise DatasetError(f"{root}: holds a shapes dataset made with {_describe(manifest)}, not {_describe(params)}; "
                           "use another folder or delete it")
    return root


def get_args_parser():
    parser = cli.OneLineParser(description="Write the synthetic shapes detection dataset in COCO or VOC layout.")
    parser.add_argument("--output", required=True, help="folder to create (reused if it already holds the same dataset)")
    image_count = cli.whole_number(1, MAX_IMAGES)
    parser.add_argument("--num-train", type=image_count, default=1000, help="number of training images")
    parser.add_argument("--num-val", type=image_count, default=200, help="number of validation images")
    parser.add_argument("--seed", type=cli.seed, default=0, help="random seed; the content is a function of it")
    parser.add_argument("--format", default="coco", choices=LAYOUTS,
                        help="coco: train2017/, val2017/, annotations/; voc: VOC2007/ with trainval and test lists")
    parser.add_argument("--image-size", type=cli.whole_number(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE), nargs=2,
                        metavar=("WIDTH", "HEIGHT"), default=None,
                        help="every image this size, e.g. 640 480 for COCO-sized JPEGs to measure data loading "
                             "(default: each side 128-320 pixels)")
    parser.add_argument("--workers", type=cli.whole_number(1, cli.MAX_PROCESSES),
                        default=min(os.cpu_count(), cli.MAX_PROCESSES),
                        help="processes drawing the images (default: one per CPU); the files do not depend on it")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        root = ensure_shapes_dataset(args.output, args.num_train, args.num_val, args.seed, layout=args.format,
                                     image_size=args.image_size, workers=args.workers)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"shapes dataset ready in {root}: {args.num_train} train / {args.num_val} val images, classes {', '.join(CATEGORIES)}")
    if args.format == "voc":
        print(f"train on it with: train.py --dataset voc --data-path {root} --voc-classes {' '.join(CATEGORIES)}")


if __name__ == "__main__":
    cli.survive_closed_output()
    try:
        main()
    except KeyboardInterrupt:
        print("shapes.py: interrupted; no partial dataset was left under the --output name", file=sys.stderr)
        sys.exit(130)

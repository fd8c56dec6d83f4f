"""The built-in "shapes" dataset: synthetic images of simple shapes in COCO layout, so that training and
evaluation can be seen working on a fresh machine without downloading COCO.

    python shapes.py --output data/shapes [--num-train 1000 --num-val 200 --seed 0]

writes DIR/train2017/*.jpg, DIR/val2017/*.jpg and DIR/annotations/instances_{train,val}2017.json, read through the
same coco_utils.get_coco path as real COCO. Content is deterministic from the seed: images of 128-320 pixels a
side on flat, gradient or noisy backgrounds, each with 1-4 filled shapes of five classes in varied colours and
sizes, overlapping a little at most, with tight boxes.

ensure_shapes_dataset() generates on first use and reuses the folder afterwards. Generation happens in a temporary
folder beside the target that is renamed into place when complete, so concurrent callers (e.g. several torchrun
ranks) are safe and a killed generation never leaves a partial dataset behind under the target name.
"""

import argparse
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from coco_utils import SPLITS, DatasetError

CATEGORIES = ["circle", "rectangle", "triangle", "star", "cross"]  # category ids 1..5
MANIFEST = "shapes_manifest.json"
GENERATOR_VERSION = 1
_SPLIT_SEEDS = {"train": 0, "val": 1}


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


def render_sample(rng):
    """One image and its objects [(category_id, (x0, y0, x1, y1) exclusive, pixel area)]."""
    width, height = (int(v) for v in rng.integers(128, 321, size=2))
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


def _write_split(root, split, num_images, seed):
    folder, ann_path = SPLITS[split]
    os.makedirs(os.path.join(root, folder))
    images, annotations = [], []
    for index in range(num_images):
        # One generator per image: images do not depend on how many others are generated.
        image, objects = render_sample(np.random.default_rng([seed, _SPLIT_SEEDS[split], index]))
        image_id = index + 1
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


def _read_manifest(root):
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable shapes manifest ({e}); delete {root} to regenerate it") from None


def _generate(root, params):
    """Build the dataset in a temporary folder beside `root`, then rename it into place atomically."""
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        _write_split(tmp, "train", params["num_train"], params["seed"])
        _write_split(tmp, "val", params["num_val"], params["seed"])
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: its presence marks a complete dataset
            json.dump(params, f)
        try:
            os.rename(tmp, root)  # fails if another process got there first (root no longer empty)
        except OSError:
            if _read_manifest(root) is None:
                raise DatasetError(f"{root}: cannot create the shapes dataset there (exists and is not empty)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_shapes_dataset(root, num_train=1000, num_val=200, seed=0):
    """Make sure `root` holds the shapes dataset with these parameters (generating it if absent); returns root."""
    root = os.path.abspath(root)
    params = {"generator": "shapes", "version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed}
    manifest = _read_manifest(root)
    if manifest is None:
        if os.path.isdir(root) and os.listdir(root):
            raise DatasetError(f"{root}: exists but is not a shapes dataset (no {MANIFEST}); choose another folder")
        _generate(root, params)
        manifest = _read_manifest(root)
    if manifest != params:
        made = ", ".join(f"{k}={manifest.get(k)}" for k in ("num_train", "num_val", "seed", "version"))
        wanted = ", ".join(f"{k}={params[k]}" for k in ("num_train", "num_val", "seed", "version"))
        raise DatasetError(f"{root}: holds a shapes dataset made with {made}, not {wanted}; use another folder or delete it")
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic shapes detection dataset in COCO layout.")
    parser.add_argument("--output", required=True, help="folder to create (reused if it already holds the same dataset)")
    parser.add_argument("--num-train", type=int, default=1000, help="number of training images")
    parser.add_argument("--num-val", type=int, default=200, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the content is a function of it")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1:
        parser.error("--num-train and --num-val must be at least 1")
    try:
        root = ensure_shapes_dataset(args.output, args.num_train, args.num_val, args.seed)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"shapes dataset ready in {root}: {args.num_train} train / {args.num_val} val images, classes {', '.join(CATEGORIES)}")


if __name__ == "__main__":
    main()

"""Run a detector on images and save what it sees: one picture with boxes, class names and scores per image, and
all detections of the run in one detections.json.

    python predict.py --weights output/model_9.pth --output-dir predictions photos/ street.jpg
    python predict.py --model ssdlite320_mobilenet_v3_large --weights SSDLite320_MobileNet_V3_Large_Weights.COCO_V1 \
        --score-thresh 0.4 --output-dir predictions photos/

Inputs are image files or folders (searched recursively). A picture keeps the input's path relative to its folder
argument; names that would collide get a numeric suffix. The output folder may lie inside an input folder (it is
not searched, nor is any folder an earlier predict.py run wrote) but must not be, or hold, an input, nor hold files of the same names that an earlier predict.py run
there did not write (its detections.json lists what it wrote): such a folder is refused rather than write over the
user's files. Images are
decoded exactly as training decodes them (coco_utils.load_rgb_image: EXIF orientation ignored, transparency on
white, 16-bit rescaled). Class names come from the training checkpoint (train.py
stores the dataset's categories in it) or, for torchvision's COCO weights, from the weights' metadata.
"""
import argparse
import colorsys
import json
import os
import sys
import time

import matplotlib
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes

import cli
import coco_utils
import models
import safe_io

SUMMARY_NAME = "detections.json"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# matplotlib (a core requirement) ships DejaVu Sans: a scalable font that is always there, no download needed.
FONT_PATH = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")


# ------------------------------------------------------------------------------------------------ the inputs


def find_images(inputs, output_dir):
    """[(image path, path of its picture relative to output_dir)] in a stable order.

    Folders are searched recursively (sorted) for known image extensions, skipping output_dir itself so that
    predicting into a subfolder of an input does not read earlier pictures back. A file named explicitly is taken
    whatever its extension.
    """
    output_dir = os.path.abspath(output_dir)
    found, seen = [], set()
    for item in inputs:
        if os.path.isfile(item):
            candidates = [(item, os.path.basename(item))]
        elif os.path.isdir(item):
            if os.path.abspath(item) != output_dir and earlier_outputs(item):
                raise cli.UserInputError(f"input {item}: an earlier predict.py run's output (its {SUMMARY_NAME} "
                                         "lists pictures with boxes drawn on them), not images to predict on")
            candidates = [(path, os.path.relpath(path, item)) for path in walk_images(item, skip=output_dir)]
        else:
            raise cli.UserInputError(f"input {item}: no such file or folder")
        for path, relative in candidates:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                found.append((path, relative))
    return list(zip([path for path, _ in found], unique_picture_names([relative for _, relative in found])))


def walk_images(folder, skip):
    """The image files under folder, sorted, outside the folder skip (this run's output) and outside any folder an
    earlier predict.py run wrote (its detections.json lists its pictures): its pictures with boxes drawn on them
    are no inputs. A skipped earlier output is named on stderr."""
    for root, dirs, files in os.walk(folder):
        earlier = sorted(d for d in dirs if earlier_outputs(os.path.join(root, d)))
        for name in earlier:
            print(f"skipping folder {os.path.join(root, name)}: an earlier predict.py run's output", file=sys.stderr)
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) != skip and d not in earlier)
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def unique_picture_names(relative_paths):
    """Picture names that mirror the inputs' relative paths: JPEG inputs stay JPEG, everything else becomes PNG
    (lossless, and any mode can be written). a.jpg from two folders gives a.jpg and a_2.jpg."""
    names, taken = [], set()
    for relative in relative_paths:
        stem, extension = os.path.splitext(relative)
        extension = ".jpg" if extension.lower() in (".jpg", ".jpeg") else ".png"
        name, number = stem + extension, 1
        while name.casefold() in taken:  # casefold: a.JPG and a.jpg are one file on some file systems
            number += 1
            name = f"{stem}_{number}{extension}"
        taken.add(name.casefold())
        names.append(name)
    return names


def check_output_dir_holds_no_input(output_dir, inputs):
    """Refuse an output folder that is an input folder or contains an input: the files written there could replace
    them."""
    output = os.path.realpath(output_dir)
    for item in inputs:
        if os.path.commonpath([output, os.path.realpath(item)]) == output:
            what = "is the input" if os.path.realpath(item) == output else "holds the input"
            raise cli.UserInputError(f"--output-dir {output_dir} {what} {item}: what is written there could "
                                     "replace your inputs; choose a folder outside them")


def check_no_foreign_file_replaced(output_dir, names, earlier, script="predict.py"):
    """Refuse to replace files in output_dir that no earlier run of script there wrote: a rerun may replace the
    files its predecessor listed (earlier, see listed_outputs), nothing else. names: the files this run will
    write, relative to output_dir."""
    existing = [name for name in names if os.path.lexists(os.path.join(output_dir, name))]
    foreign = [name for name in existing if name not in earlier]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise cli.UserInputError(f"--output-dir {output_dir} already holds {foreign[0]}{more}, which no earlier "
                                 f"{script} run there wrote: choose another --output-dir")


def listed_outputs(output_dir, summary_name, files_of):
    """The files an earlier run wrote into output_dir: its summary file summary_name and the files that
    files_of(summary) lists; none when the summary is missing or not that script's."""
    try:
        with open(os.path.join(output_dir, summary_name), encoding="utf-8") as f:
            return {summary_name, *files_of(json.load(f))}
    except (OSError, ValueError, RecursionError, KeyError, TypeError):  # none, or not that script's
        return set()


def earlier_outputs(output_dir):
    """The files an earlier predict.py run wrote into output_dir, as its detections.json lists them."""
    return listed_outputs(output_dir, SUMMARY_NAME, lambda summary: [record["picture"] for record in summary["images"]])


def read_image(path):
    """The image as a uint8 RGB tensor [3, H, W], decoded as the training loader decodes it."""
    return pil_to_tensor(coco_utils.load_rgb_image(path))


# ----------------------------------------------------------------------------------------------- the outputs


def class_color(label):
    """A bright color per class; golden-ratio hue steps keep neighbouring labels far apart."""
    red, green, blue = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.75, 1.0)
    return round(red * 255), round(green * 255), round(blue * 255)


def draw_boxes(image, boxes, captions, colors):
    """image uint8 [3, H, W] with each XYXY box drawn in its colour under its caption; later boxes are drawn on
    top. Line width and font grow with the image, so that pictures of any size stay readable."""
    if not boxes:
        return image
    longest_side = max(image.shape[1:])
    font = FONT_PATH if os.path.isfile(FONT_PATH) else None
    return draw_bounding_boxes(
        image,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=captions,
        colors=colors,
        width=max(2, round(longest_side / 300)),
        font=font,
        font_size=max(10, round(longest_side / 40)) if font else None,
        fill_labels=True,
    )


def draw_detections(image, detections):
    """image uint8 [3, H, W] with each detection's box and 'name score' label drawn on it."""
    lowest_first = detections[::-1]  # drawn last, the best boxes and labels stay readable on top
    return draw_boxes(image, [d["box"] for d in lowest_first], [detection_caption(d) for d in lowest_first],
                      [class_color(d["label"]) for d in lowest_first])


def detection_caption(detection):
    return f"{detection['name']} {detection['score']:.2f}"


def save_picture(image, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, quality=90)


def detection_records(output, class_names, category_ids):
    """Each detection's box (XYXY pixels), score, the model's label, its class name and, where the weights record
    one, the annotation file's category id (a label equals it only where training chose so: docs/own-data.md)."""
    return [
        {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": label,
         "name": class_names.get(label, str(label)),
         **({"category_id": category_ids[label]} if label in category_ids else {})}
        for box, score, label in zip(output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist())
    ]


# -------------------------------------------------------------------------------------------------- the run


@torch.inference_mode()
def detect(model, images, device):
    """Per-image detections (on the CPU) for a list of uint8 images of any sizes."""
    outputs = model([image.to(device) for image in images])  # uint8: the model scales it
    return [{key: value.cpu() for key, value in output.items()} for output in outputs]


def read_batches(images, batch_size):
    """(up to batch_size (path, picture name, image), number of inputs consumed so far); an unreadable image is
    reported and skipped."""
    batch = []
    for consumed, (path, picture_name) in enumerate(images, start=1):
        try:
            batch.append((path, picture_name, read_image(path)))
        except coco_utils.DatasetError as error:
            print(f"skipping {error}", file=sys.stderr)
            continue
        if len(batch) == batch_size:
            yield batch, consumed
            batch = []
    if batch:
        yield batch, len(images)


def predict(model, class_names, images, output_dir, records, device="cpu", batch_size=8, print_freq=20,
            category_ids=None):
    """Detect on [(path, picture name)] and write the pictures under output_dir, appending each image's
    detections.json record to records first: an interrupted run can still list every picture it began to write.
    category_ids: {label: the annotation file's category id} where the weights record them."""
    start, next_report = time.time(), print_freq
    for batch, consumed in read_batches(images, batch_size):
        outputs = detect(model, [image for _, _, image in batch], device)
        for (path, picture_name, image), output in zip(batch, outputs):
            detections = detection_records(output, class_names, category_ids or {})
            records.append({"file": path, "picture": picture_name, "width": image.shape[2], "height": image.shape[1],
                            "detections": detections})
            save_picture(draw_detections(image, detections), os.path.join(output_dir, picture_name))
        if consumed >= next_report:
            print(f"{consumed}/{len(images)} images, {len(records) / (time.time() - start):.1f} images/s", flush=True)
            next_report = (consumed // print_freq + 1) * print_freq


MAX_PRINT_FREQ = 10**9  # far beyond use: stops a typo before the work (see cli.whole_number)


def get_args_parser():
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", default=None, help="model name; optional when the checkpoint names it")
    parser.add_argument("--weights", required=True,
                        help="checkpoint file (train.py's model_N.pth, a state_dict) or a torchvision weights name")
    parser.add_argument("--output-dir", required=True, help="folder for the pictures and detections.json")
    parser.add_argument("--score-thresh", type=cli.score_threshold, default=0.5,
                        help="keep detections scoring above this (from 0 to below 1)")
    parser.add_argument("--device", type=cli.device_name, default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("-b", "--batch-size", type=cli.whole_number(1, cli.MAX_BATCH_SIZE), default=8,
                        help="images per forward pass")
    parser.add_argument("--print-freq", type=cli.whole_number(1, MAX_PRINT_FREQ), default=20,
                        help="print progress every N images")
    parser.add_argument("--compile", action="store_true",
                        help="compile the network (backbone and heads) with torch.compile: on a CPU SSDlite runs "
                             "faster per image (SSD300 about the same), but compiling takes minutes (again for a "
                             "smaller last batch), so it pays for many images only (figures in docs/performance.md)")
    return parser


def main(args):
    images = find_images(args.inputs, args.output_dir)
    if not images:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise cli.UserInputError(f"no image found in {' '.join(args.inputs)} (extensions: {extensions})")
    check_output_dir_holds_no_input(args.output_dir, args.inputs)
    picture_names = [picture_name for _, picture_name in images]
    check_no_foreign_file_replaced(args.output_dir, [*picture_names, SUMMARY_NAME], earlier_outputs(args.output_dir))
    safe_io.prepare_output_dir(args.output_dir)
    model, model_name, categories = models.load_detector(args.weights, args.model)
    class_names, category_ids = models.class_names(categories), models.category_ids(categories)
    model.to(args.device)
    if models.prefers_channels_last(model_name, args.device, training=False):
        model.to(memory_format=torch.channels_last)
    if args.compile:
        models.compile_network(model)
    model.score_thresh = args.score_thresh

    records = []
    try:
        predict(model, class_names, images, args.output_dir, records, args.device, args.batch_size, args.print_freq,
                category_ids)
    finally:  # also when interrupted, so that a rerun into this folder may replace these pictures
        if records:
            summary = {"model": model_name, "weights": args.weights, "score_thresh": args.score_thresh,
                       "images": records}
            safe_io.write_text_atomic(os.path.join(args.output_dir, SUMMARY_NAME), json.dumps(summary, indent=1))
    if not records:
        raise cli.UserInputError(f"none of the {len(images)} input images could be read")
    total = sum(len(record["detections"]) for record in records)
    print(f"{total} detections in {len(records)} images; pictures and detections.json in {args.output_dir}")


if __name__ == "__main__":
    cli.survive_closed_output()
    try:
        main(get_args_parser().parse_args())
    except (cli.UserInputError, models.WeightsError, models.CompileError) as error:
        sys.exit(f"predict.py: {error}")
    except KeyboardInterrupt:
        print("predict.py: interrupted; detections.json lists the pictures written so far", file=sys.stderr)
        sys.exit(130)

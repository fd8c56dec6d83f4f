"""Look at a detection dataset the way training reads it: images drawn with their ground-truth boxes and class
names (as predict.py draws detections), a per-class table of the boxes, and what the loader will drop or flag.

    python browse.py --annotations export/train/_annotations.coco.json --images export/train --output-dir browse
    python browse.py --dataset shapes --output-dir browse --limit 20 --classes star cross
    python browse.py --dataset coco --data-path data/coco --split val --output-dir browse_val
    python browse.py --dataset shapes --augment ssd --output-dir browse_ssd    # what the ssd policy shows the model

The table counts, per class, the images holding it and its boxes, with the smallest, median and largest box side:
the square root of width x height in pixels, the size COCO calls small below 32 and large above 96. It covers every
image of the annotation file and the boxes the loader keeps: crowd boxes left out, boxes clamped to the image, boxes
left without area dropped. Below it, what the loader drops (crowd boxes, boxes without area) and flags (images
without boxes, which training leaves out by default; categories without a box, classes the model never sees).

Pictures: with --annotations, every image of the file; with --dataset, the images of --split as train.py loads
them (its training split leaves out images without boxes). In image id order, at most --limit. A picture keeps the
image's relative path (PNG unless it is a JPEG); OUTPUT_DIR/browse.json lists them with the table. The output folder
must not be, or hold, an input; a rerun may replace the files an earlier browse.py run there listed, nothing else.

Copied into another project, it needs train.py's data path (train.py with what it imports: the repository's flat
modules and models/), since it reads a --dataset exactly as training does, and predict.py for the drawing.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

import cli
import coco_eval
import coco_utils
import detection_datasets
import predict
import presets
import safe_io
import train

SUMMARY_NAME = "browse.json"
SPLITS = ("train", "val")
MAX_IMAGES = 10**9  # --limit: far above any dataset, so that a typo stops at once


# ------------------------------------------------------------------------------------------------ the data


def load_dataset(args):
    """The split as a CocoDetection without transforms: an annotation file with every image it lists, or --dataset
    through train.py's own dataset building (the same categories, paths and filtering as training)."""
    if args.annotations:
        return coco_utils.get_coco(None, "train", None, img_folder=args.images, ann_file=args.annotations,
                                   keep_empty_images=True)
    flags = ["--dataset", args.dataset]
    if args.data_path:
        flags += ["--data-path", args.data_path]
    if args.voc_classes:
        flags += ["--voc-classes", *args.voc_classes]
    if args.split == "val":
        flags.append("--test-only")  # builds the validation split alone
    train_args = train.get_args_parser().parse_args(flags)
    train.fill_in_implied_flags(train_args)
    if args.dataset == "shapes" and not os.path.exists(train_args.data_path):
        detection_datasets.prepare_data_root(train_args)  # generated on first use, as train.py does
    training, validation = detection_datasets.get_datasets(train_args)
    dataset = training if args.split == "train" else validation
    dataset.transforms = None
    return dataset


def box_statistics(dataset):
    """(image ids, image id of each box, label of each box, side of each box, boxes per image) over every image of
    the split's annotations, as the loader keeps the boxes (coco_utils.usable_boxes)."""
    image_ids = sorted(dataset.coco.imgs)
    boxes, labels, _, _, count = coco_utils.usable_boxes(
        dataset.coco, image_ids, coco_utils.category_labels(dataset.categories), dataset.ann_file)
    boxes = boxes.astype(np.float64)
    sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return image_ids, np.repeat(image_ids, count).astype(np.int64), labels, sides, count


def class_table(categories, owners, labels, sides):
    """{class name: {"id", "images", "instances", "smallest", "median", "largest"}} in label order; the sizes are
    box sides in pixels (None for a class without boxes)."""
    ids = {label: entry["id"] for label, entry in categories.items()}
    names = coco_eval.category_names({entry["id"]: entry for entry in categories.values()}, ids.values())
    table = {}
    for label in sorted(categories):
        mine = labels == label
        side = sides[mine]
        table[names[ids[label]]] = {
            "id": ids[label], "images": int(np.unique(owners[mine]).size), "instances": int(mine.sum()),
            **{key: float(reduce(side)) if side.size else None
               for key, reduce in (("smallest", np.min), ("median", np.median), ("largest", np.max))},
        }
    return table


def loader_report(coco, image_ids, count, table):
    """What the loader drops or flags: {"crowd_boxes", "boxes_without_area", "images_without_boxes" (ids),
    "empty_categories" (names)}."""
    crowd = sum(1 for ann in coco.dataset["annotations"] if ann["iscrowd"])
    non_crowd = len(coco.dataset["annotations"]) - crowd
    return {
        "crowd_boxes": crowd,
        "boxes_without_area": non_crowd - int(count.sum()),
        "images_without_boxes": [image_id for image_id, n in zip(image_ids, count.tolist()) if n == 0],
        "empty_categories": [name for name, row in table.items() if row["instances"] == 0],
    }


def format_table(table):
    def size(value):
        return f"{value:8.1f}" if value is not None else "       -"

    width = max([5, *map(len, table)])
    lines = [f"{'class':<{width}} {'id':>5} {'images':>7} {'boxes':>7} {'smallest':>8} {'median':>8} {'largest':>8}"]
    for name, row in table.items():
        lines.append(f"{name:<{width}} {row['id']:>5} {row['images']:>7} {row['instances']:>7} "
                     f"{size(row['smallest'])} {size(row['median'])} {size(row['largest'])}")
    return "\n".join(lines)


def format_report(report, images):
    lines = []
    if report["crowd_boxes"]:
        lines.append(f"drops {report['crowd_boxes']} crowd boxes (training ignores them, COCO evaluation ignores "
                     "the detections on them)")
    if report["boxes_without_area"]:
        lines.append(f"drops {report['boxes_without_area']} boxes without area (no width or height once clamped "
                     "to the image)")
    empty = report["images_without_boxes"]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        lines.append(f"flags {len(empty)} of {images} images without boxes: training leaves them out "
                     f"(train.py --keep-empty-images keeps them as negatives), evaluation keeps them; ids {shown}")
    if report["empty_categories"]:
        lines.append(f"flags {len(report['empty_categories'])} categories without a box, classes the model will "
                     f"never see: {', '.join(report['empty_categories'])}")
    return "\n".join(["The loader " + line for line in lines] or ["The loader drops and flags nothing."])


# ------------------------------------------------------------------------------------------------ the pictures


def images_to_draw(dataset, owners, labels, wanted, limit):
    """Indices into dataset of the images to draw: those holding a wanted label (all when wanted is None), at most
    limit (0: no limit)."""
    holding = None if wanted is None else set(owners[np.isin(labels, sorted(wanted))].tolist())
    indices = [i for i, image_id in enumerate(dataset.ids) if holding is None or image_id in holding]
    return indices[:limit] if limit else indices


def draw_ground_truth(image, target, class_names, wanted):
    """image uint8 [3, H, W] with the target's boxes (of the wanted labels, all when wanted is None) and names."""
    keep = [i for i, label in enumerate(target["labels"].tolist()) if wanted is None or label in wanted]
    labels = [int(target["labels"][i]) for i in keep]
    return predict.draw_boxes(image, [target["boxes"][i].tolist() for i in keep],
                              [class_names[label] for label in labels], [predict.class_color(label) for label in labels])


def draw_pictures(dataset, indices, picture_names, output_dir, wanted, records):
    """Draw dataset[i] for i in indices into output_dir, appending each picture's record to records first: an
    interrupted run still lists every picture it began to write."""
    class_names = {label: entry["name"] for label, entry in dataset.categories.items()}
    for index, picture_name in zip(indices, picture_names):
        image, target = dataset[index]
        records.append({"image_id": dataset.ids[index], "picture": picture_name})
        predict.save_picture(draw_ground_truth(image, target, class_names, wanted),
                             os.path.join(output_dir, picture_name))


def wanted_labels(names, categories):
    """The labels of the --classes names, or None for all; an unknown name is a one-line error."""
    if not names:
        return None
    label_of_name = {entry["name"]: label for label, entry in categories.items()}
    unknown = [name for name in names if name not in label_of_name]
    if unknown:
        raise cli.UserInputError(f"--classes {unknown[0]}: not a class of this dataset "
                                   f"({coco_utils.shorten(', '.join(label_of_name), 120)})")
    return {label_of_name[name] for name in names}


# -------------------------------------------------------------------------------------------------- the run


def get_args_parser():
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("the data: an annotation file and its images, or a dataset as train.py reads it")
    data.add_argument("--annotations", metavar="FILE", help="COCO annotation file")
    data.add_argument("--images", metavar="DIR", help="the folder the annotation file's file_names are relative to")
    data.add_argument("--dataset", choices=sorted(train.DEFAULT_DATA_PATHS),
                      help="read as train.py --dataset reads it (shapes: generated when absent)")
    data.add_argument("--data-path", default=None,
                      help="with --dataset: its root (default: data/coco, data/shapes or data/VOCdevkit)")
    data.add_argument("--split", default="train", choices=SPLITS, help="with --dataset: which split (default: train)")
    data.add_argument("--voc-classes", nargs="+", metavar="NAME", default=None,
                      help="with --dataset voc: the class names (default: the 20 Pascal VOC classes)")
    parser.add_argument("--output-dir", required=True, help="folder for the pictures and browse.json")
    parser.add_argument("--limit", type=cli.whole_number(0, MAX_IMAGES), default=50,
                        help="draw at most N images (0: all; default: 50)")
    parser.add_argument("--classes", nargs="+", metavar="NAME", default=None,
                        help="draw only the images holding these classes, and only their boxes")
    parser.add_argument("--augment", choices=presets.POLICIES, default=None,
                        help="draw each image after this training augmentation policy (train.py's "
                             "--data-augmentation), as training sees it")
    parser.add_argument("--seed", type=cli.seed, default=0, help="seed of the augmentation's random draws")
    return parser


def validate_args(args):
    if (args.annotations is None) == (args.dataset is None):
        raise cli.UserInputError("give either --annotations FILE --images DIR or --dataset NAME")
    if args.annotations is not None and args.images is None:
        raise cli.UserInputError("--annotations needs --images DIR, the folder its file_names are relative to")
    if args.dataset is None and (args.data_path or args.voc_classes):
        raise cli.UserInputError("--data-path and --voc-classes go with --dataset")
    if args.dataset is not None and args.images is not None:
        raise cli.UserInputError("--images goes with --annotations; --dataset finds its own images")
    if args.voc_classes and args.dataset != "voc":
        raise cli.UserInputError(f"--voc-classes is for --dataset voc, not --dataset {args.dataset}")


def input_paths(args):
    if args.annotations:
        return [args.annotations, args.images]
    return [args.data_path or train.DEFAULT_DATA_PATHS[args.dataset]]


def main(args):
    validate_args(args)
    predict.check_output_dir_holds_no_input(args.output_dir, input_paths(args))
    dataset = load_dataset(args)
    image_ids, owners, labels, sides, count = box_statistics(dataset)
    table = class_table(dataset.categories, owners, labels, sides)
    report = loader_report(dataset.coco, image_ids, count, table)
    print(f"{dataset.ann_file}: {len(image_ids)} images, {len(labels)} boxes in {len(table)} classes "
          "(box side: sqrt(width x height) in pixels)")
    print(format_table(table))
    print(format_report(report, len(image_ids)))

    wanted = wanted_labels(args.classes, dataset.categories)
    indices = images_to_draw(dataset, owners, labels, wanted, args.limit)
    picture_names = predict.unique_picture_names([dataset.coco.imgs[dataset.ids[i]]["file_name"] for i in indices])
    earlier = predict.listed_outputs(args.output_dir, SUMMARY_NAME,
                                     lambda summary: [record["picture"] for record in summary["pictures"]])
    predict.check_no_foreign_file_replaced(args.output_dir, [*picture_names, SUMMARY_NAME], earlier, "browse.py")
    safe_io.prepare_output_dir(args.output_dir)

    policy = args.augment
    dataset.transforms = presets.DetectionPresetTrain(data_augmentation=policy) if policy else presets.DetectionPresetEval()
    torch.manual_seed(args.seed)
    records = []
    try:
        draw_pictures(dataset, indices, picture_names, args.output_dir, wanted, records)
    finally:  # also when stopped, so that a rerun into this folder may replace these pictures
        summary = {"annotations": dataset.ann_file, "augment": policy, "classes": table, "loader": report,
                   "pictures": records}
        safe_io.write_text_atomic(os.path.join(args.output_dir, SUMMARY_NAME), json.dumps(summary, indent=1) + "\n")
    augmented = f" after the {policy} augmentation" if policy else ""
    print(f"{len(records)} pictures{augmented} and {SUMMARY_NAME} in {args.output_dir}")


if __name__ == "__main__":
    cli.survive_closed_output()
    try:
        main(get_args_parser().parse_args())
    except (cli.UserInputError, coco_utils.DatasetError, train.ConfigError) as error:
        sys.exit(f"browse.py: {error}")
    except KeyboardInterrupt:
        print(f"browse.py: interrupted; {SUMMARY_NAME} lists the pictures written so far", file=sys.stderr)
        sys.exit(130)

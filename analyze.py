"""Where a detector goes wrong: its detections against the ground truth, class by class, at one score threshold.

    python train.py --dataset coco ... --test-only --output-dir eval       # writes eval/detections.json
    python analyze.py --annotations data/coco/annotations/instances_val2017.json --detections eval/detections.json \\
        --images data/coco/val2017 --output-dir analysis

The detections are a COCO results file (a list of {"image_id", "category_id", "bbox": [x, y, width, height],
"score"} in the annotation file's ids), as train.py --test-only writes detections.json. Every image of the
annotation file is counted; one without detections has all its boxes missed. Written into --output-dir:

- confusion_matrix.json: {"classes": [names in category id order], "matrix": rows}; rows are the ground-truth
  classes then "background", columns the predicted classes then "background";
- confusion_matrix.png: the counts, and the matrix normalised per row (the share of each true class's boxes);
- per_class.json (also printed): per class TP, FP and FN, precision and recall at the thresholds, and AP
  (IoU 0.50:0.95) and AP50 from pycocotools' COCOeval over all detections, whatever their score;
- analysis.json: the inputs, the thresholds, the --worst images with their errors, and the files this run writes;
- worst/: with --images, the --worst images with the most errors: the ground truth (blue) on the left, the
  detections above the threshold (orange) on the right.

The confusion matrix, image by image. Detections scoring below --score-thresh are ignored. The others, highest
score first (equal scores in the results file's order), each take the ground-truth box they overlap most among
those not taken yet (equal IoUs: the box listed first in the annotation file), if that IoU is at least
--iou-thresh. Matching ignores the classes, as supervision's and Ultralytics' matrices do, so that a box found
with the wrong class counts as one confusion rather than as one miss and one invention:
- a matched pair counts once at (true class, predicted class);
- a ground-truth box left unmatched counts at (class, background): missed;
- a detection left unmatched counts at (background, class): invented (a second detection of a box is one too),
  unless it lies on a crowd region, where COCO evaluation ignores it too;
- crowd boxes are never matched nor missed. IoU is pycocotools' (crowd regions: the intersection over the
  detection's area).
TP, FP and FN of a class are read off the matrix: TP its diagonal cell, FN the rest of its row, FP the rest of its
column. Where boxes of different classes overlap, COCOeval's class-by-class matching may pair them otherwise.

The output folder must not be, or hold, an input; a rerun may replace the files an earlier analyze.py run there
listed in its analysis.json, nothing else.

Copied into another project, it needs cli.py, coco_eval.py, coco_utils.py, predict.py (the drawing and the output
folder's checks), run_folder.py and safe_io.py, and what those import: models/, plot_curves.py and utils.py.
"""
import argparse
import collections
import contextlib
import io
import json
import os
import sys

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from pycocotools import mask as coco_mask

import cli
import coco_eval
import coco_utils
import predict
import run_folder
import safe_io

SUMMARY_NAME = "analysis.json"
MATRIX_NAME = "confusion_matrix.json"
MATRIX_PICTURE = "confusion_matrix.png"
PER_CLASS_NAME = "per_class.json"
WORST_FOLDER = "worst"
BACKGROUND = "background"
MAX_WORST = 10**6  # --worst: far above what anyone looks at, so that a typo stops at once
GROUND_TRUTH_COLOR = (30, 144, 255)  # blue and orange: told apart with any colour vision
DETECTION_COLOR = (255, 140, 0)
# Blues without its near-white end: a cell holding one box among hundreds stays visibly tinted, empty cells are white.
CELL_COLORS = ListedColormap(colormaps["Blues"](np.linspace(0.15, 1.0, 256)))
ANNOTATED_CELLS_UP_TO = 30  # classes up to which the picture writes each cell's value (beyond, the font is too small)


# ------------------------------------------------------------------------------------------------ the inputs


def read_detections(path, coco_gt):
    """The results file's detections, each checked against the ground truth; bad input is a one-line DatasetError."""
    results = coco_utils.read_json(path, what="results file")
    if isinstance(results, dict) and "images" in results:
        raise coco_utils.DatasetError(f"{path}: this is predict.py's detections.json; analyze.py reads a COCO results "
                                      "file, such as the detections.json that train.py --test-only writes")
    if not isinstance(results, list):
        raise coco_utils.DatasetError(f"{path}: not a COCO results file (expected a list of detections)")
    for index, result in enumerate(results):
        problem = result_problem(result, coco_gt)
        if problem:
            raise coco_utils.DatasetError(f"{path}: detection {index}: {problem}")
    return results


def result_problem(result, coco_gt):
    """Why one detection of a results file cannot be analysed against coco_gt, or None."""
    if not isinstance(result, dict):
        return f"not an object: {coco_utils.shorten(repr(result), 80)}"
    image_id, category_id, score = result.get("image_id"), result.get("category_id"), result.get("score")
    if not is_integer(image_id) or image_id not in coco_gt.imgs:
        return f"image id {image_id!r} is not in the annotation file (were the detections made on other images?)"
    if not is_integer(category_id) or category_id not in coco_gt.cats:
        return f"category id {category_id!r} is not one of the annotation file's categories"
    problem = coco_utils.bbox_problem(result.get("bbox"))
    if problem:
        return f"bbox {problem}, got {coco_utils.shorten(repr(result.get('bbox')), 80)}"
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not np.isfinite(score):
        return f"score must be a finite number, got {coco_utils.shorten(repr(score), 40)}"
    return None


def is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ the confusion matrix


def box_iou(detections, boxes, crowd):
    """[D, G] pycocotools IoU of XYWH boxes (for crowd boxes: the intersection over the detection's area)."""
    if not len(detections) or not len(boxes):
        return np.zeros((len(detections), len(boxes)))
    return np.asarray(coco_mask.iou(detections, boxes, [int(crowd)] * len(boxes)))


def match_image(gt_boxes, gt_classes, crowd_boxes, det_boxes, det_classes, det_scores, iou_thresh, background):
    """The confusion-matrix cells (true class, predicted class) of one image, background meaning no box; see the
    module docstring for the rules. Boxes are float64 XYWH arrays; the detections are those kept by the score threshold."""
    ious = box_iou(det_boxes, gt_boxes, crowd=False)
    on_crowd = (box_iou(det_boxes, crowd_boxes, crowd=True) >= iou_thresh).any(axis=1)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    cells = []
    for d in np.argsort(-det_scores, kind="stable"):
        free = np.where(taken, -1.0, ious[d])
        best = int(free.argmax()) if free.size else -1  # argmax: the first of equal IoUs
        if best >= 0 and free[best] >= iou_thresh:
            taken[best] = True
            cells.append((gt_classes[best], det_classes[d]))
        elif not on_crowd[d]:
            cells.append((background, det_classes[d]))
    cells += [(true_class, background) for true_class in np.asarray(gt_classes)[~taken]]
    return [(int(true_class), int(predicted)) for true_class, predicted in cells]


def confusion_matrix(coco_gt, results, score_thresh, iou_thresh):
    """(matrix [K + 1, K + 1] int64 indexed by category position in id order then background, {image id: cells})
    over every image of coco_gt."""
    position = {category_id: i for i, category_id in enumerate(sorted(coco_gt.cats))}
    background = len(position)
    kept = detections_by_image(results, score_thresh)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    cells_of_image = {}
    for image_id in sorted(coco_gt.imgs):
        annotations = coco_gt.imgToAnns[image_id]  # in the file's order
        gt = [ann for ann in annotations if not ann["iscrowd"]]
        detections = kept[image_id]
        cells = match_image(
            xywh(gt), [position[ann["category_id"]] for ann in gt], xywh([a for a in annotations if a["iscrowd"]]),
            xywh(detections), [position[d["category_id"]] for d in detections],
            np.array([d["score"] for d in detections], dtype=np.float64), iou_thresh, background)
        for cell in cells:
            matrix[cell] += 1
        cells_of_image[image_id] = cells
    return matrix, cells_of_image


def detections_by_image(results, score_thresh):
    """{image id: [its detections scoring at least score_thresh, in the file's order]}; missing ids give []."""
    grouped = collections.defaultdict(list)
    for result in results:
        if result["score"] >= score_thresh:
            grouped[result["image_id"]].append(result)
    return grouped


def xywh(entries):
    return np.array([entry["bbox"] for entry in entries], dtype=np.float64).reshape(-1, 4)


def error_counts(cells, background):
    """{"missed", "invented", "confused"} among one image's cells."""
    return {"missed": sum(1 for t, p in cells if p == background and t != background),
            "invented": sum(1 for t, p in cells if t == background),
            "confused": sum(1 for t, p in cells if t != p and background not in (t, p))}


# ------------------------------------------------------------------------------------------------ per class


def coco_ap(coco_gt, results):
    """({class name: {"AP", "AP50"}}, (AP, AP50)) from pycocotools' COCOeval over every image of coco_gt and all
    detections, through the evaluator train.py uses (coco_eval.CocoEvaluator); -1 where a class has no box."""
    evaluator = coco_eval.CocoEvaluator(coco_gt)
    by_image = detections_by_image(results, score_thresh=-np.inf)
    for image_id in sorted(coco_gt.imgs):
        detections = by_image[image_id]
        boxes = torch.tensor(xywh(detections))
        evaluator.update({image_id: {
            "boxes": torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1),
            "scores": torch.tensor([d["score"] for d in detections], dtype=torch.float64),
            "labels": torch.tensor([d["category_id"] for d in detections], dtype=torch.int64),
        }})
    evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):  # the 12-line table; only its first two numbers are reported
        evaluator.summarize()
    return evaluator.per_class(), tuple(evaluator.stats[:2])


def per_class_rows(matrix, names, ap):
    """{class name: {"ground_truth", "detections", "TP", "FP", "FN", "precision", "recall", "AP", "AP50"}}: the
    counts read off the matrix; precision or recall None where it is 0 / 0, AP None where the class has no box."""
    rows = {}
    for k, name in enumerate(names):
        tp, fn, fp = int(matrix[k, k]), int(matrix[k].sum() - matrix[k, k]), int(matrix[:, k].sum() - matrix[k, k])
        rows[name] = {"ground_truth": tp + fn, "detections": tp + fp, "TP": tp, "FP": fp, "FN": fn,
                      "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
                      **{key: value if value >= 0 else None for key, value in ap[name].items()}}
    return rows


def ratio(part, whole):
    return part / whole if whole else None


def format_per_class(rows, score_thresh, iou_thresh, mean_ap):
    def number(value):
        return f"{value:6.3f}" if value is not None else "     -"

    width = max([5, *map(len, rows)])
    lines = [f"At score >= {score_thresh} and IoU >= {iou_thresh} (TP, FP, FN from the confusion matrix), and "
             "pycocotools AP over all detections:",
             f"{'class':<{width}} {'boxes':>6} {'TP':>6} {'FP':>6} {'FN':>6} {'prec.':>6} {'recall':>6} "
             f"{'AP':>6} {'AP50':>6}"]
    for name, row in rows.items():
        lines.append(f"{name:<{width}} {row['ground_truth']:>6} {row['TP']:>6} {row['FP']:>6} {row['FN']:>6} "
                     f"{number(row['precision'])} {number(row['recall'])} {number(row['AP'])} {number(row['AP50'])}")
    lines.append(f"all classes: AP {mean_ap[0]:.3f}, AP50 {mean_ap[1]:.3f}")
    return "\n".join(lines)


def top_confusions(matrix, names, count=5):
    """The most frequent (true, predicted) pairs of different classes, most frequent first: 'true -> predicted N'."""
    k = len(names)
    off_diagonal = [(int(matrix[t, p]), t, p) for t in range(k) for p in range(k) if t != p and matrix[t, p]]
    return [f"{names[t]} -> {names[p]} {n}" for n, t, p in sorted(off_diagonal, key=lambda c: (-c[0], c[1], c[2]))[:count]]


# ------------------------------------------------------------------------------------------------ pictures


def plot_confusion_matrix(matrix, names, path, score_thresh, iou_thresh):
    """confusion_matrix.png: counts (log colour scale, zeros blank) and the shares per true class, side by side.
    Sized so that each of 80 classes keeps a readable row and tick label."""
    labels = [*names, BACKGROUND]
    n = len(labels)
    side = max(4.5, 0.17 * n + 2.0)  # inches per panel
    figure = Figure(figsize=(2 * side + 1.5, side + 1.0), layout="constrained")
    count_axes, share_axes = figure.subplots(1, 2)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    norm = LogNorm(vmin=1, vmax=max(2, int(matrix.max())))
    panels = ((count_axes, np.ma.masked_equal(matrix, 0), norm, "{:d}", "boxes"),
              (share_axes, np.ma.masked_equal(shares, 0), None, "{:.2f}", "share of each row"))
    for axes, values, panel_norm, cell_format, title in panels:
        image = axes.imshow(values, cmap=CELL_COLORS, norm=panel_norm, vmin=None if panel_norm else 0,
                            vmax=None if panel_norm else 1)
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02)
        font = max(6.0, min(10.0, 480 / n))
        axes.set_xticks(range(n), labels, rotation=90, fontsize=font)
        axes.set_yticks(range(n), labels, fontsize=font)
        axes.set(xlabel="predicted", ylabel="true", title=title)
        if n <= ANNOTATED_CELLS_UP_TO:
            annotate_cells(axes, values, cell_format, font)
    figure.suptitle(f"confusion matrix at score >= {score_thresh} and IoU >= {iou_thresh}")
    with safe_io.replacing(path) as temporary_path:  # a viewer never opens a half-written picture
        figure.savefig(temporary_path, format="png", dpi=100)


def annotate_cells(axes, values, cell_format, font):
    high = values.max() if values.count() else 0
    for (row, column), value in np.ndenumerate(values.filled(0)):
        if value:
            axes.text(column, row, cell_format.format(value.item()), ha="center", va="center", fontsize=font,
                      color="white" if value > high / 2 else "black")


def worst_images(cells_of_image, background, count):
    """Up to count [(image id, errors)] with the most errors (missed + invented + confused), most first, then by id;
    images without errors are left out."""
    errors = {image_id: error_counts(cells, background) for image_id, cells in cells_of_image.items()}
    ranked = sorted((image_id for image_id in errors if sum(errors[image_id].values())),
                    key=lambda image_id: (-sum(errors[image_id].values()), image_id))
    return [(image_id, errors[image_id]) for image_id in ranked[:count]]


def worst_picture_names(coco_gt, worst):
    """worst/<rank>_<file name>: sorted by name, the pictures come in order of errors."""
    digits = len(str(len(worst)))
    names = [f"{WORST_FOLDER}/{rank:0{digits}d}_{os.path.basename(coco_gt.imgs[image_id]['file_name'])}"
             for rank, (image_id, _) in enumerate(worst, start=1)]
    return predict.unique_picture_names(names)


def draw_errors(image, annotations, detections, names_by_id):
    """The ground truth (in blue, with class names) and the detections (in orange, with names and scores, the best
    on top) drawn on two copies of image uint8 [3, H, W], side by side, so that no caption hides another."""
    ground_truth = [ann for ann in annotations if not ann["iscrowd"]]
    detections = sorted(detections, key=lambda d: d["score"])
    left = predict.draw_boxes(image, [xyxy(ann["bbox"]) for ann in ground_truth],
                              [names_by_id[ann["category_id"]] for ann in ground_truth],
                              [GROUND_TRUTH_COLOR] * len(ground_truth))
    right = predict.draw_boxes(image, [xyxy(d["bbox"]) for d in detections],
                               [predict.detection_caption({"name": names_by_id[d["category_id"]], "score": d["score"]})
                                for d in detections], [DETECTION_COLOR] * len(detections))
    gap = torch.full((3, image.shape[1], max(4, image.shape[2] // 50)), 255, dtype=torch.uint8)
    return torch.cat([left, gap, right], dim=2)


def xyxy(bbox):
    x, y, width, height = bbox
    return [x, y, x + width, y + height]


def draw_worst(coco_gt, results, worst, picture_names, images_dir, output_dir, score_thresh, names_by_id):
    by_image = detections_by_image(results, score_thresh)
    for (image_id, _), picture_name in zip(worst, picture_names):
        path = os.path.join(images_dir, coco_gt.imgs[image_id]["file_name"])
        image = predict.read_image(path)
        picture = draw_errors(image, coco_gt.imgToAnns[image_id], by_image[image_id], names_by_id)
        predict.save_picture(picture, os.path.join(output_dir, picture_name))


# -------------------------------------------------------------------------------------------------- the run


def get_args_parser():
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, metavar="FILE", help="COCO annotation file (ground truth)")
    parser.add_argument("--detections", required=True, metavar="FILE",
                        help="COCO results file, such as train.py --test-only's detections.json")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="the annotation file's image folder: needed to draw the --worst images")
    parser.add_argument("--output-dir", required=True, help="folder for the matrix, the tables and the pictures")
    parser.add_argument("--score-thresh", type=cli.score_threshold, default=0.3,
                        help="detections scoring below this are ignored by the matrix and the counts (default: 0.3)")
    parser.add_argument("--iou-thresh", type=cli.real_number(0.0, 1.0, above_minimum=True), default=0.5,
                        help="a detection matches a box it overlaps at least this much (default: 0.5)")
    parser.add_argument("--worst", type=cli.whole_number(0, MAX_WORST), default=10, metavar="N",
                        help="list (and, with --images, draw) the N images with the most errors (default: 10)")
    return parser


def validate_args(args):
    if args.images is not None and not os.path.isdir(args.images):
        raise cli.UserInputError(f"--images {args.images}: no such folder")


def input_paths(args):
    return [path for path in (args.annotations, args.detections, args.images) if path is not None]


def check_detections_were_made_on(detections_path, annotations_path):
    """Where train.py --test-only's metrics.json sits beside the detections, it names the annotation file they were
    evaluated on by SHA-256: refuse another one. Its image and category ids may well overlap, and the analysis would
    then be of detections against the wrong ground truth, without a word."""
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(detections_path)), run_folder.METRICS_NAME)
    try:
        with open(metrics_path, encoding="utf-8") as f:
            evaluated = json.load(f)["evaluated"]
        recorded = evaluated["annotation_sha256"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):  # none, or one that records no fingerprint
        return
    if recorded != safe_io.sha256_of_file(annotations_path):
        raise cli.UserInputError(
            f"--detections {detections_path}: {metrics_path} says they were made on {evaluated.get('annotation_file')}"
            f", whose content differs from --annotations {annotations_path}; analyze them against that file")


def main(args):
    validate_args(args)
    predict.check_output_dir_holds_no_input(args.output_dir, input_paths(args))
    check_detections_were_made_on(args.detections, args.annotations)
    coco_gt = coco_utils.load_annotation_file(args.annotations)
    results = read_detections(args.detections, coco_gt)
    class_ids = sorted(coco_gt.cats)
    names = list(coco_eval.category_names(coco_gt.cats, class_ids).values())
    names_by_id = dict(zip(class_ids, names))

    matrix, cells_of_image = confusion_matrix(coco_gt, results, args.score_thresh, args.iou_thresh)
    per_class_ap, mean_ap = coco_ap(coco_gt, results)
    rows = per_class_rows(matrix, names, per_class_ap)
    worst = worst_images(cells_of_image, len(names), args.worst)
    picture_names = worst_picture_names(coco_gt, worst) if args.images else []

    files = [SUMMARY_NAME, MATRIX_NAME, MATRIX_PICTURE, PER_CLASS_NAME, *picture_names]
    earlier = predict.listed_outputs(args.output_dir, SUMMARY_NAME, lambda summary: summary["files"])
    predict.check_no_foreign_file_replaced(args.output_dir, files, earlier, "analyze.py")
    safe_io.prepare_output_dir(args.output_dir)
    thresholds = {"score_thresh": args.score_thresh, "iou_thresh": args.iou_thresh}
    worst_records = [{"image_id": image_id, "file_name": coco_gt.imgs[image_id]["file_name"], **errors,
                      "picture": picture_names[rank] if picture_names else None}
                     for rank, (image_id, errors) in enumerate(worst)]
    write_json(args.output_dir, SUMMARY_NAME, {  # first: a stopped run's files may still be replaced by a rerun
        "annotations": args.annotations, "detections": args.detections, "images": args.images, **thresholds,
        "worst": worst_records, "files": files})
    write_json(args.output_dir, MATRIX_NAME, {"classes": names, "matrix": matrix.tolist(), **thresholds,
                                              "rows": "true class, then background",
                                              "columns": "predicted class, then background"})
    write_json(args.output_dir, PER_CLASS_NAME, {**thresholds, "AP": mean_ap[0], "AP50": mean_ap[1],
                                                 "per_class": rows})
    plot_confusion_matrix(matrix, names, os.path.join(args.output_dir, MATRIX_PICTURE), args.score_thresh,
                          args.iou_thresh)
    if args.images:
        draw_worst(coco_gt, results, worst, picture_names, args.images, args.output_dir, args.score_thresh,
                   names_by_id)

    print(format_per_class(rows, args.score_thresh, args.iou_thresh, mean_ap))
    confusions = top_confusions(matrix, names)
    print(f"most frequent confusions (true -> predicted): {', '.join(confusions) if confusions else 'none'}")
    print(f"images with the most errors (missed + invented + confused): "
          f"{', '.join(str(record['image_id']) for record in worst_records) or 'none'}"
          + ("" if args.images or not worst else "; give --images DIR to draw them"))
    print(f"wrote {', '.join(files[:4])}{f' and {len(picture_names)} pictures' if picture_names else ''} "
          f"in {args.output_dir}")


def write_json(output_dir, name, content):
    safe_io.write_text_atomic(os.path.join(output_dir, name), json.dumps(content, indent=1) + "\n")


if __name__ == "__main__":
    cli.survive_closed_output()
    try:
        main(get_args_parser().parse_args())
    except (cli.UserInputError, coco_utils.DatasetError) as error:
        sys.exit(f"analyze.py: {error}")
    except KeyboardInterrupt:
        print("analyze.py: interrupted", file=sys.stderr)
        sys.exit(130)

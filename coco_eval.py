"""COCO bbox evaluation: collect detections during inference, evaluate them once at the end.

torchvision's evaluator runs pycocotools' per-image matching after every batch and gathers its large object
arrays across ranks. Here update() only stores each image's detections as small numpy arrays; after the
(distributed) gather, pycocotools or faster-coco-eval evaluates everything in one call. Evaluating once is also
what lets faster-coco-eval be used at all: its C++ evaluator has no per-batch mode.
"""
import collections
import contextlib
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import utils

BACKENDS = ("pycocotools", "faster-coco-eval")
# The names of COCOeval's 12 summary numbers, in its order (the keys of log.jsonl's "coco" and metrics.json).
COCO_STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)
SUMMARY_LINES = len(COCO_STAT_NAMES)
PER_CLASS_COLUMNS = 4  # categories per row of the per-class table: COCO's 80 fit in 20 rows
VOC_IOU_THRESHOLD = 0.5


def load_backend(backend):
    """(COCO class, COCOeval factory) of the chosen implementation."""
    if backend == "pycocotools":
        return COCO, COCOeval
    if backend == "faster-coco-eval":
        try:
            import faster_coco_eval
        except ImportError:
            raise utils.OptionalDependencyError(
                "--coco-backend faster-coco-eval needs the faster-coco-eval package: pip install faster-coco-eval"
            ) from None

        def faster_cocoeval(coco_gt, coco_dt, iouType):
            # print_function=print: its summary table is otherwise sent to a logger and never shown.
            return faster_coco_eval.COCOeval_faster(coco_gt, coco_dt, iouType=iouType, print_function=print)

        return faster_coco_eval.COCO, faster_cocoeval
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _to_numpy(tensor, dtype):
    # A private host copy: model outputs may be views into a larger batch tensor that must not be kept alive.
    return tensor.detach().to("cpu", dtype).numpy().copy()


class CocoEvaluator:
    """Evaluates the model's labels against coco_gt, which is in the annotation file's category ids. `categories`
    (the category table {label: {"id", "name"}}, coco_utils.get_categories) maps labels back to those ids; without
    it labels are taken to be the ids."""

    def __init__(self, coco_gt, iou_types=("bbox",), backend="pycocotools", categories=None):
        if tuple(iou_types) != ("bbox",):
            raise ValueError(f"only bbox evaluation is supported (SSD predicts boxes), got iou_types={iou_types}")
        self.coco_class, self.cocoeval_class = load_backend(backend)
        # bbox evaluation only adds an idempotent "ignore" flag to GT annotations, so no defensive deepcopy.
        self.coco_gt = coco_gt if isinstance(coco_gt, self.coco_class) else self.coco_class(coco_gt.dataset)
        self.category_id_of = None if categories is None else {label: e["id"] for label, e in categories.items()}
        self.detections = {}  # image id -> (boxes XYWH float32 [K, 4], scores float32 [K], labels int64 [K])
        self.coco_eval = None

    def update(self, predictions):
        """Store {image_id: {"boxes" XYXY, "scores", "labels"}}; an image with no detections still counts as
        evaluated. An image id seen before keeps its first detections (the distributed sampler repeats images)."""
        for image_id, prediction in predictions.items():
            boxes = prediction["boxes"].to(torch.float32)
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
            self.detections.setdefault(int(image_id), (
                _to_numpy(xywh, torch.float32),
                _to_numpy(prediction["scores"], torch.float32),
                _to_numpy(prediction["labels"], torch.int64),
            ))

    def synchronize_between_processes(self):
        """Gather every rank's detections; each image is kept once, so N ranks give the single-process result."""
        merged = {}
        for rank_detections in utils.all_gather(self.detections):
            for image_id, detections in rank_detections.items():
                merged.setdefault(image_id, detections)
        self.detections = merged

    def coco_results(self):
        """Detections in COCO's results format, in the annotation file's category ids, ordered by image id.
        Labels that stand for no category of the table (a model made for other classes) are left out."""
        category_id_of = self.category_id_of
        results = [
            {"image_id": image_id, "category_id": label if category_id_of is None else category_id_of.get(label),
             "bbox": box, "score": score}
            for image_id, (boxes, scores, labels) in sorted(self.detections.items())
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist())
        ]
        return [result for result in results if result["category_id"] is not None]

    def category_ids(self, labels):
        """The category ids of an array of the model's labels; -1 for a label that stands for no category."""
        if self.category_id_of is None:
            return labels
        return np.array([self.category_id_of.get(label, -1) for label in labels.tolist()], dtype=np.int64)

    def _load_results(self, results):
        if results:
            return self.coco_gt.loadRes(results)
        # pycocotools' loadRes cannot take an empty list: build the empty result set directly.
        coco_dt = self.coco_class()
        coco_dt.dataset = {
            "images": list(self.coco_gt.dataset["images"]),
            "categories": list(self.coco_gt.dataset.get("categories", [])),
            "annotations": [],
        }
        coco_dt.createIndex()
        return coco_dt

    def accumulate(self):
        """Match all stored detections against the ground truth of the evaluated images, in one pass."""
        with contextlib.redirect_stdout(io.StringIO()):  # the backends' progress chatter
            coco_dt = self._load_results(self.coco_results())
            coco_eval = self.cocoeval_class(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = sorted(self.detections)
            coco_eval.evaluate()
            coco_eval.accumulate()
        self.coco_eval = coco_eval

    def summarize(self):
        """Print "IoU metric: bbox", the standard 12-line AP/AR table and the per-category AP / AP50 table."""
        if self.coco_eval is None:
            raise RuntimeError("CocoEvaluator.summarize() needs accumulate() first")
        # faster-coco-eval appends AR@0.5 / AR@0.75 lines: print the 12 standard lines for both backends.
        with contextlib.redirect_stdout(io.StringIO()) as table:
            self.coco_eval.summarize()
        print("IoU metric: bbox")
        print("\n".join(table.getvalue().splitlines()[:SUMMARY_LINES]))
        print(format_per_class_table(self.per_class()))

    @property
    def stats(self):
        """The 12 summary numbers (stats[0] is AP@[.50:.95]), after summarize()."""
        if self.coco_eval is None or len(self.coco_eval.stats) < SUMMARY_LINES:
            raise RuntimeError("CocoEvaluator.stats needs accumulate() and summarize() first")
        return [float(s) for s in self.coco_eval.stats[:SUMMARY_LINES]]

    def per_class(self):
        """{category name: {"AP": AP@[.50:.95], "AP50": AP@.50}} from the accumulated precision array, for every
        category of the ground truth (-1 where the evaluated images hold none of it, as COCOeval reports)."""
        if self.coco_eval is None:
            raise RuntimeError("CocoEvaluator.per_class() needs accumulate() first")
        params = self.coco_eval.params
        # precision: [IoU threshold, recall point, category, area range, max detections]; -1 marks "no ground truth".
        precision = np.asarray(self.coco_eval.eval["precision"])[:, :, :, params.areaRngLbl.index("all"), -1]
        iou50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
        names = category_names(self.coco_gt.cats, params.catIds)
        return {
            names[category_id]: {"AP": _mean_precision(precision[:, :, k]),
                                 "AP50": _mean_precision(precision[iou50, :, k])}
            for k, category_id in enumerate(params.catIds)
        }

    def metrics(self):
        """{"coco": {stat name: value}, "per_class": {category name: {"AP", "AP50"}}}, after summarize()."""
        return {"coco": dict(zip(COCO_STAT_NAMES, self.stats)), "per_class": self.per_class()}


def _mean_precision(precision):
    """COCOeval's averaging: the mean over the entries that have ground truth, -1 when none has."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def category_names(categories, category_ids):
    """{category id: name} from the ground truth's categories; a name shared by several ids gets its id appended,
    so that every category keeps its own entry when the results are keyed by name."""
    names = {cid: str(categories[cid].get("name", cid)) for cid in category_ids}
    counts = collections.Counter(names.values())
    return {cid: name if counts[name] == 1 else f"{name} (id {cid})" for cid, name in names.items()}


def format_per_class_table(per_class, columns=PER_CLASS_COLUMNS, name_width=14):
    """Per-category AP and AP50, several categories per row; "-" where the evaluated images hold no such object."""
    def number(value):
        return f"{value:5.3f}" if value >= 0 else "    -"

    cells = [f"{name[:name_width]:<{name_width}} {number(v['AP'])} {number(v['AP50'])}" for name, v in per_class.items()]
    header = f"{'category':<{name_width}} {'AP':>5} {'AP50':>5}"
    rows = [" | ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join(["Per-category bbox AP @[IoU=0.50:0.95] and AP50 (area=all, maxDets=100):",
                      " | ".join([header] * min(columns, len(cells))), *rows])


def voc_ap_11_point(recall, precision):
    """VOC2007's AP (the SSD paper's): the mean over t = 0, 0.1, ..., 1 of the highest precision at recall >= t,
    0 where recall never reaches t. t is k / 10 exactly, so a recall of 3/10 counts at t = 0.3."""
    return sum(float(precision[recall >= k / 10].max(initial=0.0)) for k in range(11)) / 11


def voc_ap_area(recall, precision):
    """VOC2010+'s AP: the area under the precision envelope (precision made non-increasing from the right),
    summed over the steps of recall, as the devkit's VOCap.m."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * envelope[steps]))


def _iou(boxes, other):
    """[N, M] IoU of continuous XYXY boxes: no "+1", which on get_voc's boxes equals the devkit's +1 IoU."""
    top_left = np.maximum(boxes[:, None, :2], other[None, :, :2])
    bottom_right = np.minimum(boxes[:, None, 2:], other[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    area_other = np.prod(other[:, 2:] - other[:, :2], axis=1)
    return intersection / (area[:, None] + area_other[None, :] - intersection)


def _match_image(boxes, scores, gt_boxes, gt_difficult):
    """(true positive, false positive) flags of one image's detections of one class, as VOCevaldet.m assigns them:
    in descending score (ties in the given order), each detection takes the ground truth it overlaps most (the
    first on a tie); IoU >= 0.5 with a difficult one makes it neither TP nor FP, with one already taken a
    duplicate (FP), else a TP; below 0.5 it is an FP."""
    order = np.argsort(-scores, kind="stable")
    true_positive = np.zeros(len(scores), dtype=bool)
    false_positive = np.zeros(len(scores), dtype=bool)
    if len(gt_boxes) == 0:
        false_positive[:] = True
        return true_positive, false_positive
    with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: 0 / 0 is NaN, never a match
        overlaps = _iou(boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for d in order:
        best = int(overlaps[d].argmax())
        if not overlaps[d, best] >= VOC_IOU_THRESHOLD:
            false_positive[d] = True
        elif not gt_difficult[best]:
            false_positive[d] = taken[best]
            true_positive[d] = not taken[best]
            taken[best] = True
    return true_positive, false_positive


class VocEvaluator(CocoEvaluator):
    """Pascal VOC detection AP at IoU 0.5, both the VOC2007 11-point and the VOC2010+ area metric, computed as the
    VOC devkit's VOCevaldet.m does, on ground truth from voc_utils.get_voc (annotations with "difficult").

    The devkit ranks a class's detections over the whole split by descending score, keeping the results file's
    order on ties; here that order is the images' (ids follow the split lists) and each image's detections as the
    model returned them. Precision where no detection has yet counted (0 / 0) is 0, as py-faster-rcnn's voc_eval.
    A class without non-difficult ground truth in the evaluated images has no AP (the devkit divides by zero) and
    is left out of the means. Collecting and gathering detections is CocoEvaluator's, and so is the COCO-style AP
    it also computes (difficult objects are crowd regions there: ignored, as in VOC).
    """

    def __init__(self, coco_gt, backend="pycocotools", categories=None):
        super().__init__(coco_gt, backend=backend, categories=categories)
        self.class_names = {cat_id: cat["name"] for cat_id, cat in sorted(coco_gt.cats.items())}
        self.voc_per_class = None  # name -> {"AP_11pt", "AP_area", "positives"} after accumulate()

    def _ground_truth(self, image_id, category_id):
        anns = [ann for ann in self.coco_gt.imgToAnns[image_id] if ann["category_id"] == category_id]
        boxes = np.array([ann["bbox"] for ann in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return boxes, np.array([bool(ann["difficult"]) for ann in anns], dtype=bool)

    def _class_ap(self, category_id, image_ids):
        scores, true_positive, false_positive, positives = [], [], [], 0
        for image_id in image_ids:
            boxes, image_scores, labels = self.detections[image_id]
            mine = self.category_ids(labels) == category_id
            gt_boxes, gt_difficult = self._ground_truth(image_id, category_id)
            positives += int(np.count_nonzero(~gt_difficult))
            xywh = boxes[mine].astype(np.float64)  # stored as COCO results: back to XYXY
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            tp, fp = _match_image(xyxy, image_scores[mine], gt_boxes, gt_difficult)
            scores.append(image_scores[mine])
            true_positive.append(tp)
            false_positive.append(fp)
        if positives == 0:
            return None
        order = np.argsort(-np.concatenate(scores), kind="stable")
        tp = np.cumsum(np.concatenate(true_positive)[order])
        fp = np.cumsum(np.concatenate(false_positive)[order])
        recall = tp / positives
        precision = tp / np.maximum(tp + fp, 1)
        return {"AP_11pt": voc_ap_11_point(recall, precision), "AP_area": voc_ap_area(recall, precision),
                "positives": positives}

    def accumulate(self):
        super().accumulate()
        image_ids = sorted(self.detections)
        self.voc_per_class = {}
        for category_id, name in self.class_names.items():
            result = self._class_ap(category_id, image_ids)
            if result is not None:
                self.voc_per_class[name] = result

    def _means(self):
        if self.voc_per_class is None:
            raise RuntimeError("VocEvaluator needs accumulate() first")
        values = list(self.voc_per_class.values())
        mean = {key: float(np.mean([v[key] for v in values])) if values else float("nan")
                for key in ("AP_11pt", "AP_area")}
        return mean["AP_11pt"], mean["AP_area"]

    def summarize(self):
        """Print COCO's table, then the per-class VOC AP table (both metrics, labelled) and the means."""
        super().summarize()
        mean_11_point, mean_area = self._means()
        print(f"Pascal VOC AP at IoU {VOC_IOU_THRESHOLD} on {len(self.detections)} images: "
              "AP_11pt = VOC2007 11-point (the SSD paper's), AP_area = VOC2010+ area")
        width = max(len(name) for name in ["class", *self.class_names.values()])
        print(f"{'class':<{width}}  AP_11pt  AP_area  objects")
        for name in self.class_names.values():
            result = self.voc_per_class.get(name)
            if result is None:
                print(f"{name:<{width}}        -        -        0  (no ground truth: not in the mean)")
            else:
                print(f"{name:<{width}}  {result['AP_11pt']:7.4f}  {result['AP_area']:7.4f}  {result['positives']:7d}")
        print(f"{'mAP':<{width}}  {mean_11_point:7.4f}  {mean_area:7.4f}  ({len(self.voc_per_class)} classes)")

    def metrics(self):
        mean_11_point, mean_area = self._means()
        per_class = {name: {"AP_11pt": r["AP_11pt"], "AP_area": r["AP_area"]} for name, r in self.voc_per_class.items()}
        return {**super().metrics(), "voc": {"mAP_11pt": mean_11_point, "mAP_area": mean_area, "per_class": per_class}}

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


def load_backend(backend):
    """(COCO class, COCOeval factory) of the chosen implementation."""
    if backend == "pycocotools":
        return COCO, COCOeval
    if backend == "faster-coco-eval":
        try:
            import faster_coco_eval
        except ImportError as error:
            raise ImportError(
                "--coco-backend faster-coco-eval needs the faster-coco-eval package: pip install faster-coco-eval"
            ) from error

        def faster_cocoeval(coco_gt, coco_dt, iouType):
            # print_function=print: its summary table is otherwise sent to a logger and never shown.
            return faster_coco_eval.COCOeval_faster(coco_gt, coco_dt, iouType=iouType, print_function=print)

        return faster_coco_eval.COCO, faster_cocoeval
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _to_numpy(tensor, dtype):
    # A private host copy: model outputs may be views into a larger batch tensor that must not be kept alive.
    return tensor.detach().to("cpu", dtype).numpy().copy()


class CocoEvaluator:
    def __init__(self, coco_gt, iou_types=("bbox",), backend="pycocotools"):
        if tuple(iou_types) != ("bbox",):
            raise ValueError(f"only bbox evaluation is supported (SSD predicts boxes), got iou_types={iou_types}")
        self.coco_class, self.cocoeval_class = load_backend(backend)
        # bbox evaluation only adds an idempotent "ignore" flag to GT annotations, so no defensive deepcopy.
        self.coco_gt = coco_gt if isinstance(coco_gt, self.coco_class) else self.coco_class(coco_gt.dataset)
        self.detections = {}  # image id -> (boxes XYWH float32 [K, 4], scores float32 [K], category ids int64 [K])
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
        """Detections in COCO's results format (the dataset's category ids), ordered by image id."""
        return [
            {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
            for image_id, (boxes, scores, labels) in sorted(self.detections.items())
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist())
        ]

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

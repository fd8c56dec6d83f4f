"""COCO bbox evaluation: collect detections during inference, evaluate them once at the end.

torchvision's evaluator runs pycocotools' per-image matching after every batch and gathers its large object
arrays across ranks. Here update() only stores each image's detections as small numpy arrays; after the
(distributed) gather, pycocotools or faster-coco-eval evaluates everything in one call. Evaluating once is also
what lets faster-coco-eval be used at all: its C++ evaluator has no per-batch mode.
"""
import contextlib
import io

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import utils

BACKENDS = ("pycocotools", "faster-coco-eval")
SUMMARY_LINES = 12  # AP, AP50, AP75, AP S/M/L, AR1, AR10, AR100, AR S/M/L


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
        """Print "IoU metric: bbox" and the standard 12-line AP/AR table."""
        if self.coco_eval is None:
            raise RuntimeError("CocoEvaluator.summarize() needs accumulate() first")
        # faster-coco-eval appends AR@0.5 / AR@0.75 lines: print the 12 standard lines for both backends.
        with contextlib.redirect_stdout(io.StringIO()) as table:
            self.coco_eval.summarize()
        print("IoU metric: bbox")
        print("\n".join(table.getvalue().splitlines()[:SUMMARY_LINES]))

    @property
    def stats(self):
        """The 12 summary numbers (stats[0] is AP@[.50:.95]), after summarize()."""
        if self.coco_eval is None or len(self.coco_eval.stats) < SUMMARY_LINES:
            raise RuntimeError("CocoEvaluator.stats needs accumulate() and summarize() first")
        return [float(s) for s in self.coco_eval.stats[:SUMMARY_LINES]]

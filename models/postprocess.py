"""From head outputs to detections: score threshold, per-class top-k, per-class NMS, best K per image.

Same detections as torchvision's SSD.postprocess_detections, without its Python loop over the classes:
the candidates of all images and classes are selected at once, and one NMS call per image handles all
classes. Nothing here calls .item() on data. Under graph capture (torch.jit.trace, or torch.export for
ONNX) NMS runs as the custom op ssd::nms_mask, a mask over dense [B, C, A] scores that export.py maps onto
ONNX's NonMaxSuppression, so that the graph holds for any batch size.

The two paths and the tests that guard them:
- eager (training, evaluation, predict.py): select_candidates, then first_kept_per_image (one torchvision nms
  call per image); tests/test_postprocess.py: test_postprocessing_equals_torchvision_per_class_loop,
  test_nms_gives_the_full_nms_prefix_whatever_the_survival_rate; tests/test_inference_parity.py:
  test_eval_detections_equal_torchvision;
- graph capture (torch.jit.trace, torch.export for export.py, torch.compile): select_candidates, then nms_mask
  over dense scores; tests/test_postprocess.py: test_detect_can_be_traced, tests/test_export.py:
  test_export_round_trip_matches_pytorch (onnxruntime against the eager path).
Both end in _to_slots (fixed-size [B, K] outputs).
match_detections, last, pairs two sets of detections to tolerances (parity tests, bench.py, export.py --check).
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from .box_coder import decode

# Anchors whose best class logit is within log(score_thresh) - _LOGIT_MARGIN of their top logit get a
# softmax; the margin only covers float rounding in the softmax, so no true candidate is ever skipped.
_LOGIT_MARGIN = 1e-3


def postprocess_detections(
    bbox_regression: Tensor,
    cls_logits: Tensor,
    anchors: Tensor,
    image_size: tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    topk_candidates: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detections padded to K = detections_per_img per image.

    bbox_regression [B, A, 4], cls_logits [B, A, C] (class 0 is background), anchors [A, 4] XYXY in the
    image_size (H, W) frame. Returns boxes [B, K, 4] (same frame, clipped), scores [B, K], labels [B, K]
    and valid [B, K]: each image's detections first, by decreasing score, then zeros.
    """
    num_images, num_anchors, num_classes = cls_logits.shape
    # Autocast's float16/bfloat16 outputs are taken to float32: bfloat16 scores would tie in steps of 1/256
    # (CPU autocast keeps softmax in bfloat16) and float16 boxes near 300 px round to 0.25 px.
    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    bbox_regression, cls_logits = bbox_regression.to(dtype), cls_logits.to(dtype)
    capturing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    image_idx, anchor_idx, labels, scores = select_candidates(cls_logits, score_thresh, topk_candidates)
    # ONNX has no stable sort, but its TopK, which an exported sort becomes, orders ties by index.
    order = _by_image_then_score(image_idx, scores, stable=not capturing)
    image_idx, anchor_idx, labels, scores = image_idx[order], anchor_idx[order], labels[order], scores[order]

    deltas = bbox_regression.reshape(-1, 4).index_select(0, image_idx * num_anchors + anchor_idx)
    boxes = _clip(decode(deltas, anchors.index_select(0, anchor_idx)), image_size)
    if capturing:
        # A captured graph cannot branch on data (the NMS prefix loop): the batch goes through ssd::nms_mask.
        dense_scores = scores.new_zeros((num_images, num_classes, num_anchors))
        dense_scores = dense_scores.index_put((image_idx, labels, anchor_idx), scores)
        all_boxes = _clip(decode(bbox_regression, anchors), image_size)
        kept = torch.ops.ssd.nms_mask(all_boxes, dense_scores, nms_thresh, detections_per_img)
        keep = torch.where(kept[image_idx, labels, anchor_idx])[0]
    else:
        # Class c moves by c * (longest side + 1), so that classes never overlap in one NMS call per image.
        class_offsets = labels * (max(image_size) + 1.0)
        keep = first_kept_per_image(boxes, scores, class_offsets, image_idx, num_images, nms_thresh,
                                    detections_per_img)
    return _to_slots(keep, image_idx, (boxes, scores, labels), num_images, detections_per_img)


def select_candidates(cls_logits: Tensor, score_thresh: float, topk: int):
    """(image index, anchor index, label, score) of every class score above score_thresh, keeping the topk
    best anchors of each image and class. Class 0 (background) never yields a candidate."""
    num_images, num_anchors, num_classes = cls_logits.shape
    # softmax_c <= exp(logit_c - top logit), so an anchor whose foreground logits all sit far below its top
    # logit cannot pass the threshold: only the other anchors (few, once a model is trained) get a softmax.
    # Comparing with the background logit suffices, as log_thresh < 0 whenever anything can pass.
    log_thresh = math.log(score_thresh) if score_thresh > 0 else -math.inf
    gap = cls_logits[..., 1:].amax(dim=-1) - cls_logits[..., 0]
    rows = torch.where(gap.flatten() >= log_thresh - _LOGIT_MARGIN)[0]  # image * A + anchor, ascending
    probs = F.softmax(cls_logits.reshape(-1, num_classes).index_select(0, rows), dim=-1)  # [R, C]
    row_image = rows // num_anchors

    row, label = torch.where(probs > score_thresh)
    # Groups (image, label) with more than topk candidates get their topk best from a dense topk instead.
    group = row_image[row] * num_classes + label
    group_size = _count(group, num_images * num_classes)
    selected = (label > 0) & (group_size[group] <= topk)
    row, label = row[selected], label[selected]
    is_background = torch.arange(num_images * num_classes, device=group.device) % num_classes == 0
    crowded = torch.where((group_size > topk) & ~is_background)[0]
    crowded_image, crowded_label = crowded // num_classes, crowded % num_classes
    rows_per_image = _count(row_image, num_images)
    first_row = rows_per_image.cumsum(0) - rows_per_image
    top_rows = _top_rows(probs, crowded_label, first_row[crowded_image], rows_per_image[crowded_image],
                         num_anchors, topk)

    row = torch.cat((row, top_rows.flatten()))
    label = torch.cat((label, crowded_label[:, None].expand_as(top_rows).flatten()))
    scores = probs.flatten().index_select(0, row * num_classes + label)
    return row_image[row], rows[row] % num_anchors, label, scores


def _count(values: Tensor, size: int) -> Tensor:
    """bincount with a fixed length (a shape that graph capture can rely on)."""
    return torch.zeros(size, dtype=torch.int64, device=values.device).index_add_(0, values, torch.ones_like(values))


def _top_rows(probs: Tensor, labels: Tensor, first_row: Tensor, num_rows: Tensor, num_anchors: int, topk: int):
    """[G, topk] rows of probs [R, C] with the best scores for G groups: labels[g] over the image rows
    first_row[g] ... first_row[g] + num_rows[g] - 1.

    Each group's scores are padded to the number of anchors (a shape, not data, so that traces stay
    valid). Only used for groups with more than topk candidates: few once a model is trained.
    """
    offsets = torch.arange(num_anchors, device=probs.device)
    inside = offsets < num_rows[:, None]  # [G, A]
    rows = torch.where(inside, first_row[:, None] + offsets, 0)
    columns = probs.flatten().index_select(0, (rows * probs.shape[1] + labels[:, None]).flatten())
    columns = torch.where(inside, columns.view_as(rows), -1.0)
    return first_row[:, None] + columns.topk(min(topk, num_anchors), dim=1).indices


def _by_image_then_score(image_idx: Tensor, scores: Tensor, stable: bool = True) -> Tensor:
    """The order that groups candidates by image, best score first; equal scores keep their order when
    stable. One sort of a float64 key, in which image * 2 - score is exact."""
    key = image_idx.double() * 2 - scores.double()
    return key.sort(stable=True).indices if stable else key.sort().indices


def _clip(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), -1)


def first_kept_per_image(boxes: Tensor, scores: Tensor, class_offsets: Tensor, image_idx: Tensor, num_images: int,
                         iou_thresh: float, max_kept: int) -> Tensor:
    """Indices of the first max_kept boxes of each image that per-class greedy NMS keeps, for candidates
    sorted by image, then by decreasing score; class_offsets [N] moves each class to its own region.

    One NMS call per image, as a call costs about (number of boxes) * (number kept). Coordinates are moved
    in float64, where the offsets are exact (in float32 they would round, which can flip decisions next to
    the threshold).
    """
    moved = boxes.double() + class_offsets.double()[:, None]
    scores = scores.double()
    keep, start = [], 0
    survival = 0.4  # share of boxes NMS keeps: a guess for the first image (3.1 * max_kept boxes), then the last one's
    for count in _count(image_idx, num_images).tolist():  # images are contiguous runs of candidates
        kept, survival = _first_kept(moved[start:start + count], scores[start:start + count], iou_thresh, max_kept,
                                     survival)
        keep.append(start + kept)
        start += count
    return torch.cat(keep)


def _first_kept(boxes: Tensor, scores: Tensor, iou_thresh: float, max_kept: int, survival: float):
    """(positions of the first max_kept boxes that greedy NMS keeps, share of the boxes examined that it kept),
    for boxes sorted by decreasing score.

    Greedy NMS decides each box from higher-scored boxes only, so NMS on the best n boxes gives the final
    decisions for those n: start with the n that an expected survival share says yields max_kept survivors (plus
    25%), and widen while too few survive. This saves most of the work when thousands of candidates pass the
    score threshold; the guess only changes the cost, never the result.
    """
    total = scores.shape[0]
    while True:
        n = min(total, math.ceil(1.25 * max_kept / survival))  # grows each round: survival < max_kept / n
        kept = nms(boxes[:n], scores[:n], iou_thresh)
        survival = kept.shape[0] / n if n else survival  # NMS keeps at least one box, so this stays > 0
        if n == total or kept.shape[0] >= max_kept:
            return kept.sort().values[:max_kept], survival


@torch.library.custom_op("ssd::nms_mask", mutates_args=())
def nms_mask(boxes: Tensor, scores: Tensor, iou_threshold: float, max_kept: int) -> Tensor:
    """Per-image, per-class greedy NMS of boxes [B, A, 4] scored by scores [B, C, A] (0: not a candidate),
    as a [B, C, A] mask of the kept ones. Only each image's best max_kept survivors are marked (no other
    can make its top max_kept); an exported graph may mark them all."""
    image_idx, labels, anchor_idx = torch.where(scores > 0)  # (image, class, anchor) order
    candidate_scores = scores[image_idx, labels, anchor_idx]
    order = _by_image_then_score(image_idx, candidate_scores)
    image_idx, labels, anchor_idx = image_idx[order], labels[order], anchor_idx[order]
    class_offset = boxes.amax() - boxes.amin() + 1  # wider than any box: classes cannot overlap
    keep = first_kept_per_image(boxes[image_idx, anchor_idx], candidate_scores[order], labels * class_offset,
                                image_idx, scores.shape[0], iou_threshold, max_kept)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[image_idx[keep], labels[keep], anchor_idx[keep]] = True
    return mask


@nms_mask.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, max_kept: int) -> Tensor:
    return torch.empty_like(scores, dtype=torch.bool)


def _to_slots(keep: Tensor, image_idx: Tensor, columns, num_images: int, slots: int):
    """Scatter the first `slots` kept detections of each image (keep: grouped by image, best first) into
    zero-padded [B, slots] tensors, plus the mask of filled slots."""
    image_of_keep = image_idx[keep]
    kept_per_image = _count(image_of_keep, num_images)
    first_of_image = kept_per_image.cumsum(0) - kept_per_image
    slot = torch.arange(keep.shape[0], device=keep.device) - first_of_image[image_of_keep]
    inside = slot < slots
    keep, image_of_keep, slot = keep[inside], image_of_keep[inside], slot[inside]
    padded = []
    for values in (*(column[keep] for column in columns), torch.ones_like(keep, dtype=torch.bool)):
        out = values.new_zeros((num_images, slots) + values.shape[1:])
        out[image_of_keep, slot] = values
        padded.append(out)
    return tuple(padded)


def match_detections(reference, candidate, box_tolerance, score_tolerance):
    """Greedy one-to-one pairing of candidate detections with reference ones of the same label whose boxes differ by
    at most box_tolerance pixels (largest coordinate difference) and scores by at most score_tolerance; near-tied
    scores may come out in another order. Returns (paired count, largest box difference, largest score difference)
    over the pairs. For checking that two implementations (or an export) give the same detections."""
    pairs, box_difference, score_difference = pair_detections(reference, candidate, box_tolerance, score_tolerance)
    return len(pairs), *worst_differences(pairs, box_difference, score_difference)


def worst_differences(pairs, box_difference, score_difference):
    """(largest box difference, largest score difference) over the pairs of pair_detections; 0 without pairs."""
    worst_box = max((box_difference[row, column].item() for row, column in pairs), default=0.0)
    worst_score = max((score_difference[row, column].item() for row, column in pairs), default=0.0)
    return worst_box, worst_score


def pair_detections(reference, candidate, box_tolerance, score_tolerance):
    """The pairs (reference row, candidate row) of match_detections, with the [R, C] box and score differences."""
    box_difference = (reference["boxes"][:, None] - candidate["boxes"][None]).abs().amax(dim=-1)
    score_difference = (reference["scores"][:, None] - candidate["scores"][None]).abs()
    compatible = (reference["labels"][:, None] == candidate["labels"][None]) & (box_difference <= box_tolerance)
    compatible &= score_difference <= score_tolerance
    taken = torch.zeros(len(candidate["boxes"]), dtype=torch.bool)
    pairs = []
    for row in range(len(reference["boxes"])):
        options = (compatible[row] & ~taken).nonzero().flatten()
        if len(options):
            best = options[box_difference[row, options].argmin()]
            taken[best] = True
            pairs.append((row, int(best)))
    return pairs, box_difference, score_difference

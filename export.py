"""Export a detector to ONNX, the whole inference pipeline in one graph, and check it against PyTorch.

    python export.py --weights output/model_9.pth --output ssdlite.onnx --check photos/a.jpg photos/b.jpg

The graph takes a float image batch [B, 3, H, W] in [0, 1], already resized to the model's input size (H, W)
(300x300 for SSD300, 512x512 for SSD512, 320x320 for SSDlite); normalisation, the network, box decoding, score
thresholding, per-class top-k and NMS all run inside it. Outputs (K = the model's detections_per_img):
    boxes  [B, K, 4] float32  XYXY in pixels of the H x W input
    scores [B, K]    float32  in descending order; padding slots are 0
    labels [B, K]    int64    padding slots are 0 (the background label)
    num_detections [B] int64  how many leading slots of each row are real detections
The batch size is dynamic. Class names, the input size and the score threshold are stored in the ONNX metadata.

After exporting, the graph is run with onnxruntime on the --check images (or synthetic ones) and compared with the
PyTorch model's own eval pipeline: the same detections within tolerance, or exit status 1.
"""
import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import pil_to_tensor

import cli
import coco_utils
import models
import safe_io
from models.postprocess import pair_detections, worst_differences

INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]
# Boxes are pixels of a ~300 px input: 0.05 px is far below anything visible and far above the float32 noise
# between two runtimes (about 1e-4 px measured); likewise for scores.
BOX_TOLERANCE = 0.05
SCORE_TOLERANCE = 5e-4
# torch's exporter writes opset 18 and converts up from there; onnx cannot convert it down (measured, torch 2.14).
MIN_OPSET = 18
# export.py replaces an existing --output only where it holds this (or with --overwrite).
OUTPUT_KIND = "an ONNX file written by export.py"


def require(module, package):
    """Import an optional dependency, or stop with a one-line message that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise cli.UserInputError(f"export.py needs the optional package '{package}': pip install {package}") from None


class DetectionPipeline(torch.nn.Module):
    """The exported graph: [0, 1] images at model.size -> padded boxes, scores, labels and detection counts."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        mean, std = self.model.image_mean.view(1, 3, 1, 1), self.model.image_std.view(1, 3, 1, 1)
        boxes, scores, labels, valid = self.model.detect((images - mean) / std)
        return boxes, scores, labels, valid.sum(dim=1)


def onnx_translations():
    """ONNX for the model's custom ops: ssd::nms_mask (per-image, per-class NMS as a [B, C, A] mask) becomes
    ONNX's NonMaxSuppression, which handles the batch and class dimensions itself."""
    op = require("onnxscript", "onnxscript").opset18
    bool_type = require("onnx", "onnx").TensorProto.BOOL

    def nms_mask(boxes, scores, iou_threshold: float, max_kept: int):
        # max_kept only lets PyTorch stop early; keeping every NMS survivor selects the same best max_kept.
        # ONNX reads boxes as (y1, x1, y2, x2); IoU is the same with x and y swapped, so XYXY boxes go as they are.
        selected = op.NonMaxSuppression(  # [M, 3] rows of (image, class, anchor); zero scores are not candidates
            boxes, scores, op.Constant(value_ints=[2**31 - 1]), op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[0.0]),
        )
        ones = op.Expand(op.Constant(value_floats=[1.0]), op.Shape(selected, start=0, end=1))
        mask = op.ScatterND(op.ConstantOfShape(op.Shape(scores)), selected, ones)
        return op.Cast(mask, to=bool_type)

    return {torch.ops.ssd.nms_mask.default: nms_mask}


def export_onnx(model, output, opset=None, metadata=None):
    """Write the pipeline of model (eval mode, CPU) to output with a dynamic batch dimension."""
    # Batch 2, not 1: torch.export specialises example sizes 0 and 1, which would freeze the batch dimension.
    example = torch.rand(2, 3, *model.size)
    # onnx_ir warns about every empty attribute list the exporter emits (dozens of lines, harmless).
    logging.getLogger("onnx_ir._convenience").setLevel(logging.ERROR)
    program = torch.onnx.export(
        DetectionPipeline(model).eval(),
        (example,),
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        opset_version=opset,
        dynamo=True,
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}},
        custom_translation_table=onnx_translations(),
        verbose=False,
    )
    written = program.model.opset_imports.get("")
    if opset is not None and written != opset:
        # The exporter falls back to its own opset, with a long warning, where onnx cannot convert to the one asked.
        raise cli.UserInputError(f"--opset {opset}: the exporter could not convert this model to it (it gives opset "
                                 f"{written}); nothing was written")
    program.model.metadata_props.update(metadata or {})
    with safe_io.replacing(output) as tmp_path:  # a failed or interrupted export never leaves a partial file
        program.save(tmp_path, external_data=False)


def load_check_batch(paths, size, count=3, seed=0):
    """[B, 3, H, W] in [0, 1] at the model size: the given images resized as the model resizes them, or, without
    paths, smooth random images (smooth so that the model's boxes are not all the same noise)."""
    if not paths:
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(count, 3, 8, 8, generator=generator)
        return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    try:
        images = [pil_to_tensor(coco_utils.load_rgb_image(path)).float().div(255) for path in paths]
    except coco_utils.DatasetError as error:
        raise cli.UserInputError(f"--check: {error}") from None
    return torch.cat([F.interpolate(image[None], size=size, mode="bilinear", align_corners=False) for image in images])


def check_against_pytorch(references, output, batch):
    """Run the ONNX file with onnxruntime on batch and compare with the PyTorch detections (one dict per image).

    Prints one line per image; returns True when every image has the same detections in both.
    """
    onnxruntime = require("onnxruntime", "onnxruntime")
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    start = time.time()
    boxes, scores, labels, counts = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: batch.numpy()})
    print(f"onnxruntime: {len(batch)} images in {(time.time() - start) * 1000:.0f} ms")
    all_match = True
    for index, reference in enumerate(references):
        count = int(counts[index])
        candidate = {"boxes": torch.from_numpy(boxes[index, :count]), "scores": torch.from_numpy(scores[index, :count]),
                     "labels": torch.from_numpy(labels[index, :count])}
        same, line = compare_detections(reference, candidate)
        all_match &= same
        print(f"image {index}: {line}")
    return all_match


def newest_opset():
    """The newest ONNX opset the installed onnx package knows, or None without onnx (main() then says so)."""
    with contextlib.suppress(ImportError):
        return importlib.import_module("onnx").defs.onnx_opset_version()
    return None


def opset_version(text):
    """An argparse type: an opset from MIN_OPSET to the newest the installed onnx knows."""
    newest = newest_opset()
    if newest is None:
        raise argparse.ArgumentTypeError("export.py needs the optional package 'onnx': pip install onnx")
    return cli.whole_number(MIN_OPSET, newest)(text)


def compare_detections(reference, candidate):
    """(same, one-line report) for one image's PyTorch and ONNX detections. Each detection must pair with one of the
    same label, box and score; where several detections tie in score (a uniform image gives many), NMS and the
    detections-per-image cut may keep different members of the tie, so unpaired detections on the two sides count
    as the same when their scores pair up as ties (sorted, each within SCORE_TOLERANCE)."""
    pairs, box_difference, score_difference = pair_detections(reference, candidate, BOX_TOLERANCE, SCORE_TOLERANCE)
    unpaired = [unpaired_tied_scores(side["scores"], {pair[which] for pair in pairs})
                for which, side in enumerate((reference, candidate))]
    tied = None not in unpaired and len(unpaired[0]) == len(unpaired[1]) and all(
        abs(a - b) <= SCORE_TOLERANCE for a, b in zip(*unpaired))
    worst_box, worst_score = worst_differences(pairs, box_difference, score_difference)
    ties = f", {len(unpaired[0])} others tied in score" if tied and unpaired[0] else ""
    return tied, (f"PyTorch {len(reference['scores'])} detections, ONNX {len(candidate['scores'])}, matched "
                  f"{len(pairs)}{ties}; max |box diff| {worst_box:.1e} px, max |score diff| {worst_score:.1e} "
                  f"-> {'OK' if tied else 'MISMATCH'}")


def unpaired_tied_scores(scores, paired):
    """The sorted scores of the detections not in paired (row numbers), or None where one of them ties with no
    other detection of its own side: a detection that is not one of several equal scores has no excuse."""
    unpaired = [row for row in range(len(scores)) if row not in paired]
    if any(((scores - scores[row]).abs() <= SCORE_TOLERANCE).sum() < 2 for row in unpaired):
        return None
    return sorted(scores[unpaired].tolist())


def get_args_parser():
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name; optional when the checkpoint names it")
    parser.add_argument("--weights", required=True, help="checkpoint file or torchvision weights name")
    parser.add_argument("--output", required=True,
                        help="ONNX file to write; an existing file is replaced only if export.py wrote it (see "
                             "--overwrite), never a training run's checkpoint or log nor an input")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that export.py did not write")
    parser.add_argument("--check", nargs="*", default=[], metavar="IMAGE",
                        help="images to compare onnxruntime with PyTorch on (default: 3 synthetic images)")
    parser.add_argument("--opset", type=opset_version, default=None,
                        help=f"ONNX opset, from {MIN_OPSET} (what the exporter writes) to {newest_opset()} (the "
                             "newest the installed onnx knows) (default: the exporter's, 20 with torch 2.14)")
    parser.add_argument("--score-thresh", type=cli.score_threshold, default=None,
                        help="score threshold baked into the graph, from 0 to below 1 (default: the model's, kept "
                             "low for evaluation)")
    return parser


def is_exported_onnx(path):
    """Whether path holds an ONNX graph with the metadata export.py writes (so that replacing it loses nothing of
    the user's)."""
    onnx = require("onnx", "onnx")
    try:
        keys = {prop.key for prop in onnx.load(path, load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - protobuf reports a foreign file with many exception types: not ours
        return False
    return {"model", "input_size", "categories"} <= keys


def check_output(args):
    """Before any work: --output follows the one output rule (safe_io.check_output_file)."""
    inputs = [("--weights", args.weights)] + [("--check", path) for path in args.check]
    safe_io.check_output_file(args.output, inputs=inputs, kind=OUTPUT_KIND, is_kind=is_exported_onnx,
                              overwrite=args.overwrite)


def main(args):
    for module, package in (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime")):
        require(module, package)
    check_output(args)
    model, model_name, categories = models.load_detector(args.weights, args.model)
    class_names = models.class_names(categories)
    if args.score_thresh is not None:
        model.score_thresh = args.score_thresh
    batch = load_check_batch(args.check, model.size)
    # The reference is the model's normal eval path (list in, per-image dicts out), so the check covers the whole
    # exported pipeline, not detect() against itself.
    with torch.inference_mode():
        references = model(list(batch))

    start = time.time()
    export_onnx(model, args.output, args.opset, metadata={
        "model": model_name, "weights": args.weights, "input_size": json.dumps(list(model.size)),
        "score_thresh": str(model.score_thresh), "categories": json.dumps(class_names),
    })
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB) in {time.time() - start:.0f} s")

    if not any(len(reference["scores"]) for reference in references):
        print("note: no detection above the score threshold on these images, so only empty outputs were compared; "
              "give --check images with objects or a lower --score-thresh for a stronger check")
    if not check_against_pytorch(references, args.output, batch):
        sys.exit(f"export.py: {args.output} does not reproduce the PyTorch detections (see above)")
    print(f"{args.output} reproduces the PyTorch detections on {len(batch)} images")


if __name__ == "__main__":
    cli.survive_closed_output()
    try:
        main(get_args_parser().parse_args())
    except (cli.UserInputError, models.WeightsError) as error:
        sys.exit(f"export.py: {error}")
    except OSError as error:  # the final write (a full disk, a folder gone): one line naming --output
        sys.exit(f"export.py: {cli.one_line(error)}")
    except KeyboardInterrupt:
        print("export.py: interrupted; no partial ONNX file was left", file=sys.stderr)
        sys.exit(130)

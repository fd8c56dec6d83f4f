"""What several test modules share: running the scripts and the timeouts that catch their hangs, the tiny training
run's flags, model pairs with torchvision's SSD (the oracle) and comparisons of their outputs, a lively checkpoint,
the one writer of COCO-layout folders, and ground truth with detections for COCO evaluation. Plain functions and
constants; the fixtures built on them are in conftest.py."""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import nn
from torchvision.models.detection import ssd300_vgg16 as tv_ssd300_vgg16
from torchvision.models.detection import ssdlite320_mobilenet_v3_large as tv_ssdlite

import coco_utils
from coco_eval import CocoEvaluator
import models
from models.postprocess import match_detections

REPO = Path(__file__).resolve().parent.parent
SSD300, LITE = "ssd300_vgg16", "ssdlite320_mobilenet_v3_large"
SSD512 = "ssd512_vgg16"  # no torchvision counterpart
TORCHVISION_BUILDERS = {SSD300: tv_ssd300_vgg16, LITE: tv_ssdlite}

# ---------------------------------------------------------------------------------------------------------
# Running the scripts

# Small enough for seconds per epoch on 2 CPU cores; an odd val count exercises distributed padding.
TINY_SHAPES = {"num_train": 24, "num_val": 11}

# Timeouts in tests only catch hangs; they never measure. They are far above what any run needs, so that a machine
# busy with other work cannot reach them; SSD_TEST_TIMEOUT_SCALE multiplies every one (below 1 to give up on a
# hang sooner, above 1 on a machine slower still).
TIMEOUT_SCALE = float(os.environ.get("SSD_TEST_TIMEOUT_SCALE", "1"))


def hang_timeout(seconds):
    """seconds, scaled by SSD_TEST_TIMEOUT_SCALE."""
    return seconds * TIMEOUT_SCALE


# The longest any one script run, or any wait on one, may take before the test calls it a hang: training included.
SCRIPT_TIMEOUT = hang_timeout(1800)


def run_script(script, *args, cwd=None, env=None, launcher=None):
    """Run one of the repo's scripts the way a user would and return the CompletedProcess."""
    command = (launcher or [sys.executable]) + [str(REPO / script), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd or REPO, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT,
                          env=full_env)


# Runs each case the way `python SCRIPT ARGS` runs it (the script executed as __main__, its SystemExit turned into
# the exit code and the message the interpreter would print), all in one interpreter: a process per case would pay
# for importing torch each time. For cases that end before anything runs in the background (refusals, one-line
# errors); tests/test_safety.py::test_a_refusal_from_a_real_process covers the process boundary itself.
CASE_RUNNER = """
import contextlib, io, json, os, runpy, sys, traceback
sys.path.insert(0, {repo!r})
cases_path, results_path = sys.argv[1:3]
results = {{}}
for name, (script, argv) in json.load(open(cases_path)).items():
    sys.argv = [script] + argv
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(os.path.join({repo!r}, script), run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            code = "uncaught"
            traceback.print_exc()
    results[name] = [code, stdout.getvalue(), stderr.getvalue()]
json.dump(results, open(results_path, "w"))
"""


def run_in_one_interpreter(cases, folder):
    """{name: CompletedProcess} for cases {name: (script, args)}, each run as `python script args` would end it,
    one after the other in one interpreter (see CASE_RUNNER); folder holds the runner and its files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cases.json").write_text(json.dumps({name: [script, [str(arg) for arg in args]]
                                                   for name, (script, args) in cases.items()}))
    (folder / "runner.py").write_text(CASE_RUNNER.format(repo=str(REPO)))
    subprocess.run([sys.executable, str(folder / "runner.py"), str(folder / "cases.json"),
                    str(folder / "results.json")], cwd=REPO, check=True, timeout=SCRIPT_TIMEOUT,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    results = json.loads((folder / "results.json").read_text())
    return {name: subprocess.CompletedProcess([script, *map(str, args)], *results[str(name)])
            for name, (script, args) in cases.items()}


def torchrun(nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def train_args(data_path, output_dir, *extra, epochs=2):
    """The flags of a short, seeded SSDlite run on the tiny shapes dataset."""
    return [
        "--dataset", "shapes", "--data-path", data_path,
        "--shapes-num-train", TINY_SHAPES["num_train"], "--shapes-num-val", TINY_SHAPES["num_val"],
        "--model", LITE, "--epochs", epochs, "-b", 4, "--lr", 0.01, "--lr-scheduler", "cosineannealinglr",
        "--weight-decay", 4e-5, "--warmup-iters", 3, "-j", 0, "--print-freq", 2, "--seed", 0,
        "--eval-batch-size", 4, "--output-dir", output_dir, *extra,
    ]


def read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-3000:]}"


AP_LINE = re.compile(r"Average Precision\s+\(AP\) @\[ IoU=0.50:0.95 \| area=\s*all \| maxDets=100 \] = (-?[0-9.]+)")


def printed_ap(stdout):
    """The last AP@[.50:.95] a script printed in a COCO table."""
    values = AP_LINE.findall(stdout)
    assert values, f"no COCO AP table in the output:\n{stdout[-2000:]}"
    return float(values[-1])


# ---------------------------------------------------------------------------------------------------------
# Our models next to torchvision's

# Images of several sizes and aspect ratios, two of the same size (resized in one call).
IMAGE_SIZES = [(240, 320), (410, 170), (240, 320)]


def make_realistic(model: nn.Module, background: float, reinit: bool) -> None:
    """Weights that act like a trained detector's: class logits biased towards background, with three
    classes well above the rest, so that the score threshold, the per-class top-k and NMS all have work.
    Unlike bench.build_models, which calibrates on images for realistic timing, these are fixed offsets with
    favoured classes 1-3, so that tests of thresholds and NMS see the same detections on every machine.
    reinit: variance-preserving convolutions (SSDlite's own init makes random-weight activations vanish)."""
    torch.manual_seed(0)
    if reinit:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    for level in model.head.classification_head.module_list:
        last_conv = [m for m in level.modules() if isinstance(m, nn.Conv2d)][-1]
        with torch.no_grad():
            bias = last_conv.bias.view(-1, model.head.classification_head.num_columns)
            bias[:, 0] += background
            bias[:, 1:4] += torch.tensor([3.0, 2.0, 1.0])


def model_pair(name: str, background: float = 8.0):
    """(ours, torchvision's) with the same realistic weights, in eval mode."""
    torch.manual_seed(0)
    theirs = TORCHVISION_BUILDERS[name](weights=None, weights_backbone=None)
    make_realistic(theirs, background, reinit=name == LITE)
    ours = models.get_model(name)
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs.eval()


def random_images(sizes=IMAGE_SIZES, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


def random_targets(box_counts, sizes, num_classes=91, seed=2):
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count, (height, width) in zip(box_counts, sizes):
        corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 0.7
        extent = (torch.rand(count, 2, generator=generator) * 0.5 + 0.05) * torch.tensor([width, height])
        boxes = torch.cat([corner, torch.minimum(corner + extent, torch.tensor([width, height]))], dim=1)
        labels = torch.randint(1, num_classes, (count,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "image_id": torch.tensor(len(targets))})
    return targets


def sgd_step(model, images, targets):
    """One training forward and SGD step; the losses."""
    model.train()
    losses = model(images, targets)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    sum(losses.values()).backward()
    optimizer.step()
    return {key: value.detach() for key, value in losses.items()}


def assert_same_detections(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for image, (mine, reference) in enumerate(zip(ours, theirs)):
        assert torch.equal(mine["labels"], reference["labels"]), f"image {image}"
        torch.testing.assert_close(mine["boxes"], reference["boxes"], atol=1e-4, rtol=0, msg=f"image {image}")
        torch.testing.assert_close(mine["scores"], reference["scores"], atol=1e-4, rtol=0, msg=f"image {image}")


def assert_detections_match_to_rounding(ours: list[dict], theirs: list[dict], top: int = 100,
                                        box_tolerance: float = 0.01) -> None:
    """Each of our `top` best detections pairs one to one with one of theirs with its label, a box within
    box_tolerance pixels and a score within 1e-4: near-tied scores may swap places when kernels sum in another
    order."""
    for image, (mine, reference) in enumerate(zip(ours, theirs)):
        best = {key: value[:top] for key, value in mine.items()}
        matched, worst_box, worst_score = match_detections(reference, best, box_tolerance=0.05, score_tolerance=5e-4)
        assert matched == len(best["labels"]), f"image {image}: {len(best['labels']) - matched} detections unpaired"
        assert worst_box < box_tolerance, f"image {image}: a box moved by {worst_box:.3g} pixels"
        assert worst_score <= 1e-4, f"image {image}: a score moved by {worst_score:.3g}"


# ---------------------------------------------------------------------------------------------------------
# A checkpoint whose detections depend on the image

CATEGORIES = {1: "circle", 2: "rectangle", 3: "triangle"}
FAVOURED_LABEL = 2


def save_lively_checkpoint(path):
    """Save a train.py-style SSDlite checkpoint whose scores depend on the image and are spread out, with class
    FAVOURED_LABEL ahead of the others; return the model (eval mode).

    A freshly initialised SSDlite scores every anchor the same: its BatchNorm layers still hold the default
    running statistics, under which the activations vanish. Estimating them on a few random images (as a
    first training step would) gives features of unit scale, hence image-dependent, well separated scores.
    """
    torch.manual_seed(0)
    model = models.get_model(LITE, num_classes=len(CATEGORIES) + 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # running statistics = the plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model.head(model.backbone(torch.randn(4, 3, *model.size)))
        for name, parameter in model.head.named_parameters():
            # The last 1x1 conv of each level: its channels are (anchor, class) pairs, class fastest.
            if name.startswith("classification_head") and name.endswith(".1.bias"):
                parameter.view(-1, model.num_classes)[:, FAVOURED_LABEL] += 1.0
    torch.save({"model": model.state_dict(), "epoch": 0, "args": {"model": LITE}, "categories": CATEGORIES}, path)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# COCO-layout folders

THING = ({"id": 1, "name": "thing"},)


def write_coco_folder(root, pictures, annotations=(), categories=THING, splits=("train", "val"),
                      layout=coco_utils.SPLITS, images=None, top_level=None, annotation_text=None):
    """Write a dataset in COCO's folder layout (or a tool's: layout maps each split to its image folder and
    annotation file, relative to root): each split gets the pictures and an annotation file that lists them.
    Returns {split: (image folder, annotation file)}.

    pictures: {file name: picture}, a picture being a PIL image, a (PIL image, save options) pair, an HxWx3
      uint8 array, or the path of an image file to copy.
    images: the file's image entries as given; by default one per picture, with ids 1, 2, ... in order and the
      picture's size (an entry may name a file that is not there, or one outside the folder).
    annotations: the annotation entries as given; None leaves the key out, as in an image-info file (test-dev).
    top_level: other top-level entries, written first, as tools write "info" and "licenses".
    annotation_text: {split: text} written instead of that split's json, for malformed files.
    """
    if images is None:
        sizes = [picture_size(picture) for picture in pictures.values()]
        images = [{"id": n + 1, "file_name": name, "width": width, "height": height}
                  for n, (name, (width, height)) in enumerate(zip(pictures, sizes))]
    content = {**(top_level or {}), "images": list(images), "annotations": list(annotations or ()),
               "categories": list(categories)}
    if annotations is None:
        del content["annotations"]
    paths = {}
    for split in splits:
        folder, annotation_file = (Path(root) / part for part in layout[split])
        folder.mkdir(parents=True, exist_ok=True)
        annotation_file.parent.mkdir(parents=True, exist_ok=True)
        for name, picture in pictures.items():
            save_picture(picture, folder / name)
        annotation_file.write_text((annotation_text or {}).get(split, json.dumps(content)))
        paths[split] = folder, annotation_file
    return paths


def picture_size(picture):
    """(width, height) of one of write_coco_folder's pictures."""
    if isinstance(picture, (str, Path)):
        with Image.open(picture) as image:
            return image.size
    image = picture[0] if isinstance(picture, tuple) else picture
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def save_picture(picture, path):
    """Write one of write_coco_folder's pictures to path: copied, or saved in the format path's suffix says."""
    if isinstance(picture, (str, Path)):
        shutil.copyfile(picture, path)
        return
    image, options = picture if isinstance(picture, tuple) else (picture, {})
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path, **options)


# ---------------------------------------------------------------------------------------------------------
# Ground truth and detections for COCO evaluation

EVAL_CATEGORY_IDS = [1, 5, 9]  # non-contiguous, like COCO's


def write_gt(tmp_path, images, annotations):
    """images: [(id, width, height)]; annotations: [(image_id, category_id, [x, y, w, h])] -> path of the json."""
    gt = {
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.png"} for i, w, h in images],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for n, (i, c, box) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": f"class{c}"} for c in EVAL_CATEGORY_IDS],
    }
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(gt))
    return path


def load_gt(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def prediction(boxes_xyxy=(), scores=(), labels=()):
    return {
        "boxes": torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def jittered_evaluation(tmp_path, num_images, detections_per_image, seed=0):
    """A GT file with 1-4 objects of every size per image, and noisy detections: jittered copies of the objects
    (some with the wrong class) plus random boxes. Returns (gt_path, {image_id: prediction})."""
    rng = np.random.RandomState(seed)
    images, annotations, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        width, height = rng.randint(200, 640, size=2)
        images.append((image_id, int(width), int(height)))
        gt_boxes = []
        for _ in range(rng.randint(1, 5)):
            w, h = np.exp(rng.uniform(np.log(8), np.log([0.6 * width, 0.6 * height])))
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            box = [round(float(v), 2) for v in (x, y, w, h)]
            annotations.append((image_id, int(rng.choice(EVAL_CATEGORY_IDS)), box))
            gt_boxes.append(annotations[-1])
        boxes, scores, labels = [], [], []
        for n in range(detections_per_image):
            if n < 2 * len(gt_boxes):
                _, category, (x, y, w, h) = gt_boxes[n % len(gt_boxes)]
                x, y = x + rng.normal(0, 0.05 * w), y + rng.normal(0, 0.05 * h)
                w, h = w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)
                if rng.rand() < 0.2:
                    category = int(rng.choice(EVAL_CATEGORY_IDS))
                score = rng.uniform(0.3, 1.0)
            else:
                w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                category = int(rng.choice(EVAL_CATEGORY_IDS))
                score = rng.uniform(0.05, 0.6)
            boxes.append([x, y, x + w, y + h])
            scores.append(score)
            labels.append(category)
        predictions[image_id] = prediction(boxes, scores, labels)
    return write_gt(tmp_path, images, annotations), predictions


def evaluate(gt_path, *updates, backend="pycocotools"):
    evaluator = CocoEvaluator(load_gt(gt_path), backend=backend)
    for predictions in updates:
        evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    return evaluator.stats


# ---------------------------------------------------------------------- tiny runs as real processes, with signals

# 8 training images at batch 2: four steps per epoch; --eval-freq 2 skips evaluation after epoch 0.
TINY = {"num_train": 8, "num_val": 2}


def tiny_run_args(data_path, output_dir, *extra, epochs=2):
    return ["--dataset", "shapes", "--data-path", data_path, "--shapes-num-train", TINY["num_train"],
            "--shapes-num-val", TINY["num_val"], "--model", LITE, "--epochs", epochs, "-b", 2, "--lr", 0.01,
            "--lr-scheduler", "cosineannealinglr", "--warmup-iters", 1, "-j", 0, "--print-freq", 1, "--seed", 0,
            "--eval-freq", 2, "--eval-batch-size", 2, "--output-dir", output_dir, *extra]


def snapshot(directory):
    """sha256 of every file under directory, by relative path."""
    root = Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def stderr_lines(result_stderr):
    return [line for line in result_stderr.splitlines() if line.strip()]


def assert_one_line(returncode, stderr, expected_code, *fragments):
    """The exit code, exactly one stderr line, no traceback, and the line names what it must."""
    assert returncode == expected_code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]


def start_train(*args, launcher=None, prefix=()):
    command = [*prefix, sys.executable, *(launcher or [str(REPO / "train.py")]), *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def permission_bits_bind():
    """A command prefix under which a folder's permission bits stop this process from writing there. Root's
    capabilities override them (so chmod alone tests nothing when the tests run as root); util-linux's setpriv
    drops those capabilities from the process it starts. Skips where neither holds."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to bind")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def wait_for_line(process, pattern):
    """Read process's stdout until a line matches pattern; returns the lines read."""
    deadline, seen = time.monotonic() + SCRIPT_TIMEOUT, []
    for line in process.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return seen
        assert time.monotonic() < deadline, "".join(seen[-30:])
    raise AssertionError(f"{pattern!r} never printed; exit {process.wait()}: {process.stderr.read()[-3000:]}")


def finish(process):
    stdout, stderr = process.communicate(timeout=SCRIPT_TIMEOUT)
    return process.returncode, stdout, stderr


def temp_files(directory):
    return [p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp")]


# A launcher that runs train.py unchanged in a real process, with torch.save (not our code) made slow once and
# announcing itself, so that the test can send a real signal while the first checkpoint file is being written.
SLOW_SAVE_LAUNCHER = """
import runpy, sys, time
sys.path.insert(0, {repo!r})
import torch
real_save, calls = torch.save, []
def slow_save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if not calls:
        calls.append(1)
        print("SAVE-IN-PROGRESS", flush=True)
        time.sleep(3)
torch.save = slow_save
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


# The same with every SGD step (torch's, not ours) made slower, so that a signal sent after the first step's line
# reliably lands while the epoch is still training, however fast the machine.
SLOW_STEP_LAUNCHER = """
import runpy, sys, time
sys.path.insert(0, {repo!r})
import torch
real_step = torch.optim.SGD.step
def slow_step(self, *args, **kwargs):
    time.sleep({step_seconds})
    return real_step(self, *args, **kwargs)
torch.optim.SGD.step = slow_step
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


def launcher(template, folder, step_seconds=0.5):
    path = folder / "launcher.py"
    path.write_text(template.format(repo=str(REPO), train=str(REPO / "train.py"), step_seconds=step_seconds))
    return [str(path)]

"""SSD512 VGG16, the SSD paper's model that torchvision does not have: its feature maps and heads, its default boxes
against the paper's Caffe numbers (recomputed here from the Caffe scripts' formulas), its weights (VGG16 trunk,
fine-tuning from SSD300, refusals), the layout rules shared with SSD300, --compile, and train.py / predict.py /
export.py end to end on a tiny shapes set."""
import copy
import json
import math
import os

import pytest
import torch
import torchvision

import models
from helpers import (SSD300, SSD512, assert_detections_match_to_rounding, assert_ok, make_realistic, random_images,
                     run_script, sgd_step)

GRID_SIZES = [64, 32, 16, 8, 4, 2, 1]
BOXES_PER_LOCATION = [4, 6, 6, 6, 6, 4, 4]
CHANNELS = [512, 1024, 512, 256, 256, 256, 256]


def caffe_box_sizes(min_ratio, max_ratio, first_min_ratio, first_max_ratio, image_size=512, num_maps=7):
    """(minimum sizes, maximum sizes) in pixels as the paper's Caffe scripts compute them (ssd_coco.py,
    ssd_pascal_512.py): ratios from min_ratio to max_ratio percent in integer steps over all maps but the first,
    which gets its own."""
    step = int(math.floor((max_ratio - min_ratio) / (num_maps - 2)))
    ratios = range(min_ratio, max_ratio + 1, step)
    min_sizes = [image_size * first_min_ratio / 100] + [image_size * r / 100 for r in ratios]
    max_sizes = [image_size * first_max_ratio / 100] + [image_size * (r + step) / 100 for r in ratios]
    return min_sizes, max_sizes


COCO_SIZES = caffe_box_sizes(10, 90, 4, 10)
VOC_SIZES = caffe_box_sizes(15, 90, 7, 15)


def test_caffe_formulas_give_the_issues_numbers():
    assert COCO_SIZES[0] == pytest.approx([20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8])
    assert COCO_SIZES[1] == pytest.approx([51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72])
    assert VOC_SIZES[0] == pytest.approx([35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8])
    assert VOC_SIZES[1][-1] == pytest.approx(537.6)


@pytest.fixture(scope="module")
def ssd512():
    torch.manual_seed(0)
    return models.get_model(SSD512, num_classes=6).eval()


def test_feature_maps_and_heads_have_the_papers_shapes(ssd512):
    with torch.no_grad():
        features = ssd512.backbone(torch.zeros(2, 3, 512, 512))
        outputs = ssd512.head(features)
    assert [tuple(f.shape) for f in features] == [(2, c, g, g) for c, g in zip(CHANNELS, GRID_SIZES)]
    num_boxes = sum(g * g * b for g, b in zip(GRID_SIZES, BOXES_PER_LOCATION))
    assert outputs["cls_logits"].shape == (2, num_boxes, 6)
    assert outputs["bbox_regression"].shape == (2, num_boxes, 4)
    for heads, columns in ((ssd512.head.classification_head, 6), (ssd512.head.regression_head, 4)):
        assert [(conv.in_channels, conv.out_channels, conv.kernel_size) for conv in heads.module_list] == \
               [(c, b * columns, (3, 3)) for c, b in zip(CHANNELS, BOXES_PER_LOCATION)]
    last = ssd512.backbone.extra[-1][-2]
    assert (last.kernel_size, last.stride, last.padding) == ((4, 4), (1, 1), (1, 1))  # the Caffe model's conv10_2


def expected_boxes(level, row, column, sizes):
    """The default boxes at one cell of one map, as the paper defines them, sorted: XYXY pixels."""
    step = 512 / GRID_SIZES[level]
    cx, cy = (column + 0.5) * step, (row + 0.5) * step
    smallest, largest = sizes[0][level], sizes[1][level]
    shapes = [(smallest, smallest), (math.sqrt(smallest * largest),) * 2]
    for ratio in [2] + [3] * (BOXES_PER_LOCATION[level] == 6):
        shapes += [(smallest * math.sqrt(ratio), smallest / math.sqrt(ratio)),
                   (smallest / math.sqrt(ratio), smallest * math.sqrt(ratio))]
    return sorted((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) for w, h in shapes)


@pytest.mark.parametrize("option, sizes", [(None, COCO_SIZES), ("voc", VOC_SIZES)])
def test_default_boxes_are_the_papers(option, sizes):
    model = models.get_model(SSD512, **({"default_boxes": option} if option else {}))
    boxes = model.anchor_generator([(g, g) for g in GRID_SIZES], (512, 512)).double()
    counts = [g * g * b for g, b in zip(GRID_SIZES, BOXES_PER_LOCATION)]
    assert len(boxes) == sum(counts) == 24_564
    starts = [sum(counts[:k]) for k in range(len(counts))]
    for level, grid in enumerate(GRID_SIZES):
        for row, column in {(0, 0), (grid - 1, grid - 1), (grid // 2, grid // 3)}:
            first = starts[level] + (row * grid + column) * BOXES_PER_LOCATION[level]
            ours = torch.tensor(sorted(map(tuple, boxes[first:first + BOXES_PER_LOCATION[level]].tolist())),
                                dtype=torch.float64)
            expected = torch.tensor(expected_boxes(level, row, column, sizes), dtype=torch.float64)
            torch.testing.assert_close(ours, expected, atol=1e-3, rtol=0, msg=f"map {level}, cell {row}, {column}")


def test_state_dict_is_ssd300s_plus_a_seventh_map():
    ours, ssd300 = (models.get_model(name).state_dict() for name in (SSD512, SSD300))
    added = set(ours) - set(ssd300)
    assert set(ssd300) <= set(ours)
    assert added == {f"backbone.extra.5.{n}.{kind}" for n in (0, 2) for kind in ("weight", "bias")} | \
           {f"head.{head}.module_list.6.{kind}" for head in ("classification_head", "regression_head")
            for kind in ("weight", "bias")}


def test_unknown_default_boxes_and_unpublished_weights_are_refused_in_one_line():
    with pytest.raises(ValueError, match="default_boxes must be one of coco, voc, got 'pascal'"):
        models.get_model(SSD512, default_boxes="pascal")
    with pytest.raises(models.WeightsError) as error:
        models.get_model(SSD512, weights="SSD512_VGG16_Weights.COCO_V1")
    assert str(error.value) == ("weights 'SSD512_VGG16_Weights.COCO_V1' are not an existing file, and torchvision "
                                "publishes no ssd512_vgg16 weights")
    # A fine-tune may start from SSD300's names, so they are offered (nothing is downloaded before the refusal).
    with pytest.raises(models.WeightsError) as error:
        models.get_model(SSD512, weights="SSD512_VGG16_Weights.COCO_V1", class_names={1: "cat"})
    assert str(error.value) == ("weights 'SSD512_VGG16_Weights.COCO_V1' are neither an existing file nor one of "
                                "SSD300_VGG16_Weights.COCO_V1, SSD300_VGG16_Weights.DEFAULT (torchvision publishes no "
                                "ssd512_vgg16 weights)")


def test_channels_last_rule_is_ssd300s(monkeypatch):
    for device in ("cpu", "cuda", "mps"):
        for training in (True, False):
            assert models.prefers_channels_last(SSD512, device, training) == \
                   models.prefers_channels_last(SSD300, device, training)
    # The AVX-512 half of the rule, whatever this machine has.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert models.prefers_channels_last(SSD512, "cpu", True) == models.prefers_channels_last(SSD300, "cpu", True)


@pytest.fixture(scope="module")
def ssd300_checkpoint(tmp_path_factory):
    """A train.py-style SSD300 checkpoint for 3 classes, every tensor moved away from the builder's init."""
    torch.manual_seed(0)
    source = models.get_model(SSD300, num_classes=4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
    path = tmp_path_factory.mktemp("ssd300") / "model_9.pth"
    torch.save({"model": source.state_dict(), "args": {"model": SSD300},
                "categories": {1: {"id": 1, "name": "cat"}, 2: {"id": 2, "name": "dog"}, 3: {"id": 3, "name": "cow"}}},
               path)
    return path, source.state_dict()


def test_fine_tuning_from_ssd300_copies_what_fits_and_initialises_the_rest(ssd300_checkpoint, capsys):
    path, source = ssd300_checkpoint
    new_classes = {1: "Cow", 2: "cat", 3: "horse"}
    torch.manual_seed(7)
    fresh = models.get_model(SSD512, num_classes=4).state_dict()
    torch.manual_seed(7)
    state = models.get_model(SSD512, weights=path, class_names=new_classes).state_dict()
    line = capsys.readouterr().out.strip()

    classifier = {key for key in state if key.startswith("head.classification_head")}
    fitting = {key for key in state
               if key in source and key not in classifier and state[key].shape == source[key].shape}
    # The trunk, fc6/fc7, conv8_2 ... conv11_2 (same shapes in both) and the regression heads of maps 0-3 and 5.
    assert len(fitting) == 57 and "backbone.extra.4.2.weight" in fitting and "backbone.scale_weight" in fitting
    assert "head.regression_head.module_list.4.weight" not in fitting  # 6 boxes per location here, 4 in SSD300
    for key in fitting:
        assert torch.equal(state[key], source[key]), key
    for key in set(state) - fitting - classifier:
        assert torch.equal(state[key], fresh[key]), key
    # Maps with as many boxes per location: rows of background, cow and cat from the source, horse's fresh.
    for level in (0, 1, 2, 3, 5):
        for kind in ("weight", "bias"):
            key = f"head.classification_head.module_list.{level}.{kind}"
            new, old, init = (t[key].view(-1, 4, *t[key].shape[1:]) for t in (state, source, fresh))
            assert torch.equal(new[:, :3], old[:, [0, 3, 1]]) and torch.equal(new[:, 3], init[:, 3]), key
    for level in (4, 6):
        assert torch.equal(state[f"head.classification_head.module_list.{level}.weight"],
                           fresh[f"head.classification_head.module_list.{level}.weight"])

    assert "\n" not in line and "weights of ssd300_vgg16" in line and "copied the 57 of 79 tensors" in line
    assert "'Cow'<-'cow'" in line and "'cat'<-'cat'" in line and "1 class starts from scratch ('horse')" in line
    assert "initialised 12 tensors (backbone.extra.5.0.weight" in line


def test_torchvisions_ssd300_coco_weights_start_a_fine_tune(torch_home, capsys):
    torch.manual_seed(0)
    coco = models.get_model(SSD300).state_dict()
    url = torchvision.models.get_weight("SSD300_VGG16_Weights.COCO_V1").url
    torch.save(coco, torch_home / os.path.basename(url))  # planted in the hub cache: nothing is downloaded
    state = models.get_model(SSD512, weights="SSD300_VGG16_Weights.COCO_V1",
                             class_names={1: "person", 2: "zebra-crossing"}).state_dict()
    line = capsys.readouterr().out.strip()
    assert line.startswith("fine-tuning SSD300_VGG16_Weights.COCO_V1, weights of ssd300_vgg16, for 3 classes")
    assert "(91 classes there)" in line and "'person'<-'person'" in line
    assert torch.equal(state["backbone.extra.4.2.weight"], coco["backbone.extra.4.2.weight"])


def test_ssd300_weights_never_load_as_they_are(ssd300_checkpoint):
    path, _ = ssd300_checkpoint
    with pytest.raises(models.WeightsError, match="of ssd300_vgg16, which ssd512_vgg16 only starts a fine-tune"):
        models.get_model(SSD512, weights=path)
    with pytest.raises(models.WeightsError, match="model ssd512_vgg16 does not match weights .* ssd300_vgg16"):
        models.load_detector(path, SSD512)


@pytest.mark.slow
def test_training_step_changes_every_map():
    """Targets that are default boxes of every map (a square at a middle cell of each), on 256 px images (half the
    input size), so every map has matched anchors: one SGD step moves every head and every extra block."""
    torch.manual_seed(0)
    model = models.get_model(SSD512, num_classes=5)
    anchors = model.anchor_generator([(g, g) for g in GRID_SIZES], (512, 512))
    counts = [g * g * b for g, b in zip(GRID_SIZES, BOXES_PER_LOCATION)]
    middle_squares = [sum(counts[:k]) + ((g // 2) * g + g // 2) * b
                      for k, (g, b) in enumerate(zip(GRID_SIZES, BOXES_PER_LOCATION))]
    boxes = anchors[middle_squares] / 2
    targets = [{"boxes": boxes, "labels": torch.arange(7) % 4 + 1},
               {"boxes": boxes[::2], "labels": torch.ones(4, dtype=torch.int64)}]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = sgd_step(model, random_images([(256, 256)] * 2), targets)
    assert all(torch.isfinite(loss) and loss > 0 for loss in losses.values())
    after = dict(model.named_parameters())
    for level in range(7):
        for head in ("regression_head", "classification_head"):
            name = f"head.{head}.module_list.{level}.weight"
            assert not torch.equal(before[name], after[name]), name
    assert not torch.equal(before["backbone.extra.5.2.weight"], after["backbone.extra.5.2.weight"])


@pytest.mark.slow
def test_compiled_detections_equal_eager():
    """--compile as train.py --test-only and predict.py use it (the eval graph, channels_last as on AVX-512 CPUs):
    the seventh map and its 4x4 convolution compile like the rest."""
    eager = models.get_model(SSD512, num_classes=5).eval().to(memory_format=torch.channels_last)
    make_realistic(eager, background=8.0, reinit=False)
    compiled = copy.deepcopy(eager)
    models.compile_network(compiled, training=False)
    images = random_images([(300, 400), (512, 512)])
    with torch.inference_mode():
        expected = eager(images)
        assert_detections_match_to_rounding(compiled(images), expected, box_tolerance=0.03)
    assert all(len(detections["scores"]) > 20 for detections in expected)  # detections to compare


# ---------------------------------------------------------------------------------------------------------
# The scripts end to end: two 2-image epochs at batch 2 (SSD512 on CPU is heavy)

TINY = {"num_train": 4, "num_val": 2}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """train.py for one epoch with the VOC default boxes, then resumed for a second: (data root, output dir)."""
    import shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    shapes.ensure_shapes_dataset(root, **TINY)
    output_dir = tmp_path_factory.mktemp("run") / "out"
    common = ["--dataset", "shapes", "--data-path", root, "--shapes-num-train", TINY["num_train"],
              "--shapes-num-val", TINY["num_val"], "--model", SSD512, "--default-boxes", "voc", "-b", 2,
              "--lr", 0.001, "--workers", 0, "--seed", 0, "--eval-batch-size", 2, "--output-dir", output_dir]
    assert_ok(run_script("train.py", *common, "--epochs", 1))
    resumed = run_script("train.py", *common, "--epochs", 2, "--resume", output_dir / "checkpoint.pth")
    assert_ok(resumed)
    return root, output_dir, resumed


@pytest.mark.slow
def test_train_resume_and_test_only(tiny_run):
    root, output_dir, resumed = tiny_run
    assert "Epoch: [1]" in resumed.stdout and "Epoch: [0]" not in resumed.stdout
    checkpoint = torch.load(output_dir / "model_1.pth", map_location="cpu", weights_only=True)
    assert checkpoint["args"]["model"] == SSD512 and checkpoint["args"]["default_boxes"] == "voc"
    result = run_script("train.py", "--dataset", "shapes", "--data-path", root, "--shapes-num-train",
                        TINY["num_train"], "--shapes-num-val", TINY["num_val"], "--model", SSD512, "--test-only",
                        "--weights", output_dir / "model_1.pth", "--workers", 0, "--eval-batch-size", 2,
                        "--output-dir", output_dir / "eval")
    assert_ok(result)  # without --default-boxes: the weights' own (VOC) boxes, said in one line
    assert f"--default-boxes voc: those --weights {output_dir / 'model_1.pth'} were trained with" in result.stdout
    assert "Average Precision" in result.stdout
    metrics = json.loads((output_dir / "eval" / "metrics.json").read_text())
    assert metrics["evaluated"]["model"] == SSD512 and metrics["evaluated"]["args"]["default_boxes"] == "voc"


@pytest.mark.slow
def test_default_boxes_of_other_models_and_other_runs_are_refused(tiny_run, tmp_path):
    root, output_dir, _ = tiny_run
    result = run_script("train.py", "--dataset", "shapes", "--data-path", root, "--model", SSD300,
                        "--default-boxes", "voc", "--output-dir", tmp_path / "x")
    assert result.returncode != 0
    assert "--default-boxes is an option of --model ssd512_vgg16, not of --model ssd300_vgg16" in result.stderr
    result = run_script("train.py", "--dataset", "shapes", "--data-path", root, "--shapes-num-train",
                        TINY["num_train"], "--shapes-num-val", TINY["num_val"], "--model", SSD512, "--epochs", 3,
                        "--resume", output_dir / "checkpoint.pth", "--output-dir", output_dir)
    assert result.returncode != 0 and "was trained with --default-boxes voc" in result.stderr
    result = run_script("train.py", "--dataset", "shapes", "--data-path", root, "--shapes-num-train",
                        TINY["num_train"], "--shapes-num-val", TINY["num_val"], "--model", SSD512, "--test-only",
                        "--weights", output_dir / "model_1.pth", "--default-boxes", "coco", "--output-dir", "")
    assert result.returncode != 0
    assert "were trained with --default-boxes voc: evaluating them with --default-boxes coco" in result.stderr


@pytest.mark.slow
def test_predict_and_onnx_export_rebuild_the_checkpoints_default_boxes(tiny_run, tmp_path):
    root, output_dir, _ = tiny_run
    weights = output_dir / "model_1.pth"
    model, name, _ = models.load_detector(weights)
    assert name == SSD512 and model.anchor_generator.scales[0] == pytest.approx(35.84 / 512)  # VOC sizes

    images = sorted((root / "val2017").glob("*"))
    result = run_script("predict.py", "--weights", weights, "--score-thresh", 0.0, "--output-dir", tmp_path / "pred",
                        *images)
    assert_ok(result)
    summary = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert summary["model"] == SSD512 and len(summary["images"]) == len(images)
    assert all(record["detections"] for record in summary["images"])

    # Exported from a model whose scores depend on the image (two SGD steps of VGG16 from scratch leave every anchor
    # with the same scores, whose near-ties would make the comparison meaningless), with the run's VOC boxes.
    torch.manual_seed(0)
    lively = models.get_model(SSD512, num_classes=model.num_classes, default_boxes="voc")
    make_realistic(lively, background=8.0, reinit=False)
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "model": lively.state_dict()}, tmp_path / "lively.pth")
    result = run_script("export.py", "--weights", tmp_path / "lively.pth", "--output", tmp_path / "ssd512.onnx",
                        "--check", *images)
    assert_ok(result)
    assert "no detection above the score threshold" not in result.stdout
    assert result.stdout.count("-> OK") == len(images)
    assert f"reproduces the PyTorch detections on {len(images)} images" in result.stdout

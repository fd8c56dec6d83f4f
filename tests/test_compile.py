"""--compile (models.compile_network): compiled detections and losses equal eager's to float rounding, the
state_dict keeps its keys, train.py --test-only --compile eval prints eager's AP, and a missing C++ compiler
gives one line naming --compile.

Compiling takes minutes on 2 CPU cores with an empty inductor cache, so each graph is compiled once: the detection
test compiles the graph train.py --test-only then finds in inductor's on-disk cache (the same model, batch of 11
and layout), and the training test freezes the MobileNet body, which halves the backward graph to compile."""
import copy

import pytest
import torch
from PIL import Image
from torchvision.models.detection import ssdlite320_mobilenet_v3_large as tv_ssdlite

import coco_utils
import models
import presets
from helpers import (
    IMAGE_SIZES, LITE, TINY_SHAPES, assert_detections_match_to_rounding, assert_ok, make_realistic, printed_ap,
    random_images, random_targets, read_log, run_script, sgd_step, train_args,
)

# Left out of the quick loop (pytest -m "not slow"): compiling takes minutes on 2 CPU cores.
pytestmark = pytest.mark.slow

BOX_COUNTS = [0, 1, 25]  # an image without objects, one with one, one crowded


@pytest.fixture(scope="module")
def trained_model(trained_run):
    """The shapes run's last model as train.py --test-only runs it on CPU: eval mode, channels_last."""
    output_dir, _ = trained_run
    model, _, _ = models.load_detector(output_dir / "model_1.pth")
    return model.eval().to(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def realistic_pair(trained_model):
    """(eager, compiled for eval): the shapes model's architecture and layout with weights that score like a trained
    detector's (the 2-epoch model's scores are all near 1/6: ties that rounding reorders). Weights are inputs of
    the compiled graph, not part of it: train.py --test-only finds this graph in the cache for the trained weights."""
    torch.manual_seed(0)
    eager = models.get_model(LITE, num_classes=trained_model.num_classes).eval()
    eager.to(memory_format=torch.channels_last)
    make_realistic(eager, background=8.0, reinit=True)
    compiled = copy.deepcopy(eager)
    models.compile_network(compiled, training=False)
    return eager, compiled


def test_compiled_detections_equal_eager(realistic_pair, shapes_root):
    eager, compiled = realistic_pair
    validation = coco_utils.get_coco(shapes_root, "val", presets.DetectionPresetEval())
    images = [validation[i][0] for i in range(TINY_SHAPES["num_val"])]  # one batch, as --eval-batch-size 11
    with torch.inference_mode():
        expected = eager(images)
        # Rounding reaches 0.007 px on one of these images between eager's own two memory layouts (kernels that
        # sum in another order); the compiled kernels fuse differently again.
        assert_detections_match_to_rounding(compiled(images), expected, box_tolerance=0.03)
    assert sum(len(d["scores"]) for d in expected) > 100  # detections to compare, not empty lists


def largest_difference(state, reference):
    return max((state[key] - value).abs().max().item() for key, value in reference.items() if value.is_floating_point())


def test_compiled_training_step_equals_eager(trained_model):
    """Equal losses, and parameters after one SGD step as close to eager's as eager's own in the other memory format
    (the yardstick of float rounding here: per-tensor gradients are no test, BatchNorm biases followed by another
    BatchNorm have gradients that are rounding noise around zero). The MobileNet body is frozen, as when
    fine-tuning with trainable_backbone_layers=0: the extra blocks and heads train, through BatchNorm in training
    mode."""
    num_classes = trained_model.num_classes
    images, targets = random_images(IMAGE_SIZES), random_targets(BOX_COUNTS, IMAGE_SIZES, num_classes=num_classes)
    eager = copy.deepcopy(trained_model)
    eager.backbone.features.requires_grad_(False)
    compiled = copy.deepcopy(eager)
    models.compile_network(compiled, training=True)
    contiguous = copy.deepcopy(eager).to(memory_format=torch.contiguous_format)
    initial = copy.deepcopy(eager.state_dict())
    reference, mine = sgd_step(eager, images, targets), sgd_step(compiled, images, targets)
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=0, msg=key)
    sgd_step(contiguous, images, targets)
    rounding = largest_difference(contiguous.state_dict(), eager.state_dict())
    assert largest_difference(compiled.state_dict(), eager.state_dict()) <= 3 * rounding
    assert largest_difference(initial, eager.state_dict()) > 50 * rounding  # the step really moved the weights


def test_compiling_keeps_the_state_dict_loadable_strictly(trained_model, realistic_pair):
    compiled = realistic_pair[1]
    state = compiled.state_dict()
    assert list(state) == list(trained_model.state_dict())
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in compiled.modules())
    num_classes = trained_model.num_classes
    tv_ssdlite(weights=None, weights_backbone=None, num_classes=num_classes).load_state_dict(state, strict=True)
    models.get_model(LITE, num_classes=num_classes).load_state_dict(state, strict=True)


def test_eval_only_compile_leaves_training_eager(trained_model):
    """compile_network(training=False), train.py's --compile eval: a training step compiles nothing."""
    eval_only = copy.deepcopy(trained_model)
    models.compile_network(eval_only, training=False)
    frames_before = torch._dynamo.utils.counters["frames"]["total"]
    eval_only.train()
    eval_only(random_images(), random_targets(BOX_COUNTS, IMAGE_SIZES, num_classes=trained_model.num_classes))
    assert torch._dynamo.utils.counters["frames"]["total"] == frames_before


def test_test_only_compiled_prints_the_logged_ap(trained_run, shapes_root, tmp_path):
    """The AP table of train.py --test-only --compile eval equals the eager evaluation logged at the last epoch.
    One evaluation batch of all 11 images: the graph test_compiled_detections_equal_eager compiled."""
    output_dir, _ = trained_run
    logged = read_log(output_dir)[-1]["coco"]
    result = run_script("train.py", *train_args(shapes_root, "", "--test-only", "--compile", "eval",
                                                "--eval-batch-size", 11, "--weights", output_dir / "model_1.pth"),
                        cwd=tmp_path)
    assert_ok(result)
    assert printed_ap(result.stdout) == round(logged["AP"], 3)


def test_no_cxx_compiler_fails_in_one_line_naming_the_flag(tmp_path):
    """CPU kernels need a C++ compiler; without one (CXX pointing nowhere, an empty inductor cache) predict.py stops
    in one line before reading any image."""
    weights = tmp_path / "ssdlite.pth"
    torch.save(models.get_model(LITE, num_classes=4).state_dict(), weights)
    Image.new("RGB", (40, 30), (120, 80, 40)).save(tmp_path / "a.png")
    result = run_script("predict.py", "--model", LITE, "--weights", weights, "--output-dir", tmp_path / "out",
                        "--compile", tmp_path / "a.png",
                        env={"CXX": str(tmp_path / "no-such-compiler"),
                             "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("predict.py: --compile: torch.compile cannot compile for cpu here:") and "C++" in last, last
    assert not (tmp_path / "out" / "detections.json").exists()

"""--compile (models.compile_network): compiled detections and losses equal eager's to float rounding, the
state_dict keeps its keys, train.py --test-only --compile eval prints eager's AP, and a missing C++ compiler
gives one line naming --compile. Compiling takes minutes on 2 CPU cores with an empty inductor cache (seconds
with a warm one), so the in-process tests share one compiled model, and train.py compiles once (one eval batch)."""
import copy

import pytest
import torch
from PIL import Image
from torchvision.models.detection import ssdlite320_mobilenet_v3_large as tv_ssdlite

import models
from conftest import assert_ok, read_log, run_script, train_args
from test_models import (
    IMAGE_SIZES, LITE, assert_detections_match_to_rounding, model_pair, random_images, random_targets, sgd_step,
)
from test_train import printed_ap

BOX_COUNTS = [0, 1, 25]  # an image without objects, one with one, one crowded


@pytest.fixture(scope="module")
def eager_and_compiled():
    """SSDlite as our scripts run it on CPU (channels_last), eager and with its network compiled for both modes."""
    eager = model_pair(LITE)[0].to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    models.compile_network(compiled, training=True)
    return eager, compiled


def test_compiled_detections_equal_eager(eager_and_compiled):
    eager, compiled = eager_and_compiled
    images = random_images()
    with torch.inference_mode():
        expected = eager(images)
        assert_detections_match_to_rounding(compiled(images), expected)
        assert sum(len(d["scores"]) for d in expected) > 100  # detections to compare, not empty lists


def largest_difference(state, reference):
    return max((state[key] - value).abs().max().item() for key, value in reference.items() if value.is_floating_point())


def test_compiled_training_step_equals_eager(eager_and_compiled):
    """Equal losses, and parameters after one SGD step as close to eager's as eager's own in the other memory format
    (the yardstick of float rounding here: per-tensor gradients are no test, BatchNorm biases followed by another
    BatchNorm have gradients that are rounding noise around zero)."""
    images, targets = random_images(IMAGE_SIZES), random_targets(BOX_COUNTS, IMAGE_SIZES)
    # Copies, so the fixture's weights stay unstepped; a copy of the compiled model runs the same compiled network,
    # on its own weights.
    eager, compiled = (copy.deepcopy(model) for model in eager_and_compiled)
    contiguous = copy.deepcopy(eager).to(memory_format=torch.contiguous_format)
    initial = copy.deepcopy(eager.state_dict())
    reference, mine = sgd_step(eager, images, targets), sgd_step(compiled, images, targets)
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=0, msg=key)
    sgd_step(contiguous, images, targets)
    rounding = largest_difference(contiguous.state_dict(), eager.state_dict())
    assert largest_difference(compiled.state_dict(), eager.state_dict()) <= 3 * rounding
    assert largest_difference(initial, eager.state_dict()) > 50 * rounding  # the step really moved the weights


def test_compiling_keeps_the_state_dict_loadable_strictly(eager_and_compiled):
    eager, compiled = eager_and_compiled
    state = compiled.state_dict()
    assert list(state) == list(eager.state_dict())
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in compiled.modules())
    tv_ssdlite(weights=None, weights_backbone=None).load_state_dict(state, strict=True)
    models.get_model(LITE).load_state_dict(state, strict=True)


def test_eval_only_compile_leaves_training_eager(eager_and_compiled):
    """compile_network(training=False), train.py's --compile eval: a training step compiles nothing."""
    eval_only = copy.deepcopy(eager_and_compiled[0])
    models.compile_network(eval_only, training=False)
    frames_before = torch._dynamo.utils.counters["frames"]["total"]
    eval_only.train()
    eval_only(random_images(), random_targets(BOX_COUNTS, IMAGE_SIZES))
    assert torch._dynamo.utils.counters["frames"]["total"] == frames_before


def test_test_only_compiled_prints_the_logged_ap(trained_run, shapes_root, tmp_path):
    """The AP table of train.py --test-only --compile eval equals the eager evaluation logged at the last epoch.
    One evaluation batch of all 11 images: a single compile."""
    output_dir, _ = trained_run
    logged = read_log(output_dir)[-1]["coco"]
    result = run_script("train.py", *train_args(shapes_root, "", "--test-only", "--compile", "eval",
                                                "--eval-batch-size", 11, "--weights", output_dir / "model_1.pth"),
                        cwd=tmp_path, timeout=600)
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

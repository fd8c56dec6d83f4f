"""Shared fixtures: a tiny shapes dataset on disk and one short real training run (made once per session), model
pairs with torchvision's SSD, an empty torch hub cache, and the COCO-layout folder writer. The plain helpers they
use are in helpers.py."""
import signal

import pytest

from helpers import LITE, SSD300, TINY, TINY_SHAPES, assert_ok, model_pair, run_script, train_args, write_coco_folder


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    import shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    shapes.ensure_shapes_dataset(root, **TINY_SHAPES)
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """8 training and 2 validation shapes images: tiny_run_args's data, four steps per epoch."""
    import shapes

    root = tmp_path_factory.mktemp("data") / "tiny"
    shapes.ensure_shapes_dataset(root, **TINY)
    return root


@pytest.fixture(scope="session")
def trained_run(shapes_root, tmp_path_factory):
    """A finished 2-epoch training run: (output_dir, CompletedProcess)."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = run_script("train.py", *train_args(shapes_root, output_dir))
    assert_ok(result)
    return output_dir, result


# Session-wide: torchvision's SSD300 builder takes seconds. Tests that train or change thresholds work on copies
# or restore the thresholds.
@pytest.fixture(scope="session")
def ssd300_pair():
    return model_pair(SSD300)


@pytest.fixture(scope="session")
def lite_pair():
    return model_pair(LITE)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache: weights names resolve to files planted in it, never to downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


@pytest.fixture(scope="session")
def coco_folder():
    """helpers.write_coco_folder, the one writer of COCO-layout folders, for tests and fixtures of any scope.
    Module-level builders that tests call without handing it over (test_safety's start-up cases, test_own_data's
    tool exports) import it from helpers."""
    return write_coco_folder


@pytest.fixture(autouse=True)
def restore_stop_signal_handlers():
    """A test that runs train.main in this process leaves SIGINT and SIGTERM only recorded (utils.record_stop_signals):
    later tests, and the processes they fork, get the handlers back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)

"""Shared fixtures: a tiny shapes dataset on disk and one short real training run, made once per session."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LITE = "ssdlite320_mobilenet_v3_large"

# Small enough for seconds per epoch on 2 CPU cores; an odd val count exercises distributed padding.
TINY_SHAPES = {"num_train": 24, "num_val": 11}


def run_script(script, *args, cwd=None, timeout=300, env=None, launcher=None):
    """Run one of the repo's scripts the way a user would and return the CompletedProcess."""
    command = (launcher or [sys.executable]) + [str(REPO / script), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


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


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    import shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    shapes.ensure_shapes_dataset(root, **TINY_SHAPES)
    return root


@pytest.fixture(scope="session")
def trained_run(shapes_root, tmp_path_factory):
    """A finished 2-epoch training run: (output_dir, CompletedProcess)."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = run_script("train.py", *train_args(shapes_root, output_dir))
    assert_ok(result)
    return output_dir, result

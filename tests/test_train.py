"""train.py end to end on the tiny shapes dataset: checkpoints, log.jsonl, AP table, --test-only, --resume, torchrun."""
import math
import re
import shutil

import pytest
import torch

from helpers import LITE, assert_ok, printed_ap, read_log, run_script, torchrun, train_args

# Left out of the quick loop (pytest -m "not slow"): every test trains or evaluates through train.py in a
# subprocess (torchrun too).
pytestmark = pytest.mark.slow

DEMO_TEST_EPOCHS = 5
def test_training_writes_checkpoints_log_and_ap_table(trained_run):
    output_dir, result = trained_run
    for name in ("model_0.pth", "model_1.pth", "checkpoint.pth", "log.jsonl", "curves.png"):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert result.stdout.count("IoU metric: bbox") == 2  # evaluated after each epoch
    assert len(re.findall(r"Average (Precision|Recall)", result.stdout)) == 24  # two 12-line tables
    assert "Epoch: [1]" in result.stdout and "eta:" in result.stdout

    log = read_log(output_dir)
    assert [record["epoch"] for record in log] == [0, 1]
    for record in log:
        assert set(record["train"]) >= {"loss", "bbox_regression", "classification"}
        assert all(math.isfinite(v) for v in record["train"].values())
        assert len(record["coco"]) == 12 and record["time_s"] > 0
    assert round(log[-1]["coco"]["AP"], 3) == printed_ap(result.stdout)

    checkpoint = torch.load(output_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["model"] == LITE
    assert set(checkpoint) >= {"model", "optimizer", "lr_scheduler", "rng_states", "categories"}
    assert checkpoint["categories"] and all(isinstance(k, int) for k in checkpoint["categories"])


def test_test_only_reproduces_the_logged_ap(trained_run, shapes_root, tmp_path):
    output_dir, _ = trained_run
    logged = read_log(output_dir)[-1]["coco"]
    for source in (["--resume", output_dir / "checkpoint.pth"], ["--weights", output_dir / "model_1.pth"]):
        result = run_script("train.py", *train_args(shapes_root, "", "--test-only", *source), cwd=tmp_path)
        assert_ok(result)
        assert printed_ap(result.stdout) == round(logged["AP"], 3)
    assert not list(tmp_path.iterdir())  # --output-dir '': no detections.json, no metrics.json, anywhere


def test_resume_continues_at_next_epoch_with_restored_lr(trained_run, shapes_root, tmp_path):
    """Also what the third epoch leaves with --keep-checkpoints 1 and --tensorboard: only the newest
    model_{epoch}.pth, model_best.pth of the best logged epoch (remembered across the resume), and the events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, _ = trained_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(output_dir, resumed_dir)
    result = run_script("train.py", *train_args(shapes_root, resumed_dir, "--resume", resumed_dir / "checkpoint.pth",
                                                "--keep-checkpoints", 1, "--tensorboard", epochs=3))
    assert_ok(result)
    assert "Epoch: [2]" in result.stdout and "Epoch: [0]" not in result.stdout
    log = read_log(resumed_dir)
    assert [record["epoch"] for record in log] == [0, 1, 2]
    # The cosine schedule was restored (T_max = 2 from the first run), so epoch 2 trains at lr 0.01 * (1 + cos(pi)) / 2.
    assert math.isclose(log[2]["lr"], 0.0, abs_tol=1e-9)

    assert sorted(p.name for p in resumed_dir.iterdir()) == [
        ".train.lock", "checkpoint.pth", "curves.png", "log.jsonl", "model_2.pth", "model_best.pth", "tensorboard"]
    aps = [record["coco"]["AP"] for record in log]
    best_epoch = aps.index(max(aps))
    best = torch.load(resumed_dir / "model_best.pth", map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch and best["args"]["model"] == LITE
    assert log[-1]["best"] == {"metric": "coco.AP", "value": max(aps), "epoch": best_epoch}
    assert all(set(record["per_class"]) == {"circle", "rectangle", "triangle", "star", "cross"} for record in log)

    events = EventAccumulator(str(resumed_dir / "tensorboard"))
    events.Reload()
    iterations = log[0]["iterations"]  # per epoch; printed (--print-freq 2): every second one and the last
    printed = [2 * iterations + i for i in range(iterations) if i % 2 == 0 or i == iterations - 1]
    for tag in ("train/loss", "train/classification", "train/bbox_regression", "train/lr"):
        assert [e.step for e in events.Scalars(tag)] == printed, tag
    # The resumed checkpoint's epoch too: its scalars sit at the resume's purge step, so they are written again.
    assert [(e.step, e.value) for e in events.Scalars("val/AP")] == [(2 * iterations, pytest.approx(aps[1])),
                                                                     (3 * iterations, pytest.approx(aps[2]))]
    for epoch in (1, 2):
        per_class = {f"val_AP_per_class/{name}": values["AP"] for name, values in log[epoch]["per_class"].items()}
        assert {tag: events.Scalars(tag)[epoch - 1].value for tag in per_class} == pytest.approx(per_class)


def test_a_finished_run_requeued_gets_the_last_validation_scalars_once(trained_run, shapes_root, tmp_path):
    """What a kill between checkpoint.pth and the events of the last epoch leaves (here: a run without them at all)
    is healed by the requeued command, and requeueing once more adds nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, _ = trained_run
    finished_dir = tmp_path / "finished"
    shutil.copytree(output_dir, finished_dir)
    requeued = train_args(shapes_root, finished_dir, "--resume", "auto", "--tensorboard")
    result = run_script("train.py", *requeued)
    assert_ok(result)
    assert "restored the validation scalars of epoch 1 in tensorboard/" in result.stdout
    events_files = sorted((finished_dir / "tensorboard").iterdir())
    log = read_log(finished_dir)
    events = EventAccumulator(str(finished_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/AP")] == [
        (log[1]["iterations"], pytest.approx(log[1]["coco"]["AP"]))]

    again = run_script("train.py", *requeued)
    assert_ok(again)
    assert "restored" not in again.stdout
    assert sorted((finished_dir / "tensorboard").iterdir()) == events_files


def test_torchrun_two_processes_trains_and_evaluates_like_one(trained_run, shapes_root, tmp_path):
    output_dir, _ = trained_run
    checkpoint = output_dir / "checkpoint.pth"
    single = run_script("train.py", *train_args(shapes_root, "", "--test-only", "--resume", checkpoint))
    double = run_script("train.py", *train_args(shapes_root, "", "--test-only", "--resume", checkpoint),
                        launcher=torchrun(2))
    assert_ok(single)
    assert_ok(double)
    # 11 val images over 2 ranks: the sampler pads one repeat, which evaluation must drop.
    assert printed_ap(double.stdout) == printed_ap(single.stdout)

    trained = run_script("train.py", *train_args(shapes_root, tmp_path / "ddp", "--channels-last", epochs=1),
                         launcher=torchrun(2))
    assert_ok(trained)
    assert printed_ap(trained.stdout) >= 0
    assert (tmp_path / "ddp" / "checkpoint.pth").is_file()
    assert len(read_log(tmp_path / "ddp")) == 1


@pytest.mark.parametrize("device, extra", [
    ("cpu", []),
    pytest.param("cuda", ["--amp"], marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_a_short_demo_run_learns(device, extra, tmp_path):
    """The README's demo cut to 3 minutes: SSDlite320 from scratch on a 320-image shapes set learns to find the
    shapes. An untrained model scores AP50 ~0.002; this run reached 0.247 when calibrated (0.111 after 3 of its
    5 epochs). Batch 4 because learning needs ~200 updates: at batch 8 the same images gave AP50 0.011.
    On a GPU the same run trains in float16 autocast with GradScaler."""
    output_dir = tmp_path / "out"
    result = run_script(
        "train.py", "--dataset", "shapes", "--data-path", tmp_path / "shapes", "--shapes-num-train", 320,
        "--shapes-num-val", 40, "--model", LITE, "--device", device, "--epochs", DEMO_TEST_EPOCHS, "-b", 4,
        "--lr", 0.01, "--lr-scheduler", "cosineannealinglr", "--weight-decay", 4e-5, "--warmup-iters", 50, "-j", 0,
        "--seed", 0, "--eval-freq", DEMO_TEST_EPOCHS, "--output-dir", output_dir, *extra,
    )
    assert_ok(result)
    ap50 = read_log(output_dir)[-1]["coco"]["AP50"]
    assert ap50 > 0.1, f"AP50 {ap50:.3f} after {DEMO_TEST_EPOCHS} epochs on {device}"


def test_unseeded_runs_draw_fresh_seeds_and_a_resumed_run_keeps_its_own(shapes_root):
    import coco_utils
    import presets
    import train

    args = train.get_args_parser().parse_args(["--batch-size", "4"])
    seeds = {train.choose_seed(args, resume_checkpoint=None) for _ in range(4)}
    assert len(seeds) == 4  # a fixed default would give every unseeded run the same data order
    assert train.choose_seed(args, resume_checkpoint={"args": {"seed": 1234}}) == 1234
    args.seed = 7
    assert train.choose_seed(args, resume_checkpoint={"args": {"seed": 1234}}) == 7

    dataset = coco_utils.get_coco(shapes_root, "train", presets.DetectionPresetEval())
    orders = []
    for seed in (7, 8):
        args.seed = seed
        loader, sampler = train.build_train_loader(dataset, args)
        sampler.set_epoch(0)
        orders.append(list(sampler))
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]

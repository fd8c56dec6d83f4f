"""predict.py on real image files: pictures, detections.json, unreadable files, name collisions, class names."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import cli
import models
import predict
from helpers import CATEGORIES, FAVOURED_LABEL, LITE, assert_ok, run_script, save_lively_checkpoint

SCORE_THRESH = 0.6


def save_smooth_image(path, width, height, seed):
    """Smooth colour blobs (bilinear up-sampled noise): structure the detector reacts to, unlike pixel noise."""
    coarse = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model_0.pth"
    return path, save_lively_checkpoint(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """photos/{a.png, broken.jpg, notes.txt, sub/b.jpg} and other/a.png, whose basename collides."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "photos" / "sub").mkdir(parents=True)
    (root / "other").mkdir()
    save_smooth_image(root / "photos" / "a.png", 64, 48, seed=1)
    save_smooth_image(root / "photos" / "sub" / "b.jpg", 90, 120, seed=2)
    save_smooth_image(root / "other" / "a.png", 300, 200, seed=3)
    (root / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (root / "photos" / "notes.txt").write_text("not an image, not an image extension")
    return root


@pytest.mark.slow
def test_predict_writes_pictures_and_detections(lively, inputs, tmp_path):
    checkpoint, model = lively
    output_dir = tmp_path / "out"
    result = run_script(
        "predict.py", "--weights", checkpoint, "--output-dir", output_dir, "--score-thresh", SCORE_THRESH,
        "--batch-size", 2, "--print-freq", 1, inputs / "photos", inputs / "other" / "a.png",
    )
    assert_ok(result)
    # The corrupt file is named once on stderr and skipped; the rest went on.
    assert [line for line in result.stderr.splitlines() if "broken.jpg" in line] == [
        line for line in result.stderr.splitlines() if line.startswith("skipping")
    ]
    assert result.stderr.count("skipping") == 1
    assert "3/4 images" in result.stdout and "4/4 images" in result.stdout

    summary = json.loads((output_dir / "detections.json").read_text())
    assert summary["model"] == LITE and summary["score_thresh"] == SCORE_THRESH
    assert [(r["file"], r["picture"], r["width"], r["height"]) for r in summary["images"]] == [
        (str(inputs / "photos" / "a.png"), "a.png", 64, 48),
        (str(inputs / "photos" / "sub" / "b.jpg"), "sub/b.jpg", 90, 120),
        (str(inputs / "other" / "a.png"), "a_2.png", 300, 200),
    ]
    assert sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file()) == [
        "a.png", "a_2.png", "detections.json", "sub/b.jpg",
    ]

    # Same detections as the model called directly on the same batches (broken.jpg left a.png and b.jpg together).
    model.score_thresh = SCORE_THRESH
    images = [pil_to_tensor(Image.open(r["file"]).convert("RGB")) for r in summary["images"]]
    with torch.inference_mode():
        expected = model([im / 255 for im in images[:2]]) + model([images[2] / 255])
    for record, image, reference in zip(summary["images"], images, expected):
        detections = record["detections"]
        assert len(detections) == len(reference["scores"]) > 0
        torch.testing.assert_close(torch.tensor([d["box"] for d in detections]), reference["boxes"], atol=0.01, rtol=0)
        scores = torch.tensor([d["score"] for d in detections])
        torch.testing.assert_close(scores, reference["scores"], atol=1e-4, rtol=0)
        assert [d["label"] for d in detections] == reference["labels"].tolist()
        assert all(d["name"] == CATEGORIES[d["label"]] and d["score"] >= SCORE_THRESH for d in detections)
        names = [d["name"] for d in detections]
        assert max(set(names), key=names.count) == CATEGORIES[FAVOURED_LABEL]

        picture = Image.open(output_dir / record["picture"])
        assert picture.size == (record["width"], record["height"])
        drawn = pil_to_tensor(picture.convert("RGB")).int()
        assert (drawn - image.int()).abs().amax(dim=0).gt(60).sum() > 50  # boxes and labels are on the picture


def test_picture_names_mirror_inputs_and_never_collide():
    assert predict.unique_picture_names(["a.jpg", "A.JPG", "x/a.png", "a.jpeg", "a.bmp", "a.png"]) == [
        "a.jpg", "A_2.jpg", "x/a.png", "a_3.jpg", "a.png", "a_2.png",
    ]


@pytest.mark.slow
def test_bad_inputs_give_clear_errors(lively, inputs, tmp_path):
    checkpoint, _ = lively
    parser = predict.get_args_parser()

    def run(*args):
        predict.main(parser.parse_args(["--output-dir", str(tmp_path / "out"), *map(str, args)]))

    with pytest.raises(models.WeightsError, match="missing.pth"):
        run("--weights", tmp_path / "missing.pth", inputs / "other")
    with pytest.raises(models.WeightsError, match=f"model ssd300_vgg16 does not match weights .*belong to {LITE}"):
        run("--model", "ssd300_vgg16", "--weights", checkpoint, inputs / "other")
    with pytest.raises(cli.UserInputError, match="no such file or folder"):
        run("--weights", checkpoint, inputs / "nowhere")
    with pytest.raises(cli.UserInputError, match="none of the 1 input images could be read"):
        run("--weights", checkpoint, inputs / "photos" / "broken.jpg")


def test_a_later_run_skips_an_earlier_runs_output_inside_the_input(lively, tmp_path, capsys):
    """Predicting into photos/pred1 and then photos/pred2 must not read pred1's pictures as photos (issue 23)."""
    checkpoint, _ = lively
    photos = tmp_path / "photos"
    photos.mkdir()
    save_smooth_image(photos / "a.png", 64, 48, seed=1)
    parser = predict.get_args_parser()
    for output in ("pred1", "pred2"):
        predict.main(parser.parse_args(["--weights", str(checkpoint), "--output-dir", str(photos / output),
                                        str(photos)]))
    summary = json.loads((photos / "pred2" / "detections.json").read_text())
    assert [record["picture"] for record in summary["images"]] == ["a.png"]
    assert f"skipping folder {photos / 'pred1'}: an earlier predict.py run's output" in capsys.readouterr().err

    # Given an earlier output folder itself, it refuses to predict on the drawn pictures and writes nothing.
    with pytest.raises(cli.UserInputError, match=f"input {photos / 'pred1'}: an earlier predict.py run's output"):
        predict.main(parser.parse_args(["--weights", str(checkpoint), "--output-dir", str(tmp_path / "pred3"),
                                        str(photos / "pred1")]))
    assert not (tmp_path / "pred3").exists()


def test_detections_name_the_annotation_file_s_category_ids(lively, tmp_path):
    """A model trained on sparse ids has labels 1..K, not the ids: predict.py's detections.json gave the label alone,
    which read as an id named another class (hostile-case pass of issue 23). Each detection now carries the
    category id the checkpoint records for its label; older checkpoints ({label: name}) record none."""
    _, model = lively
    table = {label: {"id": category_id, "name": CATEGORIES[label]} for label, category_id in ((1, 1), (2, 7), (3, 100))}
    checkpoint = tmp_path / "model_1.pth"
    torch.save({"model": model.state_dict(), "epoch": 1, "args": {"model": LITE}, "categories": table}, checkpoint)
    photos = tmp_path / "photos"
    photos.mkdir()
    save_smooth_image(photos / "a.png", 64, 48, seed=1)
    parser = predict.get_args_parser()
    predict.main(parser.parse_args(["--weights", str(checkpoint), "--score-thresh", "0.3",
                                    "--output-dir", str(tmp_path / "pred"), str(photos)]))
    detections = json.loads((tmp_path / "pred" / "detections.json").read_text())["images"][0]["detections"]
    assert FAVOURED_LABEL in {detection["label"] for detection in detections}
    assert all(detection["category_id"] == table[detection["label"]]["id"] and
               detection["name"] == CATEGORIES[detection["label"]] for detection in detections)
    assert models.category_ids(CATEGORIES) == {}

"""export.py: the ONNX graph of the whole pipeline gives the same detections as PyTorch, for any batch size."""
import json

import pytest
import torch

import cli
import export
from helpers import CATEGORIES, LITE, save_lively_checkpoint

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
import onnx  # noqa: E402  (installed with onnxruntime in requirements-dev.txt)

SCORE_THRESH = 0.5


@pytest.mark.slow
def test_export_round_trip_matches_pytorch(tmp_path, capsys):
    checkpoint = tmp_path / "model_0.pth"
    model = save_lively_checkpoint(checkpoint)
    output = tmp_path / "ssdlite.onnx"

    # In-process rather than a subprocess: the export itself takes most of this test's time, so skip the start-up.
    # Exported with an example batch of 2, checked by the script on 3 synthetic images.
    args = ["--weights", str(checkpoint), "--output", str(output), "--score-thresh", str(SCORE_THRESH)]
    export.main(export.get_args_parser().parse_args(args))
    printed = capsys.readouterr().out
    assert printed.count("-> OK") == 3, printed
    assert "reproduces the PyTorch detections on 3 images" in printed

    metadata = {prop.key: prop.value for prop in onnx.load(output).metadata_props}
    assert metadata["model"] == LITE and json.loads(metadata["input_size"]) == [320, 320]
    assert {int(k): v for k, v in json.loads(metadata["categories"]).items()} == CATEGORIES

    # A batch of one image (a size the exporter might have frozen) against the model's own eval path.
    model.score_thresh = SCORE_THRESH
    image = export.load_check_batch([], model.size, count=1, seed=7)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    boxes, scores, labels, counts = session.run(export.OUTPUT_NAMES, {"images": image.numpy()})
    assert boxes.shape == (1, model.detections_per_img, 4) and counts.shape == (1,)
    with torch.inference_mode():
        (expected,) = model(list(image))
    count = int(counts[0])
    assert count == len(expected["scores"]) > 10
    torch.testing.assert_close(torch.from_numpy(boxes[0, :count]), expected["boxes"], atol=0.01, rtol=0)
    torch.testing.assert_close(torch.from_numpy(scores[0, :count]), expected["scores"], atol=1e-4, rtol=0)
    assert labels[0, :count].tolist() == expected["labels"].tolist()
    assert (scores[0, count:] == 0).all() and (labels[0, count:] == 0).all()  # padding


def test_missing_optional_package_is_named():
    with pytest.raises(cli.UserInputError, match="pip install not-a-real-package"):
        export.require("not_a_real_module", "not-a-real-package")


def detections(scores, boxes, labels):
    return {"scores": torch.tensor(scores), "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor(labels)}


def test_tied_scores_compare_as_ties():
    """A uniform image gives many equal scores: the two runtimes may keep different members of a tie (issue 23)."""
    box = [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [30.0, 30.0, 40.0, 40.0]]
    reference = detections([0.9, 0.5, 0.5], box, [1, 2, 2])
    other_tied_member = detections([0.9, 0.5, 0.5], [box[0], box[1], [50.0, 50.0, 60.0, 60.0]], [1, 2, 2])
    same, line = export.compare_detections(reference, other_tied_member)
    assert same and "matched 2, 1 others tied in score" in line and line.endswith("-> OK")
    # An unpaired detection whose score ties with nothing on its side is a real difference.
    lone = detections([0.9, 0.5], box[:2], [1, 2])
    moved = detections([0.9, 0.5], [box[0], box[2]], [1, 2])
    same, line = export.compare_detections(lone, moved)
    assert not same and line.endswith("-> MISMATCH")

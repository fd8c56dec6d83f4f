"""engine.py on a tiny COCO-format dataset on disk: warm-up, epoch means, the non-finite stop, evaluation parity."""
import contextlib
import io
import math
import re

import numpy as np
import pytest
import torch
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.transforms.functional import pil_to_tensor

import engine
import utils
from coco_eval import COCO_STAT_NAMES

CATEGORY_IDS = [1, 3]  # non-contiguous: the model predicts these ids directly


class TinyCoco(torchvision.datasets.CocoDetection):
    """Images and COCO json on disk -> (float image, {"image_id", "boxes" XYXY, "labels"})."""

    def __getitem__(self, index):
        image, annotations = super().__getitem__(index)
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        return pil_to_tensor(image).float() / 255, {"image_id": self.ids[index], "boxes": boxes, "labels": labels}


def tiny_coco(coco_folder, root, num_images=6, seed=0):
    """Coloured rectangles on noise, one or two large objects per image, written as a COCO training split."""
    rng = np.random.RandomState(seed)
    pictures, annotations = {}, []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.randint(96, 160)), int(rng.randint(96, 160))
        pixels = rng.randint(0, 60, size=(height, width, 3)).astype(np.uint8)
        for _ in range(rng.randint(1, 3)):
            w, h = int(rng.randint(width // 3, width * 3 // 4)), int(rng.randint(height // 3, height * 3 // 4))
            x, y = int(rng.randint(0, width - w)), int(rng.randint(0, height - h))
            category = int(rng.choice(CATEGORY_IDS))
            pixels[y:y + h, x:x + w] = (220, 40, 40) if category == 1 else (40, 40, 220)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        pictures[f"{image_id:04d}.png"] = pixels
    categories = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    image_folder, ann_file = coco_folder(root, pictures, annotations, categories, splits=("train",))["train"]
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = TinyCoco(str(image_folder), str(ann_file))
    dataset.ann_file = str(ann_file)
    return dataset


@pytest.fixture(scope="module")
def dataset(coco_folder, tmp_path_factory):
    return tiny_coco(coco_folder, tmp_path_factory.mktemp("tiny_coco"))


def make_model():
    torch.manual_seed(0)
    return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=max(CATEGORY_IDS) + 1)


def loader(dataset, batch_size):
    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG on every iter().
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=utils.collate_fn,
                                       generator=torch.Generator())


def printed_lrs(stdout):
    return [float(lr) for lr in re.findall(r"\]  eta: \S+  lr: (\d\.\d{6})", stdout)]


def test_train_one_epoch_warm_up_means_and_learning(dataset, capsys):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    data_loader = loader(dataset, batch_size=2)  # 3 iterations: warm-up over min(1000, 3 - 1) = 2 of them
    cpu = torch.device("cpu")

    epochs = [engine.train_one_epoch(model, optimizer, data_loader, cpu, epoch, print_freq=1) for epoch in range(4)]
    out = capsys.readouterr().out

    # The lr each step used: the warm-up ramps 1/1000 -> 1 over two steps, in epoch 0 only.
    assert printed_lrs(out) == [0.00001, 0.005005, 0.01] + [0.01] * 9
    assert out.count("--warmup-iters 1000: the first epoch has 3 steps, so the warm-up takes 2") == 1
    for means in epochs:
        assert set(means) == {"loss", "bbox_regression", "classification", "lr"}
        assert all(math.isfinite(v) for v in means.values())
        assert means["loss"] == pytest.approx(means["bbox_regression"] + means["classification"], rel=1e-5)
        assert means["lr"] == pytest.approx(0.01)
    assert epochs[-1]["loss"] < 0.8 * epochs[0]["loss"]  # it learns
    assert "Epoch: [3]  [2/3]" in out and "Epoch: [3] Total time:" in out


def test_warm_up_can_be_disabled(dataset, capsys):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    engine.train_one_epoch(model, optimizer, loader(dataset, 3), torch.device("cpu"), 0, 1, warmup_iters=0)
    out = capsys.readouterr().out
    assert printed_lrs(out) == [0.02, 0.02]
    assert "--warmup-iters" not in out


class WithNaNImages(torch.utils.data.Dataset):
    def __init__(self, dataset, bad_ids):
        self.dataset, self.bad_ids = dataset, bad_ids

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        return (torch.full_like(image, math.nan) if target["image_id"] in self.bad_ids else image), target


def test_non_finite_loss_stops_before_the_optimizer_step(dataset):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    after_steps = []
    optimizer.register_step_post_hook(
        lambda opt, args, kwargs: after_steps.append({k: p.detach().clone() for k, p in model.named_parameters()})
    )
    data_loader = loader(WithNaNImages(dataset, bad_ids={3, 4}), batch_size=2)  # batches: [1, 2], [3, 4], [5, 6]

    with pytest.raises(engine.NonFiniteLossError) as raised:
        engine.train_one_epoch(model, optimizer, data_loader, torch.device("cpu"), epoch=5, print_freq=10)

    message = str(raised.value)
    assert "\n" not in message
    assert re.fullmatch(r"non-finite loss at epoch 5, iteration 1: loss=nan, bbox_regression=\S+, "
                        r"classification=\S+; image ids \[3, 4\]", message), message
    assert len(after_steps) == 1  # only the good first batch was applied
    for name, param in model.named_parameters():
        assert torch.equal(param, after_steps[0][name]), name


def independent_pycocotools_stats(model, data_loader):
    """What torchvision's classic flow computes: per-image results in COCO json form, COCOeval over them."""
    results = []
    with torch.inference_mode():
        for images, targets in data_loader:
            for target, output in zip(targets, model(list(images))):
                x1, y1, x2, y2 = output["boxes"].unbind(1)
                xywh = torch.stack((x1, y1, x2 - x1, y2 - y1), dim=1).tolist()
                results += [{"image_id": target["image_id"], "category_id": c, "bbox": b, "score": s}
                            for b, s, c in zip(xywh, output["scores"].tolist(), output["labels"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(data_loader.dataset.ann_file)
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats.tolist()


def test_evaluate_matches_pycocotools_for_both_backends(dataset, capsys):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(3):  # a little training: detections that overlap the objects, so AP is not all zeros
        engine.train_one_epoch(model, optimizer, loader(dataset, 2), torch.device("cpu"), epoch, print_freq=100)
    data_loader = loader(dataset, batch_size=4)  # 6 images: a full and a ragged batch
    model.eval()
    expected = independent_pycocotools_stats(model, data_loader)
    capsys.readouterr()

    model.train()
    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    metrics = engine.evaluate(model, data_loader, torch.device("cpu"))
    out = capsys.readouterr().out
    stats = [metrics["coco"][name] for name in COCO_STAT_NAMES]
    assert stats == expected and list(metrics["coco"]) == list(COCO_STAT_NAMES)
    assert any(s > 0 for s in stats)
    assert not model.training
    assert torch.get_num_threads() == threads  # no set_num_threads(1) slowdown
    assert torch.equal(torch.get_rng_state(), rng_state)  # evaluation leaves the training RNG stream alone

    lines = out.splitlines()
    assert re.match(r"Test:  \[0/2\]  eta: \S+  model_time: \S+ \(\S+\)  time: \S+  data: \S+", lines[0])
    assert "IoU metric: bbox" in lines and len(re.findall("Average (Precision|Recall)", out)) == 12
    assert lines[lines.index("IoU metric: bbox") + 13].startswith("Per-category")  # right after the 12 lines
    assert "Accumulating" not in out

    assert engine.evaluate(model, data_loader, torch.device("cpu"), coco_backend="faster-coco-eval") == metrics

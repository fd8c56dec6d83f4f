"""Weights: checkpoints saved from torchvision load strictly, torchvision weights names resolve through the
hub cache, backbone weights map and freeze as torchvision's do, checkpoint files are read safely, and options
and names are checked."""
import os

import pytest
import torch
import torchvision
from torchvision.models.detection import ssdlite320_mobilenet_v3_large as tv_ssdlite

import models
from helpers import LITE, SSD300, SSD512
from models.ssd import vgg16_features


def plant(checkpoints, weights_name: str, state_dict: dict) -> None:
    url = torchvision.models.get_weight(weights_name).url
    torch.save(state_dict, checkpoints / os.path.basename(url))


def test_checkpoint_saved_from_torchvision_loads_strictly(tmp_path):
    torch.manual_seed(0)
    theirs = tv_ssdlite(weights=None, weights_backbone=None, num_classes=5)
    plain, training = tmp_path / "plain.pth", tmp_path / "training.pth"
    torch.save(theirs.state_dict(), plain)
    torch.save({"model": theirs.state_dict(), "epoch": 3, "args": {"lr": 0.1}}, training)
    for path in (plain, str(training)):
        ours = models.get_model(LITE, weights=path)
        assert ours.num_classes == 5  # read from the file's classification head
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
    # With weights, the default trainable_backbone_layers applies, as in torchvision (6 of 6 for SSDlite).
    assert all(p.requires_grad for p in ours.parameters())


def test_checkpoint_of_another_architecture_lists_every_mismatch(tmp_path):
    path = tmp_path / "lite.pth"
    torch.save(models.get_model(LITE, num_classes=5).state_dict(), path)
    with pytest.raises(models.WeightsError) as error:
        models.get_model(LITE, weights=path, num_classes=8)
    message = str(error.value)
    assert "lite.pth" in message and "shape mismatches" in message and "[30, 672, 1, 1] in file" in message
    assert "\n" not in message
    with pytest.raises(models.WeightsError, match=r"lite.pth.*missing keys.*unexpected keys"):
        models.get_model(SSD300, weights=path, num_classes=5)


def test_torchvision_weights_names_resolve_through_the_hub_cache(torch_home, monkeypatch):
    def offline(url, *args, **kwargs):
        raise OSError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    torch.manual_seed(0)
    coco = tv_ssdlite(weights=None, weights_backbone=None).state_dict()
    plant(torch_home, "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1", coco)
    enum = torchvision.models.get_weight("SSDLite320_MobileNet_V3_Large_Weights.COCO_V1")
    for spec in ("SSDLite320_MobileNet_V3_Large_Weights.COCO_V1", "SSDLite320_MobileNet_V3_Large_Weights.DEFAULT",
                 enum):
        model = models.get_model(LITE, weights=spec)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in coco.items())
    with pytest.raises(models.WeightsError, match="91 classes, num_classes=5"):
        models.get_model(LITE, weights=enum, num_classes=5)
    with pytest.raises(models.WeightsError, match="SSD300_VGG16_Weights.COCO_V1"):
        models.get_model(SSD300, weights=enum)  # the other model's weights
    with pytest.raises(models.WeightsError, match="could not get SSD300_VGG16_Weights.COCO_V1 from https://"):
        models.get_model(SSD300, weights="SSD300_VGG16_Weights.COCO_V1")  # not cached: a download, made to fail


def test_mobilenet_backbone_weights_give_the_full_tail_and_torchvision_freezing(torch_home):
    torch.manual_seed(0)
    backbone = torchvision.models.mobilenet_v3_large().state_dict()
    plant(torch_home, "MobileNet_V3_Large_Weights.IMAGENET1K_V1", backbone)
    for layers in (None, 2):
        kwargs = {} if layers is None else {"trainable_backbone_layers": layers}
        theirs = tv_ssdlite(weights=None, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1", **kwargs)
        ours = models.get_model(LITE, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1", **kwargs)
        assert [(n, p.shape, p.requires_grad) for n, p in ours.named_parameters()] == \
               [(n, p.shape, p.requires_grad) for n, p in theirs.named_parameters()]
    assert sum(p.numel() for p in ours.parameters()) == 5_198_540
    assert torch.equal(ours.state_dict()["backbone.features.0.0.0.weight"], backbone["features.0.0.weight"])
    # A checkpoint of such a model loads with weights= alone: the full tail is read from the file.
    path = torch_home / "trained_from_imagenet.pth"
    torch.save({"model": ours.state_dict()}, path)
    reloaded = models.get_model(LITE, weights=path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("name", [SSD300, SSD512])  # SSD512's trunk is laid out as SSD300's
def test_vgg16_features_map_onto_the_ssd_backbone(name, torch_home):
    features = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    plant(torch_home, "VGG16_Weights.IMAGENET1K_FEATURES", {**features, "classifier.0.bias": torch.zeros(4096)})
    model = models.get_model(name, weights_backbone="VGG16_Weights.IMAGENET1K_FEATURES")
    state = model.state_dict()
    for n in (0, 2, 21):
        assert torch.equal(state[f"backbone.features.{n}.weight"], features[f"features.{n}.weight"])
    for n, extra in ((24, 1), (26, 3), (28, 5)):
        assert torch.equal(state[f"backbone.extra.0.{extra}.weight"], features[f"features.{n}.weight"])
    # Default trainable_backbone_layers=4 with pretrained weights freezes conv1_1 and conv1_2 only.
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["backbone.features.0.bias", "backbone.features.0.weight",
                      "backbone.features.2.bias", "backbone.features.2.weight"]
    all_frozen = models.get_model(name, weights_backbone="VGG16_Weights.IMAGENET1K_FEATURES",
                                  trainable_backbone_layers=0)
    frozen = {n for n, p in all_frozen.named_parameters() if not p.requires_grad}
    assert len(frozen) == 26 and "backbone.extra.0.5.weight" in frozen and "backbone.extra.0.7.1.weight" not in frozen


def test_trainable_backbone_layers_rules():
    with pytest.warns(UserWarning, match="trainable_backbone_layers"):
        model = models.get_model(LITE, trainable_backbone_layers=2)  # no pretrained weights: ignored
    assert all(p.requires_grad for p in model.parameters())
    # Checked before any weights are read.
    with pytest.raises(ValueError, match=r"trainable_backbone_layers must be in \[0, 6\], got 7"):
        models.get_model(LITE, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1", trainable_backbone_layers=7)


class _WritesAMarker:
    """Unpickling calls open(marker, "w"): what a malicious checkpoint would do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_load_checkpoint_file_errors(tmp_path):
    with pytest.raises(models.WeightsError, match=r"weights file '.*missing.pth' does not exist"):
        models.load_checkpoint_file(tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(models.WeightsError, match="notes.pth' is not a PyTorch checkpoint or is truncated"):
        models.load_checkpoint_file(text)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:700])
    with pytest.raises(models.WeightsError, match="truncated.pth' is not a PyTorch checkpoint or is truncated"):
        models.load_checkpoint_file(truncated)

    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _WritesAMarker(str(marker))}, evil)
    refused = r"evil.pth' refused: contains non-tensor Python objects \(weights_only\)"
    with pytest.raises(models.WeightsError, match=refused):
        models.get_model(LITE, weights=evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # proof that the file was really malicious
    assert marker.exists()


def test_unknown_names_and_options_are_rejected():
    with pytest.raises(ValueError, match=f"unknown model 'ssd512'; valid names: {SSD300}, {SSD512}, {LITE}"):
        models.get_model("ssd512")
    assert models.list_models() == [SSD300, SSD512, LITE]
    with pytest.raises(ValueError, match="unknown option.*size.*valid: score_thresh"):
        models.get_model(SSD300, size=(512, 512))
    with pytest.raises(models.WeightsError, match="neither an existing file nor one of VGG16_Weights.IMAGENET1K_V1"):
        models.get_model(SSD300, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        models.get_model(LITE, num_classes=1)


def test_options_reach_the_model():
    model = models.get_model(LITE, score_thresh=0.2, nms_thresh=0.5, detections_per_img=7, topk_candidates=9,
                             iou_thresh=0.6, positive_fraction=0.5, image_mean=[0.1, 0.2, 0.3], image_std=[1, 1, 1])
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates) == (0.2, 0.5, 7, 9)
    assert model.iou_thresh == 0.6 and model.neg_to_pos_ratio == 1.0 and model.size == (320, 320)
    assert model.image_mean.tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert "image_mean" not in model.state_dict()  # normalisation is not a checkpoint entry

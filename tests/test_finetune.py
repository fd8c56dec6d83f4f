"""Fine-tuning across class sets: weights made for other classes load whole except the classification
layers, which are rebuilt for the new classes with the rows of name-matched classes carried over."""
import pytest
import torch
import torchvision

import models
from helpers import LITE, assert_ok, run_script, train_args

COCO_WEIGHTS = "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"
# torchvision's COCO names, indexed by label: "__background__" at 0, "N/A" at the unused ids (no download).
COCO_NAMES = torchvision.models.get_weight(COCO_WEIGHTS).meta["categories"]
DOG, PERSON = COCO_NAMES.index("dog"), COCO_NAMES.index("person")
# The new dataset: other label order, other spelling, and one class the weights do not know.
NEW_CLASSES = {1: "Dog", 2: "person", 3: "zebra-crossing"}


def coco_table():
    """The category table a checkpoint stores: {label: {"id", "name"}} for COCO's 80 categories."""
    return {label: {"id": label, "name": name} for label, name in enumerate(COCO_NAMES)
            if label and name != "N/A"}


@pytest.fixture(scope="module")
def source_model():
    """A 91-class SSDlite whose every tensor is far from the builder's initialisation, classifier included,
    so that a tensor left unloaded or a row copied from the wrong class changes the results."""
    torch.manual_seed(0)
    model = models.get_model(LITE)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.05
                tensor.copy_(tensor.abs() + 0.5 if name.endswith("running_var") else tensor + noise)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(source_model, tmp_path_factory):
    """The source model as a torchvision-style state_dict and as train.py's model_N.pth (with the category
    table, and with the older {label: name} form)."""
    folder = tmp_path_factory.mktemp("weights")
    state = source_model.state_dict()
    paths = {"state_dict": folder / "plain.pth", "table": folder / "model_table.pth",
             "names": folder / "model_names.pth"}
    torch.save(state, paths["state_dict"])
    torch.save({"model": state, "epoch": 9, "args": {"model": LITE}, "categories": coco_table()}, paths["table"])
    old_form = {label: entry["name"] for label, entry in coco_table().items()}
    torch.save({"model": state, "epoch": 9, "args": {"model": LITE}, "categories": old_form}, paths["names"])
    return paths


def class_logits(model, images):
    """The raw per-anchor class logits [B, anchors, classes] of an eval-mode model."""
    with torch.no_grad():
        batch, _ = model.preprocess(images)
        return model.head(model.backbone(batch))["cls_logits"]


def test_class_names_reads_both_checkpoint_forms(checkpoints):
    assert models.class_names({1: {"id": 7, "name": "dog"}, "2": "cat"}) == {1: "dog", 2: "cat"}
    assert models.class_names(None) == {}
    # predict.py and export.py take their names from models.load_detector, which reads the table form.
    for form in ("table", "names"):
        _, model_name, categories = models.load_detector(str(checkpoints[form]))
        names = models.class_names(categories)
        assert model_name == LITE and names[DOG] == "dog" and names[PERSON] == "person" and len(names) == 80


@pytest.mark.parametrize("form", ["table", "names"])
def test_matched_classes_score_exactly_as_in_the_source_model(form, source_model, checkpoints, capsys):
    model = models.get_model(LITE, weights=checkpoints[form], class_names=NEW_CLASSES).eval()
    assert model.num_classes == 4
    line = capsys.readouterr().out.strip()
    assert "kept 464 of 476 tensors whole" in line and "'Dog'<-'dog'" in line and "'person'<-'person'" in line
    assert "1 class starts from scratch ('zebra-crossing')" in line

    images = [torch.rand(3, 240, 320, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    old, new = class_logits(source_model, images), class_logits(model, images)
    # Every layer before the classifier is the source's, and each classifier row is the same dot product,
    # so the logits of background, dog and person are the source's (up to the order of summation the
    # convolution kernels pick for another number of output channels).
    torch.testing.assert_close(new[..., :3], old[..., [0, DOG, PERSON]], rtol=1e-5, atol=1e-5)
    # Hence the new model's scores are the source's softmax over {background, dog, person} alone: the
    # source's probabilities given that the box is background, a dog or a person.
    scores = torch.softmax(new, -1)[..., :3]
    restricted = torch.softmax(torch.cat([old[..., [0, DOG, PERSON]], new[..., 3:]], -1), -1)[..., :3]
    torch.testing.assert_close(scores, restricted, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(new[..., 3], old[..., 3])  # the unknown class does not inherit a row


def test_ssd300_rows_are_carried_over_too(tmp_path):
    """SSD300's classifier is one 3x3 convolution per map (SSDlite's a 1x1 after a depthwise block)."""
    torch.manual_seed(0)
    source = models.get_model("ssd300_vgg16", num_classes=4).eval()
    path = tmp_path / "ssd300.pth"
    torch.save({"model": source.state_dict(), "categories": {1: "cat", 2: "dog", 3: "cow"}}, path)
    model = models.get_model("ssd300_vgg16", weights=path, class_names={1: "cow", 2: "Cat"}).eval()
    images = [torch.rand(3, 150, 150, generator=torch.Generator().manual_seed(0))]
    torch.testing.assert_close(class_logits(model, images), class_logits(source, images)[..., [0, 3, 1]],
                               rtol=1e-5, atol=1e-5)
    # Detection weights count as pretrained, as in torchvision: SSD300's default then freezes conv1_x.
    frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["backbone.features.0.bias", "backbone.features.0.weight",
                      "backbone.features.2.bias", "backbone.features.2.weight"]


def test_everything_outside_the_classifier_is_the_checkpoints_and_new_rows_are_the_builders(checkpoints):
    torch.manual_seed(5)
    fresh = models.get_model(LITE, num_classes=4).state_dict()
    torch.manual_seed(5)
    model = models.get_model(LITE, weights=checkpoints["state_dict"], class_names={1: "Dog", 2: "person", 3: "x"})
    source, state = torch.load(checkpoints["state_dict"], weights_only=True), model.state_dict()
    classifier = {f"{prefix}.{kind}" for prefix in models.weights.classifier_layers(model) for kind in ("weight", "bias")}
    assert len(classifier) == 12 and all(".1." in key for key in classifier)  # SSDlite: the 1x1 conv of each map
    for key, value in state.items():
        if key not in classifier:
            assert torch.equal(value, source[key]), key
    for key in classifier:
        anchors = state[key].shape[0] // 4
        rows, source_rows = state[key].view(anchors, 4, -1), source[key].view(anchors, 91, -1)
        # A plain state_dict records no names: only the background carries over; the classes keep the
        # builder's own initialisation (the same random draws as a model built without weights).
        assert torch.equal(rows[:, 0], source_rows[:, 0]), key
        assert torch.equal(rows[:, 1:], fresh[key].view(anchors, 4, -1)[:, 1:]), key


def test_torchvision_weights_names_give_their_class_names(source_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    url = torchvision.models.get_weight(COCO_WEIGHTS).url
    torch.save(source_model.state_dict(), cache / url.rsplit("/", 1)[-1])
    model = models.get_model(LITE, weights=COCO_WEIGHTS, class_names={1: "person", 2: "DOG"}).eval()
    images = [torch.rand(3, 200, 200, generator=torch.Generator().manual_seed(3))]
    old, new = class_logits(source_model, images), class_logits(model, images)
    torch.testing.assert_close(new, old[..., [0, PERSON, DOG]], rtol=1e-5, atol=1e-5)
    # Without class_names the load stays torchvision's: strict, so 91 classes or nothing.
    with pytest.raises(models.WeightsError, match="91 classes, num_classes=3"):
        models.get_model(LITE, weights=COCO_WEIGHTS, num_classes=3)


def test_the_same_classes_load_strictly(source_model, checkpoints, capsys):
    coco_names = {label: entry["name"] for label, entry in coco_table().items()}
    model = models.get_model(LITE, weights=checkpoints["table"], num_classes=91, class_names=coco_names)
    assert "fine-tuning" not in capsys.readouterr().out
    for key, value in source_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key  # the N/A rows too, as a strict load keeps them


def test_trainable_backbone_layers_follow_torchvision_when_fine_tuning(checkpoints):
    def frozen(**kwargs):
        model = models.get_model(LITE, weights=checkpoints["table"], class_names={1: "dog"}, **kwargs)
        return {name for name, p in model.named_parameters() if not p.requires_grad}

    assert frozen() == set()  # SSDlite's default with weights: all 6 stages train
    # As with the same classes, where the builder freezes what torchvision's does (tested in test_weights).
    strict = models.get_model(LITE, weights=checkpoints["table"], trainable_backbone_layers=2)
    expected = {name for name, p in strict.named_parameters() if not p.requires_grad}
    assert expected and frozen(trainable_backbone_layers=2) == expected


def one_line_error(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_train_fine_tunes_onto_the_datasets_classes(source_model, shapes_root, tmp_path):
    # A 91-class checkpoint that knows two of the shapes, spelled differently.
    names = {label: entry["name"] for label, entry in coco_table().items()}
    names.update({5: "Circle", 9: "STAR"})
    weights = tmp_path / "coco_like.pth"
    torch.save({"model": source_model.state_dict(), "categories": names, "args": {"model": LITE}}, weights)

    result = run_script("train.py", *train_args(shapes_root, tmp_path / "out", "--weights", weights, epochs=1))
    assert_ok(result)
    line = next(line for line in result.stdout.splitlines() if line.startswith("fine-tuning"))
    assert "(91 classes) for 6 classes" in line and "'circle'<-'Circle'" in line and "'star'<-'STAR'" in line
    assert "3 classes start from scratch ('rectangle', 'triangle', 'cross')" in line

    # Evaluating is not fine-tuning: --test-only refuses weights whose labels name other classes than the data's.
    error = one_line_error(run_script("train.py", *train_args(shapes_root, "", "--weights", weights, "--test-only")))
    assert "coco_like.pth was trained on other classes than this data's: no class is named 'rectangle' there" in error
    # Weights of another model: one line that says so.
    other = train_args(shapes_root, tmp_path / "out2", "--weights", weights, "--model", "ssd300_vgg16")
    error = one_line_error(run_script("train.py", *other))
    assert "coco_like.pth" in error and "outside its classification layers" in error and "missing keys" in error
    assert not (tmp_path / "out2" / "checkpoint.pth").exists()

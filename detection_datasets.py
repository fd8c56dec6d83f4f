"""The datasets train.py's flags name: COCO-format annotation files (COCO itself and users' own data), Pascal VOC
and the generated shapes set, with the training or evaluation transforms of the flags' model and augmentation.

Reading the files is coco_utils.py's and voc_utils.py's; this module turns the flags into their calls, and checks
the VOC-only flags. browse.py builds its datasets here too, so that it shows what training reads.
"""
import coco_utils
import models
import presets
import shapes
import utils
import voc_utils
from cli import ConfigError


def voc_splits(args, is_train):
    """The --train-split / --val-split YEAR/LIST values as (year, list) pairs, or None for get_voc's default."""
    if is_train:
        flag, value = "--train-split", args.train_split
    else:
        flag, value = "--val-split", None if args.val_split is None else [args.val_split]
    try:
        return None if value is None else [voc_utils.parse_voc_split(split) for split in value]
    except ValueError as error:
        raise ConfigError(f"{flag}: {error}") from None


def validate_voc_args(args):
    """Check the VOC-only flags (they go with --dataset voc only)."""
    voc_flags = {"--train-split": args.train_split, "--val-split": args.val_split,
                 "--voc-classes": args.voc_classes, "--keep-difficult": args.keep_difficult}
    coco_flags = {"--train-images": args.train_images, "--train-annotations": args.train_annotations,
                  "--val-images": args.val_images, "--val-annotations": args.val_annotations,
                  "--keep-empty-images": args.keep_empty_images}
    if args.dataset != "voc":
        for flag, value in voc_flags.items():
            if value:
                raise ConfigError(f"{flag} is for --dataset voc, not --dataset {args.dataset}")
        return
    for flag, value in coco_flags.items():
        if value:
            raise ConfigError(f"{flag} is for COCO-format data, not --dataset voc (see --train-split / --val-split)")
    for is_train in (True, False):
        voc_splits(args, is_train)  # a malformed YEAR/LIST stops here, before anything is loaded
    if args.voc_classes is not None and len(set(args.voc_classes)) != len(args.voc_classes):
        raise ConfigError(f"--voc-classes names a class twice: {' '.join(args.voc_classes)}")


def get_transform(is_train, args):
    if is_train:
        return presets.DetectionPresetTrain(
            data_augmentation=args.data_augmentation, backend=args.backend, use_v2=args.use_v2,
            input_size=models.INPUT_SIZES[args.model],
        )
    return presets.DetectionPresetEval(backend=args.backend, use_v2=args.use_v2)


def prepare_data_root(args):
    """Generate the shapes dataset once (rank 0 first, the others then reuse it)."""
    if args.dataset != "shapes":
        return
    if utils.is_main_process():
        shapes.ensure_shapes_dataset(args.data_path, num_train=args.shapes_num_train,
                                     num_val=args.shapes_num_val)
    utils.barrier()
    if not utils.is_main_process():
        shapes.ensure_shapes_dataset(args.data_path, num_train=args.shapes_num_train,
                                     num_val=args.shapes_num_val)


def get_datasets(args):
    """(training dataset, or None with --test-only; validation dataset), labelled by one category table made from
    the union of the training and validation files' categories, so that a label means the same class in training
    and in any later evaluation. With --test-only the training file is read for its categories where it exists.
    Pascal VOC's labels are its class list's, the same for every split."""
    if args.dataset == "voc":
        return None if args.test_only else get_voc_dataset(args, True), get_voc_dataset(args, False)
    paths = {"val": coco_utils.split_paths(args.data_path, "val", args.val_images, args.val_annotations)}
    try:
        paths["train"] = coco_utils.split_paths(args.data_path, "train", args.train_images, args.train_annotations)
    except coco_utils.DatasetError:
        if not args.test_only:
            raise
        print(f"No training split found: the classes are those of {paths['val'][1]} alone")
    splits = [split for split in ("train", "val") if split in paths]
    cocos = {split: coco_utils.load_annotation_file(paths[split][1]) for split in splits}
    categories = coco_utils.build_category_table({paths[split][1]: cocos[split] for split in splits})
    if any(label != entry["id"] for label, entry in categories.items()):
        ids = [entry["id"] for entry in categories.values()]
        print(f"{len(ids)} categories with ids {min(ids)}..{max(ids)}: the model's labels are 1..{len(ids)} in "
              "ascending id order; evaluation results keep the annotation files' ids")

    def make_dataset(split, is_train):
        img_folder, ann_file = paths[split]
        return coco_utils.get_coco(
            args.data_path, split, get_transform(is_train, args), use_v2=args.use_v2, img_folder=img_folder,
            ann_file=ann_file, categories=categories, keep_empty_images=args.keep_empty_images, coco=cocos[split],
            allow_paths_outside=args.allow_image_paths_outside_folder,
        )

    return None if args.test_only else make_dataset("train", True), make_dataset("val", False)


def get_voc_dataset(args, is_train):
    return voc_utils.get_voc(
        args.data_path, "train" if is_train else "val", get_transform(is_train, args), use_v2=args.use_v2,
        splits=voc_splits(args, is_train), classes=args.voc_classes or voc_utils.VOC_CLASSES,
        keep_difficult=args.keep_difficult,
    )

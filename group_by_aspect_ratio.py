"""Batches of images with similar aspect ratios (torchvision detection references, --aspect-ratio-group-factor).

Aspect ratios come from the annotation file (COCO "width"/"height"), never from decoding images. For SSD every
image is resized to a fixed square, so grouping saves no padding; it only shapes batch composition as in the
published recipes.
"""

import bisect
from collections import defaultdict

import numpy as np
import torch.utils.data
from torch.utils.data.sampler import BatchSampler, Sampler


class GroupedBatchSampler(BatchSampler):
    """Wraps a sampler to yield batches whose elements share a group id, in the sampler's order, and every element
    of an epoch exactly once.

    As in torchvision, a batch is yielded as soon as a group has batch_size elements. Unlike torchvision, whose
    last batches repeat elements of the largest leftover groups and leave out the smaller ones (a group smaller than
    a batch, such as a few portrait photos among landscape ones, was never trained on), the leftovers of every group
    are then packed, group after group in order of group id, into batches of batch_size, the last one partial: the
    only batches that may mix groups. So len(self) == ceil(len(sampler) / batch_size), the same for every epoch and,
    under a DistributedSampler, for every rank. A last batch below min_batch_size (a model whose BatchNorm needs two
    images) is completed with elements already seen in its last group.
    """

    def __init__(self, sampler, group_ids, batch_size, min_batch_size=1):
        if not isinstance(sampler, Sampler):
            raise ValueError(f"sampler should be an instance of torch.utils.data.Sampler, but got sampler={sampler}")
        self.sampler = sampler
        self.group_ids = group_ids
        self.batch_size = batch_size
        self.min_batch_size = min_batch_size

    def __iter__(self):
        pending = defaultdict(list)
        seen = defaultdict(list)
        for idx in self.sampler:
            group = self.group_ids[idx]
            pending[group].append(idx)
            seen[group].append(idx)
            if len(pending[group]) == self.batch_size:
                yield pending.pop(group)

        leftovers = [idx for group in sorted(pending) for idx in pending[group]]
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start:start + self.batch_size]
            missing = self.min_batch_size - len(batch)
            if missing > 0:
                group_seen = seen[self.group_ids[batch[-1]]]
                batch += (group_seen * -(-missing // len(group_seen)))[:missing]
            yield batch

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)  # ceil


def compute_aspect_ratios(dataset, indices=None):
    """width / height of each image (of `indices`, default all), from the dataset's metadata only."""
    if indices is None:
        indices = range(len(dataset))
    if isinstance(dataset, torch.utils.data.Subset):
        return compute_aspect_ratios(dataset.dataset, [dataset.indices[i] for i in indices])
    if hasattr(dataset, "get_height_and_width"):
        sizes = [dataset.get_height_and_width(i) for i in indices]
    elif hasattr(dataset, "coco") and hasattr(dataset, "ids"):  # torchvision's CocoDetection, v2-wrapped or not
        sizes = [(dataset.coco.imgs[dataset.ids[i]]["height"], dataset.coco.imgs[dataset.ids[i]]["width"]) for i in indices]
    else:
        raise TypeError(
            f"cannot read image sizes of a {type(dataset).__name__} without decoding its images: it needs "
            "get_height_and_width(idx) or COCO metadata (.coco, .ids); use --aspect-ratio-group-factor -1"
        )
    return [float(width) / float(height) for height, width in sizes]


def _quantize(values, bins):
    bins = sorted(bins)
    return [bisect.bisect_right(bins, value) for value in values]


def create_aspect_ratio_groups(dataset, k=0):
    """Group id per image: the bin of its aspect ratio among 2k + 1 bins spaced geometrically over [0.5, 2]
    (k = 0: two groups, portrait vs landscape)."""
    aspect_ratios = compute_aspect_ratios(dataset)
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    groups = _quantize(aspect_ratios, bins)
    counts = np.unique(groups, return_counts=True)[1]
    print(f"Using {[0] + bins + [np.inf]} as bins for aspect ratio quantization")
    print(f"Count of instances per bin: {counts}")
    return groups

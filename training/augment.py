"""Data augmentation for the segmentation pre-training of g, reproducible per slice and epoch.

g is trained on full-dose slices but later judges reconstructions it never saw, so a g that
is hard to satisfy with images that are no longer CT is worth more than one that fits its
few training patients. :func:`segmentation_augmentation` is MONAI's dictionary transforms
on ``image`` and ``label`` (slices are normalised attenuation, where 1 unit is about
4072 HU and air is about 0):

* ``RandAffined`` (probability 0.8): rotation up to ±15°, scaling ±10 %, translation up to
  ±6 % of the side; bilinear for the image, nearest for the labels, air (0) and background
  outside;
* ``RandScaleIntensityd`` (0.5): intensity times 1 ± 5 % (±12 HU at soft tissue per %);
* ``RandShiftIntensityd`` (0.5): intensity plus up to ±0.005 (±20 HU);
* ``RandGaussianNoised`` (0.5): white noise of a standard deviation drawn from [0, 0.03]
  (up to 120 HU, the order of the low-dose noise at N0 = 1024).

Reproducibility: :class:`AugmentedSlices` seeds the transforms from (seed, epoch, slice)
for every item, so the augmentation of a slice does not depend on worker processes, batch
order or a resume; :class:`EpochTaggedSampler` passes the epoch with each index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from monai.transforms import Compose, RandAffined, RandGaussianNoised, RandScaleIntensityd, RandShiftIntensityd
from torch.utils.data import Dataset, DistributedSampler

AUGMENTED_KEYS = ("image", "label")


def segmentation_augmentation(size: int) -> Compose:
    """The augmentation of g's training slices of ``size`` x ``size`` px (see the module docstring)."""
    shift = 0.06 * size
    return Compose([
        RandAffined(keys=AUGMENTED_KEYS, prob=0.8, rotate_range=(math.radians(15),), scale_range=(0.1, 0.1),
                    translate_range=(shift, shift), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.05, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.005, prob=0.5),
        RandGaussianNoised(keys="image", prob=0.5, mean=0.0, std=0.03, sample_std=True),
    ])


class EpochTaggedSampler(DistributedSampler):
    """A ``DistributedSampler`` that yields ``(index, epoch)``, for :class:`AugmentedSlices`.

    MONAI's trainer calls ``set_epoch`` at the start of every epoch, as for any
    ``DistributedSampler``; the order of indices is the parent's.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((index, epoch) for index in super().__iter__())


class AugmentedSlices(Dataset):
    """``slices`` with ``transform`` applied, seeded by (seed, epoch, index) for each item.

    Args:
        slices: a dataset of MONAI-style dictionaries (``training.slices.SliceDataset``).
        transform: randomisable MONAI transforms (``set_random_state`` is called per item).
        seed: the run's seed.

    Items are asked for as ``(index, epoch)`` (see :class:`EpochTaggedSampler`).
    """

    def __init__(self, slices: Dataset, transform: Compose, seed: int) -> None:
        self.slices, self.transform, self.seed = slices, transform, seed

    def __len__(self) -> int:
        return len(self.slices)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"AugmentedSlices items are (index, epoch) pairs from an EpochTaggedSampler, got {key!r}")
        index, epoch = key
        item = dict(self.slices[index])
        seed = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
        self.transform.set_random_state(seed=int(seed))
        out = self.transform({k: item[k] for k in AUGMENTED_KEYS})
        item["image"] = out["image"].as_tensor().float() if hasattr(out["image"], "as_tensor") else out["image"].float()
        item["label"] = out["label"].as_tensor().long() if hasattr(out["label"], "as_tensor") else out["label"].long()
        return item

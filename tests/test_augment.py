"""The segmentation augmentation: reproducible per (seed, epoch, slice), image and labels moved together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from training.augment import AugmentedSlices, EpochTaggedSampler, segmentation_augmentation


class _Disc(Dataset):
    """Slices of air with one bright disc labelled liver, at a place that depends on the index."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict:
        yy, xx = np.mgrid[:64, :64]
        disc = (yy - 24 - 2 * index) ** 2 + (xx - 30) ** 2 < 12**2
        image = np.where(disc, 0.26, 0.0).astype(np.float32)[None]
        return {"image": torch.from_numpy(image), "fulldose": torch.from_numpy(image.copy()),
                "label": torch.from_numpy(disc.astype(np.int64)[None]), "case": "0", "index": index}


def test_the_augmentation_depends_only_on_seed_epoch_and_slice():
    slices = AugmentedSlices(_Disc(), segmentation_augmentation(64), seed=3)
    first, again = slices[(2, 5)], AugmentedSlices(_Disc(), segmentation_augmentation(64), seed=3)[(2, 5)]
    torch.testing.assert_close(first["image"], again["image"], rtol=0, atol=0)
    assert torch.equal(first["label"], again["label"])
    other_epoch, other_seed = slices[(2, 6)], AugmentedSlices(_Disc(), segmentation_augmentation(64), seed=4)[(2, 5)]
    assert not torch.equal(first["image"], other_epoch["image"]) and not torch.equal(first["image"], other_seed["image"])
    assert first["image"].dtype == torch.float32 and first["label"].dtype == torch.int64
    assert first["image"].shape == first["label"].shape == (1, 64, 64)
    assert torch.equal(first["fulldose"], _Disc()[2]["fulldose"]) and first["index"] == 2
    with pytest.raises(TypeError, match="EpochTaggedSampler"):
        slices[2]


def test_image_and_labels_are_moved_together():
    """Across many draws the labelled pixels stay on the disc (about 0.26) and the rest on air."""
    slices = AugmentedSlices(_Disc(), segmentation_augmentation(64), seed=0)
    moved = 0
    for epoch in range(20):
        item = slices[(epoch % 6, epoch)]
        image, label = item["image"][0].numpy(), item["label"][0].numpy()
        assert set(np.unique(label)) <= {0, 1} and label.sum() > 100
        assert abs(np.median(image[label == 1]) - 0.26) < 0.05
        assert abs(np.median(image[label == 0])) < 0.05
        moved += not np.array_equal(label, _Disc()[epoch % 6]["label"][0].numpy())
    assert moved >= 10, "the augmentation should move most slices"


def test_the_sampler_passes_the_epoch_that_the_trainer_sets():
    dataset = AugmentedSlices(_Disc(), segmentation_augmentation(64), seed=0)
    sampler = EpochTaggedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(4)
    keys = list(iter(sampler))
    assert sorted(index for index, _ in keys) == list(range(6)) and {epoch for _, epoch in keys} == {4}
    batch = next(iter(DataLoader(dataset, batch_size=3, sampler=sampler)))
    assert batch["image"].shape == (3, 1, 64, 64)

"""The PyTorch slice view of a simulated data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.errors import DataError
from training.physics import hu_to_normalized
from training.slices import SliceDataset
from training.simulate import SimulationSettings, simulate_dataset


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    from training.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("slices")
    write_phantom_dataset(root / "lits", 3, size=32, slices=4, seed=2, progress=False)
    simulate_dataset(root / "lits", root / "dataset", SimulationSettings(size=32, num_angles=24, photons=1e4),
                     workers=2, progress=False)
    return root


def test_items_are_the_stored_slices_as_tensors(dataset_root):
    slices = SliceDataset(dataset_root / "dataset", "train")
    assert len(slices) == len(slices.dataset.slices("train")) > 0
    item = slices[0]
    assert item["image"].shape == item["fulldose"].shape == item["label"].shape == (1, 32, 32)
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    ref = slices.refs[0]
    hu = slices.dataset.slice_hu("fulldose", ref)
    np.testing.assert_allclose(item["fulldose"][0].numpy(), hu_to_normalized(hu), atol=1e-6)
    assert 0.0 <= item["fulldose"].min() and item["fulldose"].max() <= 1.0
    assert set(torch.unique(item["label"]).tolist()) <= {0, 1, 2}
    assert (item["case"], item["index"]) == (ref.case, ref.index)


def test_batches_through_a_data_loader(dataset_root):
    loader = DataLoader(SliceDataset(dataset_root / "dataset", "train"), batch_size=2, shuffle=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 32, 32) and len(batch["case"]) == 2


def test_full_dose_input_for_segmentation_pretraining(dataset_root):
    slices = SliceDataset(dataset_root / "dataset", "test", input_method="fulldose")
    item = slices[0]
    np.testing.assert_allclose(item["image"].numpy(), item["fulldose"].numpy(), atol=1e-6)


def test_missing_input_volumes_are_refused(dataset_root):
    with pytest.raises(DataError, match="no 'bm3d' volumes"):
        SliceDataset(dataset_root / "dataset", "train", input_method="bm3d")


def test_a_rewritten_volume_is_read_afresh(dataset_root, tmp_path):
    import shutil

    from training.dataset import SimulatedDataset, volume_path
    from training.fileio import save_nifti

    root = tmp_path / "copy"
    shutil.copytree(dataset_root / "dataset", root)
    dataset = SimulatedDataset(root)
    ref = dataset.slices()[0]
    before = dataset.slice_hu("fbp", ref)
    image = dataset.volume("fbp", ref.case)
    assert dataset.volume("fbp", ref.case) is image, "opened once, not per slice"
    save_nifti(volume_path(root, "fbp", ref.case), np.asarray(image.dataobj) + 100.0, image.affine)
    np.testing.assert_allclose(dataset.slice_hu("fbp", ref), before + 100.0, atol=1e-3)

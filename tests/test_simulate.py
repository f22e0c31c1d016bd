"""Preparation of cases for simulation: slice selection, resampling geometry, split."""

from __future__ import annotations

import numpy as np
import pytest

from training.errors import DataError
from training.physics import LODOPAB_EXTENT_M, hu_to_normalized
from training.simulate import SimulationSettings, prepare_case, split_by_patient
from training.volume import CTVolume


def _volume(shape=(128, 96, 5), spacing=(0.8, 0.8, 2.5)) -> CTVolume:
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    hu[40:90, 30:70, :] = 60.0
    labels[50:60, 40:50, 1:4] = 1  # liver in slices 1-3 only
    hu[100:104, 20:24, :] = 3000.0  # a bright marker centred on voxel (101.5, 21.5)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-50.0, 20.0, -300.0)
    return CTVolume("7", hu, labels, affine, ["volume-7.nii.gz"])


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.array([*ijk, 1.0]))[:3]


def test_only_slices_with_a_segmentation_are_kept_unless_asked():
    volume = _volume()
    assert prepare_case(volume, SimulationSettings(size=128)).source_slices == [1, 2, 3]
    assert prepare_case(volume, SimulationSettings(size=128, keep_empty=True)).source_slices == [0, 1, 2, 3, 4]


def test_non_square_slices_are_padded_with_air_and_resampled_in_place():
    volume = _volume()
    prepared = prepare_case(volume, SimulationSettings(size=64))
    assert prepared.x_full.shape == (64, 64, 3) and prepared.labels.shape == (64, 64, 3)
    # The 128 x 96 slice becomes a 128 x 128 square (0.8 mm) and then 64 x 64 (1.6 mm).
    np.testing.assert_allclose(np.linalg.norm(prepared.affine[:3, :3], axis=0), [1.6, 1.6, 2.5])
    assert prepared.extent_m == pytest.approx(128 * 0.8 / 1000)
    # Padding is air, the marker stays at the same world position.
    assert prepared.x_full[:, 0, 0].max() == pytest.approx(hu_to_normalized(np.array(-1000.0)), abs=1e-4)
    # Sub-pixel centroid of the marker (air around it is ~0, so x itself is the weight).
    i, j = np.unravel_index(np.argmax(prepared.x_full[:, :, 0]), (64, 64))
    window = prepared.x_full[i - 3 : i + 4, j - 3 : j + 4, 0]
    ci, cj = (np.argwhere(np.ones_like(window, bool)) * window.reshape(-1, 1)).sum(axis=0) / window.sum()
    marker = _world(prepared.affine, (i - 3 + ci, j - 3 + cj, 0))
    np.testing.assert_allclose(marker, _world(volume.affine, (101.5, 21.5, 1)), atol=0.15)
    # Labels stay labels, in the same place.
    assert set(np.unique(prepared.labels)) == {0, 1}
    li, lj = np.argwhere(prepared.labels[:, :, 0]).mean(axis=0)
    np.testing.assert_allclose(_world(prepared.affine, (li, lj, 0)), _world(volume.affine, (54.5, 44.5, 1)), atol=0.4)


def test_labels_stay_on_the_image_when_slices_are_reduced():
    """An off-centre L-shaped object at 8 sub-pixel offsets, reduced 4x: the label centroid
    sits on the image centroid on average. Floor-based nearest resizing put it (1.5, 1.5)
    source pixels off, 0.53 output pixels; nearest-exact would leave 0.18."""
    air = float(hu_to_normalized(np.array(-1000.0)))
    offsets = []
    for di, dj in [(0, 0), (1, 2), (2, 1), (3, 3), (1, 0), (0, 3), (2, 2), (3, 1)]:
        hu = np.full((256, 256, 1), -1000.0, np.float32)
        labels = np.zeros((256, 256, 1), np.uint8)
        i0, j0 = 60 + di, 150 + dj
        for rows, cols in ((slice(i0, i0 + 40), slice(j0, j0 + 12)), (slice(i0 + 28, i0 + 40), slice(j0 + 12, j0 + 30))):
            hu[rows, cols] = 60.0
            labels[rows, cols] = 1
        prepared = prepare_case(CTVolume("1", hu, labels, np.eye(4), ["v"]), SimulationSettings(size=64))
        # Away from the border, where the anti-aliasing filter darkens the air.
        image = prepared.x_full[8:-8, 8:-8, 0] - air
        mask = prepared.labels[8:-8, 8:-8, 0]
        grid = np.indices(image.shape).reshape(2, -1)
        image_centroid = grid @ image.ravel() / image.sum()
        label_centroid = grid @ mask.ravel() / mask.sum()
        offsets.append(label_centroid - image_centroid)
    mean_offset = np.linalg.norm(np.mean(offsets, axis=0))
    assert mean_offset < 0.1, f"labels sit {mean_offset:.2f} output pixels off the image"


def test_kept_slices_are_one_contiguous_range_in_place():
    """Labelled slices 1 and 3 with an empty slice 2 between them: slices 1-3 are kept, and
    the output affine puts each at its source slice's position."""
    volume = _volume(shape=(64, 64, 6))
    volume.segmentation[:] = 0
    volume.segmentation[20:30, 20:30, 1] = 1
    volume.segmentation[20:30, 20:30, 3] = 2
    prepared = prepare_case(volume, SimulationSettings(size=32))
    assert prepared.source_slices == [1, 2, 3]
    assert prepared.unlabelled_slices == 1
    for z, k in enumerate(prepared.source_slices):
        np.testing.assert_allclose(_world(prepared.affine, (15.5, 15.5, z)), _world(volume.affine, (31.5, 31.5, k)),
                                   atol=1e-6)


def test_lodopab_domain_fixes_26_cm():
    prepared = prepare_case(_volume(), SimulationSettings(size=64, domain="lodopab"))
    assert prepared.extent_m == LODOPAB_EXTENT_M


def test_unusable_cases_are_refused():
    with pytest.raises(DataError, match="anisotropic in-plane spacing"):
        prepare_case(_volume(spacing=(0.8, 1.0, 2.5)), SimulationSettings(size=64))
    empty = _volume()
    empty.segmentation[:] = 0
    with pytest.raises(DataError, match="volume-7.nii.gz.*no slice has a non-empty segmentation"):
        prepare_case(empty, SimulationSettings(size=64))


@pytest.mark.parametrize("field, value, message", [
    ("photons", 0, "photons must be a positive finite number"),
    ("photons", float("inf"), "photons must be a positive finite number, got inf"),
    ("seed", -1, "seed must not be negative"),
    ("upsample", 0, "upsample must be at least 1"),
    ("size", 8, "size must be at least 16"),
    ("domain", "huge", "domain must be one of"),
    ("fbp_scaling", 0.0, r"fbp_scaling must be in \(0, 1\]"),
    ("test_fraction", 1.0, r"test_fraction must be in \[0, 1\)"),
])
def test_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        SimulationSettings(**{field: value})


def test_split_is_by_patient_seeded_and_about_80_20():
    ids = [str(k) for k in range(131)]
    split = split_by_patient(ids, 0.2, seed=0)
    assert len(split["test"]) == 26 and len(split["train"]) == 105
    assert sorted(split["train"] + split["test"], key=int) == ids
    assert split == split_by_patient(list(reversed(ids)), 0.2, seed=0), "independent of input order"
    assert split != split_by_patient(ids, 0.2, seed=1)
    assert split_by_patient(["0"], 0.2, seed=0) == {"train": [], "test": ["0"]}
    assert split_by_patient(["0", "1"], 0.0, seed=0) == {"train": ["0", "1"], "test": []}


def test_named_test_cases_always_go_to_the_test_split():
    ids = [str(k) for k in range(10)]
    for seed in range(5):
        split = split_by_patient(ids, 0.2, seed, test_cases=["7"])
        assert "7" in split["test"] and len(split["test"]) == 3  # the named case, plus 20% of the other nine
        assert sorted(split["train"] + split["test"], key=int) == ids
    assert split_by_patient(ids, 0.0, 0, test_cases=["3"]) == {"train": [i for i in ids if i != "3"], "test": ["3"]}
    with pytest.raises(ValueError, match=r"test cases \['11'\] are not among the input cases"):
        split_by_patient(ids, 0.2, 0, test_cases=["11"])

"""Tests of the synthetic LiTS-like phantom generator (training.phantom), on small volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from training.phantom import generate_phantom, write_phantom_dataset
from training.volume import LABEL_LIVER, LABEL_TUMOR, CTVolume

SIZE, SLICES, SEED = 96, 12, 8
"""A small phantom whose liver holds a tumour of a few hundred voxels."""


@pytest.fixture(scope="module")
def phantom() -> CTVolume:
    return generate_phantom(np.random.default_rng(SEED), size=SIZE, slices=SLICES, case_id="p8")


def test_arrays_geometry_and_labels(phantom: CTVolume) -> None:
    assert phantom.case_id == "p8"
    assert phantom.hu.shape == phantom.segmentation.shape == (SIZE, SIZE, SLICES)
    assert phantom.hu.dtype == np.float32 and phantom.segmentation.dtype == np.uint8
    assert set(np.unique(phantom.segmentation)) == {0, LABEL_LIVER, LABEL_TUMOR}
    # Canonical RAS+: a positive diagonal affine; realistic field of view and slice thickness.
    linear = phantom.affine[:3, :3]
    assert np.array_equal(linear, np.diag(np.diag(linear))) and np.all(np.diag(linear) > 0)
    assert np.array_equal(phantom.affine[3], [0.0, 0.0, 0.0, 1.0])
    sx, sy, sz = phantom.spacing
    assert sx == sy
    assert 340.0 <= sx * SIZE <= 420.0
    assert 2.5 <= sz <= 5.0
    # The affine centres the volume on the origin.
    centre = phantom.affine @ np.array([(SIZE - 1) / 2, (SIZE - 1) / 2, (SLICES - 1) / 2, 1.0])
    assert np.allclose(centre[:3], 0.0, atol=1e-9)


def test_liver_in_most_but_not_all_slices(phantom: CTVolume) -> None:
    with_liver = (phantom.segmentation == LABEL_LIVER).any(axis=(0, 1))
    assert SLICES // 2 <= with_liver.sum() < SLICES
    # Liver-free slices lie above or below the liver, not between liver slices.
    k = np.flatnonzero(with_liver)
    assert np.array_equal(k, np.arange(k[0], k[-1] + 1))


def test_tumours_lie_inside_the_liver(phantom: CTVolume) -> None:
    seg = phantom.segmentation
    tumour = seg == LABEL_TUMOR
    assert tumour.sum() > 50
    # Every tumour voxel's 26 neighbours are liver or tumour (outside the array counts as liver).
    interior = ndi.binary_erosion(seg > 0, structure=np.ones((3, 3, 3), bool), border_value=1)
    assert np.all(interior[tumour])


def test_tumours_are_hypodense(phantom: CTVolume) -> None:
    seg, hu = phantom.segmentation, phantom.hu
    liver, tumour = float(hu[seg == LABEL_LIVER].mean()), float(hu[seg == LABEL_TUMOR].mean())
    assert 60.0 <= liver <= 150.0  # enhanced parenchyma plus its brighter vessels
    assert 15.0 <= liver - tumour <= 80.0


def test_hounsfield_ranges(phantom: CTVolume) -> None:
    hu = phantom.hu
    assert hu.min() >= -1024.0 and hu.max() <= 3071.0
    # Outside the reconstruction circle: scanner padding; between it and the body: air.
    assert np.all(hu[0, 0, :] == -1024.0) and np.all(hu[-1, -1, :] == -1024.0)
    air = hu[SIZE // 2, -5:-2, :]  # in front of the body (high j is anterior)
    assert abs(float(air.mean()) + 1000.0) < 15.0
    assert hu.max() > 500.0  # cortical bone
    body = hu[hu > -900.0]
    assert np.mean((body > -140.0) & (body < -60.0)) > 0.05  # fat
    assert np.mean((body > 20.0) & (body < 80.0)) > 0.05  # muscle and other soft tissue
    # Lung bases or bowel gas inside the body: very dark voxels away from the edges.
    inner = hu[SIZE // 4 : -SIZE // 4, SIZE // 4 : -SIZE // 4, :]
    assert np.any(inner < -700.0)


def test_orientation_liver_right_spine_posterior(phantom: CTVolume) -> None:
    seg, hu = phantom.segmentation, phantom.hu
    i, _, _ = np.nonzero(seg == LABEL_LIVER)
    assert i.mean() > SIZE / 2 + SIZE / 20  # patient's right is high i
    # Dense bone near the midline is the spine (ribs lie laterally): posterior is low j.
    midline = hu[SIZE // 2 - SIZE // 10 : SIZE // 2 + SIZE // 10]
    _, j, _ = np.nonzero(midline > 300.0)
    assert j.size > 0 and j.mean() < SIZE / 2 - SIZE / 20


def test_tumour_count_and_size_vary_between_volumes() -> None:
    counts, volumes_mm3 = [], []
    for seed in range(10):
        volume = generate_phantom(np.random.default_rng(seed), size=64, slices=16)
        labels, count = ndi.label(volume.segmentation == LABEL_TUMOR, structure=np.ones((3, 3, 3), bool))
        counts.append(count)
        voxel = float(np.prod(volume.spacing))
        volumes_mm3 += [voxel * n for n in np.bincount(labels.ravel())[1:]]
    assert sum(c >= 1 for c in counts) >= 7  # most volumes hold a tumour
    assert max(counts) >= 2 and len(set(counts)) >= 3
    assert max(volumes_mm3) > 20 * min(volumes_mm3)  # from a few mm to a few cm across


def test_same_seed_same_volume_different_seed_different_volume(phantom: CTVolume) -> None:
    again = generate_phantom(np.random.default_rng(SEED), size=SIZE, slices=SLICES, case_id="p8")
    assert np.array_equal(again.hu, phantom.hu)
    assert np.array_equal(again.segmentation, phantom.segmentation)
    assert np.array_equal(again.affine, phantom.affine)
    other = generate_phantom(np.random.default_rng(SEED + 1), size=SIZE, slices=SLICES)
    assert not np.array_equal(other.segmentation, phantom.segmentation)
    assert not np.allclose(other.affine, phantom.affine)


def test_anatomy_is_defined_in_millimetres() -> None:
    """The same generator state gives the same anatomy at any matrix size."""
    coarse, fine = (generate_phantom(np.random.default_rng(3), size=n, slices=6) for n in (64, 128))
    assert coarse.spacing[0] * 64 == pytest.approx(fine.spacing[0] * 128)
    assert coarse.spacing[2] == fine.spacing[2]

    def liver(volume: CTVolume) -> tuple[float, np.ndarray]:
        idx = np.argwhere(volume.segmentation > 0)
        mm = idx @ volume.affine[:3, :3].T + volume.affine[:3, 3]
        return len(idx) * float(np.prod(volume.spacing)), mm.mean(axis=0)

    (v64, c64), (v128, c128) = liver(coarse), liver(fine)
    assert v64 == pytest.approx(v128, rel=0.05)
    assert np.linalg.norm(c64 - c128) < 3.0


def test_written_files_round_trip(tmp_path, capsys) -> None:
    paths = write_phantom_dataset(tmp_path, volumes=1, size=64, slices=5, seed=11, progress=True)
    assert "phantoms" in capsys.readouterr().err  # the progress bar
    assert paths == [(tmp_path / "volume-0.nii.gz", tmp_path / "segmentation-0.nii.gz")]
    expected = generate_phantom(np.random.default_rng(np.random.SeedSequence((11, 0))), size=64, slices=5)

    image, labels = nib.load(paths[0][0]), nib.load(paths[0][1])
    assert image.shape == labels.shape == (64, 64, 5)
    assert image.get_data_dtype() == np.int16 and labels.get_data_dtype() == np.uint8
    assert np.allclose(image.header.get_zooms(), expected.spacing)
    assert np.allclose(labels.header.get_zooms(), expected.spacing)
    assert np.allclose(image.affine, expected.affine) and np.allclose(labels.affine, expected.affine)
    assert np.array_equal(np.asarray(labels.dataobj), expected.segmentation)
    assert np.array_equal(np.asarray(image.dataobj), np.rint(expected.hu).astype(np.int16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["segmentation-0.nii.gz", "volume-0.nii.gz"]  # no temporaries


def test_volume_k_does_not_depend_on_the_number_of_volumes(tmp_path, capsys) -> None:
    one = write_phantom_dataset(tmp_path / "one", volumes=1, size=48, slices=3, seed=5, progress=False)
    three = write_phantom_dataset(tmp_path / "three", volumes=3, size=48, slices=3, seed=5, progress=False)
    assert capsys.readouterr().err == ""  # progress=False: no bar
    assert len(three) == 3 and all(v.exists() and s.exists() for v, s in three)
    for a, b in zip(one[0], three[0]):
        assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
    volumes = [np.asarray(nib.load(v).dataobj) for v, _ in three]
    assert not np.array_equal(volumes[0], volumes[1]) and not np.array_equal(volumes[1], volumes[2])
    # Volume K is drawn from SeedSequence((seed, K)).
    expected = generate_phantom(np.random.default_rng(np.random.SeedSequence((5, 2))), size=48, slices=3)
    assert np.array_equal(volumes[2], np.rint(expected.hu).astype(np.int16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"volumes": 0}, r"volumes .*0"),
        ({"volumes": 1, "size": 31}, r"size .*31"),
        ({"volumes": 1, "slices": 0}, r"slices .*0"),
        ({"volumes": 2.5}, r"volumes .*2\.5"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_phantom_dataset(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())


def test_generate_phantom_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match=r"size .*16"):
        generate_phantom(np.random.default_rng(0), size=16)
    with pytest.raises(ValueError, match=r"slices .*-1"):
        generate_phantom(np.random.default_rng(0), slices=-1)

"""Loaders: every orientation and format gives the same canonical case; bad inputs are named and refused.

The reference case is a 32 x 32 x 6 phantom built here in canonical RAS+ order: each voxel
of the body holds a different HU value, so any flip, transposition or shift shows, and the
liver sits on the patient's right-anterior side with a tumour in its upper slices.
"""

from __future__ import annotations

import contextlib
import locale
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from training.errors import DataError
from training.loaders import find_lits_cases, load_dicom_case, load_image, load_lits_case

SHAPE = (32, 32, 6)
SPACING = (0.75, 0.75, 2.5)
ORIGIN = (-12.0, 30.5, -100.0)


def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu int16, labels uint8, affine)`` in canonical RAS+ order."""
    i, j, k = np.indices(SHAPE)
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    body = (i >= 3) & (i < 29) & (j >= 4) & (j < 28)
    hu[body] = (-100 + 7 * i + 3 * j + 200 * k)[body]
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[(i >= 18) & (i < 27) & (j >= 16) & (j < 26)] = 1
    labels[(i >= 21) & (i < 24) & (j >= 19) & (j < 22) & (k >= 3)] = 2
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    return hu, labels, affine


def reorient(array: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with axis codes ``codes`` (e.g. ``"PIR"``), from canonical RAS+."""
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    return apply_orientation(array, transform), affine @ inv_ornt_aff(transform, array.shape)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_dicom_series(
    directory: Path, hu: np.ndarray, affine: np.ndarray, names: list[str] | None = None
) -> list[Path]:
    """Write ``hu`` (slices along its 3rd axis, any in-plane orientation) as a CT series with stored = HU + 1024.

    ``affine`` is voxel-to-RAS; the series gets the matching ImagePositionPatient and
    ImageOrientationPatient (LPS) for each slice, with file names ``names`` (default by index).
    """
    directory.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    columns, rows = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    orientation = "\\".join(f"{value:g}" for value in (*columns, *rows))
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.2"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    # GDCM's writer sets the process locale to "C"; restore it so later tests see the usual encoding.
    previous_locale = locale.setlocale(locale.LC_ALL)
    for k in range(hu.shape[2]):
        # SimpleITK slices are (rows, columns): rows run along the array's 2nd axis.
        image = sitk.GetImageFromArray(np.ascontiguousarray(hu[:, :, k].T).astype(np.int16))
        image.SetSpacing((float(spacing[0]), float(spacing[1])))
        position = lps @ [0, 0, k, 1]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": study,
            "0020|000e": series,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{value:.4f}" for value in position[:3]),
            "0020|0037": orientation,
            "0018|0050": f"{spacing[2]:g}",
            # GDCM stores (value - intercept) / slope, so the files hold HU + 1024 as on scanners.
            "0028|1052": "-1024",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        path = directory / (names[k] if names else f"slice{k:03d}.dcm")
        writer.SetFileName(str(path))
        writer.Execute(image)
        paths.append(path)
    locale.setlocale(locale.LC_ALL, previous_locale)
    return paths


def write_case(
    directory: Path, hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, seg_affine: np.ndarray | None = None
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    volume = save_nifti(directory / "volume-0.nii.gz", hu, affine)
    segmentation = save_nifti(directory / "segmentation-0.nii.gz", labels, affine if seg_affine is None else seg_affine)
    return volume, segmentation


def assert_is_phantom(volume, hu: np.ndarray, labels: np.ndarray | None, affine: np.ndarray) -> None:
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, hu.astype(np.float32))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    if labels is not None:
        assert volume.segmentation.dtype == np.uint8
        np.testing.assert_array_equal(volume.segmentation, labels)


@contextlib.contextmanager
def expect_data_error(path: Path, *patterns: str) -> Iterator[None]:
    """Expect a DataError naming ``path`` whose message matches every regex in ``patterns``."""
    with pytest.raises(DataError) as info:
        yield
    assert info.value.path == path
    assert str(path) in str(info.value)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in {info.value}"


# --- every orientation and format loads to the same canonical case -------------------------


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PIR", "ASL", "ILP"])
def test_nifti_in_any_axis_order_loads_canonical(tmp_path: Path, codes: str) -> None:
    hu, labels, affine = phantom()
    stored_hu, stored_affine = reorient(hu, affine, codes)
    stored_labels, _ = reorient(labels, affine, codes)
    assert nib.aff2axcodes(stored_affine) == tuple(codes)
    volume_path, segmentation_path = write_case(tmp_path, stored_hu, stored_labels, stored_affine)
    volume = load_lits_case(volume_path, segmentation_path, "0")
    assert_is_phantom(volume, hu, labels, affine)
    assert volume.case_id == "0" and volume.sources == [str(volume_path), str(segmentation_path)]
    assert volume.spacing == pytest.approx(SPACING)


def test_hand_built_lps_nifti_loads_canonical(tmp_path: Path) -> None:
    # Built without nibabel's orientation helpers: reverse i and j, and move the origin to the far corner.
    hu, labels, affine = phantom()
    flip = np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    volume_path, segmentation_path = write_case(tmp_path, hu[::-1, ::-1], labels[::-1, ::-1], affine @ flip)
    assert nib.aff2axcodes(affine @ flip) == ("L", "P", "S")
    assert_is_phantom(load_lits_case(volume_path, segmentation_path, "0"), hu, labels, affine)


def test_volume_and_segmentation_in_different_orientations(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    stored_labels, label_affine = reorient(labels, affine, "SLP")
    volume_path, segmentation_path = write_case(tmp_path, hu, stored_labels, affine, seg_affine=label_affine)
    assert_is_phantom(load_lits_case(volume_path, segmentation_path, "0"), hu, labels, affine)


def test_trailing_singleton_fourth_dimension_is_squeezed(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    volume_path, segmentation_path = write_case(tmp_path, hu[..., None], labels[..., None], affine)
    assert_is_phantom(load_lits_case(volume_path, segmentation_path, "0"), hu, labels, affine)


@pytest.mark.parametrize(
    "codes, names",
    [
        ("LPS", None),  # the usual axial series: columns towards the patient's left, rows posterior
        ("RAS", None),  # in-plane axes reversed in ImageOrientationPatient
        ("LPI", [f"z{n}.dcm" for n in (3, 0, 5, 1, 4, 2)]),  # stack descending, names out of order
    ],
)
def test_dicom_series_loads_canonical(tmp_path: Path, codes: str, names: list[str] | None) -> None:
    hu, labels, affine = phantom()
    stored_hu, stored_affine = reorient(hu, affine, codes)
    files = write_dicom_series(tmp_path / "dicom", stored_hu, stored_affine, names)
    first = pydicom.dcmread(files[0])
    # The files hold stored values, not HU: the loader must apply the rescale intercept.
    assert first.RescaleIntercept == -1024 and first.pixel_array.min() >= 0
    mask = save_nifti(tmp_path / "mask.nii.gz", *reorient(labels, affine, "LAS"))
    volume = load_dicom_case(tmp_path / "dicom", mask, "dicom")
    assert_is_phantom(volume, hu, labels, affine)
    hu_only = load_dicom_case(tmp_path / "dicom", None, "dicom")
    assert hu_only.segmentation is None and hu_only.sources == [str(tmp_path / "dicom")]


def test_dicom_matches_nifti_of_the_same_data(tmp_path: Path) -> None:
    hu, _, affine = phantom()
    write_dicom_series(tmp_path / "dicom", *reorient(hu, affine, "LPS"))
    nifti = save_nifti(tmp_path / "volume.nii", *reorient(hu, affine, "LAS"))
    dicom_array, dicom_affine = load_image(tmp_path / "dicom")
    nifti_array, nifti_affine = load_image(nifti)
    np.testing.assert_array_equal(dicom_array, nifti_array)
    np.testing.assert_allclose(dicom_affine, nifti_affine, atol=1e-4)


def test_nrrd_masks(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    write_dicom_series(tmp_path / "dicom", *reorient(hu, affine, "LPS"))
    # SimpleITK NRRD: LPS world, array stored in LPS order with identity direction.
    lps_labels, lps_affine = reorient(labels, affine, "LPS")
    image = sitk.GetImageFromArray(np.ascontiguousarray(lps_labels.transpose(2, 1, 0)))
    image.SetSpacing(SPACING)
    image.SetOrigin(tuple(np.diag([-1.0, -1.0, 1.0]) @ lps_affine[:3, 3]))
    sitk.WriteImage(image, str(tmp_path / "mask.nrrd"))
    # Slicer-style .seg.nrrd written with pynrrd in RAS space, axes permuted.
    pir_labels, pir_affine = reorient(labels, affine, "PIR")
    header = {
        "space": "right-anterior-superior",
        "space directions": pir_affine[:3, :3].T,
        "space origin": pir_affine[:3, 3],
        "kinds": ["domain"] * 3,
    }
    nrrd.write(str(tmp_path / "mask.seg.nrrd"), pir_labels, header)
    for name in ("mask.nrrd", "mask.seg.nrrd"):
        assert_is_phantom(load_dicom_case(tmp_path / "dicom", tmp_path / name, "0"), hu, labels, affine)


def test_anisotropic_in_plane_spacing_is_accepted_and_exposed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hu, labels, affine = phantom()
    affine[1, 1] = 0.9
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine)
    with caplog.at_level(logging.WARNING, logger="training.loaders"):
        volume = load_lits_case(volume_path, segmentation_path, "0")
    assert volume.spacing == pytest.approx((0.75, 0.9, 2.5))
    assert "anisotropic" in caplog.text


def test_geometry_within_tolerance_is_accepted(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    nudged = affine.copy()
    nudged[:3, 3] += 2e-4  # below the 1e-3 mm tolerance (float32 NIfTI headers round like this)
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine, seg_affine=nudged)
    assert_is_phantom(load_lits_case(volume_path, segmentation_path, "0"), hu, labels, affine)


# --- find_lits_cases ----------------------------------------------------------------------


def test_find_lits_cases_sorts_numerically(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    for index, suffix in [(10, ".nii.gz"), (2, ".nii"), (0, ".nii.gz")]:
        save_nifti(tmp_path / f"volume-{index}{suffix}", hu, affine)
        save_nifti(tmp_path / f"segmentation-{index}{'.nii' if index == 10 else suffix}", labels, affine)
    (tmp_path / "notes.txt").write_text("not a case")
    cases = find_lits_cases(tmp_path)
    assert [case_id for case_id, _, _ in cases] == ["0", "2", "10"]
    assert cases[2] == ("10", tmp_path / "volume-10.nii.gz", tmp_path / "segmentation-10.nii")


def test_find_lits_cases_missing_folder(tmp_path: Path) -> None:
    with expect_data_error(tmp_path / "absent", "does not exist"):
        find_lits_cases(tmp_path / "absent")


def test_find_lits_cases_no_volume(tmp_path: Path) -> None:
    (tmp_path / "segmentation-0.nii").write_bytes(b"")
    with expect_data_error(tmp_path, "no LiTS volume"):
        find_lits_cases(tmp_path)


def test_find_lits_cases_missing_segmentation(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    write_case(tmp_path, hu, labels, affine)
    save_nifti(tmp_path / "volume-3.nii.gz", hu, affine)
    with expect_data_error(tmp_path / "segmentation-3.nii.gz", "missing", "volume-3.nii.gz"):
        find_lits_cases(tmp_path)


def test_find_lits_cases_duplicate_case(tmp_path: Path) -> None:
    hu, _, affine = phantom()
    save_nifti(tmp_path / "volume-1.nii", hu, affine)
    save_nifti(tmp_path / "volume-1.nii.gz", hu, affine)
    with pytest.raises(DataError, match="exists twice"):
        find_lits_cases(tmp_path)


# --- validation: each error names the file and the problem -------------------------------------


def test_missing_files(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine)
    with expect_data_error(tmp_path / "volume-9.nii.gz", "does not exist"):
        load_lits_case(tmp_path / "volume-9.nii.gz", segmentation_path, "9")
    with expect_data_error(tmp_path / "segmentation-9.nii.gz", "does not exist"):
        load_lits_case(volume_path, tmp_path / "segmentation-9.nii.gz", "9")
    with expect_data_error(tmp_path / "no-dicom", "does not exist"):
        load_dicom_case(tmp_path / "no-dicom", None, "0")


@pytest.mark.parametrize("name", ["volume-0.nii.gz", "volume-0.nii", "volume-0.nrrd"])
def test_unreadable_volume(tmp_path: Path, name: str) -> None:
    _, labels, affine = phantom()
    path = tmp_path / name
    path.write_bytes(b"\x1f\x8b this is not an image" * 20)
    segmentation = save_nifti(tmp_path / "segmentation-0.nii.gz", labels, affine)
    with expect_data_error(path, "cannot be read"):
        load_lits_case(path, segmentation, "0")


def test_truncated_nifti(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine)
    volume_path.write_bytes(volume_path.read_bytes()[:-200])
    with expect_data_error(volume_path, "cannot be read as NIfTI"):
        load_lits_case(volume_path, segmentation_path, "0")


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "volume.png"
    path.write_bytes(b"\x89PNG")
    with expect_data_error(path, "unsupported file type"):
        load_image(path)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 6, 3)])
def test_volume_not_3d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    _, labels, affine = phantom()
    volume_path = save_nifti(tmp_path / "volume-0.nii.gz", np.full(shape, -1000, np.int16), affine)
    segmentation_path = save_nifti(tmp_path / "segmentation-0.nii.gz", labels, affine)
    with expect_data_error(volume_path, rf"{len(shape)}-D", re.escape(str(shape)), "3-D volume"):
        load_lits_case(volume_path, segmentation_path, "0")


def test_segmentation_not_3d(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    volume_path, segmentation_path = write_case(tmp_path, hu, labels[:, :, 0], affine)
    with expect_data_error(segmentation_path, "2-D"):
        load_lits_case(volume_path, segmentation_path, "0")


def test_shape_mismatch(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    volume_path, segmentation_path = write_case(tmp_path, hu, labels[:, :30], affine)
    with expect_data_error(segmentation_path, "shape mismatch", r"\(32, 30, 6\)", r"\(32, 32, 6\)"):
        load_lits_case(volume_path, segmentation_path, "0")


def test_spacing_mismatch(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    other = affine.copy()
    other[2, 2] = 5.0
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine, seg_affine=other)
    with expect_data_error(segmentation_path, "geometry mismatch", r"spacing \(0.75, 0.75, 5\) vs \(0.75, 0.75, 2.5\)"):
        load_lits_case(volume_path, segmentation_path, "0")


def test_origin_mismatch(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    other = affine.copy()
    other[0, 3] += 0.5
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine, seg_affine=other)
    expected = r"origin \(-11.5, 30.5, -100\) vs \(-12, 30.5, -100\)"
    with expect_data_error(segmentation_path, "geometry mismatch", expected):
        load_lits_case(volume_path, segmentation_path, "0")


def test_segmentation_flipped_by_its_affine_is_a_geometry_mismatch(tmp_path: Path) -> None:
    # Same array, affine claiming LPS storage: in RAS it is a mirrored grid, not the volume's.
    hu, labels, affine = phantom()
    flip = np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    shifted = affine @ flip
    shifted[:3, 3] += [5.0, 0.0, 0.0]
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine, seg_affine=shifted)
    with expect_data_error(segmentation_path, "geometry mismatch", "origin"):
        load_lits_case(volume_path, segmentation_path, "0")


@pytest.mark.parametrize("bad, count", [(np.nan, "3 NaN and 0 infinite"), (np.inf, "0 NaN and 3 infinite")])
def test_non_finite_intensities(tmp_path: Path, bad: float, count: str) -> None:
    hu, labels, affine = phantom()
    hu = hu.astype(np.float32)
    hu[0, 0, :3] = bad
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine)
    with expect_data_error(volume_path, count):
        load_lits_case(volume_path, segmentation_path, "0")


@pytest.mark.parametrize("value", [-5000.0, 40000.0])
def test_intensities_outside_hu_range(tmp_path: Path, value: float) -> None:
    hu, labels, affine = phantom()
    hu = hu.astype(np.float32)
    hu[5, 5, 5] = value
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine)
    with expect_data_error(volume_path, f"{value:g}", "not Hounsfield units"):
        load_lits_case(volume_path, segmentation_path, "0")


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_normalised_volume_is_refused(tmp_path: Path, scale: float) -> None:
    hu, labels, affine = phantom()
    normalised = (hu - hu.min()) / float(hu.max() - hu.min()) * scale
    volume_path, segmentation_path = write_case(tmp_path, normalised.astype(np.float32), labels, affine)
    expected = (rf"\[0, {scale:g}\]", "no air", "looks normalised", "Hounsfield units are expected")
    with expect_data_error(volume_path, *expected):
        load_lits_case(volume_path, segmentation_path, "0")


def test_non_integer_labels(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    fractional = labels.astype(np.float32)
    fractional[labels == 1] = 0.5
    volume_path, segmentation_path = write_case(tmp_path, hu, fractional, affine)
    with expect_data_error(segmentation_path, "non-integer values", "0.5"):
        load_lits_case(volume_path, segmentation_path, "0")


def test_labels_outside_lits_set(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    labels = labels.astype(np.int16)
    labels[0, 0, 0], labels[1, 0, 0], labels[2, 0, 0] = 7, 3, -1
    volume_path, segmentation_path = write_case(tmp_path, hu, labels, affine)
    with expect_data_error(segmentation_path, r"labels outside \{0, 1, 2\}: -1, 3, 7;"):
        load_lits_case(volume_path, segmentation_path, "0")


def test_empty_dicom_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with expect_data_error(tmp_path, "no DICOM series"):
        load_dicom_case(tmp_path, None, "0")


def test_dicom_series_with_missing_slice(tmp_path: Path) -> None:
    hu, _, affine = phantom()
    files = write_dicom_series(tmp_path, *reorient(hu, affine, "LPS"))
    files[3].unlink()
    with expect_data_error(tmp_path, "not evenly spaced", "gaps between 2.5 and 5 mm"):
        load_dicom_case(tmp_path, None, "0")


def test_dicom_normalised_series_is_refused(tmp_path: Path) -> None:
    hu, _, affine = phantom()
    write_dicom_series(tmp_path, *reorient(((hu + 1000) // 16).astype(np.int16), affine, "LPS"))
    with expect_data_error(tmp_path, "looks normalised"):
        load_dicom_case(tmp_path, None, "0")


def test_dicom_mask_on_another_grid(tmp_path: Path) -> None:
    hu, labels, affine = phantom()
    write_dicom_series(tmp_path / "dicom", *reorient(hu, affine, "LPS"))
    mask = save_nifti(tmp_path / "mask.nii.gz", labels[:, :, :5], affine)
    with expect_data_error(mask, "shape mismatch"):
        load_dicom_case(tmp_path / "dicom", mask, "0")


def test_layered_seg_nrrd_is_refused(tmp_path: Path) -> None:
    # Slicer writes overlapping segments as a multi-component (layered) labelmap.
    hu, labels, affine = phantom()
    volume_path = save_nifti(tmp_path / "volume-0.nii.gz", hu, affine)
    layers = np.stack([labels == 1, labels == 2], axis=-1).astype(np.uint8).transpose(2, 1, 0, 3)
    image = sitk.GetImageFromArray(np.ascontiguousarray(layers), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "layers.seg.nrrd"))
    with expect_data_error(tmp_path / "layers.seg.nrrd", "2 components per voxel", "overlapping segment layers"):
        load_lits_case(volume_path, tmp_path / "layers.seg.nrrd", "0")


def test_a_dicom_series_that_is_not_ct_is_refused_naming_its_modality(tmp_path):
    import pydicom

    from training.dicom_series import SeriesInfo, ct_series, study_dataset, write_series

    hu = np.full((20, 20, 3), -1000.0, np.float32)
    hu[4:16, 4:16] = 40.0
    study = study_dataset("P", "P^P", pydicom.uid.generate_uid(), "s", pydicom.uid.generate_uid())
    datasets = ct_series(hu, np.diag([1.0, 1.0, 2.0, 1.0]), study,
                         SeriesInfo("x", 1, ("ORIGINAL", "PRIMARY", "AXIAL"), "", pydicom.uid.generate_uid()))
    write_series(datasets, tmp_path / "ct")
    from training.loaders import read_volume

    assert read_volume(tmp_path / "ct")[0].shape == (20, 20, 3)
    for ds in datasets:
        ds.Modality = "MR"
    write_series(datasets, tmp_path / "mr")
    with pytest.raises(DataError, match=r"is a MR series, not CT"):
        read_volume(tmp_path / "mr")

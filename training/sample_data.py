"""The real sample case: 20 abdominal CT slices with a liver mask, in the LiTS layout.

TotalSegmentator's source distribution on PyPI (version 2.18.0, Apache-2.0) carries a
native contrast-enhanced abdominal CT series (``tests/reference_files/example_ct_dicom/``:
20 slices of 512 x 512) and its model's segmentation of that series
(``example_seg_dicom.nii.gz``, TotalSegmentator labels, liver = 5, stored LAS).
:func:`build_sample_data` downloads the archive once into a cache, reads both files into
the package's canonical RAS+ orientation, keeps the liver as label 1 (the sample has no
tumour label), verifies that the mask lies on the liver, and writes ``volume-0.nii.gz`` and
``segmentation-0.nii.gz``.

The same archive carries one more distinct abdominal CT with a liver mask, the second real
patient (:func:`load_example_ct`): ``example_ct.nii.gz`` (122 x 101 x 112 voxels of 3 mm,
unenhanced, the liver in 43 slices and cut off by the top of the scan) with the fast
model's ``example_seg_fast_force_split.nii.gz`` (liver = 5). Its other CTs are not further
patients: ``example_ct_sm.nii.gz`` is slices 82-111 of ``example_ct.nii.gz`` voxel for voxel
(with a header that places them 246 mm too low), and the chest CT angiography of
``aorta_report/`` comes with no liver mask. Both masks are TotalSegmentator's output, not
expert labels.

The cache is ``cache_dir`` if given, else ``$TACT_CACHE``, else
``~/.cache/taskadaptivect``; only the first call needs PyPI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from training.errors import DataError
from training.loaders import check_same_grid, checked_hu, load_dicom_case, load_image
from training.volume import LABEL_LIVER, CTVolume, write_lits_case

logger = logging.getLogger(__name__)

TOTALSEGMENTATOR_VERSION = "2.18.0"
ARCHIVE_NAME = f"totalsegmentator-{TOTALSEGMENTATOR_VERSION}.tar.gz"
ARCHIVE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
"""sha256 of ``totalsegmentator-2.18.0.tar.gz`` as served by PyPI (38,049,988 bytes)."""
DOWNLOAD_TIMEOUT_S = 900

_MEMBER_ROOT = f"totalsegmentator-{TOTALSEGMENTATOR_VERSION}/"
_DICOM_MEMBERS = _MEMBER_ROOT + "tests/reference_files/example_ct_dicom/"
_SEGMENTATION_MEMBER = _MEMBER_ROOT + "tests/reference_files/example_seg_dicom.nii.gz"
_LICENSE_MEMBER = _MEMBER_ROOT + "LICENSE"
_EXAMPLE_CT_MEMBERS = {"example_ct.nii.gz": _MEMBER_ROOT + "tests/reference_files/example_ct.nii.gz",
                       "example_seg_fast_force_split.nii.gz":
                           _MEMBER_ROOT + "tests/reference_files/example_seg_fast_force_split.nii.gz",
                       "LICENSE": _LICENSE_MEMBER}
REAL_CASES = ("sample", "example_ct")
"""The real patients :func:`build_real_data` writes, as LiTS cases 0, 1, ... in this order."""
EXAMPLE_CT_LIVER_SLICES = 43
"""Axial slices of ``example_ct.nii.gz`` whose mask holds liver."""
SAMPLE_SLICES = 20
"""Number of DICOM slices in the sample series."""

TOTALSEGMENTATOR_LIVER = 5
"""The liver's label in TotalSegmentator's ``total`` task."""
LIVER_MEAN_HU = (30.0, 200.0)
"""Range of the mean HU inside a liver mask, unenhanced to arterial phase."""
SOFT_TISSUE_HU = (0.0, 250.0)
"""HU range counted as soft tissue when checking that a mask covers an organ."""
MIN_SOFT_TISSUE_FRACTION = 0.9
"""Fraction of a liver mask's voxels that must be soft tissue (fat, gas, bone must not be in it)."""


def default_cache_dir() -> Path:
    """``$TACT_CACHE`` if set, else ``~/.cache/taskadaptivect``."""
    return Path(os.environ.get("TACT_CACHE") or Path.home() / ".cache" / "taskadaptivect")


def fetch_archive(cache_dir: str | Path | None = None) -> Path:
    """Return the verified TotalSegmentator source archive, downloading it with pip if it is not cached.

    Raises:
        DataError: the download failed (the message says that PyPI is needed once and where
            the cache is), or the archive does not have :data:`ARCHIVE_SHA256`.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    archive = cache / ARCHIVE_NAME
    if archive.is_file():
        if _sha256(archive) == ARCHIVE_SHA256:
            logger.info("using cached %s", archive)
            return archive
        logger.warning("%s does not match its sha256; downloading it again", archive)
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s (38 MB) from PyPI into %s", ARCHIVE_NAME, cache)
    # pip writes into a private folder; only a verified archive is moved into the cache.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as download:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"totalsegmentator=={TOTALSEGMENTATOR_VERSION}", "-d", download,
        ]  # fmt: skip
        try:
            # pip prints UTF-8 whatever the process locale is (GDCM, for one, resets it to "C").
            result = subprocess.run(
                command,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=DOWNLOAD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise DataError(cache, f"{_needs_pypi(cache)} pip timed out after {DOWNLOAD_TIMEOUT_S} s.") from error
        downloaded = Path(download) / ARCHIVE_NAME
        if result.returncode != 0 or not downloaded.is_file():
            pip_says = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise DataError(cache, f"{_needs_pypi(cache)} pip failed (exit {result.returncode}): {pip_says}")
        digest = _sha256(downloaded)
        if digest != ARCHIVE_SHA256:
            raise DataError(downloaded, f"sha256 is {digest}, expected {ARCHIVE_SHA256}; not using it.")
        os.replace(downloaded, archive)
    return archive


def extract_sample(archive: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Extract the sample's DICOM series, segmentation and licence from ``archive`` into the cache.

    Only the needed regular files are read, and each is written under a name built here
    from its base name, so no archive entry can write outside the cache. An existing
    extraction is reused.

    Returns:
        ``(dicom_dir, segmentation_path)``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"totalsegmentator-{TOTALSEGMENTATOR_VERSION}-sample"
    dicom_dir, segmentation = target / "example_ct_dicom", target / "example_seg_dicom.nii.gz"
    if target.is_dir():
        return dicom_dir, segmentation
    cache.mkdir(parents=True, exist_ok=True)
    # Extract into a temporary folder and rename it whole, so an interrupted run leaves no partial sample.
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        (staging / dicom_dir.name).mkdir()
        slices = 0
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base = name[len(_DICOM_MEMBERS) :]
                if name.startswith(_DICOM_MEMBERS) and "/" not in base and base not in ("", ".", ".."):
                    destination = staging / dicom_dir.name / base
                    slices += 1
                elif name in (_SEGMENTATION_MEMBER, _LICENSE_MEMBER):
                    destination = staging / Path(name).name
                else:
                    continue
                source = tar.extractfile(member)
                assert source is not None  # regular files always have a stream
                with source, destination.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
        if slices != SAMPLE_SLICES or not (staging / segmentation.name).is_file():
            raise DataError(
                archive,
                f"holds {slices} sample DICOM slices (expected {SAMPLE_SLICES}) or lacks {_SEGMENTATION_MEMBER}.",
            )
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("extracted %d DICOM slices and the segmentation into %s", slices, target)
    return dicom_dir, segmentation


def extract_example_ct(archive: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Extract the second real patient's CT, its segmentation and the licence into the cache.

    As :func:`extract_sample`: only the named regular files are read, into names built here,
    through a staging folder renamed whole; an existing extraction is reused.

    Returns:
        ``(image_path, segmentation_path)``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"totalsegmentator-{TOTALSEGMENTATOR_VERSION}-example-ct"
    image, segmentation = target / "example_ct.nii.gz", target / "example_seg_fast_force_split.nii.gz"
    if target.is_dir():
        return image, segmentation
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
    staging.chmod(0o755)
    wanted = {member: name for name, member in _EXAMPLE_CT_MEMBERS.items()}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.isfile() or member.name not in wanted:
                    continue
                source = tar.extractfile(member)
                assert source is not None  # regular files always have a stream
                with source, (staging / wanted[member.name]).open("wb") as sink:
                    shutil.copyfileobj(source, sink)
        missing = sorted(name for name in _EXAMPLE_CT_MEMBERS if not (staging / name).is_file())
        if missing:
            raise DataError(archive, f"lacks {', '.join(_EXAMPLE_CT_MEMBERS[name] for name in missing)}.")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("extracted the second real patient (example_ct) into %s", target)
    return image, segmentation


def verify_liver_alignment(hu: np.ndarray, liver: np.ndarray, source: str | Path | None = None) -> dict[str, float]:
    """Check that a liver mask lies on the liver of a CT, and would not if it were flipped.

    Both arrays are ``(X, Y, Z)`` on the same grid. A mask is liver-like if its mean HU is in
    :data:`LIVER_MEAN_HU` and at least :data:`MIN_SOFT_TISSUE_FRACTION` of its voxels are in
    :data:`SOFT_TISSUE_HU`. The mask must be liver-like, and its left-right and
    anterior-posterior mirror images must not be (otherwise the check cannot tell an
    orientation error from a correct mask).

    Args:
        hu: CT in HU.
        liver: boolean (or 0/1) liver mask.
        source: the mask's file, for messages.

    Returns:
        the statistics: ``mean_hu``, ``soft_tissue_fraction``, and the same for the
        ``left_right_flipped`` and ``anterior_posterior_flipped`` masks (``..._mean_hu``).

    Raises:
        DataError: the mask is empty, not liver-like, or a flipped mask is liver-like too.
    """
    liver = np.asarray(liver, dtype=bool)
    if not liver.any():
        raise DataError(source, "the liver mask is empty.")
    mean_hu, fraction = _mask_statistics(hu, liver)
    statistics = {"mean_hu": mean_hu, "soft_tissue_fraction": fraction}
    flips = {"left_right_flipped": "flipped left-right", "anterior_posterior_flipped": "flipped anterior-posterior"}
    for name, mask in zip(flips, (liver[::-1], liver[:, ::-1]), strict=True):
        statistics[f"{name}_mean_hu"], statistics[f"{name}_soft_tissue_fraction"] = _mask_statistics(hu, mask)
    if not _liver_like(mean_hu, fraction):
        raise DataError(
            source,
            f"the liver mask does not lie on the liver: mean {mean_hu:.1f} HU inside it (expected "
            f"{LIVER_MEAN_HU[0]:g} to {LIVER_MEAN_HU[1]:g}) and {fraction:.1%} of its voxels in "
            f"{SOFT_TISSUE_HU[0]:g} to {SOFT_TISSUE_HU[1]:g} HU (expected at least {MIN_SOFT_TISSUE_FRACTION:.0%}); "
            f"flipped left-right it would give {statistics['left_right_flipped_mean_hu']:.1f} HU. Check the mask's "
            "orientation against the image.",
        )
    for name, description in flips.items():
        if _liver_like(statistics[f"{name}_mean_hu"], statistics[f"{name}_soft_tissue_fraction"]):
            raise DataError(
                source,
                f"the liver mask looks like liver also when {description} ({statistics[f'{name}_mean_hu']:.1f} HU), "
                "so its alignment cannot be verified.",
            )
    return statistics


def load_sample(cache_dir: str | Path | None = None) -> CTVolume:
    """The sample as a :class:`CTVolume` (case ``"0"``): HU float32 and labels 0/1, canonical RAS+.

    Raises:
        DataError: download, extraction, geometry or alignment check failed.
    """
    dicom_dir, segmentation_path = extract_sample(fetch_archive(cache_dir), cache_dir)
    volume = load_dicom_case(dicom_dir, None, "0")
    labels, affine = load_image(segmentation_path)
    check_same_grid(segmentation_path, labels.shape, affine, volume)
    liver = labels == TOTALSEGMENTATOR_LIVER
    statistics = verify_liver_alignment(volume.hu, liver, segmentation_path)
    logger.info(
        "sample: %s voxels of %s mm, HU %.0f to %.0f; liver in %d of %d slices, mean %.1f HU "
        "(%.1f HU if flipped left-right)",
        "x".join(map(str, volume.shape)),
        "x".join(f"{s:.4g}" for s in volume.spacing),
        volume.hu.min(),
        volume.hu.max(),
        int(liver.any(axis=(0, 1)).sum()),
        volume.shape[2],
        statistics["mean_hu"],
        statistics["left_right_flipped_mean_hu"],
    )
    volume.segmentation = np.where(liver, LABEL_LIVER, 0).astype(np.uint8)
    volume.sources.append(str(segmentation_path))
    return volume


def load_example_ct(cache_dir: str | Path | None = None, case_id: str = "1") -> CTVolume:
    """The second real patient as a :class:`CTVolume`: HU float32 and labels 0/1, canonical RAS+.

    Raises:
        DataError: download, extraction, geometry, intensity or alignment check failed.
    """
    image_path, segmentation_path = extract_example_ct(fetch_archive(cache_dir), cache_dir)
    hu, affine = load_image(image_path)
    volume = CTVolume(case_id, checked_hu(image_path, hu), None, affine, [str(image_path)])
    labels, label_affine = load_image(segmentation_path)
    check_same_grid(segmentation_path, labels.shape, label_affine, volume)
    liver = labels == TOTALSEGMENTATOR_LIVER
    statistics = verify_liver_alignment(volume.hu, liver, segmentation_path)
    logger.info("example_ct: %s voxels of %s mm; liver in %d of %d slices, mean %.1f HU (%.1f HU if flipped left-right)",
                "x".join(map(str, volume.shape)), "x".join(f"{s:.4g}" for s in volume.spacing),
                int(liver.any(axis=(0, 1)).sum()), volume.shape[2], statistics["mean_hu"],
                statistics["left_right_flipped_mean_hu"])
    volume.segmentation = np.where(liver, LABEL_LIVER, 0).astype(np.uint8)
    volume.sources.append(str(segmentation_path))
    return volume


def load_real_case(name: str, cache_dir: str | Path | None = None, case_id: str = "0") -> CTVolume:
    """One of :data:`REAL_CASES` by name, verified, with ``case_id`` as its identifier."""
    if name == "sample":
        volume = load_sample(cache_dir)
        volume.case_id = case_id
        return volume
    if name == "example_ct":
        return load_example_ct(cache_dir, case_id)
    raise ValueError(f"unknown real case {name!r}; known: {', '.join(REAL_CASES)}")


def build_real_data(out: str | Path, cache_dir: str | Path | None = None) -> list[tuple[Path, Path]]:
    """Write every real patient (:data:`REAL_CASES`) as LiTS cases 0, 1, ... in ``out``.

    Returns:
        ``[(volume_path, segmentation_path), ...]`` in the order of :data:`REAL_CASES`.

    Raises:
        DataError: see :func:`load_sample` and :func:`load_example_ct`; nothing is written
            unless every case loads and verifies.
    """
    volumes = [load_real_case(name, cache_dir, str(index)) for index, name in enumerate(REAL_CASES)]
    paths = [write_lits_case(out, index, volume) for index, volume in enumerate(volumes)]
    for pair in paths:
        logger.info("wrote %s and %s", *pair)
    return paths


def build_sample_data(out: str | Path, cache_dir: str | Path | None = None) -> list[tuple[Path, Path]]:
    """Write the sample as LiTS case 0 (``volume-0.nii.gz``, ``segmentation-0.nii.gz``) in ``out``.

    Args:
        out: the output folder (created if needed).
        cache_dir: where the archive and its extracted files are kept; see
            :func:`default_cache_dir`.

    Returns:
        ``[(volume_path, segmentation_path)]``.

    Raises:
        DataError: see :func:`load_sample`.
    """
    volume = load_sample(cache_dir)
    paths = write_lits_case(out, 0, volume)
    logger.info("wrote %s and %s", *paths)
    return [paths]


def _mask_statistics(hu: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean HU inside ``mask`` and the fraction of its voxels in :data:`SOFT_TISSUE_HU`."""
    values = hu[mask]
    soft = (values >= SOFT_TISSUE_HU[0]) & (values <= SOFT_TISSUE_HU[1])
    return float(values.mean()), float(soft.mean())


def _liver_like(mean_hu: float, soft_tissue_fraction: float) -> bool:
    return LIVER_MEAN_HU[0] <= mean_hu <= LIVER_MEAN_HU[1] and soft_tissue_fraction >= MIN_SOFT_TISSUE_FRACTION


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _needs_pypi(cache: Path) -> str:
    return (
        f"could not download the sample ({ARCHIVE_NAME}): it needs PyPI access once, after which it is "
        f"reused from the cache {cache} (set TACT_CACHE or pass cache_dir to move it; you may also place "
        f"the archive there by hand)."
    )

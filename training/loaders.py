"""Reading CT volumes and segmentations, strictly validated, into the package's convention.

Every loader returns arrays in canonical RAS+ orientation (see :mod:`training.volume`):
``(X, Y, Z)`` with ``i`` towards the patient's right, ``j`` anterior, ``k`` superior, and a
``(4, 4)`` voxel-to-RAS affine in mm. Files in any other axis order or direction (LPS
DICOM, LAS NIfTI, ...) are reoriented, never resampled: the result is exactly what
nibabel's ``as_closest_canonical`` gives for the same data written as NIfTI. The one
exception is :func:`read_volume`, which keeps the file's voxel order for callers that must
answer on the input's own grid (the server).

Inputs that cannot be used raise :class:`training.errors.DataError` naming the file and
the problem. Nothing here writes files.

Supported inputs:

* NIfTI (``.nii``, ``.nii.gz``) through nibabel;
* NRRD (``.nrrd``, ``.seg.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through
  SimpleITK, whose world frame is LPS;
* a folder holding one DICOM series, through SimpleITK's ``ImageSeriesReader`` (slices
  sorted by position, rescale slope and intercept applied).
"""

from __future__ import annotations

import logging
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from nibabel.spatialimages import HeaderDataError

from training.errors import DataError
from training.volume import LABEL_NAMES, CTVolume

logger = logging.getLogger(__name__)

HU_MIN = -3100.0
"""Lowest plausible HU: scanners pad outside the field of view with -3024 or -2048."""
HU_MAX = 32767.0
"""Highest plausible HU: the int16 ceiling (metal)."""
AIR_THRESHOLD_HU = -500.0
"""Every CT has air (about -1000 HU) around or inside the body; a volume with no voxel
below this value is not in HU (typically it was normalised to [0, 1] or [0, 255])."""
TISSUE_THRESHOLD_HU = -500.0
"""Fat (about -100 HU), soft tissue and bone lie far above this value, air and lung below: a
volume with no voxel above it holds no body, and labels whose median voxel lies below it
lie on air, not on an organ."""
SPACING_TOLERANCE_MM = 1e-3
"""Largest difference in voxel size or origin (mm) for two grids to count as the same."""
DIRECTION_TOLERANCE = 1e-4
"""Largest difference in axis direction cosines for two grids to count as the same."""
ANISOTROPY_TOLERANCE = 0.01
"""Relative in-plane spacing difference above which a volume is reported as anisotropic."""
SLICE_GAP_TOLERANCE = 0.01
"""Largest relative deviation of a DICOM slice gap from the median gap, and largest sideways
drift of the slice positions relative to the stack's length (a tilted, sheared stack)."""

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")

# Exceptions nibabel raises for corrupt, truncated or non-NIfTI files (some only when the
# lazily loaded data are first read).
_NIBABEL_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


def find_lits_cases(directory: str | Path) -> list[tuple[str, Path, Path]]:
    """Find the LiTS cases in ``directory``: ``volume-K.nii[.gz]`` with ``segmentation-K.nii[.gz]``.

    Args:
        directory: a folder in the LiTS layout.

    Returns:
        ``(case_id, volume_path, segmentation_path)`` for every volume, sorted by ``K``
        numerically; ``case_id`` is ``"K"``.

    Raises:
        DataError: the folder does not exist or is a file, holds no LiTS volume, a case exists both
            compressed and uncompressed, or a volume lacks its segmentation.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DataError(directory, "is a file, not a folder (expected a folder of LiTS files volume-K.nii[.gz]).")
    if not directory.is_dir():
        raise DataError(directory, "folder does not exist (expected LiTS files volume-K.nii[.gz]).")
    volumes: dict[int, Path] = {}
    for path in directory.iterdir():
        match = _LITS_VOLUME.match(path.name)
        if match is None:
            continue
        index = int(match.group(1))
        if index in volumes:
            raise DataError(path, f"case {index} exists twice ({volumes[index].name} and {path.name}); keep one.")
        volumes[index] = path
    if not volumes:
        raise DataError(directory, "holds no LiTS volume (no file named volume-K.nii or volume-K.nii.gz).")
    cases = []
    for index in sorted(volumes):
        volume = volumes[index]
        candidates = [directory / f"segmentation-{index}{suffix}" for suffix in NIFTI_SUFFIXES]
        existing = [path for path in candidates if path.is_file()]
        if not existing:
            expected = directory / volume.name.replace("volume-", "segmentation-", 1)
            raise DataError(expected, f"missing: {volume.name} has no segmentation (segmentation-{index}.nii[.gz]).")
        if len(existing) > 1:
            raise DataError(
                existing[0], f"case {index} has two segmentations ({existing[0].name}, {existing[1].name}); keep one."
            )
        cases.append((str(index), volume, existing[0]))
    return cases


def load_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one volume in canonical RAS+ orientation, without checking its values.

    Args:
        path: a NIfTI, NRRD or MetaImage file, or a folder holding one DICOM series.

    Returns:
        ``(array, affine)``: the ``(X, Y, Z)`` array in the file's own dtype (DICOM:
        float32 with rescale slope and intercept applied) and its ``(4, 4)`` voxel-to-RAS
        affine in mm. A trailing 4th dimension of length 1 is dropped.

    Raises:
        DataError: the file is missing, unreadable, of an unsupported type, or not 3-D.
    """
    return to_closest_canonical(*read_volume(path))


def read_volume(path: str | Path, max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one volume as stored: the file's own voxel order, without checking its values.

    Like :func:`load_image`, but the array is not reoriented: ``affine`` maps the voxel
    indices of ``array`` to RAS mm, so a result written with the same array shape and
    affine has the input's geometry exactly (what a server returns to a viewer).

    Args:
        path: as for :func:`load_image`.
        max_voxels: refuse, from the header and before reading any voxel, a volume with
            more voxels than this.

    Raises:
        DataError: the file is missing, unreadable, of an unsupported type, not 3-D, or too large.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file does not exist.")
    if path.is_dir():
        return _load_dicom_series(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _load_nifti(path, max_voxels)
    if name.endswith(SITK_SUFFIXES):
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            _check_voxels(path, reader.GetSize(), max_voxels)
            image = reader.Execute()
        except RuntimeError as error:
            raise DataError(path, f"cannot be read as an image: {_error_text(error)}") from error
        return _sitk_to_ras(image, path)
    raise DataError(
        path,
        f"unsupported file type; expected NIfTI ({', '.join(NIFTI_SUFFIXES)}), "
        f"NRRD or MetaImage ({', '.join(SITK_SUFFIXES)}), or a folder with a DICOM series.",
    )


def to_closest_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip voxel axes to RAS+ (no interpolation), as nibabel's ``as_closest_canonical``."""
    orientation = io_orientation(affine)
    return apply_orientation(array, orientation), affine @ inv_ornt_aff(orientation, array.shape)


def checked_hu(path: str | Path, hu: np.ndarray, outlier_fraction: float = 0.0) -> np.ndarray:
    """``hu`` as float32 after checking it holds Hounsfield units of a body.

    Args:
        path: named in the error.
        hu: the volume.
        outlier_fraction: the fraction of voxels at each end that may lie outside
            [HU_MIN, HU_MAX]: a low-dose reconstruction's noise reaches far below -3000 HU
            in a few voxels (0.001 accepts 0.1 %).

    Raises:
        DataError: NaN or infinite values, values outside [HU_MIN, HU_MAX], no air (a
            normalised volume) or no tissue (only air or padding), naming ``path``.
    """
    return _checked_hu(Path(path), hu, outlier_fraction)


def load_lits_case(volume_path: str | Path, segmentation_path: str | Path, case_id: str) -> CTVolume:
    """Read and validate one LiTS case (or any volume/segmentation pair :func:`load_image` reads).

    Args:
        volume_path: the CT in HU.
        segmentation_path: labels 0 background, 1 liver, 2 tumour, on the volume's grid
            (any axis order; it is reoriented, not resampled).
        case_id: the identifier stored in the result.

    Returns:
        a :class:`CTVolume` with ``hu`` float32 and ``segmentation`` uint8, both ``(X, Y, Z)``.

    Raises:
        DataError: see :func:`load_image`, plus values that are not HU, a volume with no
            tissue (not a CT of a body), labels outside {0, 1, 2}, labels that lie on air,
            or a segmentation on another grid than the volume.
    """
    hu, affine = load_image(volume_path)
    volume = CTVolume(case_id, _checked_hu(Path(volume_path), hu), None, affine, [str(volume_path)])
    volume.segmentation = _load_segmentation(Path(segmentation_path), volume)
    volume.sources.append(str(segmentation_path))
    _report_anisotropy(volume)
    return volume


def load_dicom_case(dicom_dir: str | Path, mask_path: str | Path | None, case_id: str) -> CTVolume:
    """Read and validate a DICOM CT series with an optional mask.

    Args:
        dicom_dir: a folder holding exactly one DICOM series (at least two slices).
        mask_path: labels 0/1/2 on the series' grid as NIfTI or NRRD (``.seg.nrrd``
            labelmaps included), or ``None``.
        case_id: the identifier stored in the result.

    Returns:
        a :class:`CTVolume` with ``hu`` float32 ``(X, Y, Z)`` and ``segmentation`` uint8
        ``(X, Y, Z)`` or ``None``.

    Raises:
        DataError: as :func:`load_lits_case`, plus a folder with no or several series,
            or slices that are missing, duplicated or not evenly spaced.
    """
    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise DataError(dicom_dir, "DICOM folder does not exist.")
    hu, affine = to_closest_canonical(*_load_dicom_series(dicom_dir))
    volume = CTVolume(case_id, _checked_hu(dicom_dir, hu), None, affine, [str(dicom_dir)])
    if mask_path is not None:
        volume.segmentation = _load_segmentation(Path(mask_path), volume)
        volume.sources.append(str(mask_path))
    _report_anisotropy(volume)
    return volume


def check_same_grid(path: str | Path, shape: tuple[int, ...], affine: np.ndarray, reference: CTVolume) -> None:
    """Check that an array of ``shape`` with ``affine`` (canonical RAS+) lies on ``reference``'s voxel grid.

    Raises:
        DataError: naming ``path``, if the shapes differ, or the voxel sizes, axis directions
            or origins differ by more than :data:`SPACING_TOLERANCE_MM` /
            :data:`DIRECTION_TOLERANCE`; the message gives both grids' spacing and origin.
    """
    reference_name = reference.sources[0] if reference.sources else "the volume"
    if tuple(shape) != reference.shape:
        raise DataError(
            path,
            f"shape mismatch: {tuple(shape)} here, {reference.shape} in {reference_name} (both in RAS+ order); "
            "the segmentation must be on the volume's voxel grid (it is not resampled).",
        )
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    reference_spacing = np.asarray(reference.spacing)
    directions = affine[:3, :3] / spacing
    reference_directions = reference.affine[:3, :3] / reference_spacing
    origin, reference_origin = affine[:3, 3], reference.affine[:3, 3]
    rotated = np.abs(directions - reference_directions).max() > DIRECTION_TOLERANCE
    if (
        rotated
        or np.abs(spacing - reference_spacing).max() > SPACING_TOLERANCE_MM
        or np.abs(origin - reference_origin).max() > SPACING_TOLERANCE_MM
    ):
        axes = (
            f", axis directions {_fmt(directions.T.ravel())} vs {_fmt(reference_directions.T.ravel())}"
            if rotated
            else ""
        )
        raise DataError(
            path,
            f"geometry mismatch with {reference_name}: spacing {_fmt(spacing)} vs {_fmt(reference_spacing)} mm, "
            f"origin {_fmt(origin)} vs {_fmt(reference_origin)} mm (RAS){axes}; tolerance {SPACING_TOLERANCE_MM:g} mm "
            f"and {DIRECTION_TOLERANCE:g} in direction. The segmentation must be on the volume's voxel grid "
            "(it is not resampled).",
        )


def _check_voxels(path: Path, shape: tuple[int, ...], max_voxels: int | None) -> None:
    voxels = int(np.prod([int(n) for n in shape], dtype=np.float64))
    if max_voxels is not None and voxels > max_voxels:
        raise DataError(path, f"the volume is {' x '.join(str(int(n)) for n in shape)} voxels ({voxels:,}), more than "
                              f"the {max_voxels:,} this server accepts; send it in slabs of slices or crop it")


def _load_nifti(path: Path, max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(str(path))
    except _NIBABEL_READ_ERRORS as error:
        raise DataError(path, f"cannot be read as NIfTI: {_error_text(error)}") from error
    _check_dimensions(path, image.shape)
    _check_voxels(path, image.shape, max_voxels)
    image = nib.squeeze_image(image)
    try:
        # nibabel reads the voxels lazily: truncated or corrupt data only fail here.
        array = np.asanyarray(image.dataobj)
    except _NIBABEL_READ_ERRORS as error:
        raise DataError(path, f"cannot be read as NIfTI: {_error_text(error)}") from error
    return array, image.affine


def _load_dicom_series(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
    if not series:
        raise DataError(directory, "holds no DICOM series.")
    if len(series) > 1:
        raise DataError(
            directory, f"holds {len(series)} DICOM series ({', '.join(series)}); put each in its own folder."
        )
    # GDCM sorts the files by position along the slice normal, not by name or instance number.
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), series[0])
    _check_modality(directory, files[0])
    if len(files) < 2:
        raise DataError(
            directory, f"the DICOM series has {len(files)} file; a series of at least two slices is expected."
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # float32 keeps non-integer rescale slopes exact; GDCM applies each slice's slope and intercept.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise DataError(directory, f"the DICOM series cannot be read: {_error_text(error)}") from error
    positions = np.array([_dicom_vector(reader, index, "0020|0032", directory) for index in range(len(files))])
    _check_slice_positions(directory, positions, np.reshape(image.GetDirection(), (3, 3))[:, 2])
    return _sitk_to_ras(image, directory)


def _check_modality(directory: Path, first_file: str) -> None:
    """Refuse a series that is not CT (a DICOM SEG, an MR, ...): HU and the models mean nothing there."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(first_file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(directory, f"the DICOM file {first_file} cannot be read: {_error_text(error)}") from error
    modality = reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else ""
    if modality != "CT":
        raise DataError(directory, f"is a {modality or 'modality-less'} series, not CT (Modality {modality!r}); "
                                   "only CT series can be reconstructed and segmented.")


def _dicom_vector(reader: sitk.ImageSeriesReader, index: int, tag: str, directory: Path) -> np.ndarray:
    if not reader.HasMetaDataKey(index, tag):
        raise DataError(directory, f"slice {reader.GetFileNames()[index]} lacks DICOM tag ({tag}).")
    return np.array([float(value) for value in reader.GetMetaData(index, tag).split("\\")])


def _check_slice_positions(directory: Path, positions: np.ndarray, normal: np.ndarray) -> None:
    """Reject series whose slices are missing, duplicated, or not stacked along their normal."""
    offsets = positions - positions[0]
    along = offsets @ normal
    across = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    if across.max() > SLICE_GAP_TOLERANCE * abs(along[-1]):
        raise DataError(
            directory, "the slices are not stacked along their normal (gantry tilt?); reconstruct without tilt."
        )
    gaps = np.diff(along)
    median = float(np.median(gaps))
    if median <= 0 or np.abs(gaps - median).max() > SLICE_GAP_TOLERANCE * median:
        raise DataError(
            directory,
            f"slices are not evenly spaced: gaps between {gaps.min():.4g} and {gaps.max():.4g} mm "
            f"(median {median:.4g} mm) - missing or duplicated slices?",
        )


def _sitk_to_ras(image: sitk.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image (LPS world, array ``(z, y, x)``) to its ``(X, Y, Z)`` voxel array and voxel-to-RAS affine."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            path,
            f"has {image.GetNumberOfComponentsPerPixel()} components per voxel (overlapping segment layers or "
            "colour); a single-component labelmap or volume is expected.",
        )
    _check_dimensions(path, image.GetSize())
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _check_dimensions(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) == 4 and shape[3] == 1:
        return
    if len(shape) != 3:
        raise DataError(
            path,
            f"array is {len(shape)}-D (shape {tuple(shape)}); a 3-D volume (X, Y, Z) is expected "
            "(a trailing 4th dimension of length 1 is accepted).",
        )


def _checked_hu(path: Path, hu: np.ndarray, outlier_fraction: float = 0.0) -> np.ndarray:
    """Validate that ``hu`` holds Hounsfield units; return it as float32."""
    hu = np.asarray(hu, dtype=np.float32)
    if not np.isfinite(hu).all():
        raise DataError(path, f"intensities contain {np.isnan(hu).sum()} NaN and {np.isinf(hu).sum()} infinite values.")
    low, high = float(hu.min()), float(hu.max())
    if outlier_fraction > 0 and (low < HU_MIN or high > HU_MAX):
        lower, upper = (float(q) for q in np.quantile(hu, [outlier_fraction, 1 - outlier_fraction]))
        bounds_ok = lower >= HU_MIN and upper <= HU_MAX
        shown = f"[{low:g}, {high:g}] ({outlier_fraction:.1%} quantiles {lower:g}, {upper:g})"
    else:
        bounds_ok, shown = low >= HU_MIN and high <= HU_MAX, f"[{low:g}, {high:g}]"
    if not bounds_ok:
        raise DataError(
            path,
            f"intensities range over {shown}, outside [{HU_MIN:g}, {HU_MAX:g}]: these are not "
            "Hounsfield units.",
        )
    if low >= AIR_THRESHOLD_HU:
        raise DataError(
            path,
            f"intensities range over [{low:g}, {high:g}] with no air (nothing below {AIR_THRESHOLD_HU:g}): the "
            "volume looks normalised (or stored without its rescale intercept); Hounsfield units are "
            "expected (air is about -1000 HU).",
        )
    if high <= TISSUE_THRESHOLD_HU:
        raise DataError(
            path,
            f"not a CT of a body: no tissue (every voxel is at most {high:g} HU, nothing above "
            f"{TISSUE_THRESHOLD_HU:g}); the volume holds only air or padding.",
        )
    return hu


def _load_segmentation(path: Path, volume: CTVolume) -> np.ndarray:
    """Read a 0/1/2 label volume on ``volume``'s grid; return it as uint8."""
    labels, affine = load_image(path)
    check_same_grid(path, labels.shape, affine, volume)
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all():
            raise DataError(path, "segmentation contains NaN or infinite values; integer labels 0/1/2 are expected.")
        fractional = labels[labels != np.round(labels)]
        if fractional.size:
            raise DataError(
                path,
                f"segmentation has non-integer values (e.g. {_fmt(np.unique(fractional)[:5])}); "
                f"integer labels {_label_list()} are expected.",
            )
    if labels.min() < 0 or labels.max() > max(LABEL_NAMES):
        wrong = np.unique(labels[(labels < 0) | (labels > max(LABEL_NAMES))])
        shown = ", ".join(f"{value:g}" for value in wrong[:20]) + (", ..." if wrong.size > 20 else "")
        raise DataError(path, f"segmentation has labels outside {{0, 1, 2}}: {shown}; expected {_label_list()}.")
    labels = labels.astype(np.uint8)
    _check_labels_on_tissue(path, labels, volume)
    return labels


def _check_labels_on_tissue(path: Path, labels: np.ndarray, volume: CTVolume) -> None:
    """Refuse labels that lie on air: a segmentation of another scan, or flipped against this one.

    Liver and tumour are soft tissue; when the median HU under the labelled voxels is below
    :data:`TISSUE_THRESHOLD_HU`, most of them lie outside the body.
    """
    labelled = labels > 0
    if not labelled.any():
        return
    median = float(np.median(volume.hu[labelled]))
    if median < TISSUE_THRESHOLD_HU:
        reference = volume.sources[0] if volume.sources else "the volume"
        raise DataError(
            path,
            f"the labels lie on air: the median under its {int(labelled.sum())} labelled voxels is {median:g} HU "
            f"in {reference} (liver and tumour are above {TISSUE_THRESHOLD_HU:g} HU); is it the segmentation of "
            "this volume, in the same orientation?",
        )


def _report_anisotropy(volume: CTVolume) -> None:
    spacing_x, spacing_y, _ = volume.spacing
    if abs(spacing_x - spacing_y) > ANISOTROPY_TOLERANCE * min(spacing_x, spacing_y):
        logger.warning(
            "case %s: in-plane spacing is anisotropic (%.4g x %.4g mm); kept as is, see CTVolume.spacing",
            volume.case_id,
            spacing_x,
            spacing_y,
        )


def _label_list() -> str:
    return ", ".join(f"{value} {name}" for value, name in LABEL_NAMES.items())


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(value):.6g}" for value in values) + ")"


def _error_text(error: Exception) -> str:
    """The informative part of a library's error: SimpleITK puts it on the last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__

"""Volumes in and out of the app: read a request's image strictly, write results.

Inputs are read in their own voxel order (``training.loaders.read_volume``) and checked
at the boundary: at most ``max_voxels`` (read from the header, before any voxel), a 3-D
array of at least ``MIN_SIDE`` pixels in-plane, finite Hounsfield units of a body
(``training.loaders.checked_hu``). Results are written with the input's array shape and
affine, so viewers place them exactly on the input.
"""

from __future__ import annotations

import base64
import gzip

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from lib.errors import BadRequest
from training.errors import DataError
from training.grid import canonical_shape
from training.loaders import checked_hu, read_volume

MIN_SIDE = 16
"""Smallest in-plane side (pixels) a slice may have: the U-Nets down-sample it several times."""
DEFAULT_MAX_VOXELS = 512 * 512 * 1200
"""Largest input accepted by default (about 1.2 GiB as float32): a long abdominal CT."""
NOISE_OUTLIERS = 0.001
"""Fraction of voxels at each end that may lie outside the plausible HU range: low-dose
noise (the project's own simulated scans at N0 = 300) reaches below -3100 HU in a few voxels."""
OUTPUT_DTYPES = ("float32", "int16")
EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def read_ct(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A request's CT volume as ``(float32 HU array in file order, voxel-to-RAS affine)``.

    Raises:
        BadRequest: naming ``name`` (the image id or upload) and what is wrong.
    """
    shown = name or Path(path).name
    try:
        array, affine = read_volume(path, max_voxels=max_voxels)
        if array.ndim != 3:
            raise DataError(path, f"array is {array.ndim}-D (shape {array.shape}); a 3-D volume is expected")
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise DataError(path, f"the voxel-to-world transform is not invertible ({np.round(affine, 4).tolist()})")
        sides = canonical_shape(array.shape, affine)[:2]
        if min(sides) < MIN_SIDE:
            raise DataError(path, f"a volume of {array.shape} voxels is too small: its slices closest to axial are "
                                  f"{sides[0]} x {sides[1]} pixels, and need at least {MIN_SIDE} x {MIN_SIDE}")
        if array.dtype.kind not in "iuf":
            raise DataError(path, f"voxels of type {array.dtype} are not intensities")
        hu = checked_hu(path, array, outlier_fraction=NOISE_OUTLIERS)
    except DataError as error:
        raise BadRequest(f"{shown}: {error.problem}") from None
    return hu, np.asarray(affine, dtype=np.float64)


def read_label(path: str | Path, shape: tuple[int, ...], affine: np.ndarray, name: str,
               tolerance_mm: float = 1e-3) -> np.ndarray:
    """A label volume for an image of ``shape``/``affine``: uint8 with values 0, 1, 2 only.

    Raises:
        BadRequest: unreadable, another grid than the image's, or values other than 0/1/2.
    """
    try:
        array, label_affine = read_volume(path, max_voxels=int(np.prod(shape)))
    except DataError as error:
        raise BadRequest(f"label for {name}: {error.problem}") from None
    if array.shape != tuple(shape):
        raise BadRequest(f"label for {name}: shape {array.shape} differs from the image's {tuple(shape)}")
    offset = np.abs(np.asarray(label_affine) - np.asarray(affine)).max()
    if offset > tolerance_mm:
        raise BadRequest(f"label for {name}: its voxel-to-world transform differs from the image's by up to "
                         f"{offset:.3g} mm; a label must lie on the image's voxels (it is not resampled)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadRequest(f"label for {name}: holds NaN or infinite values")
    values = np.unique(array)
    unknown = [v for v in values.tolist() if v not in (0, 1, 2)]
    if unknown:
        raise BadRequest(f"label for {name}: values {unknown[:10]} are not labels; 0 background, 1 liver and "
                         "2 tumour are the only ones")
    return array.astype(np.uint8)


def as_output_dtype(hu: np.ndarray, dtype: str) -> np.ndarray:
    """HU as ``float32``, or rounded and clipped to ``int16``.

    Raises:
        BadRequest: another dtype.
    """
    if dtype not in OUTPUT_DTYPES:
        raise BadRequest(f"output_dtype {dtype!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
    if dtype == "int16":
        return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    return hu.astype(np.float32)


def write_volume(array: np.ndarray, affine: np.ndarray, extension: str = ".nii.gz", dtype: str = "float32",
                 folder: str | None = None) -> str:
    """Write ``array`` (file order) with ``affine`` to a new temporary file; returns its path.

    ``dtype`` ``int16`` rounds and clips to the int16 range (HU fit); labels are written
    as uint8 whatever is asked.
    """
    if extension not in EXTENSIONS:
        raise BadRequest(f"result_extension {extension!r} is not supported; use one of {', '.join(EXTENSIONS)}")
    if array.dtype != np.uint8:
        array = as_output_dtype(array, dtype)
    handle = tempfile.NamedTemporaryFile(suffix=extension, dir=folder, delete=False)
    handle.close()
    if extension == ".nrrd":
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine)[:3]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps[:, :3] / spacing).flatten().tolist())
        image.SetOrigin(lps[:, 3].tolist())
        sitk.WriteImage(image, handle.name, useCompression=True)
    else:
        image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
        image.header.set_xyzt_units("mm")
        nib.save(image, handle.name)
    return handle.name


def embedded_nifti(array: np.ndarray, affine: np.ndarray, dtype: str = "float32") -> dict[str, str]:
    """A volume inside a JSON reply: gzip-compressed NIfTI-1 bytes, base64-encoded.

    Decode with ``nibabel.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(data)))``.
    """
    path = write_volume(array, affine, ".nii", dtype)
    try:
        data = Path(path).read_bytes()
    finally:
        Path(path).unlink()
    return {"encoding": "nifti+gzip+base64", "dtype": dtype, "data": base64.b64encode(gzip.compress(data, 6)).decode()}


def decode_embedded(payload: dict[str, str]) -> nib.Nifti1Image:
    """The NIfTI image of :func:`embedded_nifti` (for clients and tests)."""
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(payload["data"])))




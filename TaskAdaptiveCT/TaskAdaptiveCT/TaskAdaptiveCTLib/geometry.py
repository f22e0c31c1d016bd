"""Volumes as Slicer holds them, and as files on the wire, with their geometry kept exactly.

A :class:`Volume` is what a Slicer scalar volume node is, without Slicer: a numpy array in
Slicer's ``(K, J, I)`` index order (``slicer.util.arrayFromVolume``) and the node's 4 x 4
IJK -> RAS matrix (mm; any direction, oblique included). Files are written and read with
SimpleITK, which Slicer bundles: its physical space is LPS, so RAS is reached by negating
the first two rows, and its array order is Slicer's.

The Reconstruct & Segment job sends a volume in slabs of slices along the voxel axis
closest to the patient's superior direction (:func:`slice_axis`), since the app's networks
work on the slices closest to axial; :func:`slab` keeps each slab's position in space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ORTHOGONALITY_TOLERANCE = 1e-4
"""Largest cosine between two voxel axes of a volume: ITK and NIfTI need perpendicular axes."""
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Slicer's RAS world to ITK's LPS world (and back: the matrix is its own inverse)."""


@dataclass(frozen=True)
class Volume:
    """A 3-D image with its place in space.

    Args:
        array: ``(K, J, I)`` voxels, Slicer's order (the last axis is the fastest, I).
        ijk_to_ras: ``(4, 4)`` matrix from voxel indices ``(i, j, k, 1)`` to RAS (mm).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise ValueError(f"a volume is 3-D (K, J, I), got an array of shape {array.shape}")
        if min(array.shape) < 1:
            raise ValueError(f"a volume needs at least one voxel along each axis, got shape {array.shape}")
        matrix = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
            raise ValueError(f"ijk_to_ras must be a finite 4 x 4 matrix, got {matrix.tolist()}")
        if not np.allclose(matrix[3], [0, 0, 0, 1]) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
            raise ValueError(f"ijk_to_ras must be an invertible affine matrix, got {matrix.tolist()}")
        directions = matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0)
        if np.abs(directions.T @ directions - np.eye(3)).max() > ORTHOGONALITY_TOLERANCE:
            raise ValueError("the volume's voxel axes are not perpendicular (a sheared IJK -> RAS matrix); NIfTI, "
                             "NRRD readers and the server need perpendicular axes: resample the volume first")
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "ijk_to_ras", matrix)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel sizes along I, J, K (mm)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def directions(self) -> np.ndarray:
        """Unit RAS directions of the I, J, K axes, as columns."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    def same_grid(self, other: Volume, tolerance_mm: float = 1e-4) -> bool:
        """Whether ``other`` has this volume's shape and voxel positions (within ``tolerance_mm``)."""
        if self.array.shape != other.array.shape:
            return False
        corners = np.array([[i, j, k, 1.0] for i in (0, self.array.shape[2] - 1) for j in (0, self.array.shape[1] - 1)
                            for k in (0, self.array.shape[0] - 1)]).T
        return bool(np.abs(self.ijk_to_ras @ corners - other.ijk_to_ras @ corners).max() <= tolerance_mm)


def to_sitk(volume: Volume) -> sitk.Image:
    """The volume as a SimpleITK image (LPS geometry, same voxels)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    lps = RAS_TO_LPS @ volume.ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def from_sitk(image: sitk.Image) -> Volume:
    """A SimpleITK image as a :class:`Volume` (RAS geometry, same voxels)."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return Volume(sitk.GetArrayFromImage(image), RAS_TO_LPS @ lps)


def write_volume(volume: Volume, path: str | Path, compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` (``.nii.gz``, ``.nii``, ``.nrrd``: the format from the name)."""
    path = Path(path)
    sitk.WriteImage(to_sitk(volume), str(path), useCompression=compress)
    return path


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI or NRRD file as a :class:`Volume`.

    Raises:
        ValueError: the file cannot be read as a 3-D scalar image, naming the file.
    """
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"{Path(path).name}: not a readable image ({str(error).strip().splitlines()[-1]})") from None
    try:
        return from_sitk(image)
    except ValueError as error:
        raise ValueError(f"{Path(path).name}: {error}") from None


def slice_axis(ijk_to_ras: np.ndarray) -> int:
    """The array axis (0 = K, 1 = J, 2 = I) whose voxel direction is closest to superior.

    Slices across it are the ones closest to axial, which the app's 2-D networks process
    one by one: slabs cut along it give the same result as the whole volume.
    """
    directions = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    superior = np.abs(directions[2]) / np.linalg.norm(directions, axis=0)  # |S component| of each unit I, J, K axis
    ijk_axis = int(np.argmax(superior))
    return 2 - ijk_axis  # I is array axis 2, K is array axis 0


def slab(volume: Volume, axis: int, start: int, stop: int) -> Volume:
    """Slices ``start:stop`` of ``volume`` along array ``axis``, in their place in space."""
    if not 0 <= start < stop <= volume.array.shape[axis]:
        raise ValueError(f"slab {start}:{stop} lies outside the {volume.array.shape[axis]} slices of axis {axis}")
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    offset = np.zeros(4)
    offset[2 - axis] = start  # array axis -> IJK index
    offset[3] = 1.0
    matrix = volume.ijk_to_ras.copy()
    matrix[:, 3] = volume.ijk_to_ras @ offset
    return Volume(volume.array[tuple(index)], matrix)

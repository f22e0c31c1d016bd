"""A volume's axial slices on a model's pixel grid, and back.

The networks are 2-D: they were trained on axial slices of canonical RAS+ volumes (see
:mod:`training.volume`) at the pixel spacing of their training data. A volume served to
them may come in any voxel order, direction (oblique included) and spacing.
:class:`ModelGrid` maps it there and back without touching its geometry:

1. the voxel axes are permuted and flipped to the closest canonical RAS+ order (nibabel's
   ``io_orientation``: no interpolation), so that ``[:, :, k]`` is the slice closest to
   axial, oriented as in training;
2. each slice is resampled in-plane to the model's spacing with MONAI ``Resize``
   (pixel areas aligned; anti-aliased when it shrinks) and padded with air to sides that
   the U-Net can down-sample;
3. results are cropped, resampled back to the slice's pixels (bilinear; class
   probabilities are resampled before the argmax), and the voxel order is restored, so
   the output has the input's shape and affine exactly.

A spacing inside the range the model was trained on is kept as it is (no resampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from training.physics import MU_MAX, hu_to_mu

AIR_HU = -1000.0
OUT_OF_FIELD_HU = -2000.0
"""Voxels below this are scanners' padding outside the field of view (-3024, -2048), not
noise: they are read as air, as the training images have air there."""
_CANONICAL = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def hu_to_network_input(hu: np.ndarray) -> np.ndarray:
    """HU to the networks' input: normalised attenuation, not clipped (noise keeps its sign), float32."""
    hu = np.where(hu < OUT_OF_FIELD_HU, AIR_HU, hu)
    return (hu_to_mu(hu) / MU_MAX).astype(np.float32)


def in_plane_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes ``(sx, sy, sz)`` (mm) of the canonical order of a volume with this affine."""
    order = io_orientation(np.asarray(affine, dtype=float))[:, 0].astype(int)
    sizes = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    canonical = np.empty(3)
    canonical[order] = sizes  # voxel axis a becomes canonical axis order[a]
    return float(canonical[0]), float(canonical[1]), float(canonical[2])


def canonical_shape(shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
    """The shape of a volume in canonical RAS+ voxel order: ``[:2]`` are the sides of its slices closest to axial."""
    order = io_orientation(np.asarray(affine, dtype=float))[:, 0].astype(int)  # voxel axis -> canonical axis
    canonical = [0, 0, 0]
    for axis, target in enumerate(order):
        canonical[target] = shape[axis]
    return tuple(canonical)  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelGrid:
    """How a volume of a given shape and affine maps to a model's slices.

    Args:
        shape: the volume's ``(X, Y, Z)`` shape, in its own voxel order.
        affine: its ``(4, 4)`` voxel-to-RAS affine (mm); any direction, oblique included.
        spacing_range_mm: the in-plane pixel spacings the model was trained on, ``(min,
            max)``; a spacing outside is resampled to the nearer end.
        multiple: model slice sides are padded to a multiple of this (``2**depth``).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing_range_mm: tuple[float, float]
    multiple: int

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"a volume grid needs a 3-D shape, got {self.shape}")
        affine = np.asarray(self.affine, dtype=float)
        if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise ValueError(f"the affine must be a finite, invertible 4x4 matrix, got {affine.tolist()}")
        low, high = self.spacing_range_mm
        if not 0 < low <= high:
            raise ValueError(f"spacing_range_mm must be 0 < min <= max, got {self.spacing_range_mm}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be at least 1, got {self.multiple}")

    @property
    def orientation(self) -> np.ndarray:
        """nibabel orientation taking the volume's voxel order to canonical RAS+."""
        return io_orientation(np.asarray(self.affine, dtype=float))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return canonical_shape(self.shape, self.affine)

    @property
    def source_spacing_mm(self) -> tuple[float, float]:
        sx, sy, _ = in_plane_spacing(self.affine)
        return sx, sy

    @property
    def model_spacing_mm(self) -> tuple[float, float]:
        """The pixel spacing of the model's slices: the input's where the model knows it, else the nearer trained one."""
        low, high = self.spacing_range_mm
        return tuple(float(np.clip(s, low, high)) for s in self.source_spacing_mm)  # type: ignore[return-value]

    @property
    def resampled(self) -> bool:
        return self.model_spacing_mm != self.source_spacing_mm

    @property
    def slice_shape(self) -> tuple[int, int]:
        """In-plane shape on the model's spacing, before padding."""
        nx, ny, _ = self.canonical_shape
        if not self.resampled:
            return nx, ny
        (sx, sy), (tx, ty) = self.source_spacing_mm, self.model_spacing_mm
        return max(1, round(nx * sx / tx)), max(1, round(ny * sy / ty))

    @property
    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Air added before and after each in-plane axis, centring the slice."""
        pads = []
        for side in self.slice_shape:
            total = -side % self.multiple
            pads.append((total // 2, total - total // 2))
        return pads[0], pads[1]

    def to_canonical(self, volume: np.ndarray) -> np.ndarray:
        """The volume in canonical RAS+ voxel order (a view where possible; no interpolation)."""
        self._check(volume, self.shape)
        return apply_orientation(volume, self.orientation)

    def from_canonical(self, volume: np.ndarray) -> np.ndarray:
        """Undo :meth:`to_canonical` (on the first three axes; a trailing channel axis is kept)."""
        self._check(volume, self.canonical_shape)
        return apply_orientation(volume, ornt_transform(_CANONICAL, self.orientation))

    def to_model(self, hu: np.ndarray) -> np.ndarray:
        """``(Z, H, W)`` network input (normalised attenuation) of a HU volume in its own voxel order."""
        canonical = hu_to_network_input(self.to_canonical(np.asarray(hu, dtype=np.float32)))
        slices = np.moveaxis(canonical, 2, 0)  # (Z, X, Y): slices as channels for MONAI
        if self.resampled:
            slices = _resize(slices, self.slice_shape)
        (px, qx), (py, qy) = self.padding
        air = float(hu_to_network_input(np.array(AIR_HU)))
        return np.pad(slices, ((0, 0), (px, qx), (py, qy)), constant_values=air).astype(np.float32)

    def from_model(self, slices: np.ndarray) -> np.ndarray:
        """A ``(Z, H, W)`` or ``(Z, C, H, W)`` stack on the model grid back on the volume's voxels.

        Returns ``(X, Y, Z)`` (or ``(X, Y, Z, C)``) in the volume's own voxel order,
        resampled bilinearly (area-averaged where the volume's pixels are larger).
        """
        slices = np.asarray(slices, dtype=np.float32)
        channels = slices.ndim == 4
        restored = self._restore(slices)
        # (Z, X, Y) -> (X, Y, Z); (Z, C, X, Y) -> (X, Y, Z, C)
        restored = np.transpose(restored, (2, 3, 0, 1) if channels else (1, 2, 0))
        return self.from_canonical(restored)

    def labels_from_model(self, probabilities: np.ndarray) -> np.ndarray:
        """Labels on the volume's voxels from ``(Z, C, H, W)`` class probabilities on the model grid.

        The probabilities are resampled (as :meth:`from_model`) before the argmax, which is
        taken before the voxel order is restored, on contiguous memory (2-4x faster than on
        the reoriented volume for a 512 x 512 x 50 one). Returns ``(X, Y, Z)`` uint8 class indices.
        """
        probabilities = np.asarray(probabilities, dtype=np.float32)
        if probabilities.ndim != 4:
            raise ValueError(f"expected (Z, C, H, W) class probabilities, got shape {probabilities.shape}")
        labels = self._restore(probabilities).argmax(axis=1).astype(np.uint8)
        return self.from_canonical(np.transpose(labels, (1, 2, 0)))

    def _restore(self, slices: np.ndarray) -> np.ndarray:
        """Crop the padding and resample back: ``(Z, [C,] H, W)`` -> ``(Z, [C,] X, Y)`` in canonical order."""
        (px, qx), (py, qy) = self.padding
        height, width = slices.shape[-2:]
        cropped = slices[..., px : height - qx, py : width - qy]
        if cropped.shape[-2:] != self.slice_shape:
            raise ValueError(f"expected slices of {self.slice_shape} px plus padding {self.padding}, got {slices.shape[-2:]}")
        nx, ny, nz = self.canonical_shape
        if cropped.shape[0] != nz:
            raise ValueError(f"expected {nz} slices, got {cropped.shape[0]}")
        flat = cropped.reshape(-1, *cropped.shape[-2:])
        if self.resampled:
            flat = _resize(flat, (nx, ny))
        return flat.reshape(*cropped.shape[:-2], nx, ny)

    @staticmethod
    def _check(volume: np.ndarray, shape: tuple[int, ...]) -> None:
        if tuple(volume.shape[:3]) != tuple(shape):
            raise ValueError(f"expected a volume of shape {tuple(shape)}, got {tuple(volume.shape[:3])}")


def _resize(slices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize each ``(H, W)`` slice of a ``(N, H, W)`` stack with MONAI (area-aligned pixel centres).

    Shrinking uses area averaging (no aliasing of noise or edges); enlarging is bilinear.
    """
    from monai.transforms import Resize

    shrinks = size[0] < slices.shape[1] or size[1] < slices.shape[2]
    resized = Resize(size, mode="area" if shrinks else "bilinear")(np.ascontiguousarray(slices, dtype=np.float32))
    return np.asarray(resized, dtype=np.float32)

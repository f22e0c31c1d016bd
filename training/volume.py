"""In-memory CT volumes and the LiTS file layout.

All volumes inside the package share one convention, so that every module can index
slices the same way:

* arrays are ``(X, Y, Z)`` in nibabel's RAS+ orientation: index ``i`` grows towards the
  patient's right (R), ``j`` towards anterior (A), ``k`` towards superior (S);
  ``volume[:, :, k]`` is one axial slice;
* ``affine`` maps voxel indices to RAS world coordinates in millimetres;
* intensities are Hounsfield units (float32); labels are uint8 with 0 background,
  1 liver, 2 liver tumour (the LiTS convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.fileio import save_nifti

LABEL_BACKGROUND = 0
LABEL_LIVER = 1
LABEL_TUMOR = 2
LABEL_NAMES = {LABEL_BACKGROUND: "background", LABEL_LIVER: "liver", LABEL_TUMOR: "tumor"}


@dataclass
class CTVolume:
    """A CT volume in HU with its reference segmentation, in canonical RAS+ orientation.

    Attributes:
        case_id: a short identifier, unique within a data set (``"0"``, ``"lits-17"``).
        hu: ``(X, Y, Z)`` float32 Hounsfield units.
        segmentation: ``(X, Y, Z)`` uint8 labels 0/1/2, or ``None`` if there is none.
        affine: ``(4, 4)`` voxel-to-RAS transform in mm.
        sources: the files this volume was read from (for messages and provenance).
    """

    case_id: str
    hu: np.ndarray
    segmentation: np.ndarray | None
    affine: np.ndarray
    sources: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(sx, sy, sz)`` in mm."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


def lits_paths(directory: str | Path, index: int | str) -> tuple[Path, Path]:
    """The LiTS file names this package writes for case ``index``: ``volume-K.nii.gz``, ``segmentation-K.nii.gz``."""
    directory = Path(directory)
    return directory / f"volume-{index}.nii.gz", directory / f"segmentation-{index}.nii.gz"


def write_lits_case(directory: str | Path, index: int | str, volume: CTVolume) -> tuple[Path, Path]:
    """Write ``volume`` as a LiTS pair (HU as int16, labels as uint8), each file atomically.

    Returns:
        the paths of the volume and segmentation files.
    """
    if volume.segmentation is None:
        raise ValueError(f"case {volume.case_id}: a LiTS case needs a segmentation")
    volume_path, segmentation_path = lits_paths(directory, index)
    hu = np.clip(np.rint(volume.hu), -32768, 32767).astype(np.int16)
    save_nifti(volume_path, hu, volume.affine, "CT in HU")
    save_nifti(segmentation_path, volume.segmentation.astype(np.uint8), volume.affine, "0 bg, 1 liver, 2 tumor")
    return volume_path, segmentation_path

"""Atomic file writing: a file either exists whole or not at all.

Every writer in the package goes through :func:`atomic_path`, so an interrupted run never
leaves a half-written file behind under its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps ``path``'s suffixes (``.nii.gz`` stays ``.nii.gz``) so that
    libraries which pick a format from the file name write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary files that a killed writer left under ``folder``; returns how many."""
    stale = [p for p in Path(folder).rglob(".*.tmp*") if p.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)


def save_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, description: str = "") -> None:
    """Write ``array`` (with its 4x4 voxel-to-RAS affine, mm) as NIfTI-1, atomically.

    Uncompressed ``.nii`` files are memory-mapped when read back, so a single slice of a
    large volume can be read without loading the rest.
    """
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    if description:
        image.header["descrip"] = description.encode()[:79]
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` (memory-mappable with ``np.load(mmap_mode='r')``), atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, np.asarray(array))

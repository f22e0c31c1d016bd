"""Atomic file writing: a file either exists whole or not at all.

Every writer in the package goes through :func:`atomic_path`, so an interrupted run never
leaves a half-written file behind under its final name. :func:`check_output_folder` lets a
command refuse an output folder it could not write before it starts any work.
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

from training.errors import DataError


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


def check_output_folder(path: str | Path) -> Path:
    """Refuse an output folder that cannot be written, before any work is done; returns ``path``.

    The folder may exist (what it holds is kept) or not (it is created later, with any
    missing parents). Refused: a path that is a file, a path below a file, and a folder in
    which no file can be created (read-only or virtual file system, no permission). The
    last is found by creating a temporary file in the folder, or in its nearest existing
    ancestor, and deleting it: permission bits say nothing when running as root. The probe
    is an unnamed file where the file system allows it (``O_TMPFILE``), so nothing is
    left behind and, mostly, the folder's modification time stays as it was.

    Raises:
        DataError: naming ``path``.
    """
    path = Path(path)
    ancestor = path
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise DataError(path, f"cannot be created: {ancestor} is a broken symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        if ancestor == path:
            raise DataError(path, "is a file, not a folder")
        raise DataError(path, f"cannot be created: {ancestor} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        where = "" if ancestor == path else f" (no file can be created in {ancestor}, its nearest existing folder)"
        raise DataError(path, f"cannot be written: {exc.strerror or type(exc).__name__}{where}") from None
    return path


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

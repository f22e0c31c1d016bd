"""The app's local datastore: MONAI Label's, with every upload checked before anything is stored.

MONAI Label's ``LocalDatastore`` copies whatever is uploaded into the studies folder, and
a label saved with another file extension than the previous one leaves the old file
behind. Here:

* an uploaded image must be a CT volume in HU that the app can serve
  (:func:`lib.volumes.read_ct`), under an id of letters, digits, ``.``, ``_`` and ``-``;
* a saved label must lie on its image's voxels (same shape and affine) and hold only 0,
  1 and 2; it is stored as uint8 NIfTI with the image's affine (uncompressed ``.nii``
  beside ``.nii`` images, so that a ``tact simulate`` data set reads it as its reference
  segmentation), replacing the image's previous label of that tag whatever its extension;
* files are written to ``.incoming/`` first and renamed into place, so a reader never
  sees half a file.

A refused upload raises an HTTP 4xx error naming the problem and changes nothing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from lib.errors import BadRequest, NotFound
from lib.volumes import DEFAULT_MAX_VOXELS, as_output_dtype, read_ct, read_label
from training.errors import DataError
from training.loaders import read_volume

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
INCOMING = ".incoming"


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise BadRequest(f"{kind} {value!r} is not allowed: use letters, digits, '.', '_' and '-' (at most 128)")
    return value


def place_atomically(write: Callable[[str], None], destination: Path, incoming: Path) -> None:
    """Write a file through ``write(tmp_path)`` in the folder ``incoming`` and rename it to ``destination``.

    ``incoming`` must be on the same file system as ``destination`` (the rename is atomic there).
    """
    incoming.mkdir(parents=True, exist_ok=True)
    suffix = "".join(destination.suffixes)
    fd, name = tempfile.mkstemp(suffix=suffix, dir=incoming)
    os.close(fd)
    try:
        write(name)
        os.chmod(name, 0o644)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(name, destination)
    finally:
        Path(name).unlink(missing_ok=True)


class TaskAdaptiveDatastore(LocalDatastore):
    """``LocalDatastore`` that validates uploads and writes atomically (see the module docstring).

    Args:
        path: the studies folder (e.g. a data set's ``lowdose/``).
        max_voxels: largest image accepted.
        on_label_saved: called with (image id, tag) after a label was saved through the API.
        **kwargs: passed to ``LocalDatastore``.
    """

    def __init__(self, path: str, max_voxels: int = DEFAULT_MAX_VOXELS,
                 on_label_saved: Callable[[str, str], None] | None = None, **kwargs: Any) -> None:
        self.max_voxels = max_voxels
        self.on_label_saved = on_label_saved
        super().__init__(path, **kwargs)
        shutil.rmtree(Path(path) / INCOMING, ignore_errors=True)  # leftovers of an interrupted write

    # ----------------------------------------------------------------------------- helpers

    def _place(self, write: Callable[[str], None], destination: Path) -> None:
        place_atomically(write, destination, Path(self._datastore_path) / INCOMING)

    def check_image(self, image_id: str) -> None:
        """Refuse (404) an image id the datastore does not hold."""
        if image_id not in self.list_images():
            raise NotFound(f"unknown image id {image_id!r}; list them with GET /datastore/?output=all")

    def image_grid(self, image_id: str) -> tuple[tuple[int, ...], np.ndarray]:
        """Shape and affine of a datastore image (its own voxel order)."""
        uri = self.get_image_uri(image_id)
        if not uri:
            raise NotFound(f"unknown image id {image_id!r}")
        try:
            if uri.endswith((".nii", ".nii.gz")):
                header = nib.load(uri)
                return tuple(int(n) for n in header.shape[:3]), np.asarray(header.affine)
            array, affine = read_volume(uri)
            return array.shape, affine
        except DataError as error:
            raise BadRequest(f"image {image_id}: {error.problem}") from None

    def _label_extension(self, image_id: str) -> str:
        image_ext = self._datastore.objects[image_id].image.ext
        return ".nii" if image_ext == ".nii" else ".nii.gz"

    def _register_label(self, image_id: str, tag: str, ext: str, info: dict[str, Any]) -> None:
        obj = self._datastore.objects[image_id]
        info = dict(info or {}, ts=int(time.time()), name=image_id + ext)
        obj.labels[tag] = DataModel(info=info, ext=ext)
        self._update_datastore_file(lock=False)

    def _remove_other_extensions(self, image_id: str, tag: str, keep: Path) -> None:
        folder = Path(self._datastore.label_path(tag))
        for ext in self._extensions:
            other = folder / f"{image_id}{ext.replace('*', '')}"
            if other != keep and other.is_file():
                other.unlink()

    # ----------------------------------------------------------------------------- API

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Store an uploaded CT volume, after :func:`lib.volumes.read_ct` accepted it."""
        derived, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = check_name("image id", image_id or derived)
        read_ct(image_filename, self.max_voxels, image_id)
        destination = Path(self._datastore.image_path()) / self._filename(image_id, image_ext)
        with FileLock(self._lock_file):
            self._place(lambda tmp: shutil.copyfile(image_filename, tmp), destination)
            info = dict(image_info or {}, ts=int(time.time()), name=destination.name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Store a label (liver 1, tumour 2) for a datastore image, after checking it fits the image."""
        if image_id not in self._datastore.objects:
            raise NotFound(f"unknown image id {image_id!r}; list them with GET /datastore/?output=all")
        tag = check_name("label tag", label_tag)
        shape, affine = self.image_grid(image_id)
        labels = read_label(label_filename, shape, affine, image_id)
        ext = self._label_extension(image_id)
        destination = Path(self._datastore.label_path(tag)) / f"{image_id}{ext}"

        def write(tmp: str) -> None:
            image = nib.Nifti1Image(labels, affine)
            image.header.set_xyzt_units("mm")
            image.header["descrip"] = b"0 bg, 1 liver, 2 tumor"
            nib.save(image, tmp)

        info = dict(label_info or {}, corrected=True) if tag == "final" else label_info
        with FileLock(self._lock_file):
            self._place(write, destination)
            self._remove_other_extensions(image_id, tag, destination)
            self._register_label(image_id, tag, ext, info)
        if self.on_label_saved is not None:
            self.on_label_saved(image_id, tag)
        log.info("saved label %s of %s (%s voxels liver, %s tumour)", tag, image_id, int((labels == 1).sum()),
                 int((labels == 2).sum()))
        return image_id

    def store_volume(self, image_id: str, array: np.ndarray, affine: np.ndarray, tag: str, info: dict[str, Any],
                     dtype: str = "float32") -> str:
        """Keep a volume computed for an image (e.g. its reconstruction) as a label of ``tag``."""
        if image_id not in self._datastore.objects:
            raise NotFound(f"unknown image id {image_id!r}")
        check_name("label tag", tag)
        data = as_output_dtype(array, dtype)
        # float32 noise barely compresses (41 of 50 MB for 512 x 512 x 50) at 15x the write time; int16 does (8 MB)
        ext = ".nii" if data.dtype == np.float32 else ".nii.gz"
        destination = Path(self._datastore.label_path(tag)) / f"{image_id}{ext}"

        def write(tmp: str) -> None:
            image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
            image.header.set_xyzt_units("mm")
            nib.save(image, tmp)

        with FileLock(self._lock_file):
            self._place(write, destination)
            self._remove_other_extensions(image_id, tag, destination)
            self._register_label(image_id, tag, ext, info)
        return image_id

"""The app's datastore on a PACS: CT series over DICOMweb, results stored back into the same study.

Started with ``--studies http://HOST:PORT/dicom-web`` (Orthanc's DICOMweb root, or a site's
PACS). Images are the PACS's CT series, by Series Instance UID. Compared with MONAI Label's
``DICOMWebDatastore``:

* listing asks the PACS each time (cached for :data:`LISTING_TTL_S` seconds, not two
  hours), and leaves out the app's own reconstruction series;
* a series is downloaded into a temporary folder and read with the project's strict DICOM
  loader before anything is kept: a series that is not CT (a SEG, an MR), has uneven slice
  spacing or a gantry tilt, or one slice only is refused with an error naming the series,
  and nothing of it stays in the cache;
* a ``final`` label (a clinician's correction) is checked against the series' grid and
  stored on the PACS as a DICOM SEG with Liver and Tumour segments
  (:mod:`training.dicom_seg`), in the series' study;
* a reconstruction is stored on the PACS as a derived CT series of the same study
  (:func:`training.dicom_series.derived_ct_series`): Image Type DERIVED\\SECONDARY, a
  Series Description naming the model and alpha;
* every store is whole or removed again (:func:`training.dicomweb.store_series`);
* a PACS that does not answer gives HTTP 503 naming it, and the server keeps serving.

Local copies (the converted volume, labels, reconstructions) live in the cache folder, as
in a local datastore, so that ``GET /datastore/label`` works as it does there.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pydicom
import pydicom.errors
import requests
from dicomweb_client import DICOMwebClient
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import DataModel, ImageLabelModel

from lib.datastore import INCOMING, TaskAdaptiveDatastore, place_atomically
from lib.errors import BadRequest, NotFound, Unavailable
from lib.volumes import DEFAULT_MAX_VOXELS, read_ct, read_label
from training.dicom_seg import write_seg
from training.dicom_series import derived_ct_series
from training.dicomweb import StowError, store_series

log = logging.getLogger(__name__)

LISTING_TTL_S = 10.0
RECONSTRUCTION_PREFIX = "TaskAdaptiveCT reconstruction"
"""Series Description prefix of the reconstructions the app stores (left out of the image list)."""
SEG_DESCRIPTION = "TaskAdaptiveCT liver and tumour"
DICOM_FOLDER = "dicom"

_SERIES_UID, _STUDY_UID, _MODALITY, _DESCRIPTION, _PATIENT_ID = "0020000E", "0020000D", "00080060", "0008103E", "00100020"


def cache_folder(root: str | Path, url: str) -> Path:
    """Where the app keeps what it fetched from the PACS at ``url`` (one folder per URL)."""
    return Path(root).expanduser().resolve() / hashlib.md5(url.encode()).hexdigest()


class BadGateway(HTTPException):
    """502: the PACS answered, but refused what the app stored (``detail`` says what and why)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=502, detail=detail)


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def pacs_call(method: Callable) -> Callable:
    """Turn a PACS that does not answer, or answers with an error, into HTTP 503 naming it."""

    @functools.wraps(method)
    def wrapper(self: PacsDatastore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as error:
            raise Unavailable(f"the PACS at {self.url} does not answer ({type(error).__name__}); "
                              "is it running and reachable?") from None
        except requests.HTTPError as error:
            response = error.response
            status = response.status_code if response is not None else "?"
            text = (response.text or "").strip()[:200] if response is not None else ""
            raise Unavailable(f"the PACS at {self.url} answered HTTP {status}: {text}") from None

    return wrapper


class PacsDatastore(TaskAdaptiveDatastore):
    """CT series of a DICOMweb server as the app's images (see the module docstring).

    Args:
        client: a DICOMweb client for the PACS (:func:`training.dicomweb.dicomweb_client`).
        cache: the local folder for fetched series and results (:func:`cache_folder`).
        max_voxels: largest series accepted.
        on_label_saved: called with (image id, tag) after a label was saved.
    """

    def __init__(self, client: DICOMwebClient, cache: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS,
                 on_label_saved: Callable[[str, str], None] | None = None) -> None:
        self.client = client
        self.url = client.base_url
        Path(cache).mkdir(parents=True, exist_ok=True)
        self._listing: tuple[float, list[dict]] = (0.0, [])
        self._fetch_lock = threading.Lock()
        super().__init__(str(cache), max_voxels=max_voxels, on_label_saved=on_label_saved,
                         extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)

    def name(self) -> str:
        return self.url

    # ----------------------------------------------------------------------------- listing

    @pacs_call
    def series(self) -> list[dict]:
        """QIDO-RS records of the PACS's CT series, without the app's reconstructions (cached briefly)."""
        taken, records = self._listing
        if time.monotonic() - taken > LISTING_TTL_S:
            found = self.client.search_for_series(search_filters={"Modality": "CT"},
                                                  fields=[_DESCRIPTION, _STUDY_UID, _PATIENT_ID])
            records = [r for r in found if not _value(r, _DESCRIPTION).startswith(RECONSTRUCTION_PREFIX)]
            self._listing = (time.monotonic(), records)
        return records

    def list_images(self) -> list[str]:
        return [_value(r, _SERIES_UID) for r in self.series()]

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labeled = set(self.get_labeled_images())
        return [image for image in self.list_images() if image not in labeled]

    def json(self) -> dict[str, Any]:
        """MONAI Label's datastore listing, with every CT series of the PACS (fetched or not)."""
        listing = super().json()
        objects = listing.setdefault("objects", {})
        for record in self.series():
            uid = _value(record, _SERIES_UID)
            objects.setdefault(uid, {"image": {"ext": "", "info": {"fetched": False}}, "labels": {}})
            objects[uid]["image"]["info"].update({"SeriesDescription": _value(record, _DESCRIPTION),
                                                  "StudyInstanceUID": _value(record, _STUDY_UID),
                                                  "PatientID": _value(record, _PATIENT_ID)})
        return listing

    def status(self) -> dict[str, Any]:
        """Counts for ``/info/``; with the PACS unreachable, those of the cache and the PACS's error."""
        try:
            return super().status()
        except Unavailable as error:
            cached = self._datastore.objects
            return {"total": len(cached), "completed": len(self.get_labeled_images()),
                    "label_tags": {}, "pacs_error": error.detail}

    @pacs_call
    def check_series(self, series_uid: str) -> dict:
        """The QIDO-RS record of a series the app can serve.

        Raises:
            NotFound: the PACS has no such series.
            BadRequest: the series is not CT (naming its modality).
        """
        found = [r for r in self.client.search_for_series(search_filters={"SeriesInstanceUID": series_uid},
                                                         fields=[_MODALITY, _DESCRIPTION, _STUDY_UID])
                 if _value(r, _SERIES_UID) == series_uid]
        if not found:
            raise NotFound(f"the PACS at {self.url} has no series {series_uid!r}; list them with GET /datastore/?output=all")
        modality = _value(found[0], _MODALITY)
        if modality != "CT":
            raise BadRequest(f"series {series_uid}: is a {modality or 'modality-less'} series, not CT; only CT series "
                             "can be reconstructed and segmented")
        return found[0]

    # ----------------------------------------------------------------------------- images

    def dicom_folder(self, series_uid: str) -> Path:
        return Path(self._datastore_path) / DICOM_FOLDER / series_uid

    def is_fetched(self, series_uid: str) -> bool:
        """Whether a series is in the cache, checked (it is then served without asking the PACS)."""
        return series_uid in self._datastore.objects and self.dicom_folder(series_uid).is_dir()

    def check_image(self, image_id: str) -> None:
        """Fetch and check a series (once): 404, 422 naming it, or 503 if the PACS does not answer."""
        self.get_image_uri(image_id)

    def get_image_uri(self, image_id: str) -> str:
        """The fetched, checked series as NIfTI (fetched from the PACS on first use)."""
        if self.is_fetched(image_id):
            return super().get_image_uri(image_id)
        with self._fetch_lock:
            if not self.is_fetched(image_id):
                self._fetch(image_id)
        return super().get_image_uri(image_id)

    @pacs_call
    def _fetch(self, series_uid: str) -> None:
        record = self.check_series(series_uid)
        study_uid = _value(record, _STUDY_UID)
        incoming = Path(self._datastore_path) / INCOMING
        incoming.mkdir(exist_ok=True)
        download = Path(tempfile.mkdtemp(prefix="series-", dir=incoming))
        try:
            try:
                instances = self.client.retrieve_series(study_uid, series_uid)
            except pydicom.errors.InvalidDicomError as error:
                raise BadGateway(f"series {series_uid}: the PACS at {self.url} sent what is not DICOM ({error})") from None
            for ds in instances:
                ds.save_as(download / f"{ds.SOPInstanceUID}.dcm", write_like_original=False)
            hu, affine = read_ct(download, self.max_voxels, f"series {series_uid}")
            destination = Path(self._datastore_path) / f"{series_uid}.nii.gz"

            def write(tmp: str) -> None:
                image = nib.Nifti1Image(hu, affine)
                image.header.set_xyzt_units("mm")
                nib.save(image, tmp)

            place_atomically(write, destination, incoming)
            folder = self.dicom_folder(series_uid)
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(download, folder)
        finally:
            shutil.rmtree(download, ignore_errors=True)
        info = {"ts": int(time.time()), "name": destination.name, "SeriesInstanceUID": series_uid,
                "StudyInstanceUID": study_uid, "SeriesDescription": _value(record, _DESCRIPTION),
                "instances": len(instances)}
        self._datastore.objects[series_uid] = ImageLabelModel(image=DataModel(info=info, ext=".nii.gz"))
        self._update_datastore_file(lock=True)
        log.info("fetched series %s (%d instances) from %s", series_uid, len(instances), self.url)

    def source_instances(self, series_uid: str) -> list[pydicom.Dataset]:
        """Headers of a fetched series' instances."""
        return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(self.dicom_folder(series_uid).glob("*.dcm"))]

    # ----------------------------------------------------------------------------- results

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Keep a label; a ``final`` one also goes to the PACS as a DICOM SEG in the series' study."""
        self.get_image_uri(image_id)  # fetched and checked, or a 4xx/503
        if label_tag != "final":
            return super().save_label(image_id, label_filename, label_tag, label_info)
        shape, affine = self.image_grid(image_id)
        labels = read_label(label_filename, shape, affine, image_id)
        with tempfile.TemporaryDirectory(dir=Path(self._datastore_path) / INCOMING) as work:
            try:
                seg = write_seg(labels, affine, self.dicom_folder(image_id), Path(work) / "seg.dcm",
                                series_description=SEG_DESCRIPTION)
            except ValueError as error:
                raise BadRequest(f"label of {image_id}: {error}") from None
            self._store(image_id, [seg], "the DICOM SEG")
        info = dict(label_info or {}, seg_series_uid=str(seg.SeriesInstanceUID),
                    segments=[str(s.SegmentLabel) for s in seg.SegmentSequence])
        super().save_label(image_id, label_filename, label_tag, info)
        return image_id

    def store_volume(self, image_id: str, array: np.ndarray, affine: np.ndarray, tag: str, info: dict[str, Any],
                     dtype: str = "float32") -> dict[str, Any]:
        """Keep a reconstruction locally and store it on the PACS as a derived CT series of the image's study."""
        variant = str(info.get("variant") or tag)
        alpha = (info.get("reconstructor") or {}).get("alpha")
        description = f"{RECONSTRUCTION_PREFIX} {variant}" + (f" a={float(alpha):g}" if alpha is not None else "")
        derivation = (f"TaskAdaptiveCT reconstruction of series {image_id} by the U-Net {variant}"
                      + (f" trained with alpha = {float(alpha):g} ((1 - alpha) MSE + alpha Dice through a frozen "
                         "segmentation network)" if alpha is not None else ""))
        try:
            datasets = derived_ct_series(array, affine, self.source_instances(image_id), description, derivation)
        except ValueError as error:
            raise BadRequest(f"reconstruction of {image_id}: {error}") from None
        self._store(image_id, datasets, "the reconstruction")
        series_uid = str(datasets[0].SeriesInstanceUID)
        super().store_volume(image_id, array, affine, tag, dict(info, series_uid=series_uid), dtype)
        return {"series_uid": series_uid, "study_uid": str(datasets[0].StudyInstanceUID), "description": description}

    @pacs_call
    def _store(self, image_id: str, datasets: list[pydicom.Dataset], what: str) -> None:
        try:
            store_series(self.client, datasets)
        except StowError as error:
            raise BadGateway(f"{what} of series {image_id} was not stored on the PACS at {self.url}: {error}") from None

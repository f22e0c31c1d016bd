"""CT volumes as DICOM CT series: the simulated scans for a PACS, and reconstructions as derived series.

A volume of the package (``(X, Y, Z)`` HU, voxel-to-RAS affine, see :mod:`training.volume`)
becomes one CT Image Storage instance per axial slice:

* geometry: Image Orientation (Patient) and Image Position (Patient) in DICOM's LPS
  world, from the affine (the voxel axes are first reordered to L, P, S so that viewers
  show the usual radiological orientation without flipping); Pixel Spacing is
  ``[row spacing, column spacing]``; Slice Thickness and Spacing Between Slices are the
  slice spacing;
* intensities: signed 16-bit stored values with Rescale Intercept -1024 and Rescale
  Slope 1 (HU = stored - 1024, rounded to 1 HU; values beyond int16 are clipped and
  counted in the log);
* identity: new Study, Series, SOP and Frame of Reference UIDs. For a data set's export
  they are derived from the data set's manifest, case and series, so exporting the same
  data set twice gives the same UIDs and a PACS does not fill with copies.

A derived series (:func:`derived_ct_series`) is a volume computed from a stored series,
on its grid (e.g. the app's reconstruction of a low-dose series): it joins the source's
patient, study and frame of reference, with Image Type DERIVED\\SECONDARY\\AXIAL, a new
Series UID, a Derivation Description, and each slice's Source Image Sequence pointing at
the source slice at its position.

PHI: a derived series copies the source's patient and study attributes unchanged; nothing
here anonymises anything.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import format_number_as_ds
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from training.errors import DataError

log = logging.getLogger(__name__)

RESCALE_INTERCEPT = -1024.0
RESCALE_SLOPE = 1.0
_STORED_MIN, _STORED_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max
LPS = ("L", "P", "S")
# the patient and study attributes a derived series copies from its source
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                          "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                          "ReferringPhysicianName", "StudyDescription", "FrameOfReferenceUID",
                          "PositionReferenceIndicator")


@dataclass(frozen=True)
class SeriesInfo:
    """What distinguishes one series of a study.

    Args:
        description: Series Description (0008,103E), at most 64 characters.
        number: Series Number.
        image_type: Image Type values, e.g. ``("DERIVED", "PRIMARY", "AXIAL")``.
        derivation: Derivation Description (0008,2111): how the images were made.
        uid: the Series Instance UID (new: :func:`pydicom.uid.generate_uid`).
    """

    description: str
    number: int
    image_type: tuple[str, ...]
    derivation: str
    uid: str

    def __post_init__(self) -> None:
        if len(self.description) > 64:
            raise ValueError(f"a Series Description holds at most 64 characters, got {len(self.description)}: "
                             f"{self.description!r}")


def to_lps_voxels(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder (permute and flip, no interpolation) ``(X, Y, Z)`` voxels so that the axes point L, P, S.

    Args:
        array: ``(X, Y, Z)`` voxels.
        affine: ``(4, 4)`` voxel-to-RAS affine in mm.

    Returns:
        the reordered array and its voxel-to-**LPS** affine (DICOM's patient coordinates).
    """
    orientation = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                  nib.orientations.axcodes2ornt(LPS, labels=(("L", "R"), ("P", "A"),
                                                                                             ("I", "S"))))
    reordered = nib.orientations.apply_orientation(array, orientation)
    ras = affine @ nib.orientations.inv_ornt_aff(orientation, array.shape)
    return reordered, np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras


def study_dataset(patient_id: str, patient_name: str, study_uid: str, study_description: str,
                  frame_of_reference_uid: str, when: datetime.datetime | None = None) -> Dataset:
    """The patient, study and frame-of-reference attributes shared by every series of one study."""
    when = when or datetime.datetime.now()
    study = Dataset()
    study.PatientName = patient_name
    study.PatientID = patient_id
    study.PatientBirthDate = ""
    study.PatientSex = "O"
    study.StudyInstanceUID = study_uid
    study.StudyDate = when.strftime("%Y%m%d")
    study.StudyTime = when.strftime("%H%M%S")
    study.StudyID = "1"
    study.AccessionNumber = ""
    study.ReferringPhysicianName = ""
    study.StudyDescription = study_description[:64]
    study.FrameOfReferenceUID = frame_of_reference_uid
    study.PositionReferenceIndicator = ""
    return study


def stored_values(hu: np.ndarray) -> tuple[np.ndarray, int]:
    """HU as int16 stored values (HU = stored * slope + intercept) and how many voxels were clipped."""
    if not np.isfinite(hu).all():
        raise ValueError("the volume holds NaN or infinite values; they have no DICOM representation")
    stored = np.rint((np.asarray(hu, dtype=np.float64) - RESCALE_INTERCEPT) / RESCALE_SLOPE)
    clipped = int(((stored < _STORED_MIN) | (stored > _STORED_MAX)).sum())
    return np.clip(stored, _STORED_MIN, _STORED_MAX).astype(np.int16), clipped


def ct_series(hu: np.ndarray, affine: np.ndarray, study: Dataset, series: SeriesInfo,
              sop_uids: Sequence[str] | None = None, sources: Sequence[Dataset | None] | None = None,
              when: datetime.datetime | None = None) -> list[Dataset]:
    """One CT Image Storage dataset per axial slice of a volume (see the module docstring).

    Args:
        hu: ``(X, Y, Z)`` Hounsfield units, finite.
        affine: ``(4, 4)`` voxel-to-RAS affine in mm; its third axis must be the slice axis
            (the one closest to S once reordered to L, P, S).
        study: patient, study and frame-of-reference attributes (:func:`study_dataset`, or
            a source series' first instance for a derived series).
        series: the series' description, number, type and UID.
        sop_uids: one SOP Instance UID per slice in L, P, S order (default: new random ones).
        sources: per slice (L, P, S order) the source instance it was derived from, or ``None``.
        when: content date and time (default: now).

    Returns:
        datasets ordered from inferior to superior, Instance Number 1, 2, ..., with file meta.

    Raises:
        ValueError: not a 3-D volume of at least one slice, non-finite values, or an affine
            whose in-plane axes are not perpendicular to the slice axis.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"a CT series needs an (X, Y, Z) volume, got shape {hu.shape}")
    voxels, lps = to_lps_voxels(hu, np.asarray(affine, dtype=np.float64))
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    directions = lps[:3, :3] / spacing
    if abs(float(np.dot(np.cross(directions[:, 0], directions[:, 1]), directions[:, 2]))) < 0.999:
        raise ValueError("the volume's slices are not perpendicular to its slice axis (tilted or sheared grid); "
                         "such a volume has no plain CT series")
    stored, clipped = stored_values(voxels)
    if clipped:
        log.warning("%s: %d voxels beyond the int16 range of stored values were clipped", series.description, clipped)
    when = when or datetime.datetime.now()
    count = voxels.shape[2]
    sop_uids = list(sop_uids) if sop_uids is not None else [generate_uid() for _ in range(count)]
    if len(sop_uids) != count or (sources is not None and len(sources) != count):
        raise ValueError(f"{count} slices need {count} SOP UIDs and sources")
    datasets = []
    for k in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uids[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        # a preamble, so that a server storing the bytes as sent (Orthanc does) serves a valid DICOM file
        ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        for element in study:
            if element.keyword in PATIENT_STUDY_KEYWORDS:
                ds.add(element)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uids[k]
        ds.Modality = "CT"
        ds.Manufacturer = "TaskAdaptiveCT"
        ds.ImageType = list(series.image_type)
        ds.SeriesInstanceUID = series.uid
        ds.SeriesNumber = series.number
        ds.SeriesDescription = series.description
        ds.DerivationDescription = series.derivation[:1024]
        ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
        ds.InstanceNumber = k + 1
        ds.BodyPartExamined = "ABDOMEN"
        ds.PatientPosition = "HFS"
        position = lps @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
        ds.ImageOrientationPatient = [_ds(v) for v in directions[:, :2].T.ravel()]
        ds.SliceLocation = _ds(position[2])
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # [between rows (Y), between columns (X)]
        ds.SliceThickness = _ds(spacing[2])
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(voxels.shape[1]), int(voxels.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
        ds.RescaleSlope = _ds(RESCALE_SLOPE)
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"  # abdomen
        source = sources[k] if sources is not None else None
        if source is not None:
            reference = Dataset()
            reference.ReferencedSOPClassUID = source.SOPClassUID
            reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
            ds.SourceImageSequence = DicomSequence([reference])
        # rows are Y (posterior), columns X (left): the slice's (X, Y) array transposed
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        datasets.append(ds)
    return datasets


def _ds(value: float) -> str:
    """A Decimal String (at most 16 characters)."""
    return format_number_as_ds(float(value))


def write_series(datasets: Sequence[Dataset], folder: str | Path) -> Path:
    """Write ``datasets`` as ``folder/0001.dcm, 0002.dcm, ...``, all or nothing.

    The files are written into a temporary sibling folder that is renamed onto ``folder``
    (an existing ``folder`` is replaced only once the new one is complete).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for ds in datasets:
            ds.save_as(tmp / f"{int(ds.InstanceNumber):04d}.dcm", write_like_original=False)
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_series(folder: str | Path) -> list[Dataset]:
    """The DICOM files of a folder, sorted by Instance Number."""
    files = sorted(Path(folder).glob("*.dcm"))
    if not files:
        raise DataError(folder, "holds no .dcm files")
    return sorted((pydicom.dcmread(f) for f in files), key=lambda ds: int(ds.InstanceNumber))


def stable_uid(*parts: object) -> str:
    """A UID determined by ``parts`` (pydicom's root), so that re-exporting the same thing repeats it."""
    return generate_uid(entropy_srcs=[str(part) for part in parts])


# ----------------------------------------------------------------------------- derived series

def source_for_slices(sources: Sequence[Dataset], lps_affine: np.ndarray, count: int,
                      tolerance_mm: float = 0.01) -> list[Dataset | None]:
    """Per slice ``k`` of an LPS-ordered volume, the source instance (of at least one) at its position, else ``None``."""
    normal = lps_affine[:3, 2] / np.linalg.norm(lps_affine[:3, 2])
    spacing = float(np.linalg.norm(lps_affine[:3, 2]))
    by_offset = [(float(np.dot(np.asarray(s.ImagePositionPatient, dtype=float), normal)), s) for s in sources]
    matched: list[Dataset | None] = []
    for k in range(count):
        target = float(np.dot(lps_affine @ np.array([0.0, 0.0, k, 1.0]), np.append(normal, 0.0)))
        offset, best = min(by_offset, key=lambda item: abs(item[0] - target))
        matched.append(best if abs(offset - target) <= max(tolerance_mm, 0.01 * spacing) else None)
    return matched


def derived_ct_series(hu: np.ndarray, affine: np.ndarray, sources: Sequence[Dataset], description: str,
                      derivation: str, series_number: int | None = None) -> list[Dataset]:
    """A volume computed on a stored series' grid, as a new series of that series' study.

    Args:
        hu: ``(X, Y, Z)`` HU on the source series' voxel grid.
        affine: its voxel-to-RAS affine.
        sources: the source series' instances (any order; headers suffice).
        description: Series Description (e.g. naming the model and alpha).
        derivation: Derivation Description.
        series_number: default: the source's plus 1000.

    Raises:
        ValueError: no sources, sources of several series, or a volume not on the
            source's grid (a slice without a source instance at its position).
    """
    if not sources:
        raise ValueError("a derived series needs the instances of its source series")
    series_uids = {s.SeriesInstanceUID for s in sources}
    if len(series_uids) != 1:
        raise ValueError(f"the sources belong to {len(series_uids)} series; one is expected")
    first = sources[0]
    voxels_lps = to_lps_voxels(np.asarray(hu), np.asarray(affine, dtype=np.float64))[1]
    count = np.asarray(hu).shape[2]
    matched = source_for_slices(sources, voxels_lps, count)
    if any(m is None for m in matched):
        missing = [k for k, m in enumerate(matched) if m is None]
        raise ValueError(f"slices {missing[:5]} of the volume lie where the source series has no slice: "
                         "the volume is not on the source's grid")
    number = series_number if series_number is not None else int(getattr(first, "SeriesNumber", 0) or 0) + 1000
    info = SeriesInfo(description=description[:64], number=number, image_type=("DERIVED", "SECONDARY", "AXIAL"),
                      derivation=derivation, uid=generate_uid())
    return ct_series(hu, affine, first, info, sources=matched)


# ----------------------------------------------------------------------------- data set export

EXPORTED_METHODS = {
    "lowdose": ("Low-dose CT (simulated)", 1),
    "fulldose": ("Full-dose CT (reference)", 2),
}


def export_dataset(root: str | Path, out: str | Path, methods: Sequence[str] = ("lowdose", "fulldose"),
                   cases: Sequence[str] | None = None) -> dict[str, dict[str, Path]]:
    """Write a simulated data set's volumes as DICOM CT series: one study per case, one series per method.

    Layout: ``out/<case>/<method>/0001.dcm ...``. The low-dose series is what a site
    would have scanned; the full-dose series, a separate series of the same study, is the
    reference for comparison.

    Args:
        root: a ``tact simulate`` data set.
        out: the output folder.
        methods: ``lowdose`` and/or ``fulldose``.
        cases: case ids (default: all).

    Returns:
        ``{case: {method: series folder}}``.

    Raises:
        DataError: not a data set, an unknown case or method.
    """
    from training.dataset import SimulatedDataset  # the data set layer is not needed to write a series

    dataset = SimulatedDataset(root)
    unknown = [m for m in methods if m not in EXPORTED_METHODS]
    if unknown or not methods:
        raise DataError(None, f"methods {unknown or list(methods)} cannot be exported; choose from "
                              f"{', '.join(EXPORTED_METHODS)}")
    case_ids = list(cases) if cases is not None else dataset.case_ids("all")
    missing = [c for c in case_ids if c not in dataset.cases]
    if missing:
        raise DataError(dataset.root, f"no cases {missing}; the data set has {', '.join(dataset.cases)}")
    fingerprint = hashlib.sha256(json.dumps(dataset.manifest, sort_keys=True, default=str).encode()).hexdigest()
    settings = dataset.settings
    written: dict[str, dict[str, Path]] = {}
    for case in case_ids:
        study = study_dataset(patient_id=f"TACT-{case}", patient_name=f"TaskAdaptiveCT^{case}",
                              study_uid=stable_uid(fingerprint, case, "study"),
                              study_description=f"Simulated low-dose CT, N0={settings['photons']:g}",
                              frame_of_reference_uid=stable_uid(fingerprint, case, "frame"))
        written[case] = {}
        for method in methods:
            image = dataset.volume(method, case)
            hu = np.asarray(image.dataobj, dtype=np.float32)
            title, number = EXPORTED_METHODS[method]
            derivation = (f"simulated low-dose scan: N0 = {settings['photons']:g} photons per bin, "
                          f"{settings['num_angles']} parallel-beam angles, ramp-filter FBP"
                          if method == "lowdose" else "full-dose reference the low-dose scan was simulated from")
            series = SeriesInfo(description=title, number=number, image_type=("DERIVED", "PRIMARY", "AXIAL"),
                                derivation=derivation, uid=stable_uid(fingerprint, case, method, "series"))
            sop_uids = [stable_uid(fingerprint, case, method, k) for k in range(hu.shape[2])]
            datasets = ct_series(hu, image.affine, study, series, sop_uids=sop_uids)
            written[case][method] = write_series(datasets, Path(out) / case / method)
            log.info("case %s: %s as %d DICOM slices in %s", case, method, len(datasets), written[case][method])
    return written

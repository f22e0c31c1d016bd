"""Liver/tumour label maps as DICOM Segmentation objects, written by dcmqi's ``itkimage2segimage``.

A label map (0 background, 1 liver, 2 tumour, :mod:`training.volume`) on a CT series' voxel
grid becomes one DICOM SEG instance referencing that series: a binary segment per label
present, named ``Liver`` and ``Tumour`` with SNOMED CT codes (DICOM CID 7150/7151), in the
source's patient, study and frame of reference. dcmqi comes from PyPI (``dcmqi``, pinned in
``requirements.txt``); its ``itkimage2segimage`` is looked for beside this interpreter,
then on ``PATH``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from training.volume import LABEL_LIVER, LABEL_TUMOR

TOOL = "itkimage2segimage"

# labelID -> (label, description, category code, type code, display colour)
SEGMENTS = {
    LABEL_LIVER: ("Liver", "liver parenchyma",
                  ("123037004", "SCT", "Anatomical Structure"), ("10200004", "SCT", "Liver"), (221, 130, 101)),
    LABEL_TUMOR: ("Tumour", "liver tumour",
                  ("49755003", "SCT", "Morphologically Altered Structure"), ("108369006", "SCT", "Neoplasm"),
                  (255, 255, 0)),
}


def find_tool() -> str:
    """The ``itkimage2segimage`` executable.

    Raises:
        FileNotFoundError: saying how to install it.
    """
    beside = Path(sys.executable).parent / TOOL
    found = str(beside) if beside.exists() else shutil.which(TOOL)
    if found is None:
        raise FileNotFoundError(f"{TOOL} (dcmqi) is not installed: `pip install dcmqi` (see requirements.txt)")
    return found


def _code(code: tuple[str, str, str]) -> dict[str, str]:
    return {"CodeValue": code[0], "CodingSchemeDesignator": code[1], "CodeMeaning": code[2]}


def seg_metadata(labels_present: list[int], series_description: str, algorithm: str,
                 algorithm_type: str = "SEMIAUTOMATIC") -> dict:
    """dcmqi's metadata JSON for the segments of ``labels_present``."""
    attributes = []
    for label in labels_present:
        name, description, category, kind, colour = SEGMENTS[label]
        attributes.append({"labelID": int(label), "SegmentLabel": name, "SegmentDescription": description,
                           "SegmentAlgorithmType": algorithm_type, "SegmentAlgorithmName": algorithm,
                           "SegmentedPropertyCategoryCodeSequence": _code(category),
                           "SegmentedPropertyTypeCodeSequence": _code(kind),
                           "recommendedDisplayRGBValue": list(colour)})
    return {"ContentCreatorName": "TaskAdaptiveCT", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
            "ClinicalTrialCoordinatingCenterName": "TaskAdaptiveCT", "SeriesDescription": series_description[:64],
            "SeriesNumber": "300", "InstanceNumber": "1", "ContentLabel": "SEGMENTATION",
            "ContentDescription": "Liver and liver tumour", "BodyPartExamined": "ABDOMEN",
            "segmentAttributes": [attributes]}


def write_seg(labels: np.ndarray, affine: np.ndarray, source_dir: str | Path, out_file: str | Path,
              series_description: str = "Liver and tumour", algorithm: str = "TaskAdaptiveCT",
              timeout_s: float = 600.0) -> Dataset:
    """Write ``labels`` as a DICOM SEG of the CT series in ``source_dir``; returns the SEG read back.

    Args:
        labels: ``(X, Y, Z)`` uint8 label map (0, 1, 2) on the series' grid.
        affine: its voxel-to-RAS affine (the series', as :func:`training.loaders.read_volume` gives it).
        source_dir: the CT series' files.
        out_file: the SEG file to write.
        series_description: the SEG series' description.
        algorithm: Segment Algorithm Name.

    Raises:
        ValueError: labels other than 0/1/2, or no liver and no tumour at all (a SEG
            must hold a segment).
        RuntimeError: ``itkimage2segimage`` failed (its output in the message).
    """
    labels = np.asarray(labels)
    values = set(np.unique(labels).tolist())
    if not values <= {0, LABEL_LIVER, LABEL_TUMOR}:
        raise ValueError(f"labels must be 0 (background), 1 (liver) or 2 (tumour), got {sorted(values)}")
    present = sorted(values - {0})
    if not present:
        raise ValueError("the label map holds no liver and no tumour: a DICOM SEG needs at least one segment")
    with tempfile.TemporaryDirectory(prefix="tact-seg-") as work:
        label_file = Path(work) / "labels.nii.gz"
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.asarray(affine, dtype=np.float64)), str(label_file))
        meta_file = Path(work) / "meta.json"
        meta_file.write_text(json.dumps(seg_metadata(present, series_description, algorithm)))
        written = Path(work) / "seg.dcm"
        done = subprocess.run([find_tool(), "--inputImageList", str(label_file), "--inputDICOMDirectory",
                               str(source_dir), "--outputDICOM", str(written), "--inputMetadata", str(meta_file),
                               "--skip", "0"], capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not written.is_file():
            output = (done.stdout + done.stderr).strip().splitlines()[-8:]
            raise RuntimeError(f"{TOOL} failed (exit {done.returncode}): " + " | ".join(output))
        out_file = Path(out_file)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(written), out_file)
    return pydicom.dcmread(out_file)

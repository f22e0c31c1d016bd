"""Sending a clinician's corrected segmentation back to the app (the feedback loop).

The app keeps a correction as the ``final`` label of a datastore image, on that image's
voxels. A volume loaded in Slicer from a file is not in the datastore yet, so
:func:`submit_correction` first uploads it (under an id made from its name) when the
server does not hold it, then sends the label volume made from the named segments
(:func:`TaskAdaptiveCTLib.segments.labels_from_segments`), both as NRRD on the same grid.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from TaskAdaptiveCTLib.client import TaskAdaptiveClient
from TaskAdaptiveCTLib.geometry import Volume, write_volume
from TaskAdaptiveCTLib.segments import LABEL_NAMES, labels_from_segments


def image_id_for(name: str) -> str:
    """A datastore image id from a volume node's name: letters, digits, ``.``, ``_``, ``-``; at most 128."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")[:128]
    if not cleaned:
        raise ValueError(f"cannot make an image id from the name {name!r}; give the volume a name with letters or digits")
    return cleaned


def submit_correction(client: TaskAdaptiveClient, image_id: str, volume: Volume,
                      masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Store the corrected segments as the ``final`` label of ``image_id``, uploading the volume if needed.

    Args:
        client: the app's client.
        image_id: the datastore id (see :func:`image_id_for`).
        volume: the CT the segmentation was drawn on (uploaded when the server lacks it).
        masks: segment name -> boolean mask on ``volume``'s voxels (``Liver``, ``Tumor``).

    Returns:
        the server's reply (``feedback`` says whether the correction counts toward retraining).

    Raises:
        ValueError: a segment that is neither liver nor tumour, or masks off the volume's grid.
        ServerError: the server refused the image or the label (its reason in the message).
    """
    labels = labels_from_segments(masks)
    if labels.shape != volume.array.shape:
        raise ValueError(f"the segmentation's shape {labels.shape} differs from the volume's {volume.array.shape}: "
                         "export the segments on the volume's grid")
    with tempfile.TemporaryDirectory() as folder:
        if not client.has_image(image_id):
            image = write_volume(Volume(np.asarray(volume.array, dtype=np.float32), volume.ijk_to_ras),
                                 Path(folder) / f"{image_id}.nrrd")
            image_id = client.upload_image(image_id, image)
        label = write_volume(Volume(labels, volume.ijk_to_ras), Path(folder) / f"{image_id}_final.nrrd")
        segments = {name: int(np.count_nonzero(mask)) for name, mask in masks.items()}
        return client.save_label(image_id, label, "final", {"label_names": LABEL_NAMES, "segment_voxels": segments})

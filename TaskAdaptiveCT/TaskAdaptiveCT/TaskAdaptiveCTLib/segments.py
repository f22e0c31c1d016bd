"""Liver and tumour as named segments, and as the app's label values (1 liver, 2 tumour).

The app answers and stores one label volume (0 background, 1 liver, 2 tumour, as LiTS).
Slicer keeps a segmentation as named segments, which may overlap (a tumour drawn inside the
liver is usually also inside the Liver segment). :func:`segments_from_labels` splits the
app's labels into the two named segments with Slicer's standard colours, and
:func:`labels_from_segments` puts a (corrected) segmentation back into label values by
segment *name*, so that nothing is flattened or renumbered: a tumour voxel stays 2 where it
also lies in the liver, and a segment whose name is neither is refused, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """One class of the app's labels.

    Attributes:
        name: the segment name in Slicer (``Liver``, ``Tumor``).
        value: its label value in the app's volumes.
        color: RGB in [0, 1] (Slicer's GenericAnatomyColors: ``liver`` 221 130 101,
            ``mass`` 144 238 144).
        aliases: other names accepted on submission, lower case.
    """

    name: str
    value: int
    color: tuple[float, float, float]
    aliases: tuple[str, ...] = ()


LIVER = Segment("Liver", 1, (221 / 255, 130 / 255, 101 / 255), ("liver",))
TUMOR = Segment("Tumor", 2, (144 / 255, 238 / 255, 144 / 255), ("tumor", "tumour", "lesion", "liver tumor", "liver tumour"))
SEGMENTS = (LIVER, TUMOR)
"""In the order they are painted into a label volume: a later segment wins where they overlap."""
LABEL_NAMES = {"liver": LIVER.value, "tumor": TUMOR.value}
"""The ``label_names`` the app sends and is sent."""


def segment_for(name: str) -> Segment:
    """The app's segment a Slicer segment name stands for.

    Raises:
        ValueError: a name that is neither liver nor tumour, naming the accepted ones.
    """
    key = name.strip().lower()
    for segment in SEGMENTS:
        if key == segment.name.lower() or key in segment.aliases:
            return segment
    accepted = ", ".join(f"{s.name} ({'/'.join(s.aliases)})" for s in SEGMENTS)
    raise ValueError(f"segment {name!r} is neither liver nor tumour; the server knows {accepted}")


def segments_from_labels(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The app's label volume as one boolean mask per named segment (``Liver``, ``Tumor``).

    Raises:
        ValueError: values other than 0, 1 and 2.
    """
    labels = np.asarray(labels)
    unknown = sorted(set(np.unique(labels).tolist()) - {0, LIVER.value, TUMOR.value})
    if unknown:
        raise ValueError(f"label values {unknown[:10]} are not the app's (0 background, 1 liver, 2 tumour)")
    return {segment.name: labels == segment.value for segment in SEGMENTS}


def labels_from_segments(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Named segment masks (as Slicer exports them, same shape) as the app's uint8 label volume.

    Liver is painted first and tumour over it, so a tumour inside the Liver segment keeps
    value 2. Empty segments are allowed (a correction may remove all tumour).

    Raises:
        ValueError: no segment, masks of different shapes, or a segment name that is
            neither liver nor tumour, or two segments for the same class.
    """
    if not masks:
        raise ValueError("the segmentation has no segment; it needs Liver and/or Tumor")
    shapes = {name: np.shape(mask) for name, mask in masks.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"segments differ in shape: {shapes}")
    by_class: dict[int, str] = {}
    for name in masks:
        segment = segment_for(name)
        if segment.value in by_class:
            raise ValueError(f"segments {by_class[segment.value]!r} and {name!r} are both {segment.name}; merge them first")
        by_class[segment.value] = name
    labels = np.zeros(next(iter(shapes.values())), dtype=np.uint8)
    for segment in SEGMENTS:
        if segment.value in by_class:
            labels[np.asarray(masks[by_class[segment.value]], dtype=bool)] = segment.value
    return labels

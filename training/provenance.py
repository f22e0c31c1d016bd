"""Where a model's training data came from, and the imaging settings it was trained for.

A network is only meaningful on images like the ones it was trained on: the same noise
level (photons N0, angles), field of view and pixel spacing, and intensities in the same
range. :func:`imaging_settings` summarises a simulated data set's training patients as a
model file records them (``training.checkpoints``), so that the server can resample an
input to the model's grid and warn about an input unlike its training data
(:func:`input_warnings`). :func:`dataset_fingerprint` and :func:`file_sha256` identify the
data set and segmenter file a run trains on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.dataset import SimulatedDataset

SPACING_MARGIN = 1.5
"""An input pixel spacing more than this factor outside the trained range is reported."""
INTENSITY_MARGIN_HU = 500.0
"""An input whose 1st/50th/99th HU percentile lies more than this outside the trained
percentiles is reported."""
_PERCENTILES = (1.0, 50.0, 99.0)
_SLICE_STRIDE = 4  # percentiles from every 4th slice: cheap, and slices are highly correlated


def dataset_fingerprint(dataset: SimulatedDataset) -> str:
    """sha256 of what a training depends on in the manifest: format, simulation settings, split and cases.

    Baseline and reconstruction records (``methods``) are left out: running a baseline or
    ``tact reconstruct`` does not change the training data.
    """
    manifest = dataset.manifest
    relevant = {key: manifest.get(key) for key in ("format", "version", "simulation", "split", "cases")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hu_percentiles(volumes: Sequence[Any]) -> list[float]:
    """The 1st, 50th and 99th percentile (HU) of every ``_SLICE_STRIDE``-th axial slice of ``volumes``."""
    samples = [np.asarray(v[:, :, ::_SLICE_STRIDE], dtype=np.float32).ravel() for v in volumes]
    return [float(p) for p in np.percentile(np.concatenate(samples), _PERCENTILES)]


def _span(values: Sequence[float]) -> dict[str, float]:
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def imaging_settings(dataset: SimulatedDataset, cases: Sequence[str], input_method: str) -> dict[str, Any]:
    """The imaging settings of ``cases`` of a data set, as a model file records them.

    Args:
        dataset: the simulated data set trained on.
        cases: the patients the model saw (fitted and validation patients).
        input_method: the volume the network takes as input (``lowdose`` or ``fulldose``).

    Returns:
        ``slice_size`` (px), ``pixel_spacing_mm`` and ``field_of_view_mm`` (min/median/max
        over the patients; in-plane), ``domain`` (``physical``: the projector's field of
        view is the slice's; ``lodopab``: fixed 26 cm), ``photons`` (N0), ``angles``,
        ``input`` (the method) and ``input_hu_percentiles`` (1st, 50th, 99th of the input
        volumes); ``data``: the data set's path, fingerprint, the patients and their
        source files.
    """
    if not cases:
        raise ValueError("imaging_settings needs at least one case")
    settings = dataset.settings
    spacing = [float(np.mean(dataset.cases[c]["pixel_spacing_mm"][:2])) for c in cases]
    size = int(settings["size"])
    # memory-mapped proxies: hu_percentiles reads only the slices it samples
    volumes = [dataset.volume(input_method, c).dataobj for c in cases]
    return {
        "slice_size": size,
        "pixel_spacing_mm": _span(spacing),
        "field_of_view_mm": _span([s * size for s in spacing]),
        "domain": settings["domain"],
        "projector_field_of_view_mm": _span([1000.0 * dataset.cases[c]["extent_m"] for c in cases]),
        "photons": float(settings["photons"]),
        "angles": int(settings["num_angles"]),
        "input": input_method,
        "input_hu_percentiles": hu_percentiles(volumes),
        "data": {
            "dataset": str(dataset.root.resolve()),
            "fingerprint": dataset_fingerprint(dataset),
            "cases": list(cases),
            "sources": {c: dataset.cases[c].get("sources", []) for c in cases},
        },
    }


def input_warnings(imaging: dict[str, Any] | None, spacing_mm: float, percentiles: Sequence[float]) -> list[str]:
    """Sentences describing how an input differs from a model's training data (empty when it does not).

    Args:
        imaging: the model's :func:`imaging_settings` (``None`` for a model file that does
            not record them: one warning says so).
        spacing_mm: the input's in-plane pixel spacing.
        percentiles: the input's 1st, 50th and 99th HU percentile (:func:`hu_percentiles`).
    """
    if imaging is None:
        return ["the model file does not record the imaging settings it was trained for (a version 1 file); "
                "its output on this input is unchecked"]
    warnings = []
    low, high = imaging["pixel_spacing_mm"]["min"], imaging["pixel_spacing_mm"]["max"]
    if not low / SPACING_MARGIN <= spacing_mm <= high * SPACING_MARGIN:
        warnings.append(f"in-plane pixel spacing {spacing_mm:.3g} mm is far outside the {low:.3g}-{high:.3g} mm the "
                        "model was trained on; slices are resampled to its grid, so fine detail is lost or invented")
    trained = imaging["input_hu_percentiles"]
    for name, value, reference in zip(("1st", "median", "99th"), percentiles, trained):
        if abs(value - reference) > INTENSITY_MARGIN_HU:
            warnings.append(f"the {name} percentile of the input is {value:.0f} HU, against {reference:.0f} HU in the "
                            "model's training data: is it a CT in HU, of the same kind of scan?")
    return warnings

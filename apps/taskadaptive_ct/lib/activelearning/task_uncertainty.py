"""``task_uncertainty``: review next the image whose segmentation g is least sure of, on f's reconstruction.

For every image not yet corrected by a clinician (no ``final`` label saved through the
app), the default reconstructor f and the segmenter g run as in ``reconstruct_segment``,
and the image's score is g's mean softmax entropy over the body
(``training.inference.mean_entropy``: 0 sure, 1 all classes equally likely). The image
with the highest score is returned, with the ranking (and the images that could not be
scored, with why). Scores are kept per image file and
model file version, so a second request only computes what changed.

``POST /activelearning/task_uncertainty`` (body: optional ``{"variant": "ta0.5"}``).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.strategy import Strategy

from lib.errors import NotFound, Unavailable, choices
from lib.models import ModelFolder
from lib.volumes import read_ct
from training.inference import reconstruct_and_segment

log = logging.getLogger(__name__)

CORRECTED = "corrected"
"""Key set in the info of a ``final`` label saved through the app."""


class TaskUncertainty(Strategy):
    """Uncertainty of g on f's output (see the module docstring).

    Args:
        models: the app's model folder.
        default_variant: the reconstructor to use when the request names none.
        batch_size: slices per forward pass.
        max_voxels: images larger than this are skipped.
    """

    def __init__(self, models: ModelFolder, default_variant: str | None, batch_size: int, max_voxels: int) -> None:
        super().__init__("Next image to review: where g is least sure of its segmentation of f's reconstruction")
        self.models, self.default_variant, self.batch_size, self.max_voxels = models, default_variant, batch_size, max_voxels
        self._scores: dict[tuple, float] = {}

    def score(self, path: str, variant: str) -> float:
        f = self.models.reconstructors()[variant]
        g = (f.segmenter, f.model) if f.segmenter is not None else None
        if g is None:
            served = self.models.segmenter()
            if served is None:
                raise Unavailable(f"no segmentation model in the model folder {self.models.root}")
            g = (served.network, served.model)
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size, str(f.model.path), str(g[1].path), g[1].epoch, f.model.epoch)
        if key not in self._scores:
            hu, affine = read_ct(path, self.max_voxels)
            result = reconstruct_and_segment(hu, affine, reconstructor=(f.network, f.model), segmenter=g,
                                             batch_size=self.batch_size)
            self._scores[key] = result.uncertainty
        return self._scores[key]

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any] | None:
        reconstructors = self.models.reconstructors()
        variant = request.get("variant") or self.models.default_variant(self.default_variant)
        if variant not in reconstructors:
            raise NotFound(f"unknown variant {variant!r}; this server has {choices(reconstructors)}")
        ranking, skipped = [], []
        for image in datastore.list_images():
            if (datastore.get_label_info(image, "final") or {}).get(CORRECTED):
                continue
            path = datastore.get_image_uri(image)
            try:
                ranking.append({"id": image, "uncertainty": self.score(path, variant)})
            except (HTTPException, ValueError, OSError) as error:  # one bad image must not hide the others
                reason = str(getattr(error, "detail", error))
                skipped.append({"id": image, "reason": reason})
                log.warning("task_uncertainty: skipping %s: %s", image, reason)
        if not ranking:
            return None
        # most uncertain first; an image without body (NaN) last
        ranking.sort(key=lambda item: item["uncertainty"] if math.isfinite(item["uncertainty"]) else -1.0, reverse=True)
        return {"id": ranking[0]["id"], "uncertainty": ranking[0]["uncertainty"], "variant": variant, "ranking": ranking,
                "skipped": skipped}

"""``segmentation``: g on a full-dose or reconstructed CT volume; the result is its label volume."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.base import LABELS, VolumeInferTask, extension
from lib.volumes import write_volume


class Segmentation(VolumeInferTask):
    """CT (HU) -> labels (uint8: 0 background, 1 liver, 2 tumour) on the input's voxels."""

    uses_segmenter = True

    def __init__(self, models, **kwargs) -> None:
        super().__init__(models, "Liver and tumour segmentation (g) of a full-dose or reconstructed CT",
                         InferType.SEGMENTATION, **kwargs)

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        segmenter = self.segmenter()
        result, affine, params = self.run(request, None, (segmenter.network, segmenter.model))
        params["label_names"] = LABELS
        params["segmenter"] = segmenter.name
        return write_volume(result.labels, affine, extension(request)), params

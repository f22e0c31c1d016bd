"""What the three infer tasks share: reading the request, choosing models, answering.

The work itself is ``training.inference.reconstruct_and_segment`` (the same code as the
CLI's); a task only picks the networks, reads the request's volume strictly
(:mod:`lib.volumes`) and writes the result on the input's voxels.

Request parameters common to every task (``params`` of ``POST /infer/{task}``):

* ``result_extension``: ``.nii.gz`` (default), ``.nii`` or ``.nrrd``;
* ``batch_size``: slices per forward pass (default: the app's ``batch_size``).

The networks run where the app loaded them (``--conf device``); a request's ``device`` is
ignored, since moving shared networks per request would race with other requests.
MONAI Label's Slicer plugin sends ``result_dtype`` (``uint8``) for every model: it is
ignored here, since a CT in uint8 would be destroyed; reconstructions take
``output_dtype`` (``float32``, the default, or ``int16``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.errors import BadRequest, NotFound, Unavailable, choices
from lib.models import ModelFolder, ServedModel
from lib.volumes import DEFAULT_MAX_VOXELS, read_ct
from training.inference import VolumeResult, reconstruct_and_segment
from training.volume import LABEL_LIVER, LABEL_TUMOR

log = logging.getLogger(__name__)

LABELS = {"liver": LABEL_LIVER, "tumor": LABEL_TUMOR}
"""Label values of g's maps (0 is background), as MONAI Label clients expect them."""


class VolumeInferTask(InferTask):
    """Base of the app's infer tasks.

    Args:
        models: the app's model folder.
        description: shown in ``/info/``.
        infer_type: MONAI Label's kind of task (segmentation, or others for images).
        default_variant: the reconstructor used when a request names none (None: the
            best validated task-adaptive one, see :meth:`ModelFolder.default_variant`).
        batch_size: default slices per forward pass.
        max_voxels: largest input volume accepted.
        store: ``store(image_id, array, affine, tag, info)`` keeps a volume in the
            datastore for an image (the app's datastore).
    """

    uses_reconstructor = False
    uses_segmenter = False

    def __init__(self, models: ModelFolder, description: str, infer_type: InferType,
                 default_variant: str | None = None, batch_size: int = 8, max_voxels: int = DEFAULT_MAX_VOXELS,
                 store: Callable[..., Any] | None = None) -> None:
        labels = LABELS if self.uses_segmenter else []
        super().__init__(type=infer_type, labels=labels, dimension=3, description=description,
                         config={"variant": default_variant or "", "result_extension": ".nii.gz", "batch_size": batch_size})
        self.models = models
        self.default_variant = default_variant
        self.batch_size = batch_size
        self.max_voxels = max_voxels
        self.store = store

    # -------------------------------------------------------------------- description

    def is_valid(self) -> bool:
        """Listed in ``/info/`` only when the model folder holds what the task needs."""
        return (not self.uses_reconstructor or bool(self.models.reconstructors())) and (
            not self.uses_segmenter or self.models.segmenter() is not None)

    def info(self) -> dict[str, Any]:
        info = super().info()
        if self.uses_reconstructor:
            info["variants"] = {n: m.describe() for n, m in self.models.reconstructors().items()}
            info["default_variant"] = self.models.default_variant(self.default_variant)
        if self.uses_segmenter:
            segmenter = self.models.segmenter()
            info["segmenter"] = segmenter.describe() if segmenter else None
        return info

    # -------------------------------------------------------------------- request

    def reconstructor(self, request: dict[str, Any]) -> ServedModel:
        """The reconstructor the request names (``variant``), or the default one."""
        available = self.models.reconstructors()
        if not available:
            raise Unavailable(f"no reconstruction model in the model folder {self.models.root}")
        variant = request.get("variant") or self.models.default_variant(self.default_variant)
        if not isinstance(variant, str) or variant not in available:
            raise NotFound(f"unknown variant {variant!r}; this server has {choices(available)}")
        return available[variant]

    def segmenter(self) -> ServedModel:
        segmenter = self.models.segmenter()
        if segmenter is None:
            raise Unavailable(f"no segmentation model in the model folder {self.models.root}")
        return segmenter

    def batch(self, request: dict[str, Any]) -> int:
        value = request.get("batch_size", self.batch_size)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
            raise BadRequest(f"batch_size must be an integer from 1 to 256, got {value!r}")
        return value

    def read(self, request: dict[str, Any]):
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise BadRequest("no image: give an image id of the datastore or upload a file")
        name = request.get("image_id") or "the uploaded file"
        return read_ct(image, self.max_voxels, name)

    def run(self, request: dict[str, Any], reconstructor: ServedModel | None,
            segmenter: tuple | None) -> tuple[VolumeResult, Any, dict[str, Any]]:
        """Read the volume, run the networks, and describe what was done (the reply's params)."""
        started = time.perf_counter()
        hu, affine = self.read(request)
        batch_size = self.batch(request)
        if "result_dtype" in request:
            log.info("ignoring result_dtype=%r: reconstructions are HU (output_dtype), labels uint8", request["result_dtype"])
        try:
            result = reconstruct_and_segment(hu, affine,
                                             reconstructor=(reconstructor.network, reconstructor.model) if reconstructor else None,
                                             segmenter=segmenter, batch_size=batch_size)
        except ValueError as error:
            raise BadRequest(str(error)) from None
        params: dict[str, Any] = {
            "warnings": result.warnings,
            "model_spacing_mm": list(result.model_spacing_mm),
            "resampled": result.resampled,
            "shape": list(hu.shape),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if reconstructor is not None:
            params["variant"] = reconstructor.name
            params["reconstructor"] = _summary(reconstructor)
        for text in result.warnings:
            log.warning("%s: %s", request.get("image_id") or "upload", text)
        return result, affine, params


def _summary(served: ServedModel) -> dict[str, Any]:
    described = served.describe()
    return {k: described[k] for k in ("name", "task", "alpha", "C", "file", "epoch") if k in described}


def image_id(request: dict[str, Any]) -> str | None:
    """The datastore id of the request's image (None for an uploaded file)."""
    return request.get("image_id")


def extension(request: dict[str, Any]) -> str:
    value = request.get("result_extension") or ".nii.gz"
    return value if value.startswith(".") else "." + value


def stem(path: str) -> str:
    return Path(path).name.split(".")[0]

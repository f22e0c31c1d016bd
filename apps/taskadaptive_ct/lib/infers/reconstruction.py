"""``reconstruction``: f on a low-dose CT volume; the result is the reconstructed volume in HU."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.base import VolumeInferTask, extension
from lib.volumes import write_volume


class Reconstruction(VolumeInferTask):
    """Low-dose CT (HU, any orientation and spacing) -> reconstruction (HU, same shape and affine).

    Parameters: ``variant`` (a reconstructor of ``/info/``; default the app's),
    ``output_dtype`` (``float32`` or ``int16``), and those of :mod:`lib.infers.base`.
    """

    uses_reconstructor = True

    def __init__(self, models, **kwargs) -> None:
        super().__init__(models, "Task-adaptive reconstruction of a low-dose CT (HU in, HU out)", InferType.OTHERS,
                         **kwargs)
        self._config["output_dtype"] = "float32"

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        reconstructor = self.reconstructor(request)
        result, affine, params = self.run(request, reconstructor, None)
        dtype = request.get("output_dtype") or "float32"
        path = write_volume(result.reconstruction_hu, affine, extension(request), dtype)
        params["output_dtype"] = dtype
        return path, params

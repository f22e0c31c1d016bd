"""``reconstruct_segment``: the paper's pipeline, g(f(x)), in one request.

The result file is the segmentation. The reconstruction it was computed from:

* for a datastore image, is stored in the datastore as a label of tag
  ``reconstruction_<variant>`` (``GET /datastore/label?label=<image id>&tag=reconstruction_ta0.5``);
  on a PACS it is also stored as a derived CT series of the image's study, whose UIDs the
  reply's ``reconstruction`` gives (``series_uid``, ``study_uid``);
* for an uploaded file, is returned inside the reply's params as ``reconstruction``: a
  gzip-compressed NIfTI, base64-encoded (``lib.volumes.decode_embedded``). Set
  ``return_reconstruction`` to false to leave it out (for example when only the labels
  are wanted from a large volume).

A joint model (``joint<C>``) carries its own g, trained with its f: that g segments its
reconstruction. Every other variant is segmented by the model folder's segmenter.
"""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.errors import BadRequest
from lib.infers.base import LABELS, VolumeInferTask, extension, image_id
from lib.volumes import embedded_nifti, write_volume

TAG_PREFIX = "reconstruction_"


class ReconstructSegment(VolumeInferTask):
    """Low-dose CT -> labels of g on f's reconstruction (and the reconstruction, see the module docstring)."""

    uses_reconstructor = True
    uses_segmenter = True

    def __init__(self, models, **kwargs) -> None:
        super().__init__(models, "Reconstruct a low-dose CT with f, then segment liver and tumour with g",
                         InferType.SEGMENTATION, **kwargs)
        self._config.update({"output_dtype": "float32", "return_reconstruction": True})

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        reconstructor = self.reconstructor(request)
        if reconstructor.segmenter is not None:  # a joint model's own g
            segmenter = (reconstructor.segmenter, reconstructor.model)
            segmenter_name = reconstructor.name
        else:
            served = self.segmenter()
            segmenter, segmenter_name = (served.network, served.model), served.name
        dtype = request.get("output_dtype") or "float32"
        embed = request.get("return_reconstruction", True)
        if not isinstance(embed, bool):
            raise BadRequest(f"return_reconstruction must be true or false, got {embed!r}")
        result, affine, params = self.run(request, reconstructor, segmenter)
        params.update({"label_names": LABELS, "segmenter": segmenter_name, "output_dtype": dtype})
        tag = f"{TAG_PREFIX}{reconstructor.name}"
        identifier = image_id(request)
        if identifier is not None and self.store is not None:
            stored = self.store(identifier, result.reconstruction_hu, affine, tag,
                                {"variant": reconstructor.name, "warnings": result.warnings,
                                 "reconstructor": params.get("reconstructor", {})}, dtype)
            params["reconstruction"] = {"image": identifier, "tag": tag,
                                        "url": f"/datastore/label?label={identifier}&tag={tag}"}
            if isinstance(stored, dict):  # on a PACS: the derived series' UIDs
                params["reconstruction"].update(stored)
        elif embed:
            params["reconstruction"] = embedded_nifti(result.reconstruction_hu, affine, dtype)
        return write_volume(result.labels, affine, extension(request)), params

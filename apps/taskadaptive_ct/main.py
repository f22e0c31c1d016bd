"""TaskAdaptiveCT: a MONAI Label app serving task-adaptive low-dose CT reconstruction and liver/tumour segmentation.

Start it with::

    monailabel start_server --app apps/taskadaptive_ct --studies DATASET/lowdose --host 127.0.0.1

Settings (``--conf KEY VALUE``):

* ``models``: the model folder (default ``<app>/model``; a ``tact reproduce`` run's
  ``models/`` works as it is);
* ``variant``: the reconstructor served when a request names none (default: the
  task-adaptive model with the best validation Dice);
* ``batch_size``: slices per forward pass (default 8);
* ``max_voxels``: the largest volume accepted (default 512 x 512 x 1200).

Infer tasks: ``reconstruction``, ``segmentation``, ``reconstruct_segment`` (see ``lib/infers``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.configs.base import AppContext
from lib.configs.reconstruction import ReconstructionConfig
from lib.configs.segmentation import SegmentationConfig
from lib.datastore import TaskAdaptiveDatastore
from lib.errors import BadRequest, NotFound, choices
from lib.models import ModelFolder
from lib.volumes import DEFAULT_MAX_VOXELS
from monailabel.config import settings

log = logging.getLogger(__name__)

CONFIGS = (SegmentationConfig, ReconstructionConfig)


def _positive_int(conf: dict[str, str], key: str, default: int) -> int:
    text = conf.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--conf {key} must be a positive integer, got {text!r}")
    return value


class TaskAdaptiveCTApp(MONAILabelApp):
    """Serves every model of its model folder (see ``lib.models``) on a validating local datastore."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.model_folder = ModelFolder(Path(conf.get("models") or Path(app_dir) / "model").expanduser().resolve())
        self.max_voxels = _positive_int(conf, "max_voxels", DEFAULT_MAX_VOXELS)
        self.context = AppContext(models=self.model_folder, default_variant=conf.get("variant") or None,
                                  batch_size=_positive_int(conf, "batch_size", 8), max_voxels=self.max_voxels,
                                  store=self._store_volume, conf=conf)
        self.configs = [config(self.context) for config in CONFIGS]
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="TaskAdaptiveCT",
                         description="Task-adaptive low-dose CT reconstruction and liver/tumour segmentation",
                         version="1.0")

    # ----------------------------------------------------------------------------- wiring

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return TaskAdaptiveDatastore(self.studies, max_voxels=self.max_voxels,
                                     extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                     auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                     read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self) -> dict[str, Any]:
        return {name: task for config in self.configs for name, task in config.infer().items()}

    def init_trainers(self) -> dict[str, Any]:
        return {name: task for config in self.configs for name, task in config.trainer().items()}

    def init_strategies(self) -> dict[str, Any]:
        return {"random": Random(), "first": First()}

    def _store_volume(self, *args: Any) -> str:
        return self.datastore().store_volume(*args)

    # ----------------------------------------------------------------------------- requests

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["model_folder"] = {"path": str(self.model_folder.root),
                                "models": {n: m.describe() for n, m in self.model_folder.models().items()},
                                "not_served": self.model_folder.problems}
        return meta

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's ``infer``, with 4xx errors for an unknown task or image and the image id kept."""
        model = request.get("model")
        if model not in self._infers:
            raise NotFound(f"unknown model {model!r}; this server has {choices(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            if image not in (datastore or self.datastore()).list_images():
                raise NotFound(f"unknown image id {image!r}; list them with GET /datastore/?output=all")
            request = dict(request, image_id=image)
        for key in ("variant", "output_dtype", "result_extension"):
            if key in request and not isinstance(request[key], str):
                raise BadRequest(f"{key} must be a string, got {request[key]!r}")
        return super().infer(request, datastore)

"""TaskAdaptiveCT: a MONAI Label app serving task-adaptive low-dose CT reconstruction and liver/tumour segmentation.

Start it with::

    monailabel start_server --app apps/taskadaptive_ct --studies DATASET/lowdose --host 127.0.0.1

or, on a PACS (its DICOMweb root; see ``lib/pacs.py``)::

    monailabel start_server --app apps/taskadaptive_ct --studies http://127.0.0.1:8042/dicom-web --host 127.0.0.1

Settings (``--conf KEY VALUE``):

* ``models``: the model folder (default ``<app>/model``; a ``tact reproduce`` run's
  ``models/`` works as it is);
* ``variant``: the reconstructor served when a request names none (default: the one the
  model folder's ``serving.json`` names, else the one ``tact export-models`` would choose:
  the task-adaptive model with the best validation Dice within 1 dB of the best validation
  PSNR);
* ``device``: where the networks run (default: the first GPU where there is one, else the CPU);
* ``batch_size``: slices per forward pass (default 8);
* ``max_voxels``: the largest volume accepted (default 512 x 512 x 1200);
* ``preset``: the ``tact`` preset whose training settings the train tasks start from
  (default ``cpu``);
* ``runs``: where training runs are written (default ``<app>/train_runs``);
* ``retrain_after``: corrected labels that trigger retraining g and then f (default 0: off);
* ``retrain_alpha``: alpha of the reconstructor retrained then (default: the default
  variant's, else 0.5).

Infer tasks: ``reconstruction``, ``segmentation``, ``reconstruct_segment`` (``lib/infers``).
Train tasks: ``segmentation``, ``reconstruction``, ``joint`` (``lib/trainers``).
Active learning: ``task_uncertainty``, ``random``, ``first`` (``lib/activelearning``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import sys

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.async_tasks.task import AsyncTask

from lib.activelearning import TaskUncertainty
from lib.configs.base import AppContext
from lib.configs.joint import JointConfig
from lib.configs.reconstruction import ReconstructionConfig
from lib.configs.segmentation import SegmentationConfig
from lib.datastore import TaskAdaptiveDatastore
from lib.errors import BadRequest, NotFound, choices
from lib.feedback import FeedbackLog
from lib.guards import guard_train_route
from lib.models import ModelFolder
from lib.pacs import PacsDatastore, cache_folder
from lib.trainers import TrainRequestError
from lib.trainers.engine_task import dataset_of
from lib.volumes import DEFAULT_MAX_VOXELS
from training.dicomweb import dicomweb_client, dicomweb_session
from training.model_card import read_serving

log = logging.getLogger(__name__)

CONFIGS = (SegmentationConfig, ReconstructionConfig, JointConfig)
DEFAULT_PACS_CACHE = Path.home() / ".cache" / "taskadaptivect" / "pacs"
PACS_TIMEOUT_S = 60.0


def _int_setting(conf: dict[str, str], key: str, default: int, minimum: int = 1) -> int:
    text = conf.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"--conf {key} must be an integer of at least {minimum}, got {text!r}")
    return value


class TaskAdaptiveCTApp(MONAILabelApp):
    """Serves every model of its model folder (see ``lib.models``) on a validating local datastore."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.on_pacs = studies.startswith(("http://", "https://"))
        # on a PACS, what the app keeps (fetched series, labels, the feedback count) lives in its cache folder
        local_studies = cache_folder(settings.MONAI_LABEL_DICOMWEB_CACHE_PATH.strip() or DEFAULT_PACS_CACHE,
                                     studies.rstrip("/")) if self.on_pacs else Path(studies).resolve()
        self.model_folder = ModelFolder(Path(conf.get("models") or Path(app_dir) / "model").expanduser().resolve(),
                                        device=conf.get("device") or None)
        self.max_voxels = _int_setting(conf, "max_voxels", DEFAULT_MAX_VOXELS)
        # the default variant: --conf variant, else what the model folder's serving.json names
        default_variant = conf.get("variant") or read_serving(self.model_folder.root).get("default_variant")
        self.context = AppContext(models=self.model_folder, default_variant=default_variant,
                                  batch_size=_int_setting(conf, "batch_size", 8), max_voxels=self.max_voxels,
                                  store=self._store_volume, studies=local_studies,
                                  runs=Path(conf.get("runs") or Path(app_dir) / "train_runs").expanduser().resolve(),
                                  preset=conf.get("preset", "cpu"), conf=conf)
        self.local_studies = local_studies
        self.feedback = FeedbackLog(local_studies, _int_setting(conf, "retrain_after", 0, minimum=0))
        self.retrain_alpha = conf.get("retrain_alpha")
        self._feedback_replies: dict[str, dict] = {}
        self.configs = [config(self.context) for config in CONFIGS]
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="TaskAdaptiveCT",
                         description="Task-adaptive low-dose CT reconstruction and liver/tumour segmentation",
                         version="1.0")

    # ----------------------------------------------------------------------------- wiring

    def init_datastore(self) -> Datastore:
        if self.on_pacs:
            session = dicomweb_session(timeout=PACS_TIMEOUT_S, username=settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                       password=settings.MONAI_LABEL_DICOMWEB_PASSWORD)
            client = dicomweb_client(self.studies, session)
            return PacsDatastore(client, self.local_studies, max_voxels=self.max_voxels,
                                 on_label_saved=self._label_saved)
        return TaskAdaptiveDatastore(self.studies, max_voxels=self.max_voxels, on_label_saved=self._label_saved,
                                     extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                     auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                     read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self) -> dict[str, Any]:
        return {name: task for config in self.configs for name, task in config.infer().items()}

    def init_trainers(self) -> dict[str, Any]:
        return {name: task for config in self.configs for name, task in config.trainer().items()}

    def init_strategies(self) -> dict[str, Any]:
        context = self.context
        return {"task_uncertainty": TaskUncertainty(context.models, context.default_variant, context.batch_size,
                                                    context.max_voxels),
                "random": Random(), "first": First()}

    def _store_volume(self, *args: Any) -> str:
        return self.datastore().store_volume(*args)

    def server_mode(self, mode: bool) -> None:
        """Called once the server runs: check train requests there before MONAI Label starts a process."""
        super().server_mode(mode)
        api = sys.modules.get("monailabel.app")
        if mode and api is not None:
            guard_train_route(api.app, self._check_train_request)

    def _check_train_request(self, model: str, options: dict) -> tuple[int, str] | None:
        if model not in self._trainers:
            return 404, f"unknown train task {model!r}; this server has {choices(self._trainers)}"
        try:
            self._trainers[model].validate(options)
        except TrainRequestError as error:
            return 422, str(error)
        return None

    # ----------------------------------------------------------------------------- feedback loop

    def _label_saved(self, image_id: str, tag: str) -> None:
        """A label was stored through the datastore API: a ``final`` one is a clinician's correction."""
        if tag != "final":
            return
        try:
            counted = image_id in dataset_of(self.local_studies).case_ids("train")
        except TrainRequestError:
            counted = False  # not a simulated data set: nothing can be retrained from it
        reply = self.feedback.record(image_id, counted)
        if reply["due"]:
            reply["retraining"] = self._retrain()
        self._feedback_replies[image_id] = reply

    def _retrain(self) -> list[dict[str, Any]]:
        """Queue segmentation, then reconstruction with the new g (MONAI Label runs its queue in order)."""
        alpha = self.retrain_alpha
        if alpha is None:
            default = self.model_folder.default_variant(self.context.default_variant)
            served = self.model_folder.reconstructors().get(default or "")
            alpha = served.model.weight if served is not None and served.kind == "reconstruction" else 0.5
        queued = []
        for model, params in (("segmentation", {}), ("reconstruction", {"alpha": float(alpha)})):
            task, _ = AsyncTask.run("train", request={"model": model}, params=params, enqueue=True)
            queued.append({"model": model, **params, "task": task.get("id") if task else None})
            log.info("feedback loop: queued %s training %s", model, params)
        return queued

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        reply = self._feedback_replies.pop(image_id, None)
        return {"feedback": reply} if reply is not None else {}

    # ----------------------------------------------------------------------------- requests

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["model_folder"] = {"path": str(self.model_folder.root),
                                "models": {n: m.describe() for n, m in self.model_folder.models().items()},
                                "not_served": self.model_folder.problems}
        meta["feedback"] = self.feedback.status()
        return meta

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's ``infer``, with 4xx errors for an unknown task or image and the image id kept."""
        model = request.get("model")
        if model not in self._infers:
            raise NotFound(f"unknown model {model!r}; this server has {choices(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            (datastore or self.datastore()).check_image(image)  # 404; on a PACS also 422 or 503, naming the series
            request = dict(request, image_id=image)
        for key in ("variant", "output_dtype", "result_extension"):
            if key in request and not isinstance(request[key], str):
                raise BadRequest(f"{key} must be a string, got {request[key]!r}")
        return super().infer(request, datastore)

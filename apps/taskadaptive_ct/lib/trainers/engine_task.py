"""One train task per model kind, running ``training.engine.train``: the engine, loss and step of ``tact train``.

``POST /train/{segmentation|reconstruction|joint}`` with a JSON body of options:

* ``alpha`` (``reconstruction``, default 0.5) or ``C`` (``joint``, default 0.5), in [0, 1];
* ``epochs``, ``batch_size``, ``learning_rate``, ``validation_fraction``, ``seed``,
  ``early_stopping_patience``: as in the training configuration (``training.config``);
  the rest comes from the app's ``preset`` (``--conf preset cpu`` by default).

MONAI Label runs the task in a subprocess that rebuilds the app. It trains on the data
set behind the datastore (the studies folder must be a ``tact simulate`` data set's
``lowdose/``: training needs the full dose and the reference labels, and clinicians'
corrections saved as ``final`` labels replace the reference of their image). The training
split is the data set's; validation patients are held out of it as in ``tact train``.

* ``segmentation`` trains g on full-dose images and ``final`` labels;
* ``reconstruction`` trains f with the model folder's current g, frozen (a copy of its
  file is taken at the start, so a g published meanwhile does not change the run);
* ``joint`` trains f and g together, g starting from the current segmenter.

The networks have the current segmenter's width and depth (so that a new f fits the
served g), else the preset's. Progress is one log line per epoch (``GET /train/``
shows the last lines); ``DELETE /train/`` kills the process, leaving the served models
untouched. At the end the run's ``best.pt`` is published into the model folder
atomically (``<name>.pt``: ``segmentation.pt``, ``ta0.5.pt``, ``joint0.5.pt``) and the
next request is served by it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.tasks.train import TrainTask

from lib.models import ModelFolder, served_name
from training.checkpoints import read_model
from training.config import ConfigError, TrainingConfig, config_from_mapping
from training.dataset import SimulatedDataset
from training.engine import read_history, read_summary, train
from training.errors import DataError
from training.fileio import atomic_path
from training.presets import PRESETS

log = logging.getLogger(__name__)

KINDS = ("segmentation", "reconstruction", "joint")
WEIGHT_KEY = {"reconstruction": "alpha", "joint": "C"}
OPTIONS = ("epochs", "batch_size", "learning_rate", "validation_fraction", "seed", "early_stopping_patience")
MONAI_LABEL_KEYS = {"model", "gpus", "local_rank", "client_id", "device", "bundle_path", "tracking", "tracking_uri",
                    "tracking_experiment_name", "max_epochs", "name", "multi_gpu", "dataset", "pretrained"}
"""Keys MONAI Label or its clients add to every train request; accepted and not used."""


class TrainRequestError(ValueError):
    """A train request that cannot run; the message names the option or file."""


def dataset_of(studies: str | Path) -> SimulatedDataset:
    """The ``tact simulate`` data set whose ``lowdose/`` folder is ``studies``.

    Raises:
        TrainRequestError: the studies folder is not such a folder.
    """
    studies = Path(studies).resolve()
    root = studies.parent
    if studies.name != "lowdose" or not (root / "dataset.json").is_file():
        raise TrainRequestError(f"{studies}: training needs a simulated data set (the lowdose/ folder of `tact simulate`), "
                                "whose full-dose images and labels it learns from; this datastore serves inference only")
    try:
        return SimulatedDataset(root)
    except DataError as error:
        raise TrainRequestError(str(error)) from None


class EngineTrainTask(TrainTask):
    """Train one model kind with the project's engine and publish it (see the module docstring).

    Args:
        kind: ``segmentation``, ``reconstruction`` or ``joint``.
        models: the app's model folder (the segmenter is read from it, results published to it).
        studies: the datastore folder.
        runs: where run folders are written (``<runs>/<name>-<time>``).
        preset: the preset whose training settings are the defaults.
    """

    def __init__(self, kind: str, models: ModelFolder, studies: str | Path, runs: str | Path, preset: str = "cpu") -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if preset not in PRESETS:
            raise ValueError(f"--conf preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        super().__init__(f"Train {kind} with the TaskAdaptiveCT engine ({preset} preset defaults)")
        self.kind, self.models, self.studies, self.runs, self.preset = kind, models, Path(studies), Path(runs), PRESETS[preset]

    def config(self) -> dict[str, Any]:
        base = self.preset.config(self.kind)
        options = {key: getattr(base, key) for key in OPTIONS}
        if self.kind in WEIGHT_KEY:
            options[WEIGHT_KEY[self.kind]] = 0.5
        return options

    def stats(self) -> dict[str, Any]:
        """The latest run of this kind: folder, epochs done, best epoch, whether it finished."""
        runs = sorted(self.runs.glob(f"{self.kind}-*"), key=lambda p: p.stat().st_mtime) if self.runs.is_dir() else []
        if not runs:
            return {}
        run = runs[-1]
        summary, history = read_summary(run), read_history(run) if (run / "history.csv").is_file() else []
        return {"run": str(run), "epochs_done": len(history), "finished": summary is not None,
                "best_epoch": summary.best_epoch if summary else None}

    # ----------------------------------------------------------------------------- request

    def training_config(self, request: dict[str, Any], segmenter: Path | None) -> TrainingConfig:
        """The configuration a request asks for (validated), before any work.

        ``segmenter`` is the current g's file: its width and depth are the networks'
        (a retrained g keeps its architecture, a new f fits it); f's training freezes it
        (``reconstruction``) or starts g from it (``joint``).

        Raises:
            TrainRequestError: an unknown option, a value of the wrong type or out of range,
                or no segmenter where one is needed.
        """
        unknown = sorted(set(request) - set(OPTIONS) - set(WEIGHT_KEY.values()) - MONAI_LABEL_KEYS)
        if unknown:
            raise TrainRequestError(f"unknown option(s) {', '.join(map(repr, unknown))} for {self.kind} training; "
                                    f"known: {', '.join(self.config())}")
        wrong_weight = [k for k in WEIGHT_KEY.values() if k in request and k != WEIGHT_KEY.get(self.kind)]
        if wrong_weight:
            raise TrainRequestError(f"{wrong_weight[0]} is not an option of {self.kind} training")
        base = self.preset.config(self.kind)
        values = dataclasses.asdict(base)
        if segmenter is not None:
            values["network"] = dataclasses.asdict(read_model(segmenter).network)
        values.update({key: request[key] for key in OPTIONS if key in request})
        if self.kind in WEIGHT_KEY:
            name = WEIGHT_KEY[self.kind]
            weight = request.get(name, 0.5)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
                raise TrainRequestError(f"{name} must be a number in [0, 1], got {weight!r}")
            values["weight"] = float(weight)
            if self.kind == "reconstruction" and weight > 0 and segmenter is None:
                raise TrainRequestError(f"alpha = {weight:g} needs a segmenter: the model folder {self.models.root} "
                                        "holds none; train segmentation first")
        uses_segmenter = segmenter is not None and self.kind != "segmentation"
        values["segmenter_checkpoint"] = str(segmenter) if uses_segmenter else None
        try:
            return config_from_mapping(values)
        except ConfigError as error:
            raise TrainRequestError(str(error)) from None

    def validate(self, request: dict[str, Any]) -> None:
        """Check a request in the server, before MONAI Label starts the subprocess (raises TrainRequestError)."""
        if self.kind != "segmentation":
            dataset_of(self.studies)
        segmenter = self.models.segmenter()
        self.training_config(request, segmenter.model.path if segmenter else None)

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any]:
        _log_to_stdout()
        dataset = dataset_of(self.studies)
        current = self.models.segmenter()
        run = self.runs / f"{self.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        segmenter = None
        if current is not None:
            segmenter = run / "segmenter.pt"  # a copy: a g published meanwhile does not change this run
            run.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(current.model.path, segmenter)
        config = self.training_config(request, segmenter)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("training %s on %s (%s), run folder %s", self.kind, dataset.root, device, run)
        summary = train(config, dataset, run, device=device, progress=False)
        model = read_model(run / "best.pt")
        target = self.models.root / f"{served_name(model)}.pt"
        with atomic_path(target) as tmp:
            shutil.copyfile(run / "best.pt", tmp)
        log.info("published %s (epoch %d of %d) as %s", served_name(model), summary.best_epoch, summary.epochs, target)
        return {"published": str(target), "name": served_name(model), "run": str(run), "epochs": summary.epochs,
                "best_epoch": summary.best_epoch, "seconds": summary.seconds}


def _log_to_stdout() -> None:
    """Per-epoch lines of the engine on stdout, which MONAI Label shows in ``GET /train/``."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("training", "lib"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout for h in logger.handlers):
            logger.addHandler(handler)

"""The app's model folder: which trained models it serves, under which names.

Every TaskAdaptiveCT model file in the folder is served (``training.checkpoints``): files
directly in it (``segmentation.pt``, ``ta0.5.pt``, as the train tasks publish them) and the
``best.pt`` of run folders one level down (``models/<stage>/best.pt``, as ``tact
reproduce`` writes them). A model is named by what it is, not by its file name:
``segmentation`` for the segmenter g, and the method name for a reconstructor f
(``baseunet``, ``ta0.1``, ``joint0.5``; :func:`training.methods.method_name`). Where two
files give the same name, the one written last is served.

The folder is read again whenever a file in it changes (modification time or size), so
a model published by a training (written to a temporary file and renamed into place) is
served by the next request without a restart. Networks are loaded once per file version.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.checkpoints import ModelFile, load_reconstructor, load_segmenter, read_model
from training.errors import DataError
from training.methods import default_variant, method_name

log = logging.getLogger(__name__)

SEGMENTER_NAME = "segmentation"


@dataclass(frozen=True)
class ServedModel:
    """One model file of the folder, with its serving name and its loaded network(s)."""

    name: str
    model: ModelFile
    network: nn.Module
    segmenter: nn.Module | None = None  # a joint model's own g

    @property
    def kind(self) -> str:
        return self.model.task

    def describe(self) -> dict[str, Any]:
        """What ``/info/`` shows of the model: task, weight, file, epoch, validation metrics, imaging settings."""
        model = self.model
        weight_name = {"reconstruction": "alpha", "joint": "C"}.get(model.task)
        imaging = None
        if model.imaging is not None:
            imaging = {k: v for k, v in model.imaging.items() if k != "data"}
            data = model.imaging.get("data", {})
            imaging["training_cases"] = data.get("cases", [])
        return {
            "name": self.name,
            "task": model.task,
            **({weight_name: model.weight} if weight_name else {}),
            "file": str(model.path),
            "format_version": model.version,
            "epoch": model.epoch,
            "network": {"features": model.network.features, "depth": model.network.depth, "norm": model.network.norm},
            "validation": {k: v for k, v in model.metrics.items() if k.startswith("val_")},
            "imaging": imaging,
        }


def served_name(model: ModelFile) -> str:
    """``segmentation`` for g, the method name (``baseunet``, ``ta0.5``, ``joint0.9``) for f."""
    return SEGMENTER_NAME if model.task == "segmentation" else method_name(model.task, model.weight)


class ModelFolder:
    """The models of one folder, re-read when its files change; safe to share between request threads.

    Args:
        root: the model folder (created if missing).
        device: where the networks are loaded (default: the first GPU where there is one).
    """

    def __init__(self, root: str | Path, device: str | None = None) -> None:
        self.root = Path(root)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._signature: tuple = ()
        self._models: dict[str, ServedModel] = {}
        self._loaded: dict[tuple, ServedModel] = {}  # (path, mtime, size) -> loaded model
        self.problems: dict[str, str] = {}  # file -> why it is not served

    def files(self) -> list[Path]:
        """Candidate model files: ``*.pt`` in the folder and ``*/best.pt`` one level down."""
        return sorted([p for p in self.root.glob("*.pt") if p.is_file()] + [p for p in self.root.glob("*/best.pt")])

    def _scan(self) -> None:
        stats = []
        for path in self.files():
            try:
                stat = path.stat()
            except FileNotFoundError:  # replaced between the listing and here
                continue
            stats.append((str(path), stat.st_mtime_ns, stat.st_size))
        signature = tuple(stats)
        if signature == self._signature:
            return
        models: dict[str, tuple[int, ServedModel]] = {}
        problems = {}
        for key in signature:
            path, mtime, _ = key
            try:
                served = self._loaded.get(key) or self._load(Path(path))
            except DataError as error:
                problems[path] = error.problem
                log.warning("not serving %s: %s", path, error.problem)
                continue
            self._loaded[key] = served
            if served.name not in models or mtime > models[served.name][0]:
                models[served.name] = (mtime, served)
        self._loaded = {k: v for k, v in self._loaded.items() if k in set(signature)}
        self._models = {name: served for name, (_, served) in sorted(models.items())}
        self.problems = problems
        self._signature = signature
        log.info("model folder %s: serving %s", self.root, ", ".join(self._models) or "nothing")

    def _load(self, path: Path) -> ServedModel:
        model = read_model(path)
        name = served_name(model)
        if model.task == "segmentation":
            return ServedModel(name, model, load_segmenter(model).to(self.device))
        network, _ = load_reconstructor(path)
        segmenter = load_segmenter(model).to(self.device) if model.task == "joint" else None
        return ServedModel(name, model, network.to(self.device), segmenter)

    def models(self) -> dict[str, ServedModel]:
        """Every served model by name (the folder is re-read if it changed)."""
        with self._lock:
            self._scan()
            return dict(self._models)

    def segmenter(self) -> ServedModel | None:
        """The segmenter g, or None when the folder holds none."""
        return self.models().get(SEGMENTER_NAME)

    def reconstructors(self) -> dict[str, ServedModel]:
        """The reconstructors f by method name."""
        return {name: m for name, m in self.models().items() if m.kind != "segmentation"}

    def default_variant(self, preferred: str | None = None) -> str | None:
        """The reconstructor served when a request names none.

        ``preferred`` (the app's ``variant`` setting, or ``serving.json``'s) when it is
        served; otherwise the one ``tact export-models`` would choose
        (:func:`training.methods.default_variant`: the best validation Dice among the
        task-adaptive models within ``PSNR_TOLERANCE_DB`` of the best validation PSNR).
        """
        reconstructors = self.reconstructors()
        if preferred and preferred in reconstructors:
            return preferred
        if preferred:
            log.warning("the configured default variant %r is not in %s; choosing another", preferred, self.root)
        if not reconstructors:
            return None
        return default_variant({name: served.model.metrics for name, served in sorted(reconstructors.items())})

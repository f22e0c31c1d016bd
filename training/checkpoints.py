"""Trained-model files: what a training run leaves behind, and loading it back.

A model file (``best.pt`` / ``final.pt`` of a run) is a plain ``torch.save`` dictionary
that loads with ``weights_only=True``::

    format, version       "taskadaptivect-model", 2 (version 1 files, without
                          ``imaging``, still load)
    task                  "segmentation" | "reconstruction" | "joint"
    weight                alpha (reconstruction) or C (joint); 0 for segmentation
    network               the U-Net's width/depth (``UNetConfig`` as a dict)
    state                 {"segmenter": state dict} for segmentation,
                          {"reconstructor": ...} for reconstruction,
                          {"reconstructor": ..., "segmenter": ...} for joint
    epoch, metrics        when it was saved and its validation metrics
    imaging               the imaging settings of its training data and where the data
                          came from (``training.provenance.imaging_settings``), or None

:func:`load_segmenter` and :func:`load_reconstructor` rebuild the networks and refuse, with
a message naming the file, a checkpoint of the wrong kind or one whose weights do not fit
the requested architecture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.errors import DataError
from training.fileio import atomic_path
from training.networks import UNetConfig, build_reconstruction_net, build_segmentation_net

FORMAT = "taskadaptivect-model"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SEGMENTER = "segmenter"
RECONSTRUCTOR = "reconstructor"
_NETWORKS_OF_TASK = {"segmentation": (SEGMENTER,), "reconstruction": (RECONSTRUCTOR,), "joint": (RECONSTRUCTOR, SEGMENTER)}


@dataclass(frozen=True)
class ModelFile:
    """A trained model read from disk (see the module docstring for the fields)."""

    path: Path
    task: str
    weight: float
    network: UNetConfig
    state: dict[str, dict[str, torch.Tensor]]
    epoch: int
    metrics: dict[str, float]
    imaging: dict[str, Any] | None = None
    version: int = VERSION


def save_model(
    path: str | Path,
    task: str,
    weight: float,
    network: UNetConfig,
    networks: dict[str, nn.Module],
    epoch: int,
    metrics: dict[str, float],
    imaging: dict[str, Any] | None = None,
) -> None:
    """Write a model file atomically. ``networks`` maps ``segmenter``/``reconstructor`` to modules.

    ``imaging`` is what :func:`training.provenance.imaging_settings` returns for the
    training data (JSON-like values only, so the file still loads with ``weights_only``).
    """
    if task not in _NETWORKS_OF_TASK or set(networks) != set(_NETWORKS_OF_TASK[task]):
        raise ValueError(f"a {task!r} model holds networks {_NETWORKS_OF_TASK.get(task)}, got {sorted(networks)}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "task": task,
        "weight": float(weight),
        "network": dataclasses.asdict(network),
        "state": {name: {k: v.detach().cpu() for k, v in module.state_dict().items()} for name, module in networks.items()},
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "imaging": imaging,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_model(path: str | Path) -> ModelFile:
    """Read and check a model file.

    Raises:
        DataError: missing or unreadable file, or not a model file of this project. The
            message never passes on PyTorch's advice to load an unknown file unsafely.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a bad file
        # Only the exception's type: torch's text for a file holding pickled objects
        # advises loading it with weights_only=False, which would run arbitrary code.
        raise DataError(path, f"not a TaskAdaptiveCT model file (PyTorch cannot read it as one: {type(exc).__name__}); "
                              "give the best.pt or final.pt of a `tact train` run") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(path, f"not a {FORMAT} file (a training run's best.pt or final.pt)")
    if payload.get("version") not in READABLE_VERSIONS:
        raise DataError(path, f"model file version {payload.get('version')} is not supported (this version of "
                              f"TaskAdaptiveCT reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    try:
        network = UNetConfig(**payload["network"])
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"invalid network description {payload['network']!r}: {exc}") from exc
    return ModelFile(path, payload["task"], payload["weight"], network, payload["state"], payload["epoch"], payload["metrics"],
                     payload.get("imaging"), payload["version"])


def _describe(config: UNetConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())


def _load(model: ModelFile, name: str, module: nn.Module) -> nn.Module:
    try:
        module.load_state_dict(model.state[name])
    except RuntimeError as exc:  # a hand-edited file: the description and the weights disagree
        raise DataError(model.path, f"the {name} weights do not fit a U-Net with {_describe(model.network)}: {exc}") from exc
    return module


def check_input_size(model: ModelFile, size: int) -> None:
    """Refuse ``size`` x ``size`` slices that the model's U-Net cannot down-sample ``depth`` times.

    Raises:
        DataError: naming the model file.
    """
    factor = 2**model.network.depth
    if size % factor:
        raise DataError(model.path, f"its U-Net (depth {model.network.depth}) needs image sides that are multiples of "
                                    f"{factor}, but the data set's slices are {size} x {size} px")


def load_segmenter(path: str | Path | ModelFile, expected: UNetConfig | None = None) -> nn.Module:
    """The segmentation network g from a ``segmentation`` (or ``joint``) model file, in eval mode.

    Args:
        path: the model file, or the file already read with :func:`read_model`.
        expected: the architecture the caller will use g with; a different one is refused.

    Raises:
        DataError: the file holds no segmentation network, or not one of ``expected``'s shape.
    """
    model = path if isinstance(path, ModelFile) else read_model(path)
    if SEGMENTER not in model.state:
        raise DataError(model.path, f"holds a {model.task!r} model without a segmentation network; "
                                    "give the best.pt of `tact train segmentation`")
    if expected is not None and model.network != expected:
        raise DataError(model.path, f"the segmentation network was trained with {_describe(model.network)}, "
                                    f"but this run's network is {_describe(expected)}; use a matching checkpoint "
                                    "or set network.* to match it")
    return _load(model, SEGMENTER, build_segmentation_net(model.network)).eval()


def load_reconstructor(path: str | Path, expected: UNetConfig | None = None) -> tuple[nn.Module, ModelFile]:
    """The reconstruction network f (eval mode) and its model file's description.

    Args:
        path: a ``reconstruction`` or ``joint`` model file.
        expected: the architecture the caller will use f with; a different one is refused.

    Raises:
        DataError: the file holds no reconstruction network, or not one of ``expected``'s shape.
    """
    model = read_model(path)
    if RECONSTRUCTOR not in model.state:
        raise DataError(model.path, f"holds a {model.task!r} model without a reconstruction network; "
                                    "give the best.pt of `tact train reconstruction` or `tact train joint`")
    if expected is not None and model.network != expected:
        raise DataError(model.path, f"the reconstruction network was trained with {_describe(model.network)}, "
                                    f"but this run's network is {_describe(expected)}; use a matching checkpoint "
                                    "or set network.* to match it")
    return _load(model, RECONSTRUCTOR, build_reconstruction_net(model.network)).eval(), model


def describe_model(model: ModelFile) -> dict[str, Any]:
    """What a data set's manifest records about a reconstructor it ran (provenance)."""
    return {"checkpoint": str(model.path.resolve()), "task": model.task, "weight": model.weight,
            "network": dataclasses.asdict(model.network), "epoch": model.epoch, "metrics": model.metrics,
            "imaging": model.imaging}

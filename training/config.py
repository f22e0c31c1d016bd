"""Training configuration: YAML files with ``key=value`` command-line overrides.

One :class:`TrainingConfig` describes any of the paper's trainings (segmentation
pre-training, the reconstruction U-Net with task weight alpha, joint training with C).
:func:`load_config` reads an optional YAML file, applies overrides such as
``network.features=16`` or ``weight=0.5`` (values parsed as YAML), and rejects keys that do
not exist and values of the wrong type before any training starts.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.fileio import atomic_path
from training.networks import UNetConfig

TASKS = ("segmentation", "reconstruction", "joint")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run needs besides its data set and output folder.

    Args:
        task: ``segmentation`` (pre-train g on full-dose scans), ``reconstruction`` (f with
            a frozen g, weight = alpha; alpha = 0 is the Base U-Net) or ``joint`` (f and g
            together, weight = C).
        weight: alpha or C, in [0, 1].
        network: width and depth of both U-Nets.
        epochs: maximum number of epochs.
        batch_size: slices per optimisation step (per process under torchrun).
        learning_rate: Adam's initial learning rate.
        weight_decay: Adam's weight decay.
        lr_factor, lr_patience: reduce the learning rate by ``lr_factor`` after
            ``lr_patience`` epochs without validation improvement.
        early_stopping_patience: stop after this many epochs without improvement.
        improvement_threshold: an epoch improves on the best one when its monitored metric
            (validation loss of f, validation Dice of g) is better by more than this
            *fraction* of the best value: relative, so that runs whose losses differ by a
            constant factor (the Base U-Net's MSE, a large alpha's Dice term) are judged alike.
        validation_fraction: fraction of training *patients* held out for validation.
        seed: seeds weights, shuffling and the validation split.
        num_workers: data-loading processes.
        amp: mixed precision where CUDA is available (always off on CPU).
        channels_last: channels-last memory format where CUDA is available.
        segmenter_checkpoint: the pre-trained g for ``reconstruction`` and ``joint``.
        init_checkpoint: a model file whose f starts this ``reconstruction`` or ``joint``
            run (a warm start, e.g. from a Base U-Net's ``best.pt``) instead of random weights.
        augment: augment g's training slices (segmentation only; ``training.augment``:
            MONAI random affine, intensity scaling and shifting, noise).
        loss_reference: a reconstruction model file (e.g. a Base U-Net's ``best.pt``) that
            switches the loss to its normalised form: each term is divided by that f's mean
            value of it on this run's validation slices (training slices if none are held
            out), under this run's g, so that alpha is the Dice term's share of the loss
            (``training.losses``). ``null``: the paper's plain loss.
    """

    task: str = "reconstruction"
    weight: float = 0.0
    network: UNetConfig = field(default_factory=UNetConfig)
    epochs: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_factor: float = 0.5
    lr_patience: int = 5
    early_stopping_patience: int = 15
    improvement_threshold: float = 1e-3
    validation_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 2
    amp: bool = True
    channels_last: bool = True
    segmenter_checkpoint: str | None = None
    init_checkpoint: str | None = None
    loss_reference: str | None = None
    augment: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        name = "C" if self.task == "joint" else "alpha"
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"weight ({name}) must be in [0, 1], got {self.weight}")
        for key in ("epochs", "batch_size", "early_stopping_patience"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.improvement_threshold < 1.0:
            raise ConfigError(f"improvement_threshold must be in [0, 1) (a fraction of the best value), got {self.improvement_threshold}")
        if not 0.0 < self.lr_factor < 1.0:
            raise ConfigError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.loss_reference is not None and (self.task == "segmentation" or self.weight == 0.0):
            raise ConfigError(f"loss_reference normalises the two terms of a task-adaptive or joint loss; a "
                              f"{self.task} run{' with ' + name + ' = 0' if self.task != 'segmentation' else ''} "
                              "has only one term")
        if self.augment and self.task != "segmentation":
            raise ConfigError("augment is for the segmentation pre-training of g; a reconstruction network learns "
                              "from paired slices whose noise augmentation would change")
        if self.num_workers < 0 or self.lr_patience < 0 or self.weight_decay < 0:
            raise ConfigError("num_workers, lr_patience and weight_decay must not be negative")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking every key and value type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the configuration'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in values if key not in known]
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; known keys{' of ' + prefix.rstrip('.') if prefix else ''}: "
                          f"{', '.join(known)}")
    kwargs = {}
    for key, value in values.items():
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build(expected, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, expected)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # a nested config's own validation (e.g. UNetConfig)
        raise ConfigError(f"{prefix.rstrip('.')}: {exc}") from exc


def _check_type(key: str, value: Any, expected: Any) -> Any:
    allowed = typing.get_args(expected) or (expected,)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str) and _is_number(value):
        return float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
    if any(t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed):
        return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_from_mapping(values: dict[str, Any]) -> TrainingConfig:
    """A configuration from a mapping of keys to values (nested ``network``), validated.

    Raises:
        ConfigError: unknown key, wrong type or invalid value.
    """
    return _build(TrainingConfig, values)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainingConfig:
    """The configuration from an optional YAML file and ``key=value`` overrides, validated.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or invalid value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the configuration: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the configuration must be a mapping of keys to values")
        values = loaded or {}
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key=value")
        target = values
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {override!r}: {parent!r} is not a section")
        target[leaf] = yaml.safe_load(text)
    return _build(TrainingConfig, values)


def save_config(path: str | Path, config: TrainingConfig) -> None:
    """Write ``config`` as YAML (atomically), so that a run records what it was given."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))

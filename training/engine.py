"""The training engine: one implementation for every training of the paper.

Segmentation pre-training of g, the reconstruction U-Net f with a frozen g (task weight
alpha; alpha = 0 is the Base U-Net) and joint training of f and g (weight C) all run through
:func:`train`, built on MONAI's ignite engines (``SupervisedTrainer`` and
``SupervisedEvaluator``) with the task's own step (:class:`TrainingStep`,
:class:`ValidationStep`). The MONAI Label train tasks reuse :class:`TrainingTask` and the
two steps, so the CLI and the server train the same way.

A run folder holds::

    config.yaml       the configuration the run was started with
    inputs.json       the data set (path, fingerprint) and segmenter file (sha256) it trains on
    best.pt           model file of the best validation epoch (see ``training.checkpoints``)
    last.pt           everything needed to resume: weights, optimiser, scheduler, counters, RNG
    history.csv       one row per epoch: training and validation metrics, learning rate, time
    summary.json      written when the run has finished (epochs, best epoch, early stop, time,
                      how the best epoch was selected)
    tensorboard/      TensorBoard event files

Policy, after every epoch: validation on held-out *patients* of the training split. The
monitored metric (:class:`Selection`) is the per-volume validation Dice of g for
segmentation and the validation loss (the objective) for reconstruction and joint
training; an epoch improves on the best when the metric is better by more than
``improvement_threshold`` (a fraction of the best value, so the decision does not depend on
the loss's scale). The learning rate is multiplied by ``lr_factor`` after ``lr_patience``
epochs without improvement; training stops after ``early_stopping_patience`` such epochs;
``best.pt`` and ``last.pt`` are replaced atomically. A killed run, started again with the same command, resumes after its last
finished epoch and ends bit-identical to an uninterrupted run on the same hardware
(the data order depends only on the seed and the epoch).

Distributed: under ``torchrun`` every process trains on its share of each batch order
(``DistributedSampler``) with ``DistributedDataParallel`` (NCCL on GPUs, gloo on CPUs);
validation metrics are reduced over processes, so every process takes the same decisions;
only rank 0 writes files. ``batch_size`` is per process. On GPUs batch normalisation is
synchronised across processes; gloo has no synchronised batch norm, so CPU runs on several
processes match a single process exactly only with ``network.norm=instance``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.networks.utils import eval_mode
from monai.utils import set_determinism
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from training.augment import AugmentedSlices, EpochTaggedSampler, segmentation_augmentation
from training.checkpoints import RECONSTRUCTOR, SEGMENTER, load_reconstructor, load_segmenter, save_model
from training.config import ConfigError, TrainingConfig, load_config, save_config
from training.dataset import FULLDOSE, LOWDOSE, SimulatedDataset
from training.errors import DataError
from training.fileio import atomic_path, save_json
from training.losses import dice_loss, joint_loss, task_adaptive_loss, term_scales
from training.metrics import DICE_LABELS, dice_counts, dice_scores
from training.networks import build_reconstruction_net, build_segmentation_net
from training.physics import disc_mask
from training.provenance import dataset_fingerprint, file_sha256, imaging_settings
from training.slices import SliceDataset

log = logging.getLogger(__name__)

RESUME_FORMAT = "taskadaptivect-resume"
INPUTS = "inputs.json"


# ---------------------------------------------------------------------------------------
# Where and how this process runs


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Distributed:
    """Join the ``torchrun`` process group if there is one; pick this process's device.

    ``device`` forces ``cpu`` or ``cuda``; by default CUDA is used where available.
    """
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Distributed(rank=rank, world_size=world_size, device=target)


# ---------------------------------------------------------------------------------------
# What is trained, and the per-batch computations


class Objective(nn.Module):
    """The networks of a task and its loss, as one module: ``forward`` returns per-slice terms.

    Being one module, it is what ``DistributedDataParallel`` wraps (f, and g in joint
    training, share one gradient reduction); a frozen g has no trainable parameters and is
    left alone by it.
    """

    def __init__(self, task: str, network: nn.Module, loss: nn.Module, monitor_dice: bool) -> None:
        super().__init__()
        self.task, self.network, self.loss, self.monitor_dice = task, network, loss, monitor_dice

    def forward(self, image: torch.Tensor, fulldose: torch.Tensor, label: torch.Tensor,
                monitoring: bool = False) -> dict[str, torch.Tensor]:
        """Per-slice ``loss`` ``(B,)`` (and ``mse``, ``dice`` where they apply), ``logits`` of g and f's ``reconstruction``."""
        if self.task == "segmentation":
            logits = self.network(image).float()
            return {"loss": self.loss(logits, label).flatten(1).mean(1), "logits": logits}
        reconstruction = self.network(image)
        out = self.loss.terms(reconstruction, fulldose, label, with_dice=monitoring and self.monitor_dice)
        out["reconstruction"] = reconstruction
        return out


class TrainingTask:
    """The networks, loss and device settings of one configuration.

    * ``segmentation``: g on full-dose slices, soft Dice loss;
    * ``reconstruction``: f on low-dose slices, ``(1 - alpha) MSE + alpha Dice(g(f(x)))``
      with g loaded from ``segmenter_checkpoint`` and frozen (optional for alpha = 0, where
      it only monitors the validation Dice);
    * ``joint``: f and g trained together with weight C; g starts from
      ``segmenter_checkpoint`` if one is given, else from scratch.

    Raises:
        ConfigError: a setting the task cannot use; DataError: an unusable checkpoint.
    """

    def __init__(self, config: TrainingConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.channels_last = config.channels_last and device.type == "cuda"
        self.amp = config.amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        segmenter = None
        if config.segmenter_checkpoint is not None:
            if config.task == "segmentation":
                raise ConfigError("segmenter_checkpoint is for reconstruction and joint training, not segmentation")
            # A frozen g keeps its own architecture (a wider or deeper g judges a narrow f); joint
            # training saves f and g in one model file, with one architecture.
            segmenter = load_segmenter(config.segmenter_checkpoint,
                                       expected=config.network if config.task == "joint" else None)
        elif config.task == "reconstruction" and config.weight > 0:
            raise ConfigError(f"alpha = {config.weight:g} needs the pre-trained segmentation network: "
                              "pass --segmenter (segmenter_checkpoint) the best.pt of `tact train segmentation`")
        if config.task == "segmentation" and config.init_checkpoint is not None:
            raise ConfigError("init_checkpoint (--init) starts a reconstruction network f; segmentation training "
                              "has none")
        if config.task == "segmentation":
            network, loss, monitor = build_segmentation_net(config.network), dice_loss(), True
            self.input_method = FULLDOSE
        else:
            network = build_reconstruction_net(config.network)
            if config.init_checkpoint is not None:  # warm start: f begins where another run's f ended
                network = load_reconstructor(config.init_checkpoint, expected=config.network)[0]
            g = segmenter or build_segmentation_net(config.network)
            loss = joint_loss(g, config.weight) if config.task == "joint" else task_adaptive_loss(g, config.weight)
            # The Base U-Net without a checkpoint has no meaningful g to monitor with.
            monitor = config.weight > 0 or segmenter is not None
            self.input_method = LOWDOSE
        # The normalised loss's reference f; only used to measure the scales (see measure_loss_scales).
        self.loss_reference = (load_reconstructor(config.loss_reference)[0] if config.loss_reference is not None
                               else None)
        self.depths = {"network": config.network.depth}
        if segmenter is not None and config.task == "reconstruction":
            self.depths["the segmenter's network"] = _depth(segmenter)
        self.objective = Objective(config.task, network, loss, monitor).to(device)
        if self.channels_last:
            self.objective.to(memory_format=torch.channels_last)
        self.train_objective: nn.Module = self.objective

    def metric_keys(self, validation: bool) -> list[str]:
        """The per-slice outputs averaged each epoch: of :class:`TrainingStep` or :class:`ValidationStep`.

        Validation Dice of g's maps is not among them: :class:`ValidationDice` scores it.
        """
        if self.config.task == "segmentation":
            return ["loss"]
        if validation:
            return ["loss", "mse", "psnr"] + (["dice_loss"] if self.objective.monitor_dice else [])
        return ["loss", "mse"] + (["dice_loss"] if self.config.weight > 0 else [])

    @property
    def scores_dice(self) -> bool:
        """Whether validation applies g and scores its maps (always for g; for f when a g is monitored)."""
        return self.config.task == "segmentation" or self.objective.monitor_dice

    def selection(self, validated: bool) -> Selection:
        """How this task's best epoch is chosen (see :class:`Selection`)."""
        threshold = self.config.improvement_threshold
        if not validated:  # no held-out patients: the training loss is all there is
            return Selection("train_loss", "min", threshold)
        if self.config.task == "segmentation":
            return Selection("val_dice_volume", "max", threshold)
        return Selection("val_loss", "min", threshold)

    def trained_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights the optimiser changes, by model-file name."""
        objective = self.objective
        if self.config.task == "segmentation":
            return {SEGMENTER: objective.network}
        if self.config.task == "joint":
            return {RECONSTRUCTOR: objective.network, SEGMENTER: objective.loss.segmenter}
        return {RECONSTRUCTOR: objective.network}

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.trained_modules().values() for p in module.parameters()]

    def distribute(self, distributed: Distributed) -> None:
        """Wrap the objective in DistributedDataParallel for training (after the weights are final).

        Validation keeps using the plain module: processes may hold different numbers of
        validation batches, and a wrapped forward would wait for the others.
        """
        if distributed.world_size == 1:
            return
        if self.device.type == "cuda":
            self.objective = nn.SyncBatchNorm.convert_sync_batchnorm(self.objective)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.train_objective = nn.parallel.DistributedDataParallel(self.objective, device_ids=device_ids)

    def measure_loss_scales(self, slices: torch.utils.data.Dataset) -> dict[str, float] | None:
        """Set the normalised loss's scales from the reference f on ``slices``; ``None`` for the plain loss.

        Every process measures on all of ``slices`` (not its share), so that all use the same scales.
        """
        if self.loss_reference is None:
            return None
        reference = self.loss_reference.to(self.device)
        loader = DataLoader(slices, batch_size=self.config.batch_size, shuffle=False, num_workers=0)
        scales = term_scales(reference, self.objective.loss, (self.batch(batch) for batch in loader))
        self.objective.loss.scales = scales
        self.loss_reference = None  # measured once; the reference is not needed any more
        log.info("normalised loss: MSE / %.4g + Dice loss / %.4g (the reference's values on %d slices)",
                 scales.mse, scales.dice_loss, len(slices))
        return asdict(scales)

    def batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, full dose, labels) of a loader batch on this task's device."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        image = batch["image"].to(self.device, memory_format=fmt, non_blocking=True)
        fulldose = batch["fulldose"].to(self.device, memory_format=fmt, non_blocking=True)
        return image, fulldose, batch["label"].to(self.device, non_blocking=True)

class TrainingStep:
    """One optimisation step, as the ``iteration_update`` of MONAI's ``SupervisedTrainer``.

    Returns the per-slice terms of the batch (detached ``(B,)`` tensors).
    """

    def __init__(self, task: TrainingTask) -> None:
        self.task = task
        # A gradient scaler only where float16 needs one (bfloat16 and float32 do not).
        self.scaler = torch.amp.GradScaler("cuda", enabled=task.amp and task.amp_dtype == torch.float16)

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        task = self.task
        # MONAI's own iteration (which this step replaces) calls train(); without it a g loaded
        # in eval mode would be trained with frozen batch-norm statistics. A frozen g
        # (task-adaptive training) stays in eval mode whatever train() is called on.
        task.train_objective.train()
        image, fulldose, label = task.batch(batch)
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(task.device.type, dtype=task.amp_dtype, enabled=task.amp):
            terms = task.train_objective(image, fulldose, label)
        loss = terms["loss"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {float(loss)} at iteration {engine.state.iteration}; "
                                     "lower learning_rate or turn amp off")
        self.scaler.scale(loss).backward()
        self.scaler.step(engine.optimizer)
        self.scaler.update()
        return {k: v.detach() for k, v in terms.items() if v.ndim == 1}


class ValidationStep:
    """Forward pass and per-slice validation metrics, as ``SupervisedEvaluator``'s ``iteration_update``.

    Outputs ``(B,)`` tensors: ``loss`` (the training objective), and where they apply
    ``mse``, ``dice_loss`` and ``psnr`` (inside the reconstruction disc, data range 1); where
    g runs, ``dice_counts`` ``(B, 2, 3)`` (:func:`training.metrics.dice_counts` of g's hard
    map, liver and tumour) and the slices' ``case`` ids, for :class:`ValidationDice`.
    """

    def __init__(self, task: TrainingTask) -> None:
        self.task = task
        self._roi: torch.Tensor | None = None

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> dict[str, Any]:
        task = self.task
        image, fulldose, label = task.batch(batch)
        with eval_mode(task.objective), torch.autocast(task.device.type, dtype=task.amp_dtype, enabled=task.amp):
            terms = task.objective(image, fulldose, label, monitoring=True)
        out: dict[str, Any] = {k: v.float() for k, v in terms.items() if v.ndim == 1}
        if "logits" in terms:
            predicted = terms["logits"].argmax(1).cpu().numpy()
            counts = dice_counts(predicted, label[:, 0].cpu().numpy(), DICE_LABELS, batch=True)
            out["dice_counts"] = torch.from_numpy(counts)
            out["case"] = list(batch["case"])
        if "reconstruction" in terms:
            if self._roi is None or self._roi.shape != image.shape[-2:]:
                self._roi = torch.from_numpy(disc_mask(image.shape[-1])).to(task.device)
            error = (terms["reconstruction"].float() - fulldose.float()).square()[:, 0][:, self._roi].mean(1)
            out["psnr"] = -10.0 * torch.log10(error.clamp_min(1e-12))
        return out


class SliceMean(Metric):
    """Mean over slices of one per-slice ``(B,)`` output, exact across batches and processes."""

    def __init__(self, key: str) -> None:
        super().__init__(output_transform=lambda output: output[key])

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64)
        self._count = torch.tensor(0, dtype=torch.int64)

    @reinit__is_reduced
    def update(self, values: torch.Tensor) -> None:
        self._sum += values.detach().double().sum().cpu()
        self._count += values.numel()

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count) if self._count > 0 else float("nan")


class ValidationDice(Metric):
    """g's validation Dice under the three conventions of :mod:`training.metrics`, exact across processes.

    Accumulates the pixel counts of every validation patient (for the per-volume
    convention) and the sums of the per-slice scores (for the two per-slice ones); every
    process holds a share of the slices, and sums reduce exactly. ``compute`` gives, for
    each convention ``C`` in ``volume``, ``slice_eq7`` and ``slice_present``: ``dice_C``
    (the mean over patients or slices of each one's mean over its counted classes),
    ``dice_C_liver`` and ``dice_C_tumour``.

    Args:
        cases: the validation patients (every process gets the same list).
    """

    CONVENTIONS = ("volume", "slice_eq7", "slice_present")

    def __init__(self, cases: list[str]) -> None:
        self._cases = {case: index for index, case in enumerate(cases)}
        super().__init__(output_transform=lambda output: (output["dice_counts"], output["case"]),
                         metrics_result_mode="flatten")

    @reinit__is_reduced
    def reset(self) -> None:
        classes = len(DICE_LABELS)
        self._case_counts = torch.zeros(len(self._cases), classes, 3, dtype=torch.int64)
        # [convention (eq7, present)][classes..., mean][sum, count]
        self._slice_sums = torch.zeros(2, classes + 1, 2, dtype=torch.float64)

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, list[str]]) -> None:
        counts, cases = output
        for case, slice_counts in zip(cases, counts):
            self._case_counts[self._cases[case]] += slice_counts.cpu()
        for row, convention in enumerate(("slice_eq7", "slice_present")):
            per_class, mean = dice_scores(counts.cpu().numpy(), convention)
            values = np.concatenate([per_class, mean[:, None]], axis=1)  # (B, classes + 1)
            counted = ~np.isnan(values)
            self._slice_sums[row, :, 0] += torch.from_numpy(np.where(counted, values, 0.0).sum(axis=0))
            self._slice_sums[row, :, 1] += torch.from_numpy(counted.sum(axis=0).astype(np.float64))

    @sync_all_reduce("_case_counts", "_slice_sums")
    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        seen = self._case_counts.sum(dim=(1, 2)) > 0
        counts = self._case_counts[seen].numpy()
        per_class, mean = dice_scores(counts, "volume", cases=list(range(len(counts))))
        values = np.concatenate([per_class, mean[:, None]], axis=1)
        with np.errstate(invalid="ignore"):
            volume = [float(np.nanmean(column)) if np.isfinite(column).any() else math.nan for column in values.T]
        results.update(_dice_names("volume", volume))
        for row, convention in enumerate(("slice_eq7", "slice_present")):
            sums, counted = self._slice_sums[row, :, 0], self._slice_sums[row, :, 1]
            results.update(_dice_names(convention, [float(s / n) if n > 0 else math.nan for s, n in zip(sums, counted)]))
        return results


def _dice_names(convention: str, values: list[float]) -> dict[str, float]:
    """``dice_<convention>_liver``, ``..._tumour`` and ``dice_<convention>`` (the mean) from per-class values and the mean."""
    liver, tumour, mean = values
    return {f"dice_{convention}": mean, f"dice_{convention}_liver": liver, f"dice_{convention}_tumour": tumour}


def _depth(network: nn.Module) -> int:
    """The number of down-samplings of one of our U-Nets (MONAI's DynUNet)."""
    unet = getattr(network, "unet", network)
    return len(unet.upsamples)


# ---------------------------------------------------------------------------------------
# Data


def validation_cases(train_cases: list[str], fraction: float, seed: int) -> list[str]:
    """Seeded choice of training patients held out for validation (none if ``fraction`` is 0)."""
    if fraction == 0.0:
        return []
    if len(train_cases) < 2:
        raise ConfigError(f"validation_fraction = {fraction:g} needs at least 2 training patients, the data set has "
                          f"{len(train_cases)}; set validation_fraction=0 to train without validation")
    count = min(len(train_cases) - 1, max(1, round(fraction * len(train_cases))))
    order = np.random.default_rng(seed).permutation(len(train_cases))
    return sorted(train_cases[i] for i in order[:count])


def _loaders(dataset: SimulatedDataset, task: TrainingTask, distributed: Distributed) -> tuple[DataLoader, DataLoader | None, dict]:
    config = task.config
    train_cases = dataset.case_ids("train")
    if not dataset.slices("train"):
        raise DataError(dataset.root, "the training split holds no slices; simulate more patients "
                                      "(a one-patient data set is all test split)")
    size = dataset.settings["size"]
    for name, depth in task.depths.items():
        if size % 2**depth:
            raise ConfigError(f"slices of {size} px cannot be down-sampled {depth} times ({name}); "
                              f"choose network.depth so that 2**depth divides {size}")
    held_out = validation_cases(train_cases, config.validation_fraction, config.seed)
    fit_cases = [c for c in train_cases if c not in held_out]
    fit = SliceDataset(dataset, "train", task.input_method, cases=fit_cases)
    # The sampler's order depends only on (seed, epoch): resumed runs see the same batches, and
    # augmented ones the same augmentation (seeded per slice and epoch).
    sampler_type = DistributedSampler
    if config.augment:
        fit = AugmentedSlices(fit, segmentation_augmentation(size), config.seed)
        sampler_type = EpochTaggedSampler
    sampler = sampler_type(fit, num_replicas=distributed.world_size, rank=distributed.rank, shuffle=True, seed=config.seed)
    pin = task.device.type == "cuda"
    train_loader = DataLoader(fit, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                              pin_memory=pin, persistent_workers=config.num_workers > 0)
    val_loader = None
    if held_out:
        from monai.data import DistributedSampler as EvenSampler  # no padding: every slice counted once

        val = SliceDataset(dataset, "train", task.input_method, cases=held_out)
        val_sampler = EvenSampler(val, even_divisible=False, num_replicas=distributed.world_size, rank=distributed.rank,
                                  shuffle=False) if distributed.world_size > 1 else None
        val_loader = DataLoader(val, batch_size=config.batch_size, sampler=val_sampler, num_workers=config.num_workers,
                                pin_memory=pin, persistent_workers=config.num_workers > 0)
    split = {"fit": fit_cases, "validation": held_out,
             "fit_slices": len(fit), "validation_slices": len(val_loader.dataset) if val_loader else 0}
    return train_loader, val_loader, split


# ---------------------------------------------------------------------------------------
# Policy and bookkeeping after every epoch


@dataclass(frozen=True)
class Selection:
    """How the best epoch is chosen: the monitored metric, its direction and a relative threshold.

    A value improves on the best so far when it is better by more than ``threshold`` times
    the best value's magnitude. Being relative, the rule takes the same decisions for two
    runs whose losses differ by a constant factor: the Base U-Net's MSE (about 6e-4 at 32 dB)
    and a large alpha's loss, dominated by its Dice term (0.1-0.5), are judged alike. The
    learning-rate schedule uses the same rule (``ReduceLROnPlateau`` in ``rel`` mode, which
    agrees with :meth:`improves` for the non-negative losses and Dice scores monitored here).

    Args:
        metric: a column of ``history.csv`` (``val_loss``, ``val_dice_volume``, ``train_loss``).
        mode: ``min`` (a loss) or ``max`` (a Dice score).
        threshold: the relative improvement that counts, in [0, 1).
    """

    metric: str
    mode: str
    threshold: float

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")

    @property
    def worst(self) -> float:
        """The starting 'best' value, which any finite value improves on."""
        return math.inf if self.mode == "min" else -math.inf

    def improves(self, value: float, best: float) -> bool:
        """Whether ``value`` is better than ``best`` by more than ``threshold * |best|`` (NaN never is)."""
        if math.isnan(value):
            return False
        if math.isinf(best):
            return value != best
        margin = self.threshold * abs(best)
        return value < best - margin if self.mode == "min" else value > best + margin

    def score(self, value: float) -> float:
        """The value as a higher-is-better score (what MONAI Label's key metric expects)."""
        return value if self.mode == "max" else -value

    def scheduler(self, optimizer: torch.optim.Optimizer, factor: float, patience: int) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
        """A ``ReduceLROnPlateau`` that steps on the monitored value with this rule."""
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=self.mode, factor=factor, patience=patience,
                                                          threshold=self.threshold, threshold_mode="rel")


class EpochPolicy:
    """After each epoch: selection, learning-rate schedule, early stopping, checkpoints, history.

    Attached to the trainer's ``EPOCH_COMPLETED`` after validation. Its state (best value,
    epochs without improvement, history) is part of ``last.pt``.
    """

    def __init__(self, run: Path, task: TrainingTask, selection: Selection, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau, step: TrainingStep,
                 evaluator: Engine | None, distributed: Distributed, writer: Any, imaging: dict[str, Any]) -> None:
        self.run, self.task, self.selection, self.imaging = run, task, selection, imaging
        self.optimizer, self.scheduler, self.step = optimizer, scheduler, step
        self.evaluator, self.distributed, self.writer = evaluator, distributed, writer
        self.best_value = selection.worst
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: list[dict[str, float]] = []
        self._epoch_start = time.perf_counter()

    @property
    def best_score(self) -> float:
        return self.selection.score(self.best_value)

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "stopped_early": self.stopped_early, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.bad_epochs, self.stopped_early, self.history = state["bad_epochs"], state["stopped_early"], list(state["history"])

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._start)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _start(self, trainer: Engine) -> None:
        self._epoch_start = time.perf_counter()

    def __call__(self, trainer: Engine) -> None:
        epoch = trainer.state.epoch
        row: dict[str, float] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        row.update({k: v for k, v in trainer.state.metrics.items()})
        if self.evaluator is not None:
            row.update({f"val_{k}": v for k, v in self.evaluator.state.metrics.items()})
        value = row[self.selection.metric]
        row["score"] = self.selection.score(value)
        row["seconds"] = time.perf_counter() - self._epoch_start
        improved = self.selection.improves(value, self.best_value)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        self.scheduler.step(value)
        self.history.append(row)
        if self.bad_epochs >= self.task.config.early_stopping_patience and epoch < trainer.state.max_epochs:
            self.stopped_early = True
            trainer.terminate()
        if self.distributed.is_main:
            metrics = {k: v for k, v in row.items() if k != "epoch"}
            if improved:
                save_model(self.run / "best.pt", self.task.config.task, self.task.config.weight, self.task.config.network,
                           self.task.trained_modules(), epoch, metrics, imaging=self.imaging)
            self._save_resume_state(trainer)
            _write_history(self.run / "history.csv", self.history)
            if self.writer is not None:
                for key, number in metrics.items():
                    self.writer.add_scalar(key, number, epoch)
                self.writer.flush()
            shown = ", ".join(f"{k} {row[k]:.4g}" for k in _LOGGED if k in row)
            log.info("epoch %d/%d: %s; %s %.4g (%.1f s)%s", epoch, trainer.state.max_epochs, shown, self.selection.metric,
                     value, row["seconds"], " *best*" if improved else "")
            if self.stopped_early:
                log.info("early stop: no improvement for %d epochs; best epoch %d", self.bad_epochs, self.best_epoch)

    def _save_resume_state(self, trainer: Engine) -> None:
        state = {
            "format": RESUME_FORMAT,
            "config": asdict(self.task.config),
            "trainer": {"epoch": trainer.state.epoch, "epoch_length": trainer.state.epoch_length,
                        "max_epochs": trainer.state.max_epochs},
            "modules": {name: m.state_dict() for name, m in self.task.trained_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step.scaler.state_dict(),
            "policy": self.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        with atomic_path(self.run / "last.pt") as tmp:
            torch.save(state, tmp)


_LOGGED = ("lr", "train_loss", "val_loss", "val_psnr", "val_dice_volume")
"""The history columns of each epoch's log line (the rest are in history.csv and TensorBoard)."""


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def read_history(run: str | Path) -> list[dict[str, float]]:
    """The per-epoch rows of a run's ``history.csv`` (numbers as floats)."""
    with open(Path(run) / "history.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


# ---------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class TrainingSummary:
    """What a finished run reports (also ``summary.json``).

    ``best_score`` is the best epoch's monitored value as a higher-is-better score;
    ``selection`` says which metric it is, its direction and threshold, and its value.
    """

    task: str
    weight: float
    epochs: int
    best_epoch: int
    best_score: float
    stopped_early: bool
    seconds: float
    world_size: int
    device: str
    fit_slices: int
    validation_slices: int
    selection: dict[str, Any] = field(default_factory=dict)


def read_summary(run: str | Path) -> TrainingSummary | None:
    """The summary of a finished run, or ``None`` if it has not finished."""
    path = Path(run) / "summary.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return TrainingSummary(**{f.name: saved[f.name] for f in fields(TrainingSummary) if f.name in saved})


MODEL_INPUTS = {"segmenter_checkpoint": "segmenter", "init_checkpoint": "init", "loss_reference": "loss_reference"}
"""Model files a run reads, by config key and ``inputs.json`` name: a resume refuses a changed one."""


def run_inputs(config: TrainingConfig, dataset: SimulatedDataset) -> dict[str, Any]:
    """What a run trains on, as ``inputs.json`` records it: the data set and the model files it reads."""
    inputs: dict[str, Any] = {"dataset": {"path": str(dataset.root.resolve()), "fingerprint": dataset_fingerprint(dataset)}}
    for key, name in MODEL_INPUTS.items():
        path = getattr(config, key)
        if path is not None and Path(path).is_file():
            inputs[name] = {"path": str(Path(path).resolve()), "sha256": file_sha256(Path(path))}
    return inputs


def check_run_folder(run: Path, config: TrainingConfig, inputs: dict[str, Any] | None = None) -> None:
    """Refuse to resume or skip a run folder started with another configuration, data set or segmenter file.

    Raises:
        ConfigError: another configuration; DataError: naming the ``--dataset`` or segmenter
            file that differs from what the run recorded in ``inputs.json``.
    """
    saved = run / "config.yaml"
    if saved.is_file() and load_config(saved) != config:
        raise ConfigError(f"{run} holds a run with another configuration ({saved}); "
                          "use a new output folder or the same settings to resume")
    recorded_path = run / INPUTS
    if inputs is None or not recorded_path.is_file():
        return
    recorded = json.loads(recorded_path.read_text())
    old, new = recorded["dataset"], inputs["dataset"]
    if old["fingerprint"] != new["fingerprint"]:
        raise DataError(new["path"], f"is not the data set the run in {run} was trained on ({old['path']}, manifest "
                                     f"fingerprint {old['fingerprint'][:12]}, this one {new['fingerprint'][:12]}); "
                                     "use a new --out, or that data set to resume")
    if old["path"] != new["path"]:
        log.info("%s: the data set moved from %s to %s (same manifest fingerprint)", run, old["path"], new["path"])
    for name in MODEL_INPUTS.values():
        old_file, new_file = recorded.get(name), inputs.get(name)
        if old_file is not None and new_file is not None and old_file["sha256"] != new_file["sha256"]:
            raise DataError(new_file["path"], f"has changed since the run in {run} started (sha256 "
                                              f"{old_file['sha256'][:12]} then, {new_file['sha256'][:12]} now); use a "
                                              "new --out, or restore the file to resume")


def train(
    config: TrainingConfig,
    dataset: SimulatedDataset | str | Path,
    out: str | Path,
    device: str | None = None,
    progress: bool = True,
    until: int | None = None,
) -> TrainingSummary | None:
    """Train (or resume, or skip if finished) one configuration on a simulated data set.

    Args:
        config: what to train (see :class:`~training.config.TrainingConfig`).
        dataset: the data set from ``tact simulate`` (training split; validation patients
            are held out of it).
        out: the run folder; an unfinished run there is resumed, a finished one returned.
            A run folder holds one configuration on one data set (and segmenter file):
            another is refused.
        device: ``cpu`` or ``cuda``; default CUDA where available.
        progress: show a progress bar over each epoch's batches (rank 0 only).
        until: stop after this epoch, leaving an unfinished run that a later call continues
            exactly as an uninterrupted run would (``None``: train to the end). Used by the
            alpha search, which trains candidates rung by rung.

    Returns:
        the summary of the finished run; ``None`` when ``until`` stopped it before its end.

    Raises:
        ConfigError, DataError: before any training, for settings or data that cannot work.
    """
    if until is not None and until < 1:
        raise ConfigError(f"until must be at least 1 epoch, got {until}")
    run = Path(out)
    dataset = dataset if isinstance(dataset, SimulatedDataset) else SimulatedDataset(dataset)
    inputs = run_inputs(config, dataset)
    check_run_folder(run, config, inputs)
    finished = read_summary(run)
    if finished is not None:
        log.info("%s: already trained (%d epochs, best epoch %d); delete the folder to retrain", run, finished.epochs,
                 finished.best_epoch)
        return finished
    distributed = setup_distributed(device)
    set_determinism(seed=config.seed)
    task = TrainingTask(config, distributed.device)
    train_loader, val_loader, split = _loaders(dataset, task, distributed)
    selection = task.selection(validated=val_loader is not None)
    scales = task.measure_loss_scales(val_loader.dataset if val_loader is not None else train_loader.dataset)
    if scales is not None:
        inputs["loss_reference"]["scales"] = scales
    optimizer = torch.optim.Adam(task.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = selection.scheduler(optimizer, config.lr_factor, config.lr_patience)
    resume = _read_resume_state(run, config)
    if resume is not None:
        for name, module in task.trained_modules().items():
            module.load_state_dict(resume["modules"][name])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    task.distribute(distributed)
    step = TrainingStep(task)
    if resume is not None:
        step.scaler.load_state_dict(resume["scaler"])

    evaluator = None
    if val_loader is not None:
        evaluator = SupervisedEvaluator(device=distributed.device, val_data_loader=val_loader, network=task.objective,
                                        iteration_update=ValidationStep(task), decollate=False)
        for key in task.metric_keys(validation=True):
            SliceMean(key).attach(evaluator, key)
        if task.scores_dice:
            ValidationDice(split["validation"]).attach(evaluator, "dice")
    trainer = SupervisedTrainer(device=distributed.device, max_epochs=config.epochs, train_data_loader=train_loader,
                                network=task.train_objective, optimizer=optimizer, loss_function=task.objective.loss,
                                iteration_update=step, decollate=False)
    for key in task.metric_keys(validation=False):
        SliceMean(key).attach(trainer, f"train_{key}")
    if evaluator is not None:
        ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)
    writer = None
    if distributed.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(run / "config.yaml", config)
        save_json(run / INPUTS, inputs)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run / "tensorboard"))
    imaging = imaging_settings(dataset, split["fit"] + split["validation"], task.input_method)
    policy = EpochPolicy(run, task, selection, optimizer, scheduler, step, evaluator, distributed, writer, imaging)
    policy.attach(trainer)
    if until is not None:
        @trainer.on(Events.EPOCH_COMPLETED)
        def _pause(engine: Engine) -> None:  # after the policy's handler: last.pt holds this epoch
            if engine.state.epoch >= until and not policy.stopped_early:
                engine.terminate()
    if progress and distributed.is_main:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False, desc=f"{config.task} {_weight_text(config)}".strip()).attach(
            trainer, output_transform=lambda output: {"loss": float(output["loss"].mean())})

    if resume is not None:
        policy.load_state_dict(resume["policy"])
        torch.set_rng_state(resume["rng"]["torch"])
        if torch.cuda.is_available() and resume["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        trainer.load_state_dict(resume["trainer"])
        log.info("%s: resuming after epoch %d of %d", run, resume["trainer"]["epoch"], config.epochs)
    log.info("%s: training %s on %d slices (%d patients), validating on %d slices (%d patients), %s, %d process(es); "
             "best epoch by %s (%s, relative threshold %g)", run, f"{config.task} {_weight_text(config)}".strip(),
             split["fit_slices"], len(split["fit"]), split["validation_slices"], len(split["validation"]),
             distributed.device, distributed.world_size, selection.metric, selection.mode, selection.threshold)
    done = resume["trainer"]["epoch"] if resume is not None else 0
    already = resume is not None and (resume["policy"]["stopped_early"] or done >= config.epochs)
    if not already and (until is None or done < until):
        trainer.run()
    if writer is not None:
        writer.close()
    if not policy.stopped_early and len(policy.history) < config.epochs:  # paused by ``until``
        log.info("%s: paused after epoch %d of %d", run, len(policy.history), config.epochs)
        return None
    seconds = sum(row["seconds"] for row in policy.history)  # every epoch, including those before a resume
    summary = TrainingSummary(task=config.task, weight=config.weight, epochs=len(policy.history), best_epoch=policy.best_epoch,
                              best_score=policy.best_score, stopped_early=policy.stopped_early, seconds=seconds,
                              world_size=distributed.world_size, device=str(distributed.device),
                              fit_slices=split["fit_slices"], validation_slices=split["validation_slices"],
                              selection=asdict(selection) | {"best_value": policy.best_value})
    if distributed.is_main:
        save_json(run / "summary.json", asdict(summary) | {"split": split})
    if dist.is_initialized():
        dist.barrier()
    return summary


def _weight_text(config: TrainingConfig) -> str:
    if config.task == "segmentation":
        return ""
    return f"{'C' if config.task == 'joint' else 'alpha'}={config.weight:g}"


def _read_resume_state(run: Path, config: TrainingConfig) -> dict[str, Any] | None:
    path = run / "last.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a damaged file
        # Not torch's text: for a file of pickled objects it advises unsafe loading (weights_only=False).
        raise DataError(path, f"not a TaskAdaptiveCT resume state (PyTorch cannot read it as one: {type(exc).__name__}); "
                              "delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise DataError(path, "not a resume state of this project; delete it to start over")
    if state["config"] != asdict(config):
        raise ConfigError(f"{path} was written by a run with another configuration; use a new output folder")
    return state

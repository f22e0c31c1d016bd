"""Reconstruction losses with a segmentation task term: task-adaptive and joint training.

Both are ``(1 - w) * MSE(f(x_L), x_N) + w * Dice(g(f(x_L)), z_N)`` (paper eq. 9 and eq. 1);
they differ only in the segmentation network g:

* task-adaptive (the paper's method, weight ``alpha``): g is pre-trained and *frozen*:
  always in eval mode (batch-norm statistics never update), its parameters never receive
  gradients, yet gradients flow through it into f;
* joint (Adler et al., weight ``C``): g is trained together with f.

``alpha = 0`` is the plain "Base U-Net" (MSE only). Dice is MONAI's ``DiceLoss`` on the
softmax of g's logits against one-hot labels, over all three classes, with MONAI's small
smoothing terms (the epsilon of the paper's eq. 7).

The two terms live on different scales: on normalised attenuation the MSE of a good
reconstruction is about 1e-3, the Dice loss 0.1-0.5, so in the paper's plain form a small
weight already hands the Dice term most of the gradient. The *normalised* form divides each
term by a reference scale (:class:`LossScales`, by default measured by :func:`term_scales`
for a reference reconstructor such as a trained Base U-Net):
``(1 - w) * MSE / mse_ref + w * Dice / dice_ref``, so that ``w`` is the Dice term's share
of the loss at the reference. The plain form (scales 1) stays the default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from monai.losses import DiceLoss
from torch import nn


@dataclass(frozen=True)
class LossScales:
    """Reference values that divide the two loss terms (both 1: the paper's plain loss).

    Args:
        mse: the reference MSE (squared normalised attenuation), positive.
        dice_loss: the reference soft Dice loss (no unit, in (0, 1]), positive.
    """

    mse: float = 1.0
    dice_loss: float = 1.0

    def __post_init__(self) -> None:
        for name in ("mse", "dice_loss"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"the reference {name} must be a positive number, got {value}")

    @property
    def plain(self) -> bool:
        return self.mse == 1.0 and self.dice_loss == 1.0


def _check_weight(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


class FrozenNetwork(nn.Module):
    """Wraps a network so that it stays in eval mode with no trainable parameters.

    ``train()`` on this module (or on anything that contains it) leaves the wrapped
    network in eval mode, so batch-norm running statistics and dropout stay fixed.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.eval()
        self.network.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenNetwork:
        super().train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


class TaskWeightedLoss(nn.Module):
    """``(1 - weight) * MSE + weight * Dice(segmenter(reconstruction), labels)``.

    Args:
        segmenter: the segmentation network g, ``(B, 1, H, W) -> (B, 3, H, W)`` logits.
        weight: alpha (task-adaptive) or C (joint), in [0, 1].
        freeze_segmenter: freeze g (task-adaptive) or leave it trainable (joint).
        scales: the reference scales of the normalised form (default: the plain loss);
            :attr:`scales` may also be set later, e.g. once :func:`term_scales` has measured them.

    ``forward(reconstruction (B, 1, H, W), full_dose (B, 1, H, W), labels (B, 1, H, W) int)``
    returns the batch mean of the loss; :meth:`terms` returns it per slice with its parts.
    """

    def __init__(self, segmenter: nn.Module, weight: float, freeze_segmenter: bool,
                 scales: LossScales = LossScales()) -> None:
        super().__init__()
        self.weight = _check_weight("alpha" if freeze_segmenter else "C", weight)
        self.segmenter = FrozenNetwork(segmenter) if freeze_segmenter else segmenter
        self.dice = dice_loss()
        self.scales = scales

    def terms(self, reconstruction: torch.Tensor, full_dose: torch.Tensor, labels: torch.Tensor,
              with_dice: bool = False) -> dict[str, torch.Tensor]:
        """Per-slice ``loss``, ``mse`` and ``dice_loss`` (each ``(B,)``) and g's ``logits``.

        With ``weight = 0`` the segmentation pass is skipped (``dice_loss`` and ``logits`` are
        absent) unless ``with_dice`` asks for it, e.g. to monitor the Base U-Net's task quality.
        """
        if reconstruction.shape != full_dose.shape or reconstruction.shape[0] != labels.shape[0]:
            raise ValueError(f"shapes differ: reconstruction {tuple(reconstruction.shape)}, "
                             f"full dose {tuple(full_dose.shape)}, labels {tuple(labels.shape)}")
        mse = (reconstruction.float() - full_dose.float()).square().flatten(1).mean(1)
        out = {"mse": mse, "loss": mse}
        if self.weight == 0.0 and not with_dice:  # the Base U-Net: no segmentation pass at all
            return out
        logits = self.segmenter(reconstruction).float()
        out["logits"] = logits
        out["dice_loss"] = self.dice(logits, labels).flatten(1).mean(1)
        if self.weight > 0.0:
            out["loss"] = ((1.0 - self.weight) * mse / self.scales.mse
                           + self.weight * out["dice_loss"] / self.scales.dice_loss)
        return out

    def forward(self, reconstruction: torch.Tensor, full_dose: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.terms(reconstruction, full_dose, labels)["loss"].mean()


@torch.no_grad()
def term_scales(reconstructor: nn.Module, loss: TaskWeightedLoss,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> LossScales:
    """Each loss term's mean over slices for ``reconstructor``: the scales of the normalised loss.

    Args:
        reconstructor: the reference f (e.g. a trained Base U-Net), run in eval mode.
        loss: the loss whose g scores the reconstructions.
        batches: ``(low dose, full dose, labels)`` batches, e.g. the validation slices.

    Raises:
        ValueError: no slices, or a term that is zero or not finite (it cannot divide).
    """
    was_training = reconstructor.training
    reconstructor.eval()
    sums, count = torch.zeros(2, dtype=torch.float64), 0
    try:
        for low_dose, full_dose, labels in batches:
            terms = loss.terms(reconstructor(low_dose), full_dose, labels, with_dice=True)
            sums += torch.stack([terms["mse"].double().sum(), terms["dice_loss"].double().sum()]).cpu()
            count += low_dose.shape[0]
    finally:
        reconstructor.train(was_training)
    if count == 0:
        raise ValueError("no slices to measure the loss terms on")
    mse, dice = (sums / count).tolist()
    return LossScales(mse=mse, dice_loss=dice)


def dice_loss() -> DiceLoss:
    """The task loss: MONAI's soft Dice on softmax(logits) vs one-hot labels, over all 3 classes, per slice.

    ``dice_loss()(logits (B, 3, H, W), labels (B, 1, H, W))`` is ``(B, 3, 1, 1)``; its mean
    over classes is the paper's eq. 8 for each slice, and its overall mean the batch loss.
    """
    return DiceLoss(to_onehot_y=True, softmax=True, reduction="none")


def task_adaptive_loss(segmenter: nn.Module, alpha: float) -> TaskWeightedLoss:
    """The paper's loss (eq. 9): g pre-trained and frozen; ``alpha = 0`` is the Base U-Net."""
    return TaskWeightedLoss(segmenter, alpha, freeze_segmenter=True)


def joint_loss(segmenter: nn.Module, c: float) -> TaskWeightedLoss:
    """Adler et al.'s joint training (eq. 1): g trained with f; optimise both parameter sets."""
    return TaskWeightedLoss(segmenter, c, freeze_segmenter=False)

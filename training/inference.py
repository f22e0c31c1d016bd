"""Applying trained networks: f to a data set's low-dose scans, g to any images.

* :func:`segment_images` runs the segmentation network g on a stack of images and returns
  hard label maps (the argmax of its three class logits);
* :func:`reconstruct_images` runs a reconstruction network f on a stack of images;
* :func:`reconstruct_dataset` (``tact reconstruct``) applies a trained f to every low-dose
  slice of a data set and writes its volumes beside the baselines'
  (``lowdose/labels/<method>/<case>.nii``, HU, float32), so that ``tact evaluate`` can
  compare it with them (method names: :mod:`training.methods`);
* :func:`reconstruct_volume`, :func:`segment_volume` and :func:`reconstruct_and_segment`
  apply f, g or both to a whole CT volume of any orientation and spacing, on the model's
  pixel grid (:class:`training.grid.ModelGrid`), and answer on the volume's own voxels
  (what the MONAI Label app serves).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import DynUNet
from monai.networks.utils import eval_mode
from torch import nn
from tqdm.auto import tqdm

from training.checkpoints import ModelFile, check_input_size, describe_model, load_reconstructor
from training.dataset import LOWDOSE, SimulatedDataset, volume_path
from training.fileio import save_nifti
from training.grid import ModelGrid, hu_to_network_input
from training.methods import check_trained_method_name, method_name, without_variant
from training.physics import normalized_to_hu
from training.provenance import hu_percentiles, input_warnings

log = logging.getLogger(__name__)

def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the first GPU where there is one and the CPU otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def downsampling_factor(network: nn.Module) -> int:
    """The total down-sampling factor of the U-Net inside ``network`` (``2**depth``).

    Image sides must be multiples of it. 1 when ``network`` holds no MONAI ``DynUNet``
    (nothing is known about it).
    """
    for module in network.modules():
        if isinstance(module, DynUNet):
            return int(np.prod([np.max(s) for s in module.strides]))
    return 1


def _check_images(images: np.ndarray, network: nn.Module) -> np.ndarray:
    """A ``(B, H, W)`` stack of finite floating-point images as float32, or a ValueError."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be a (B, H, W) stack of slices, got shape {images.shape}")
    if images.dtype.kind != "f":
        raise ValueError(f"images must be floating-point normalised attenuation, got dtype {images.dtype}")
    finite = np.isfinite(images).all(axis=(1, 2))
    if not finite.all():
        raise ValueError(f"images {np.flatnonzero(~finite)[:10].tolist()} of the stack contain NaN or infinite values")
    factor = downsampling_factor(network)
    if images.shape[1] % factor or images.shape[2] % factor:
        raise ValueError(f"the network down-samples by {factor}: image sides must be multiples of it, "
                         f"got {images.shape[1]} x {images.shape[2]}")
    return images.astype(np.float32, copy=False)


def _network_device(network: nn.Module, device: str | torch.device | None) -> torch.device:
    """Where to run ``network``: ``device`` (the network is moved there), else where its weights are."""
    if device is not None:
        device = torch.device(device)
        network.to(device)
        return device
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _apply(network: nn.Module, images: np.ndarray, batch_size: int, device: str | torch.device | None,
           output: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """``output(network(batch))`` over ``images`` in batches, concatenated on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    images = _check_images(images, network)
    run_on = _network_device(network, device)
    results = []
    with eval_mode(network):  # fixed batch-norm statistics, no dropout, no autograd; mode restored after
        for start in range(0, images.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size, None])).to(run_on)
            results.append(output(network(batch)).cpu().numpy())
    return np.concatenate(results) if results else np.empty((0,) + images.shape[1:], dtype=np.float32)


def segment_images(
    segmenter: nn.Module,
    images: np.ndarray,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Label maps of g for a stack of images.

    Args:
        segmenter: the segmentation network g, ``(B, 1, H, W) -> (B, 3, H, W)`` logits (e.g.
            :func:`training.checkpoints.load_segmenter`); run in eval mode, its mode restored.
        images: ``(B, H, W)`` normalised attenuation (as :meth:`SimulatedDataset.slice`
            returns, not clipped), floating point, finite; H and W multiples of the
            network's down-sampling factor.
        batch_size: slices per forward pass.
        device: where to run g (it is moved there); by default where its weights are.

    Returns:
        ``(B, H, W)`` uint8 label maps: 0 background, 1 liver, 2 tumour.

    Raises:
        ValueError: for a wrong shape or dtype, NaN or infinite values, or a bad batch size.
    """
    labels = _apply(segmenter, images, batch_size, device, lambda logits: logits.argmax(1).to(torch.uint8))
    return labels.astype(np.uint8, copy=False)


def reconstruct_images(
    reconstructor: nn.Module,
    images: np.ndarray,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Reconstructions of f for a stack of low-dose images.

    Args:
        reconstructor: the reconstruction network f, ``(B, 1, H, W) -> (B, 1, H, W)`` (e.g.
            :func:`training.checkpoints.load_reconstructor`); run in eval mode.
        images: ``(B, H, W)`` low-dose scans as normalised attenuation (not clipped),
            floating point, finite.
        batch_size: slices per forward pass.
        device: where to run f (it is moved there); by default where its weights are.

    Returns:
        ``(B, H, W)`` float32 normalised attenuation (in (0, 1) for the project's f).

    Raises:
        ValueError: as :func:`segment_images`.
    """
    return _apply(reconstructor, images, batch_size, device, lambda out: out[:, 0].float()).astype(np.float32, copy=False)


def reconstruct_dataset(
    dataset: SimulatedDataset,
    checkpoint: str | Path,
    method: str | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> str:
    """Apply a trained f to every low-dose slice of the data set and store it as a method.

    Writes ``lowdose/labels/<method>/<case>.nii`` for every case: HU float32 on the
    low-dose volume's grid (same shape and affine), then records the model's provenance
    (:func:`training.checkpoints.describe_model`) as ``dataset.methods[method]``. The record
    is dropped before the first volume is written and rewritten after the last, so an
    interrupted run is not taken for a finished one (:meth:`SimulatedDataset.has_method`).

    Args:
        dataset: the simulated data set (its manifest is updated and saved).
        checkpoint: a ``reconstruction`` or ``joint`` model file (a run's ``best.pt``).
        method: the name to store it under; by default the model's own
            (:func:`training.methods.method_name`: ``baseunet``, ``ta0.5``, ``joint0.9``).
        batch_size: slices per forward pass.
        device: ``cpu``, ``cuda``, ...; by default the first GPU where there is one.
        progress: show a progress bar over slices.

    Returns:
        the method name written.

    Raises:
        DataError: an unusable model file, or one whose U-Net cannot take the data set's slices.
        ValueError: a method name that collides with the data set's volumes or is unknown, or
            a bad batch size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    reconstructor, model = load_reconstructor(checkpoint)
    natural = method_name(model.task, model.weight)
    method = natural if method is None else method
    check_trained_method_name(method)
    if without_variant(method) != natural:  # a variant tag names how it was trained; another weight misleads
        log.warning("writing the %s model %s (its own name: %s) as method %r", model.task, model.path, natural, method)
    check_input_size(model, dataset.settings["size"])
    run_on = default_device(device)
    reconstructor.to(run_on)

    dataset.methods.pop(method, None)
    dataset.save_manifest()
    slices = dataset.slices("all")
    with tqdm(total=len(slices), desc=method, unit="slice", disable=not progress) as bar:
        for case in dataset.case_ids("all"):
            refs = [ref for ref in slices if ref.case == case]
            images = []
            for start in range(0, len(refs), batch_size):
                batch = np.stack([dataset.slice(LOWDOSE, ref) for ref in refs[start : start + batch_size]])
                images.append(reconstruct_images(reconstructor, batch, batch_size, run_on))
                bar.update(batch.shape[0])
            volume = np.concatenate(images).transpose(1, 2, 0)  # (Z, N, N) -> (N, N, Z), slices on the last axis
            affine = dataset.volume(LOWDOSE, case).affine
            save_nifti(volume_path(dataset.root, method, case), normalized_to_hu(volume), affine, f"{method} HU")
    dataset.methods[method] = describe_model(model)
    dataset.save_manifest()
    log.info("wrote %s for %d case(s) (%d slices) from %s", method, len(dataset.cases), len(slices), model.path)
    return method


# ---------------------------------------------------------------------------------------
# Whole volumes, on their own voxel grid (the server's unit of work)

Progress = Callable[[int, int], None]
"""Called as ``progress(slices_done, slices_total)`` after each batch."""


@dataclass
class VolumeResult:
    """What :func:`reconstruct_and_segment` and friends return, on the input volume's voxels.

    Attributes:
        reconstruction_hu: ``(X, Y, Z)`` float32 HU of f's output, or None.
        labels: ``(X, Y, Z)`` uint8 labels of g (0 background, 1 liver, 2 tumour), or None.
        warnings: how the input differs from the models' training data (may be empty).
        model_spacing_mm: the in-plane pixel spacing the networks ran at.
        resampled: whether slices were resampled to reach it.
        uncertainty: g's mean softmax entropy over the body (pixels of the input above
            ``BODY_HU``), normalised to [0, 1] (1: all three classes equally likely); NaN
            when g did not run or there is no body.
    """

    reconstruction_hu: np.ndarray | None = None
    labels: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    model_spacing_mm: tuple[float, float] = (0.0, 0.0)
    resampled: bool = False
    uncertainty: float = float("nan")


BODY_HU = -500.0
"""Pixels of the input above this are the body, over which g's uncertainty is averaged."""


def mean_entropy(probabilities: np.ndarray, mask: np.ndarray) -> float:
    """Mean over ``mask`` of the softmax entropy of ``(N, C, H, W)`` probabilities, divided by log C (so in [0, 1])."""
    p = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=1) / np.log(probabilities.shape[1])
    return float(entropy[mask].mean()) if mask.any() else float("nan")


def model_grid(model: ModelFile, shape: tuple[int, int, int], affine: np.ndarray) -> ModelGrid:
    """How a volume maps to ``model``'s pixel grid.

    A model file that does not record its imaging settings (version 1) runs at the
    input's own spacing.
    """
    factor = 2**model.network.depth
    if model.imaging is None:
        spacing = min(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :2], axis=0))
        return ModelGrid(tuple(shape), np.asarray(affine), (spacing, spacing * 1e6), factor)  # type: ignore[arg-type]
    span = model.imaging["pixel_spacing_mm"]
    return ModelGrid(tuple(shape), np.asarray(affine), (span["min"], span["max"]), factor)  # type: ignore[arg-type]


def _run_slices(network: nn.Module, images: np.ndarray, batch_size: int, device: torch.device,
                output: Callable[[torch.Tensor], torch.Tensor], progress: Progress | None,
                done: int, total: int) -> np.ndarray:
    results = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        results.append(_apply(network, batch, batch_size, device, output))
        if progress is not None:
            progress(done + start + batch.shape[0], total)
    return np.concatenate(results)


def _warnings(model: ModelFile, grid: ModelGrid, hu: np.ndarray, role: str) -> list[str]:
    spacing = float(np.sqrt(np.prod(grid.source_spacing_mm)))
    return [f"{role} ({model.path.name}): {text}" for text in input_warnings(model.imaging, spacing, hu_percentiles([hu]))]


def reconstruct_and_segment(
    hu: np.ndarray,
    affine: np.ndarray,
    reconstructor: tuple[nn.Module, ModelFile] | None = None,
    segmenter: tuple[nn.Module, ModelFile] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> VolumeResult:
    """f, g or f then g (the paper's pipeline) on a CT volume, answered on its own voxels.

    Slices are taken along the voxel axis closest to superior, in canonical orientation,
    resampled in-plane to the model's pixel spacing where the input's lies outside the
    trained range, and padded with air to sides the U-Net can down-sample
    (:class:`training.grid.ModelGrid`). g runs on f's output on the model grid (one
    resampling, not two); its class probabilities are resampled back before the argmax.

    Args:
        hu: ``(X, Y, Z)`` CT volume in HU, in the file's own voxel order, finite.
        affine: its ``(4, 4)`` voxel-to-RAS affine (mm), any direction.
        reconstructor: f and its model file (:func:`training.checkpoints.load_reconstructor`).
        segmenter: g and its model file; with ``reconstructor`` g segments f's output.
        batch_size: slices per forward pass.
        device: where to run (the networks are moved there); by default where their weights are.
        progress: called after each batch with (slices done, slices in all).

    Returns:
        a :class:`VolumeResult` with the input's shape (float32 HU and/or uint8 labels).

    Raises:
        ValueError: neither network given, or a volume that is not a finite 3-D array.
    """
    if reconstructor is None and segmenter is None:
        raise ValueError("give a reconstructor, a segmenter or both")
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"a CT volume must be 3-D (X, Y, Z), got shape {hu.shape}")
    if hu.dtype.kind not in "iuf":
        raise ValueError(f"a CT volume must hold numbers, got dtype {hu.dtype}")
    if not np.isfinite(hu).all():
        raise ValueError(f"the volume holds {int(np.isnan(hu).sum())} NaN and {int(np.isinf(hu).sum())} infinite values")
    first = reconstructor if reconstructor is not None else segmenter
    assert first is not None
    grid = model_grid(first[1], hu.shape, affine)
    images = grid.to_model(hu)
    body = images > float(hu_to_network_input(np.array(BODY_HU)))
    result = VolumeResult(model_spacing_mm=grid.model_spacing_mm, resampled=grid.resampled)
    total = images.shape[0] * (int(reconstructor is not None) + int(segmenter is not None))
    done = 0
    if reconstructor is not None:
        network, model = reconstructor
        result.warnings += _warnings(model, grid, hu, "reconstruction")
        run_on = _network_device(network, device)
        images = _run_slices(network, images, batch_size, run_on, lambda out: out[:, 0].float(), progress, done, total)
        done += images.shape[0]
        result.reconstruction_hu = normalized_to_hu(grid.from_model(images))
    if segmenter is not None:
        network, model = segmenter
        if reconstructor is None:
            result.warnings += _warnings(model, grid, hu, "segmentation")
        run_on = _network_device(network, device)
        probabilities = _run_slices(network, images, batch_size, run_on, lambda logits: logits.float().softmax(1),
                                    progress, done, total)
        result.labels = grid.labels_from_model(probabilities)
        result.uncertainty = mean_entropy(probabilities, body)
    return result


def reconstruct_volume(hu: np.ndarray, affine: np.ndarray, reconstructor: tuple[nn.Module, ModelFile],
                       **kwargs) -> VolumeResult:
    """f on a CT volume (see :func:`reconstruct_and_segment`)."""
    return reconstruct_and_segment(hu, affine, reconstructor=reconstructor, **kwargs)


def segment_volume(hu: np.ndarray, affine: np.ndarray, segmenter: tuple[nn.Module, ModelFile],
                   **kwargs) -> VolumeResult:
    """g on a (full-dose or reconstructed) CT volume (see :func:`reconstruct_and_segment`)."""
    return reconstruct_and_segment(hu, affine, segmenter=segmenter, **kwargs)

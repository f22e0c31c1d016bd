"""Classical baselines: FBP with a tuned Hann filter, and BM3D (``tact baseline``).

Both write per-case volumes into the data set (``lowdose/labels/{fbp,bm3d}/<case>.nii``)
and record their parameters, and what they were chosen on, in ``dataset.json``. Tuning
uses training-split slices only; the test split is never looked at.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from training.dataset import SimulatedDataset, SliceRef, volume_path, worker_dataset
from training.fileio import save_nifti
from training.metrics import roi_psnr_ssim
from training.parallel import process_pool
from training.physics import DEFAULT_HANN_SCALING, normalized_to_hu, simulator_for

log = logging.getLogger(__name__)

DEFAULT_BM3D_SIGMA = 0.075
"""The paper's sigma_psd for BM3D, in units of the normalised image."""
FBP_SCALING_GRID = tuple(np.round(np.arange(0.30, 1.0001, 0.05), 3))
BM3D_SIGMA_GRID = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4)


@dataclass(frozen=True)
class _Job:
    """One slice of work for a pool worker (workers reopen the memory-mapped data set)."""

    root: str
    method: str
    ref: SliceRef
    parameter: float


def fbp_slice(dataset: SimulatedDataset, ref: SliceRef, frequency_scaling: float) -> np.ndarray:
    """Hann-filtered FBP of one slice's stored projection data, normalised ``(N, N)``."""
    simulator = simulator_for(dataset.geometry(ref.case))
    return simulator.fbp(np.asarray(dataset.sinogram(ref.case)[ref.index]), "Hann", frequency_scaling)


def bm3d_slice(dataset: SimulatedDataset, ref: SliceRef, sigma_psd: float) -> np.ndarray:
    """BM3D of one slice's low-dose scan (normalised units), ``(N, N)`` float32."""
    import bm3d

    return np.asarray(bm3d.bm3d(dataset.slice("lowdose", ref), sigma_psd=sigma_psd), dtype=np.float32)


_RECONSTRUCTORS = {"fbp": fbp_slice, "bm3d": bm3d_slice}


def _reconstruct(job: _Job) -> np.ndarray:
    return _RECONSTRUCTORS[job.method](worker_dataset(job.root), job.ref, job.parameter)


def _roi_psnr(job: _Job) -> float:
    reference = worker_dataset(job.root).slice("fulldose", job.ref)
    return roi_psnr_ssim(_reconstruct(job), reference)[0]


def _sweep(
    dataset: SimulatedDataset,
    method: str,
    values: Sequence[float],
    max_slices: int,
    seed: int,
    workers: int | None,
    progress: bool,
    desc: str,
) -> tuple[float, dict[float, float]]:
    """Mean ROI PSNR of each parameter value on a seeded random subset of training slices."""
    train = dataset.slices("train")
    if not train:
        raise ValueError(f"{dataset.root}: the training split holds no slices to tune on")
    rng = np.random.default_rng(seed)
    subset = [train[i] for i in sorted(rng.choice(len(train), size=min(max_slices, len(train)), replace=False))]
    jobs = [_Job(str(dataset.root), method, ref, float(v)) for v in values for ref in subset]
    with process_pool(workers) as pool:
        scores = list(tqdm(pool.imap(_roi_psnr, jobs), total=len(jobs), desc=desc, unit="slice", disable=not progress))
    table = {float(v): float(np.mean(scores[i * len(subset) : (i + 1) * len(subset)])) for i, v in enumerate(values)}
    best = max(table, key=table.__getitem__)
    log.info("%s: mean PSNR by parameter on %d training slices: %s; best %s", desc, len(subset), table, best)
    if best in (min(table), max(table)):
        log.warning("%s: the best value %s is at the edge of the grid %s; the optimum may lie beyond it", desc, best, list(table))
    return best, table


def tune_fbp_scaling(
    dataset: SimulatedDataset,
    values: Sequence[float] = FBP_SCALING_GRID,
    max_slices: int = 16,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[float, dict[float, float]]:
    """The Hann frequency scaling with the best mean ROI PSNR on training slices, and the table."""
    return _sweep(dataset, "fbp", values, max_slices, seed, workers, progress, "tune FBP")


def sweep_bm3d_sigma(
    dataset: SimulatedDataset,
    values: Sequence[float] = BM3D_SIGMA_GRID,
    max_slices: int = 8,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[float, dict[float, float]]:
    """BM3D's ``sigma_psd`` with the best mean ROI PSNR on a random training subset (the paper's sweep)."""
    return _sweep(dataset, "bm3d", values, max_slices, seed, workers, progress, "sweep BM3D")


def _write_method(
    dataset: SimulatedDataset,
    method: str,
    parameter: float,
    workers: int | None,
    progress: bool,
) -> None:
    """Reconstruct every slice with ``method`` and write one volume per case, case by case.

    The method's manifest record is dropped first and rewritten by the caller when all
    cases are done, so an interrupted run is not mistaken for a finished one.
    """
    dataset.methods.pop(method, None)
    dataset.save_manifest()
    slices = dataset.slices("all")
    with process_pool(workers) as pool, tqdm(total=len(slices), desc=method, unit="slice", disable=not progress) as bar:
        for case in dataset.case_ids("all"):
            refs = [r for r in slices if r.case == case]
            images = []
            for image in pool.imap(_reconstruct, [_Job(str(dataset.root), method, r, parameter) for r in refs]):
                images.append(image)
                bar.update()
            affine = dataset.volume("lowdose", case).affine
            save_nifti(volume_path(dataset.root, method, case), normalized_to_hu(np.stack(images, axis=-1)), affine, f"{method} HU")


def run_fbp(
    dataset: SimulatedDataset,
    frequency_scaling: float | None = None,
    workers: int | None = None,
    progress: bool = True,
    tune_slices: int = 16,
) -> float:
    """Write the Hann FBP baseline for every case; returns the frequency scaling used.

    With ``frequency_scaling=None`` it is tuned on the training split; if that split is
    empty, LoDoPaB's 0.641 is used and the manifest says so.

    Raises:
        ValueError: a ``frequency_scaling`` outside (0, 1], before the data set is touched
            (writing starts by dropping the manifest's ``fbp`` record).
    """
    if frequency_scaling is not None and not 0.0 < frequency_scaling <= 1.0:
        raise ValueError(f"frequency_scaling must be in (0, 1], got {frequency_scaling}")
    tuned_on, table = None, None
    if frequency_scaling is None:
        if dataset.slices("train"):
            frequency_scaling, table = tune_fbp_scaling(dataset, max_slices=tune_slices, workers=workers, progress=progress)
            tuned_on = f"{min(tune_slices, len(dataset.slices('train')))} training slices"
        else:
            log.warning("%s: no training slices to tune the FBP on; using LoDoPaB's scaling %s", dataset.root, DEFAULT_HANN_SCALING)
            frequency_scaling = DEFAULT_HANN_SCALING
    _write_method(dataset, "fbp", frequency_scaling, workers, progress)
    dataset.methods["fbp"] = {"filter": "Hann", "frequency_scaling": frequency_scaling, "tuned_on": tuned_on, "sweep": table}
    dataset.save_manifest()
    return frequency_scaling


def run_bm3d(
    dataset: SimulatedDataset,
    sigma_psd: float = DEFAULT_BM3D_SIGMA,
    sweep: bool = False,
    workers: int | None = None,
    progress: bool = True,
    sweep_slices: int = 8,
) -> float:
    """Write the BM3D baseline (denoised low-dose scans) for every case; returns sigma_psd used.

    Raises:
        ValueError: a ``sigma_psd`` that is not a positive finite number (unless ``sweep``
            picks it), before the data set is touched.
    """
    table = None
    if sweep:
        sigma_psd, table = sweep_bm3d_sigma(dataset, max_slices=sweep_slices, workers=workers, progress=progress)
    elif not (math.isfinite(sigma_psd) and sigma_psd > 0):
        raise ValueError(f"sigma_psd must be a positive finite number, got {sigma_psd}")
    _write_method(dataset, "bm3d", sigma_psd, workers, progress)
    dataset.methods["bm3d"] = {"sigma_psd": sigma_psd, "input": "lowdose", "sweep": table}
    dataset.save_manifest()
    return sigma_psd

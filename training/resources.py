"""Memory estimates of the commands whose memory grows with the image size, checked before any work.

A ``--size`` of 100000 pixels would otherwise end, minutes in, in a failed allocation. Each
estimate is a small formula in the sizes that matter, calibrated on real runs of the
command on this project's reference machine (2 cores, 23 GiB, Python 3.11, astra_cpu): the peak resident
memory of the command's whole process tree (the main process and its pool workers),
sampled every 20 ms, with ``/usr/bin/time -v`` as a cross-check for single processes. Each
coefficient is rounded up from the measurements (given in each function's docstring), so
an estimate is meant to be somewhat above the real peak and never far below it. The
commands compare the estimate with the machine's total physical memory
(:func:`physical_memory`): a run that cannot fit even on an idle machine is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

MIB = 2**20
GIB = 2**30

SAMPLE_SHAPE = (512, 512, 20)
"""Voxels of the real sample (:mod:`training.sample_data`): the demo's input volume."""


@dataclass(frozen=True)
class MemoryEstimate:
    """An estimated peak memory: ``total`` bytes, and ``detail``, how it adds up (for messages)."""

    total: int
    detail: str


def physical_memory() -> int:
    """Total physical memory of this machine, bytes."""
    return int(psutil.virtual_memory().total)


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def phantom_memory(size: int, slices: int) -> MemoryEstimate:
    """Peak memory of ``tact phantom`` (one volume at a time, so ``--volumes`` does not count).

    Measured peaks (``size x slices``: MiB): 128 x 8: 93; 512 x 32: 374; 512 x 128: 1,209;
    512 x 256: 2,295; 1024 x 32: 1,208. That is about 34 bytes per voxel (the distance
    fields, texture, HU and label volumes of the renderer) over about 100 MiB of imports.
    Estimate: 200 MiB + 40 bytes per voxel.
    """
    voxels = size * size * slices
    total = 200 * MIB + 40 * voxels
    return MemoryEstimate(total, f"{size} x {size} x {slices} voxels at about 40 bytes each")


def largest_volume_shape(paths: Sequence[str | Path]) -> tuple[int, ...]:
    """The shape of the input volume with the most voxels, read from the files' headers only.

    A volume whose header cannot be read is skipped here; the loader reports it later.
    """
    import nibabel as nib

    shapes = []
    for path in paths:
        try:
            shapes.append(tuple(int(n) for n in nib.load(str(path)).shape))
        except Exception:  # noqa: BLE001 - any unreadable header: the loader names the problem
            continue
    return max(shapes, key=_voxels, default=(1, 1, 1))


def _voxels(shape: Sequence[int]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def simulation_memory(size: int, angles: int, workers: int, source_shape: Sequence[int]) -> MemoryEstimate:
    """Peak memory of ``tact simulate``: the main process plus ``workers`` pool processes.

    * Each worker holds the ODL operators of one geometry and works on one slice: the 2x
      upsampled image and the projection data (``angles x`` about ``1.42 size`` detector
      bins), FFT-padded for the filtering. Measured worker peaks (``size / angles``: MiB):
      128/200: 236; 256/500: 253; 512/1000: 318; 1024/1000: 388; 2048/250: 347;
      2048/1000: 582, i.e. about 240 MiB + 8 bytes per pixel + 160 bytes per angle and
      pixel row. Estimate: 256 MiB + 24 bytes x size^2 + 200 bytes x angles x size.
    * The main process imports MONAI (1.45 GiB resident when it resamples; 0.3 GiB
      without), then either loads one source volume (its HU, labels and working copies:
      about 23 bytes per source voxel, measured as the difference between 512 x 512 x 16
      and 512 x 512 x 128 inputs) or assembles one case's output (per output slice: the
      full-dose, low-dose and FBP images, 4 bytes x size^2 each, with copies; the
      sinogram, 4 bytes x angles x 1.42 size, twice). The output slices are at most the
      source's slices. Estimate: 1.5 GiB + the larger of 24 bytes x source voxels and
      source slices x (24 bytes x size^2 + 12 bytes x angles x size).
    """
    source_voxels = _voxels(source_shape)
    source_slices = int(source_shape[2]) if len(source_shape) > 2 else 1
    worker = 256 * MIB + 24 * size * size + 200 * angles * size
    load = 24 * source_voxels
    assemble = source_slices * (24 * size * size + 12 * angles * size)
    main = int(1.5 * GIB) + max(load, assemble)
    total = main + workers * worker
    return MemoryEstimate(total, f"main process {_gib(main)} + {workers} worker(s) x {_gib(worker)} for "
                                 f"{size} x {size} px slices, {angles} angles")


def demo_memory(size: int, angles: int, workers: int, source_shape: Sequence[int] = SAMPLE_SHAPE) -> MemoryEstimate:
    """Peak memory of ``tact demo``: its simulation stage, the largest of its stages.

    Measured whole-demo peaks are in the README of :mod:`training.resources` callers; the
    simulation estimate (:func:`simulation_memory`) was above each of them.
    """
    return simulation_memory(size, angles, workers, source_shape)

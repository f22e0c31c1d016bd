"""What the photon count N0 gives: noise and PSNR of the simulated scans against dose.

For a few slices of the real sample (``tact sample-data``), simulates the low-dose data at
several N0 (same geometry as ``tact simulate``), and prints, per N0, the noise added
inside the liver (std of reconstruction minus full dose, HU) and the ROI PSNR, for the
ramp-filter low-dose scan and the Hann FBP baseline. Noise variance should scale as 1/N0.

    .venv/bin/python benchmarks/dose.py [--lits runs/demo/lits] [--slices 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.ndimage

from training.loaders import find_lits_cases, load_lits_case
from training.metrics import roi_psnr_ssim
from training.parallel import process_pool
from training.physics import DEFAULT_HANN_SCALING, ScanGeometry, hu_per_normalized_unit, poisson_data, simulator_for
from training.simulate import SimulationSettings, prepare_case

PHOTONS = (1024, 4096, 16384, 65536, 262144, 1048576)


def _measure(job: tuple[np.ndarray, np.ndarray, ScanGeometry, int]) -> dict[int, tuple[float, float, float, float]]:
    """Per N0: (ramp liver noise HU, Hann liver noise HU, ramp PSNR, Hann PSNR) for one slice."""
    x, liver, geometry, seed = job
    simulator = simulator_for(geometry)
    clean = simulator.project(x)
    rng = np.random.default_rng(seed)
    core = scipy.ndimage.binary_erosion(liver, iterations=3)  # keep away from the liver's edge
    results = {}
    for photons in PHOTONS:
        data = poisson_data(clean, photons, rng)
        ramp, hann = simulator.fbp(data), simulator.fbp(data, "Hann", DEFAULT_HANN_SCALING)
        noise = [float(np.std((r - x)[core]) * hu_per_normalized_unit()) for r in (ramp, hann)]
        results[photons] = (*noise, roi_psnr_ssim(ramp, x)[0], roi_psnr_ssim(hann, x)[0])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lits", type=Path, default=Path("runs/demo/lits"), help="LiTS folder (default: %(default)s)")
    parser.add_argument("--slices", type=int, default=4, help="evenly spaced slices to use (default: %(default)s)")
    args = parser.parse_args()

    case_id, volume_file, segmentation_file = find_lits_cases(args.lits)[0]
    prepared = prepare_case(load_lits_case(volume_file, segmentation_file, case_id), SimulationSettings())
    geometry = ScanGeometry(prepared.x_full.shape[0], prepared.extent_m, 1000)
    picks = np.linspace(0, prepared.x_full.shape[2] - 1, args.slices).round().astype(int)
    jobs = [(prepared.x_full[:, :, z], prepared.labels[:, :, z] > 0, geometry, int(z)) for z in picks]
    with process_pool() as pool:
        per_slice = pool.map(_measure, jobs)
    print(f"case {case_id}: {len(jobs)} slices, {geometry.size}² px of {geometry.pixel_size_mm:.3f} mm, 1000 angles")
    print(f"{'N0':>9} {'ramp noise HU':>14} {'Hann noise HU':>14} {'ramp PSNR':>10} {'Hann PSNR':>10}")
    for photons in PHOTONS:
        values = np.mean([s[photons] for s in per_slice], axis=0)
        print(f"{photons:>9} {values[0]:>14.1f} {values[1]:>14.1f} {values[2]:>10.2f} {values[3]:>10.2f}")


if __name__ == "__main__":
    main()

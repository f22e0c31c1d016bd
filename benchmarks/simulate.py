"""Throughput of `tact simulate` against a single-process ODL reference, in one run.

Both paths do the same work per slice: a 2x upsampled forward projection, Poisson noise,
a ramp FBP (the low-dose scan) and a Hann FBP (the baseline). The reference is written
here directly against ODL, in one process; the project's path is `simulate_dataset` with
every core (process pool, file output included). Each path runs in its own subprocess,
whose process tree's resident memory is sampled to report the peak.

    .venv/bin/python benchmarks/simulate.py [--slices 8] [--size 512] [--angles 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REFERENCE = r"""
import sys, time, json, numpy as np, nibabel as nib, odl, scipy.ndimage
from training.physics import MU_MAX, hu_to_normalized
lits, angles, photons, impl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
image = nib.as_closest_canonical(nib.load(lits + "/volume-0.nii.gz"))
hu = image.get_fdata(dtype=np.float32)
n, extent = hu.shape[0], hu.shape[0] * float(image.header.get_zooms()[0]) / 1000
start = time.perf_counter()
space = odl.uniform_discr([-extent / 2] * 2, [extent / 2] * 2, (n, n), dtype="float32")
fine = odl.uniform_discr([-extent / 2] * 2, [extent / 2] * 2, (2 * n, 2 * n), dtype="float32")
geometry = odl.tomo.parallel_beam_geometry(space, num_angles=angles)
ray, fine_ray = odl.tomo.RayTransform(space, geometry, impl=impl), odl.tomo.RayTransform(fine, geometry, impl=impl)
ramp = odl.tomo.fbp_op(ray, filter_type="Ram-Lak", frequency_scaling=1.0)
hann = odl.tomo.fbp_op(ray, filter_type="Hann", frequency_scaling=0.641)
rng = np.random.default_rng(0)
for k in range(hu.shape[2]):
    x = hu_to_normalized(hu[:, :, k])
    counts = rng.poisson(photons * np.exp(-MU_MAX * fine_ray(scipy.ndimage.zoom(x, 2, order=1, grid_mode=True, mode="nearest")).asarray()))
    data = -np.log(np.maximum(counts, 0.1) / photons) / MU_MAX
    low, base = ramp(data), hann(data)
print(json.dumps({"seconds": time.perf_counter() - start, "slices": hu.shape[2]}))
"""

PROJECT = r"""
import sys, time, json
from training.simulate import SimulationSettings, simulate_dataset
lits, out, angles, photons, impl, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
start = time.perf_counter()
dataset = simulate_dataset(lits, out, SimulationSettings(photons=photons, num_angles=angles, size=size, keep_empty=True, test_fraction=0),
                           impl=impl, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "slices": len(dataset.slices())}))
"""


def _tree_rss_mib(parent: psutil.Process) -> float:
    """Resident memory of a process and its descendants; 0 if it changed while sampled."""
    try:
        return sum(p.memory_info().rss for p in (parent, *parent.children(recursive=True))) / 2**20
    except psutil.Error:  # a process ended between listing and sampling: skip this sample
        return 0.0


def run_measured(args: list[str]) -> tuple[dict, float]:
    """Run a Python snippet in a subprocess; return its JSON output and peak tree RSS (MiB)."""
    process = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(process.pid)
        while not done.is_set():
            peak = max(peak, _tree_rss_mib(parent))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed with exit status {process.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--angles", type=int, default=1000)
    parser.add_argument("--photons", type=float, default=4096)
    args = parser.parse_args()

    from training.parallel import default_workers
    from training.phantom import write_phantom_dataset
    from training.physics import default_impl

    impls = ["astra_cpu"] + (["astra_cuda"] if default_impl() == "astra_cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        lits = Path(tmp) / "lits"
        write_phantom_dataset(lits, 1, size=args.size, slices=args.slices, seed=0, progress=False)
        rows = []
        for impl in impls:
            ref, ref_peak = run_measured([REFERENCE, str(lits), str(args.angles), str(args.photons), impl])
            ours, our_peak = run_measured([PROJECT, str(lits), f"{tmp}/out-{impl}", str(args.angles), str(args.photons), impl, str(args.size)])
            ref_rate, our_rate = ref["seconds"] / ref["slices"], ours["seconds"] / ours["slices"]
            rows.append((f"ODL reference, 1 process ({impl})", 1, ref["slices"], ref_rate, 1.0, ref_peak))
            rows.append((f"tact simulate ({impl})", default_workers(), ours["slices"], our_rate, ref_rate / our_rate, our_peak))
    print(f"\n{args.size}x{args.size} px, {args.angles} angles, 2x upsampled forward + Poisson (N0={args.photons:g}) + ramp and Hann FBP")
    print(f"{'path':<38} {'workers':>7} {'slices':>6} {'s/slice':>8} {'speed-up':>8} {'peak RSS MiB':>12}")
    for name, workers, slices, rate, speedup, peak in rows:
        print(f"{name:<38} {workers:>7} {slices:>6} {rate:>8.2f} {speedup:>7.2f}x {peak:>12.0f}")


if __name__ == "__main__":
    main()

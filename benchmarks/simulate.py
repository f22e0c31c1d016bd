"""Throughput of `tact simulate` against a single-process ODL reference, in one run.

Both paths do the same work per slice: a 2x upsampled forward projection, Poisson noise,
a ramp FBP (the low-dose scan) and a Hann FBP (the baseline). The reference is written
here directly against ODL, in one process; the project's path is `simulate_dataset` with
every core (process pool, file output included). A third row runs one copy of the
reference per core on its share of the slices: the most that spreading the same work over
this machine's cores can give. Each path runs in subprocesses, timed from start (imports
included) to end, whose process trees' resident memory is sampled to report the peak.

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
import sys, json, numpy as np, nibabel as nib, odl, scipy.ndimage
from training.physics import MU_MAX, hu_to_normalized
lits, angles, photons, impl, part, parts = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
image = nib.as_closest_canonical(nib.load(lits + "/volume-0.nii.gz"))
hu = image.get_fdata(dtype=np.float32)[:, :, part::parts]
n, extent = hu.shape[0], hu.shape[0] * float(image.header.get_zooms()[0]) / 1000
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
print(json.dumps({"slices": hu.shape[2]}))
"""

PROJECT = r"""
import sys, json
from training.simulate import SimulationSettings, simulate_dataset
lits, out, angles, photons, impl, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
dataset = simulate_dataset(lits, out, SimulationSettings(photons=photons, num_angles=angles, size=size, keep_empty=True, test_fraction=0),
                           impl=impl, progress=False)
print(json.dumps({"slices": len(dataset.slices())}))
"""


def _tree_rss_mib(parent: psutil.Process) -> float:
    """Resident memory of a process and its descendants; 0 if it changed while sampled."""
    try:
        return sum(p.memory_info().rss for p in (parent, *parent.children(recursive=True))) / 2**20
    except psutil.Error:  # a process ended between listing and sampling: skip this sample
        return 0.0


def run_measured(*commands: list[str]) -> tuple[float, int, float]:
    """Run Python snippets in concurrent subprocesses.

    Returns the wall time until the last one finished (s), the slices they reported in
    total, and the peak resident memory of all their process trees together (MiB).
    """
    start = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True) for args in commands]
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        parents = [psutil.Process(p.pid) for p in processes]
        while not done.is_set():
            peak = max(peak, sum(_tree_rss_mib(parent) for parent in parents))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outputs = [p.communicate()[0] for p in processes]
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if any(p.returncode != 0 for p in processes):
        raise SystemExit(f"a benchmark subprocess failed: exit status {[p.returncode for p in processes]}")
    slices = sum(json.loads(out.strip().splitlines()[-1])["slices"] for out in outputs)
    return wall, slices, peak


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
        workers = default_workers()
        rows = []
        for impl in impls:
            reference = [REFERENCE, str(lits), str(args.angles), str(args.photons), impl]
            ref_wall, ref_slices, ref_peak = run_measured(reference + ["0", "1"])
            # The ceiling: the reference itself, one copy per core, each on its share of slices.
            ceiling_wall, ceiling_slices, ceiling_peak = run_measured(*(reference + [str(k), str(workers)] for k in range(workers)))
            ours = [PROJECT, str(lits), f"{tmp}/out-{impl}", str(args.angles), str(args.photons), impl, str(args.size)]
            our_wall, our_slices, our_peak = run_measured(ours)
            ref_rate = ref_wall / ref_slices
            for name, n, wall, slices, peak in (
                (f"ODL reference, 1 process ({impl})", 1, ref_wall, ref_slices, ref_peak),
                (f"ODL reference, {workers} copies ({impl})", workers, ceiling_wall, ceiling_slices, ceiling_peak),
                (f"tact simulate ({impl})", workers, our_wall, our_slices, our_peak),
            ):
                rows.append((name, n, slices, wall / slices, ref_rate / (wall / slices), peak))
    print(f"\n{args.size}x{args.size} px, {args.angles} angles, 2x upsampled forward + Poisson (N0={args.photons:g}) + ramp and Hann FBP")
    print(f"{'path':<38} {'workers':>7} {'slices':>6} {'s/slice':>8} {'speed-up':>8} {'peak RSS MiB':>12}")
    for name, workers, slices, rate, speedup, peak in rows:
        print(f"{name:<38} {workers:>7} {slices:>6} {rate:>8.2f} {speedup:>7.2f}x {peak:>12.0f}")


if __name__ == "__main__":
    main()

"""Serving overhead of the MONAI Label app: end-to-end ``reconstruct_segment`` over HTTP against the bare networks.

For a 50-slice 512 x 512 CT volume in the app's datastore, the script times (after one
warm-up request) ``POST /infer/reconstruct_segment?image=...`` of a real ``monailabel
start_server`` process running the app, from the request to the last byte of the reply,
and divides by the slices: seconds per slice end to end. That includes reading the
volume, the model grid, both networks, writing the labels (the reply) and the
reconstruction (kept in the datastore), and HTTP. In the same run it times the bare
forward passes of the same two networks (f, then g on f's output, in batches of the app's
size) on the same slices in this process, and reports the ratio: the serving overhead.

Two inputs: at the model's pixel spacing (the networks see 512 x 512 slices; the overhead
is the app's bookkeeping) and at 0.8 mm (the slices are resampled to the model's grid and
back, as a real scan would be). Peak memory is the largest resident set of the server's
process tree, sampled every 50 ms during the timed requests.

    .venv/bin/python benchmarks/serve.py [--models apps/taskadaptive_ct/model] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from app_server import MonaiLabelServer  # noqa: E402  (the tests' server harness: the real server process)

from training.checkpoints import load_reconstructor, load_segmenter, read_model  # noqa: E402
from training.grid import ModelGrid  # noqa: E402

SLICES, SIZE, BATCH = 50, 512, 8


def body_volume(spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """A 512 x 512 x 50 HU volume (air, body, organ, noise) at ``spacing`` mm."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    body = ((xx - 256) / 220.0) ** 2 + ((yy - 256) / 170.0) ** 2 < 1
    organ = ((xx - 200) / 90.0) ** 2 + ((yy - 230) / 70.0) ** 2 < 1
    slice_hu = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0)
    hu = slice_hu[:, :, None] + rng.normal(0, 40, (SIZE, SIZE, SLICES))
    return hu.astype(np.float32), np.diag([spacing, spacing, 2.5, 1.0])


class PeakMemory:
    """Largest RSS of a process and its children, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss + sum(c.memory_info().rss for c in self.process.children(True))
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            time.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def forward_seconds(models: Path, hu: np.ndarray, affine: np.ndarray, device: str, repeats: int) -> float:
    """Median time of f then g on the model-grid slices of ``hu``, in this process."""
    serving = __import__("json").loads((models / "serving.json").read_text())
    f, f_model = load_reconstructor(models / f"{serving['default_variant']}.pt")
    g = load_segmenter(models / "segmentation.pt")
    f, g = f.to(device), g.to(device)
    grid = ModelGrid(hu.shape, affine, (f_model.imaging["pixel_spacing_mm"]["min"], f_model.imaging["pixel_spacing_mm"]["max"]),
                     2 ** f_model.network.depth)
    images = torch.from_numpy(grid.to_model(hu))[:, None]
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for i in range(0, images.shape[0], BATCH):
                batch = images[i : i + BATCH].to(device)
                g(f(batch)).softmax(1).cpu()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def serve_seconds(server: MonaiLabelServer, image: str, repeats: int) -> tuple[float, int]:
    """Median end-to-end time of reconstruct_segment, and the server's peak memory while it ran."""
    requests.post(f"{server.url}/infer/reconstruct_segment", params={"image": image, "output": "image"},
                  files={"params": (None, "{}")}, timeout=1800).raise_for_status()  # warm-up
    times = []
    with PeakMemory(server.process.pid) as memory:
        for _ in range(repeats):
            start = time.perf_counter()
            reply = requests.post(f"{server.url}/infer/reconstruct_segment", params={"image": image, "output": "image"},
                                  files={"params": (None, "{}")}, timeout=1800)
            reply.raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times), memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "apps" / "taskadaptive_ct" / "model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model_spacing = read_model(args.models / "segmentation.pt").imaging["pixel_spacing_mm"]["median"]
    inputs = {f"model spacing ({model_spacing:.2f} mm)": model_spacing, "0.80 mm (resampled)": 0.8}
    print(f"reconstruct_segment of a {SIZE} x {SIZE} x {SLICES} volume, {args.device}, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}")
    print("| input | HTTP end to end, s/slice | f + g forward, s/slice | overhead | server peak memory |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        studies = Path(work) / "studies"
        studies.mkdir()
        for i, spacing in enumerate(inputs.values()):
            hu, affine = body_volume(spacing)
            nib.save(nib.Nifti1Image(hu, affine), str(studies / f"volume{i}.nii"))
        server = MonaiLabelServer(studies, Path(work), conf={"models": str(args.models), "device": args.device,
                                                             "batch_size": str(BATCH)}, threads=None)
        try:
            for i, (name, spacing) in enumerate(inputs.items()):
                hu, affine = body_volume(spacing)
                served, peak = serve_seconds(server, f"volume{i}", args.repeats)
                forward = forward_seconds(args.models, hu, affine, args.device, args.repeats)
                print(f"| {name} | {served / SLICES:.4f} | {forward / SLICES:.4f} | {served / forward:.2f}x | "
                      f"{peak / 2**30:.2f} GiB |")
        finally:
            server.stop()


if __name__ == "__main__":
    main()

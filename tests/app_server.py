"""A real MONAI Label server process running the project's app, for tests that talk HTTP to it.

``MonaiLabelServer`` starts ``python -m monailabel.main start_server`` (the command the
``monailabel`` script runs, with this interpreter) on 127.0.0.1 and a free port, waits
until ``/info/`` answers, and stops the whole process group afterwards. Its log is kept
in the given folder for the failure message.
"""

from __future__ import annotations


import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import torch
from requests_toolbelt.multipart.decoder import MultipartDecoder

from training.checkpoints import load_reconstructor, load_segmenter, read_model, save_model
from training.inference import reconstruct_and_segment
from training.networks import UNetConfig, build_reconstruction_net, build_segmentation_net

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "taskadaptive_ct"
START_TIMEOUT = 240.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MonaiLabelServer:
    """A running server: ``url``, ``log``, :meth:`stop` (``threads=None``: torch's default, every core)."""

    def __init__(self, studies: Path, workdir: Path, conf: dict[str, str] | None = None,
                 env: dict[str, str] | None = None, threads: int | None = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
                   "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in (conf or {}).items():
            command += ["--conf", key, str(value)]
        # One thread by default: the tests' networks are tiny and the test process shares the cores.
        threading = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        environment = dict(os.environ, MONAI_LABEL_TRACKING_ENABLED="false", MONAI_LABEL_AUTO_UPDATE_SCORING="false",
                           MONAI_LABEL_SESSION_PATH=str(workdir / "sessions"), **threading, **(env or {}))
        self._log_handle = open(self.log, "w")
        self.process = subprocess.Popen(command, cwd=workdir, stdout=self._log_handle, stderr=subprocess.STDOUT,
                                        env=environment, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not answer within {START_TIMEOUT:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_handle.close()

    # --------------------------------------------------------------------- requests

    def info(self) -> dict:
        reply = requests.get(f"{self.url}/info/", timeout=30)
        reply.raise_for_status()
        return reply.json()

    def infer(self, task: str, image: str = "", params: dict | None = None, upload: Path | None = None,
              timeout: float = 300) -> requests.Response:
        files = {"params": (None, json.dumps(params or {}))}
        if upload is not None:
            files["file"] = (upload.name, upload.read_bytes())
        return requests.post(f"{self.url}/infer/{task}", params={"image": image} if image else {}, files=files,
                             timeout=timeout)


def multipart_result(reply: requests.Response) -> tuple[dict, bytes, str]:
    """``(params, file bytes, file name)`` of MONAI Label's default multipart infer reply."""
    assert reply.status_code == 200, f"{reply.status_code}: {reply.text[:500]}"
    parts = MultipartDecoder(reply.content, reply.headers["content-type"]).parts
    params, image, name = {}, b"", ""
    for part in parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        elif 'name="image"' in disposition:
            image = part.content
            name = disposition.split('filename="')[1].split('"')[0]
    return params, image, name


def nifti_from_bytes(data: bytes, name: str = "") -> nib.Nifti1Image:
    """A NIfTI image from a reply's bytes, gzip-compressed or not (``name`` is for messages)."""
    if data[:2] == b"\x1f\x8b":
        import gzip

        data = gzip.decompress(data)
    return nib.Nifti1Image.from_bytes(data)


# ------------------------------------------------------------------------- test models

NET = UNetConfig(features=4, depth=2)
SPACING = (1.5, 2.5)


def imaging(spacing: tuple[float, float] = SPACING) -> dict:
    return {"slice_size": 32, "pixel_spacing_mm": {"min": spacing[0], "median": sum(spacing) / 2, "max": spacing[1]},
            "field_of_view_mm": {"min": 32 * spacing[0], "median": 32 * sum(spacing) / 2, "max": 32 * spacing[1]},
            "domain": "physical", "projector_field_of_view_mm": {"min": 48.0, "median": 64.0, "max": 80.0},
            "photons": 1024.0, "angles": 64, "input": "lowdose", "input_hu_percentiles": [-1000.0, -40.0, 250.0],
            "data": {"dataset": "/data/set", "fingerprint": "f" * 64, "cases": ["1", "2"], "sources": {}}}


def write_models(folder: Path) -> dict[str, Path]:
    """g, a task-adaptive f (flat file), a Base U-Net (run folder layout) and a joint model."""
    torch.manual_seed(0)
    paths = {"segmentation": folder / "segmentation.pt", "ta0.5": folder / "ta0.5.pt",
             "baseunet": folder / "baseunet" / "best.pt", "joint0.5": folder / "joint0.5" / "best.pt"}
    save_model(paths["segmentation"], "segmentation", 0.0, NET, {"segmenter": build_segmentation_net(NET)}, 4,
               {"val_dice_volume": 0.61}, imaging=imaging() | {"input": "fulldose"})
    save_model(paths["ta0.5"], "reconstruction", 0.5, NET, {"reconstructor": build_reconstruction_net(NET)}, 5,
               {"val_dice_volume": 0.66, "val_psnr": 29.0}, imaging=imaging())
    save_model(paths["baseunet"], "reconstruction", 0.0, NET, {"reconstructor": build_reconstruction_net(NET)}, 6,
               {"val_psnr": 31.0}, imaging=imaging())
    save_model(paths["joint0.5"], "joint", 0.5, NET, {"reconstructor": build_reconstruction_net(NET),
                                                    "segmenter": build_segmentation_net(NET)}, 2,
               {"val_dice_volume": 0.4}, imaging=imaging())
    return paths


def body(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A noisy HU volume: air, a soft-tissue body, a brighter off-centre organ."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[3:-3, 2:-4] = 40.0
    hu[5 : shape[0] // 2, 4 : shape[1] // 2] = 160.0
    return hu + rng.normal(0, 30, shape).astype(np.float32)


def in_process(models: dict[str, Path], hu: np.ndarray, affine: np.ndarray, variant: str | None, segment: bool):
    f = load_reconstructor(models[variant]) if variant else None
    g = None
    if segment:
        source = models[variant] if variant and variant.startswith("joint") else models["segmentation"]
        g = (load_segmenter(source), read_model(source))
    return reconstruct_and_segment(hu, affine, reconstructor=f, segmenter=g, batch_size=2)

"""The main job: `tact serve` with the committed demo models, and whether they show the method working.

The demo studies are prepared exactly as `make serve` prepares them (phantoms and the real
sample simulated at the models' settings); the served `reconstruct_segment` on the real
sample, which the models never saw, must beat the Hann FBP of the same data in PSNR and
give g a better liver Dice than the FBP does, with the numbers the model card states.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from app_server import APP, MonaiLabelServer, free_port, multipart_result, nifti_from_bytes
from training.checkpoints import read_model
from training.dataset import SimulatedDataset
from training.metrics import dice_counts, dice_from_counts, roi_psnr_ssim
from training.physics import MU_MAX, hu_to_mu
from training.serving import SAMPLE_CASE

TACT = Path(sys.executable).with_name("tact")
MODELS = APP / "model"
pytestmark = pytest.mark.network  # the real sample comes from PyPI once


def normalised(hu: np.ndarray) -> np.ndarray:
    return (hu_to_mu(hu) / MU_MAX).astype(np.float32)


def mean_psnr(volume_hu: np.ndarray, reference_x: np.ndarray) -> float:
    x = normalised(volume_hu)
    return float(np.mean([roi_psnr_ssim(x[:, :, k], reference_x[:, :, k])[0] for k in range(x.shape[2])]))


def liver_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    return float(dice_from_counts(dice_counts(prediction, reference, labels=(1,)), absent=float("nan"))[0])


@pytest.fixture(scope="module")
def studies(sample_cache, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("serve")
    result = subprocess.run([str(TACT), "-q", "serve", "--prepare-only", "--data", str(data)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return data / "dataset" / "lowdose"


def test_demo_models_are_small_documented_and_know_their_settings():
    files = sorted(MODELS.glob("*.pt"))
    assert {p.stem for p in files} >= {"segmentation", "baseunet"}
    assert sum(p.stat().st_size for p in MODELS.iterdir() if p.is_file()) < 20 * 2**20
    card = (MODELS / "MODEL_CARD.md").read_text()
    for path in files:
        model = read_model(path)
        assert model.version == 2 and model.imaging is not None, path
        assert f"`{path.name}`" in card
    default = json.loads((MODELS / "serving.json").read_text())["default_variant"]
    assert (MODELS / f"{default}.pt").is_file() and default.startswith("ta")


@pytest.fixture(scope="module")
def served_sample(studies, tmp_path_factory) -> dict:
    """reconstruct_segment of the real sample and g on its FBP, over HTTP, scored against the references."""
    tmp_path = tmp_path_factory.mktemp("served")
    dataset = SimulatedDataset(studies.parent)
    assert dataset.case_ids("test") == [SAMPLE_CASE]
    imaging = read_model(MODELS / "segmentation.pt").imaging
    assert (dataset.settings["size"], dataset.settings["num_angles"], dataset.settings["photons"]) == (
        imaging["slice_size"], imaging["angles"], imaging["photons"])
    server = MonaiLabelServer(studies, tmp_path, conf={"models": str(MODELS)})
    try:
        params, data, name = multipart_result(server.infer("reconstruct_segment", SAMPLE_CASE))
        labels = np.asarray(nifti_from_bytes(data, name).dataobj)
        stored = requests.get(server.url + params["reconstruction"]["url"], timeout=60)
        reconstruction = np.asarray(nifti_from_bytes(stored.content).dataobj)
        fbp_file = studies / "labels" / "fbp" / f"{SAMPLE_CASE}.nii"
        fbp_params, fbp_data, fbp_name = multipart_result(server.infer("segmentation", upload=fbp_file))
        fbp_labels = np.asarray(nifti_from_bytes(fbp_data, fbp_name).dataobj)
    finally:
        server.stop()
    reference = normalised(np.asarray(nib.load(str(studies / "labels" / "fulldose" / f"{SAMPLE_CASE}.nii")).dataobj))
    truth = np.asarray(nib.load(str(studies / "labels" / "final" / f"{SAMPLE_CASE}.nii")).dataobj)
    fbp = np.asarray(nib.load(str(fbp_file)).dataobj)
    psnr_served, psnr_fbp = mean_psnr(reconstruction, reference), mean_psnr(fbp, reference)
    dice_served, dice_fbp = liver_dice(labels, truth), liver_dice(fbp_labels, truth)
    return {"variant": params["variant"], "psnr_served": psnr_served, "psnr_fbp": psnr_fbp,
            "dice_served": dice_served, "dice_fbp": dice_fbp}


def test_served_segmentation_beats_g_on_the_fbp_and_the_card_says_so(served_sample):
    variant, psnr_served, psnr_fbp = served_sample["variant"], served_sample["psnr_served"], served_sample["psnr_fbp"]
    dice_served, dice_fbp = served_sample["dice_served"], served_sample["dice_fbp"]
    assert dice_served > dice_fbp
    # the model card states these numbers
    card = (MODELS / "MODEL_CARD.md").read_text()
    served_row = re.search(rf"\| served `{re.escape(variant)}` \(default\) \| ([\d.]+) \| ([\d.]+) \|", card)
    fbp_row = re.search(r"\| Hann FBP \| ([\d.]+) \| ([\d.]+) \|", card)
    assert served_row and fbp_row, "the model card has no served-on-the-sample table"
    assert float(served_row[1]) == pytest.approx(psnr_served, abs=0.02)
    assert float(fbp_row[1]) == pytest.approx(psnr_fbp, abs=0.02)
    assert float(served_row[2]) == pytest.approx(dice_served, abs=0.003)
    assert float(fbp_row[2]) == pytest.approx(dice_fbp, abs=0.003)


def test_served_reconstruction_beats_the_fbp_in_psnr_on_the_real_sample(served_sample):
    assert served_sample["psnr_served"] > served_sample["psnr_fbp"]


def test_tact_serve_starts_the_server_and_says_how_to_use_it(studies, tmp_path):
    port = free_port()
    process = subprocess.Popen([str(TACT), "serve", "--studies", str(studies), "--port", str(port)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env=dict(os.environ, MONAI_LABEL_SESSION_PATH=str(tmp_path / "sessions")))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/info/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            raise AssertionError("tact serve: the server did not answer")
        info = requests.get(f"{url}/info/", timeout=30).json()
        assert info["name"] == "TaskAdaptiveCT"
        assert info["models"]["reconstruction"]["default_variant"] == json.loads((MODELS / "serving.json").read_text())[
            "default_variant"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert f"TaskAdaptiveCT app: {url}" in output and f"{url}/infer/reconstruct_segment?image=" in output

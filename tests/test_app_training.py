"""The app's train tasks, feedback loop and active learning, on a real server over a simulated data set.

A small phantom data set (64 px, 64 angles) simulated with ODL/astra is the datastore
(its ``lowdose/`` folder, as `tact simulate` wrote it); trainings are short (2 epochs)
but run the project's engine in MONAI Label's train subprocess, as a site would.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monailabel.client import MONAILabelClient

from app_server import ROOT, MonaiLabelServer, multipart_result, nifti_from_bytes
from training.checkpoints import load_reconstructor, read_model, save_model
from training.dataset import SimulatedDataset
from training.inference import reconstruct_and_segment
from training.networks import UNetConfig, build_segmentation_net
from training.phantom import write_phantom_dataset
from training.provenance import imaging_settings
from training.simulate import SimulationSettings, simulate_dataset

sys.path.insert(0, str(ROOT / "TaskAdaptiveCT" / "TaskAdaptiveCT"))
from TaskAdaptiveCTLib import RequestFailed, TaskAdaptiveClient  # noqa: E402
from TaskAdaptiveCTLib.status import training_text  # noqa: E402

NET = UNetConfig(features=4, depth=2)
SHORT = {"epochs": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("app-training")
    write_phantom_dataset(root / "lits", 5, size=64, slices=6, seed=21, progress=False)
    simulate_dataset(root / "lits", root / "dataset", SimulationSettings(photons=300, num_angles=64, size=64, seed=4),
                     workers=2, progress=False)
    return root / "dataset"


@pytest.fixture(scope="module")
def segmenter_file(dataset, tmp_path_factory) -> Path:
    """An (untrained) g of the data set's imaging settings, as a starting model folder holds it."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("g") / "segmentation.pt"
    data = SimulatedDataset(dataset)
    save_model(path, "segmentation", 0.0, NET, {"segmenter": build_segmentation_net(NET)}, 1, {"val_dice_volume": 0.1},
               imaging=imaging_settings(data, data.case_ids("train"), "fulldose"))
    return path


def start(dataset: Path, segmenter: Path, workdir: Path, **conf: str) -> tuple[MonaiLabelServer, Path]:
    """A server on a fresh copy of the data set (trainings and corrections change it) and a model folder with g."""
    copy = workdir / "dataset"
    shutil.copytree(dataset, copy)
    models = workdir / "models"
    models.mkdir()
    shutil.copyfile(segmenter, models / "segmentation.pt")
    server = MonaiLabelServer(copy / "lowdose", workdir, conf={"models": str(models), "runs": str(workdir / "runs"),
                                                               "preset": "smoke", **conf})
    return server, models


def wait_for_training(server: MonaiLabelServer, timeout: float = 900, count: int = 1) -> list[dict]:
    """Poll ``GET /train/?all=true`` until ``count`` tasks have ended; returns them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = requests.get(f"{server.url}/train/", params={"all": "true"}, timeout=30)
        tasks = reply.json() if reply.status_code == 200 else []
        ended = [t for t in tasks if t["status"] in ("DONE", "ERROR", "STOPPED")]
        if len(ended) >= count and all(t["status"] not in ("SUBMITTED", "RUNNING") for t in tasks):
            return tasks
        time.sleep(2)
    raise AssertionError(f"training did not end within {timeout:.0f} s:\n{server.tail()}")


@pytest.fixture(scope="module")
def trained(dataset, segmenter_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    server, models = start(dataset, segmenter_file, workdir)
    yield server, models, workdir
    server.stop()


def test_bad_train_requests_are_refused_before_anything_starts(trained):
    server, models, _ = trained
    for model, body, status, phrase in [
        ("reconstruction", {"alpha": 2}, 422, "alpha must be a number in [0, 1], got 2"),
        ("reconstruction", {"alpha": "high"}, 422, "alpha must be a number in [0, 1]"),
        ("joint", {"C": -0.1}, 422, "C must be a number in [0, 1]"),
        ("joint", {"alpha": 0.5}, 422, "alpha is not an option of joint training"),
        ("segmentation", {"epoch": 3}, 422, "unknown option(s) 'epoch'"),
        ("segmentation", {"epochs": 0}, 422, "epochs must be at least 1"),
        ("deepedit", {}, 404, "unknown train task 'deepedit'; this server has joint, reconstruction, segmentation"),
    ]:
        reply = requests.post(f"{server.url}/train/{model}", json=body, timeout=30)
        assert reply.status_code == status, (model, body, reply.text)
        assert phrase in reply.json()["detail"], (model, body, reply.json())
    assert requests.get(f"{server.url}/train/", timeout=30).status_code == 404, "no training was started"
    assert sorted(p.name for p in models.iterdir()) == ["segmentation.pt"]


def test_reconstruction_training_publishes_a_model_that_the_next_request_uses(trained, dataset):
    server, models, workdir = trained
    started = requests.post(f"{server.url}/train/reconstruction", json={"alpha": 0.5, **SHORT}, timeout=30)
    assert started.status_code == 200, started.text
    # MONAI Label registers the training's process a moment after it answers; a request in between
    # would be queued, not refused. Once it shows as running (its subprocess takes seconds to import
    # before the 2 short epochs), a second training is refused.
    deadline = time.monotonic() + 10
    while requests.get(f"{server.url}/train/", params={"check_if_running": "true"}, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the training never showed as running"
        time.sleep(0.05)
    again = requests.post(f"{server.url}/train/segmentation", json=SHORT, timeout=30)
    assert again.status_code == 429  # one training at a time
    task = wait_for_training(server)[-1]
    assert task["status"] == "DONE", "\n".join(task["details"])
    assert any("epoch 2/2" in line for line in task["details"]), task["details"]
    assert any("published ta0.5" in line for line in task["details"])
    published = models / "ta0.5.pt"
    model = read_model(published)
    assert model.task == "reconstruction" and model.weight == 0.5 and model.network == NET
    assert model.imaging["slice_size"] == 64 and model.imaging["photons"] == 300
    run = Path(task["details"][-1].split("run folder ")[-1]) if "run folder" in task["details"][-1] else None
    runs = list((workdir / "runs").glob("reconstruction-*"))
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file() and run is None or run == runs[0]
    # the frozen g was the model folder's: the run recorded the sha256 of its copy
    assert (runs[0] / "segmenter.pt").read_bytes() == (models / "segmentation.pt").read_bytes()

    info = server.info()
    assert info["models"]["reconstruction"]["variants"]["ta0.5"]["epoch"] == model.epoch
    case = SimulatedDataset(dataset).case_ids("test")[0]
    _, data, name = multipart_result(server.infer("reconstruction", case, {"variant": "ta0.5"}))
    image = nib.load(str(workdir / "dataset" / "lowdose" / f"{case}.nii"))
    expected = reconstruct_and_segment(np.asarray(image.dataobj), image.affine,
                                       reconstructor=load_reconstructor(published), batch_size=2).reconstruction_hu
    np.testing.assert_allclose(np.asarray(nifti_from_bytes(data, name).dataobj), expected, atol=1e-3)
    assert info["train_stats"]["reconstruction"]["finished"] is True


def test_a_stopped_training_leaves_the_served_models_untouched(trained):
    """Started, followed and stopped through the Slicer module's client (TaskAdaptiveCTLib), as the module does."""
    server, models, _ = trained
    client = TaskAdaptiveClient(server.url)
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    # epochs of these tiny networks take about 0.1 s: no early stop, so that it still runs when stopped
    client.train("segmentation", {"epochs": 500, "batch_size": 2, "early_stopping_patience": 500})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = client.train_status()
        if status["status"] == "RUNNING" and any("epoch 1/500" in line for line in status.get("details", [])):
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"training did not reach its first epoch:\n{server.tail()}")
    running, line = training_text(status)
    assert running and line.startswith("Training running: ") and "epoch" in line
    with pytest.raises(RequestFailed) as refused:  # one training at a time, said by the server
        client.train("reconstruction", {"alpha": 0.5})
    assert refused.value.status == 429
    assert client.stop_training()["status"] == "STOPPED"
    time.sleep(2)
    assert client.train_status()["status"] == "STOPPED" and training_text(client.train_status())[0] is False
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    assert server.info()["name"] == "TaskAdaptiveCT"


def test_task_uncertainty_ranks_every_uncorrected_image(trained, dataset):
    server, _, _ = trained
    reply = requests.post(f"{server.url}/activelearning/task_uncertainty", json={"variant": "ta0.5"}, timeout=300)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    cases = SimulatedDataset(dataset).case_ids("all")
    ranking = answer["ranking"]
    assert sorted(item["id"] for item in ranking) == sorted(cases)
    scores = [item["uncertainty"] for item in ranking]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert answer["id"] == ranking[0]["id"]


def test_corrections_trigger_retraining_of_g_then_f(dataset, segmenter_file, tmp_path):
    server, models = start(dataset, segmenter_file, tmp_path, retrain_after="2", retrain_alpha="0.9")
    try:
        data = SimulatedDataset(tmp_path / "dataset")
        train_cases, test_case = data.case_ids("train"), data.case_ids("test")[0]

        def correct(case: str) -> dict:
            image = nib.load(str(data.root / "lowdose" / f"{case}.nii"))
            labels = np.asarray(nib.load(str(data.root / "lowdose" / "labels" / "final" / f"{case}.nii")).dataobj).copy()
            labels[labels == 2] = 1  # a clinician decides the 'tumour' is liver
            path = tmp_path / f"{case}-corrected.nii.gz"
            nib.save(nib.Nifti1Image(labels.astype(np.uint8), image.affine), str(path))
            reply = requests.put(f"{server.url}/datastore/label", params={"image": case, "tag": "final"},
                                 files={"label": (path.name, path.read_bytes())}, timeout=60)
            assert reply.status_code == 200, reply.text
            return reply.json()["feedback"]

        first = correct(test_case)
        assert first["counted"] is False and first["pending"] == 0  # test patients stay out of training
        second = correct(train_cases[0])
        assert second["counted"] is True and second["pending"] == 1 and not second["due"]
        third = correct(train_cases[1])
        assert third["due"] is True and [q["model"] for q in third["retraining"]] == ["segmentation", "reconstruction"]
        assert third["pending"] == 0 and server.info()["feedback"]["retrainings"] == 1
        # the corrected label is what the data set now holds for that patient
        stored = np.asarray(nib.load(str(data.root / "lowdose" / "labels" / "final" / f"{train_cases[1]}.nii")).dataobj)
        assert not (stored == 2).any()

        tasks = wait_for_training(server, count=2)
        assert [t["status"] for t in tasks] == ["DONE", "DONE"], [t["details"] for t in tasks]
        g, f = read_model(models / "segmentation.pt"), read_model(models / "ta0.9.pt")
        assert g.epoch >= 1 and f.weight == 0.9
        g_run = sorted((tmp_path / "runs").glob("segmentation-*"))[0]
        f_run = sorted((tmp_path / "runs").glob("reconstruction-*"))[0]
        # f was trained with the new g frozen: its run's copy of g is the published one
        assert (f_run / "segmenter.pt").read_bytes() == (models / "segmentation.pt").read_bytes()
        assert (g_run / "best.pt").read_bytes() == (models / "segmentation.pt").read_bytes()
        # once corrected, an image is not proposed for review again
        ranking = requests.post(f"{server.url}/activelearning/task_uncertainty", json={}, timeout=300).json()["ranking"]
        assert {item["id"] for item in ranking} == set(data.case_ids("all")) - {test_case, *train_cases[:2]}
    finally:
        server.stop()


def test_the_flow_with_monai_labels_own_client(trained, dataset, tmp_path):
    """MONAI Label's Python client, as a third-party program would use it."""
    server, _, workdir = trained
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    info = client.info()
    assert {"reconstruction", "segmentation", "reconstruct_segment"} <= set(info["models"])
    case = SimulatedDataset(dataset).case_ids("train")[0]
    image = workdir / "dataset" / "lowdose" / f"{case}.nii"
    result, params = client.infer("reconstruct_segment", "", {"variant": "ta0.5", "return_reconstruction": False},
                                  file=str(image))
    labels = nib.load(result)
    assert labels.shape == nib.load(str(image)).shape and params["segmenter"] == "segmentation"
    by_id, _ = client.infer("segmentation", case, {})
    assert nib.load(by_id).shape == labels.shape
    saved = client.save_label(case, result, tag="final")
    assert saved["image"] == case and saved["feedback"]["counted"] is True
    # a stop sent at once, while the task may have no process yet, still stops it (lib.guards)
    started = client.train_start("reconstruction", {"alpha": 0.1, "epochs": 500, "early_stopping_patience": 500})
    assert started["status"] in ("SUBMITTED", "RUNNING")
    assert client.train_status()["request"]["alpha"] == 0.1
    assert client.train_stop()["status"] == "STOPPED"
    time.sleep(3)
    assert client.train_status()["status"] == "STOPPED"

"""TaskAdaptiveCTLib, the Slicer module's logic without Slicer, against a real server running the app.

The server is a real ``monailabel start_server`` process with the project's app and small
real model files (``app_server.write_models``); every result the Lib assembles is checked
voxel for voxel against the same model files run in this process through
``training.inference`` on the same voxels, and its geometry against the input's IJK -> RAS
matrix. The one stand-in is :class:`BrokenServer`, a plain HTTP server on loopback that
answers like a misconfigured or foreign server, since the app never sends such replies.
"""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_server import ROOT, MonaiLabelServer, free_port, write_models
from training.checkpoints import load_reconstructor, load_segmenter, read_model
from training.inference import reconstruct_and_segment

sys.path.insert(0, str(ROOT / "TaskAdaptiveCT" / "TaskAdaptiveCT"))

from TaskAdaptiveCTLib import (ConnectionFailed, MalformedReply, ReconstructSegmentJob, RequestFailed,  # noqa: E402
                               TaskAdaptiveClient, Volume, image_id_for, labels_from_segments, read_volume, slab,
                               slice_axis, submit_correction, write_volume)
from TaskAdaptiveCTLib.job import CANCELLED, DONE, FAILED  # noqa: E402
from TaskAdaptiveCTLib.segments import segments_from_labels  # noqa: E402
from TaskAdaptiveCTLib.status import job_outcome, recent_urls, remember_url, training_text  # noqa: E402


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def oblique_ijk_to_ras(spacing=(2.0, 1.8, 3.0), origin=(-40.0, 62.0, -131.0)) -> np.ndarray:
    """I to the patient's left, J posterior (LPS-like voxel order), tilted 14 degrees about an oblique axis."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation([1.0, 0.4, 0.2], 14.0) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def ct_array(shape_kji: tuple[int, int, int], seed: int) -> np.ndarray:
    """A noisy HU volume (K, J, I): air, a body, a brighter off-centre organ."""
    rng = np.random.default_rng(seed)
    k, j, i = shape_kji
    hu = np.full(shape_kji, -1000.0, dtype=np.float32)
    hu[:, 3 : j - 3, 2 : i - 4] = 40.0
    hu[:, 5 : j // 2, 4 : i // 2] = 170.0
    return hu + rng.normal(0, 30, shape_kji).astype(np.float32)


def in_process(models: dict[str, Path], volume: Volume, variant: str):
    """The same model files through ``training.inference`` on the same voxels (nibabel order: I, J, K)."""
    f = load_reconstructor(models[variant])
    g = (load_segmenter(models["segmentation"]), read_model(models["segmentation"]))
    result = reconstruct_and_segment(volume.array.transpose(2, 1, 0), volume.ijk_to_ras, reconstructor=f, segmenter=g,
                                     batch_size=2)
    return result.reconstruction_hu.transpose(2, 1, 0), result.labels.transpose(2, 1, 0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("slicer")
    models = write_models(root / "models")
    studies = root / "studies"
    studies.mkdir()
    stored = Volume(ct_array((4, 30, 34), 3), np.diag([2.0, 2.0, 3.0, 1.0]))
    nib.save(nib.Nifti1Image(stored.array.transpose(2, 1, 0), stored.ijk_to_ras), str(studies / "stored.nii"))
    server = MonaiLabelServer(studies, root, conf={"models": str(root / "models"), "batch_size": "2"})
    yield {"server": server, "models": models, "studies": studies, "stored": stored}
    server.stop()


# ---------------------------------------------------------------------------- geometry, no server


def test_volumes_keep_an_oblique_ijk_to_ras_through_sitk_nrrd_and_nifti(tmp_path):
    volume = Volume(ct_array((5, 12, 14), 0), oblique_ijk_to_ras())
    nrrd = read_volume(write_volume(volume, tmp_path / "v.nrrd"))
    np.testing.assert_array_equal(nrrd.array, volume.array)
    np.testing.assert_allclose(nrrd.ijk_to_ras, volume.ijk_to_ras, atol=1e-9)
    nifti = read_volume(write_volume(volume, tmp_path / "v.nii.gz"))
    np.testing.assert_array_equal(nifti.array, volume.array)
    np.testing.assert_allclose(nifti.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)  # NIfTI stores float32
    # nibabel reads the same file in (I, J, K) order with the same matrix: the two conventions agree
    image = nib.load(str(tmp_path / "v.nii.gz"))
    np.testing.assert_allclose(image.affine, volume.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj), volume.array.transpose(2, 1, 0))


def test_a_slab_keeps_every_voxel_in_its_place_and_slabs_follow_the_axis_closest_to_superior():
    volume = Volume(ct_array((6, 8, 10), 1), oblique_ijk_to_ras())
    assert slice_axis(volume.ijk_to_ras) == 0  # K is (nearly) superior: array axis 0
    piece = slab(volume, 0, 2, 5)
    np.testing.assert_array_equal(piece.array, volume.array[2:5])
    for i, j, k in [(0, 0, 0), (9, 7, 2), (3, 4, 1)]:
        np.testing.assert_allclose(piece.ijk_to_ras @ [i, j, k, 1], volume.ijk_to_ras @ [i, j, k + 2, 1], atol=1e-12)
    # a sagittally stored volume: I runs superior, so slabs are cut along array axis 2
    sagittal = np.zeros((4, 4))
    sagittal[:3, :3] = [[0, 0, 1.5], [0, -1.0, 0], [2.0, 0, 0]]  # i -> S, j -> P, k -> R
    sagittal[3, 3] = 1
    assert slice_axis(sagittal) == 2
    volume = Volume(ct_array((6, 8, 10), 1), sagittal)
    piece = slab(volume, 2, 4, 7)
    np.testing.assert_array_equal(piece.array, volume.array[:, :, 4:7])
    np.testing.assert_allclose(piece.ijk_to_ras @ [1, 2, 3, 1], volume.ijk_to_ras @ [5, 2, 3, 1], atol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        slab(volume, 2, 8, 11)
    # a sheared matrix is refused before anything is written or sent
    sheared = np.diag([2.0, 2.0, 3.0, 1.0])
    sheared[0, 1] = 0.4
    with pytest.raises(ValueError, match="not perpendicular"):
        Volume(np.zeros((2, 3, 4)), sheared)


def test_segments_keep_their_names_and_values_and_a_tumour_inside_the_liver_stays_tumour():
    liver = np.zeros((2, 6, 6), dtype=bool)
    liver[:, 1:5, 1:5] = True
    tumour = np.zeros_like(liver)
    tumour[1, 2:4, 2:4] = True  # drawn inside the liver segment, as clinicians do
    labels = labels_from_segments({"Liver": liver, "Tumour": tumour})
    assert labels.dtype == np.uint8
    assert (labels == 2).sum() == 4 and (labels == 1).sum() == liver.sum() - 4 and (labels[~liver] == 0).all()
    back = segments_from_labels(labels)
    np.testing.assert_array_equal(back["Tumor"], tumour)
    np.testing.assert_array_equal(back["Liver"], liver & ~tumour)
    with pytest.raises(ValueError, match="'Spleen' is neither liver nor tumour"):
        labels_from_segments({"Liver": liver, "Spleen": tumour})
    with pytest.raises(ValueError, match="both Tumor"):
        labels_from_segments({"Tumor": tumour, "lesion": tumour})
    with pytest.raises(ValueError, match="not the app's"):
        segments_from_labels(np.array([[[0, 3]]]))
    assert image_id_for("CT low dose (1)") == "CT_low_dose_1"


def test_recent_urls_and_training_status_lines():
    recent = remember_url(["http://a:8000", "http://b:8000"], " http://b:8000/ ")
    assert recent == ["http://b:8000", "http://a:8000"]
    assert len(remember_url([f"http://h{i}:1" for i in range(20)], "http://new:1")) == 8
    assert remember_url(recent, "  ") == recent
    # Qt settings give back None, one string or a list
    assert recent_urls(None) == ["http://127.0.0.1:8000"] and recent_urls("http://a:1/") == ["http://a:1"]
    assert recent_urls(["http://a:1", " ", "http://b:2"]) == ["http://a:1", "http://b:2"]
    assert training_text({"status": "NONE", "details": []}) == (False, "No training has run on this server since it started.")
    running, text = training_text({"status": "RUNNING", "details": ["epoch 1/4 ...", "epoch 2/4 loss 0.31"]})
    assert running and text == "Training running: epoch 2/4 loss 0.31"
    assert training_text({"status": "DONE", "details": []}) == (False, "Training done")
    # the server's log lines: the engine's last epoch line, without the logging prefix
    log = ["[2026-12-02 06:50:58,101] [13768] [MainThread] [INFO] (training.engine:567) - epoch 1/500: loss 0.9; "
           "val_dice_volume 0.1 (0.2 s)",
           "[2026-12-02 06:50:59,301] [13768] [MainThread] [INFO] (ignite.engine.engine.SupervisedTrainer:1142) - "
           "Epoch[2] Complete. Time taken: 00:00:00.145"]
    assert training_text({"status": "RUNNING", "details": log}) == (
        True, "Training running: epoch 1/500: loss 0.9; val_dice_volume 0.1 (0.2 s)")
    assert training_text({"status": "ERROR", "details": log[1:]}) == (
        False, "Training error: Epoch[2] Complete. Time taken: 00:00:00.145")


# ---------------------------------------------------------------------------- against the real server


def test_models_and_variants_come_from_info(served):
    models = TaskAdaptiveClient(served["server"].url).models()
    assert set(models.variants) == {"baseunet", "ta0.5", "joint0.5"}
    assert models.default_variant == "ta0.5" and models.segmenter["name"] == "segmentation"
    assert models.label("ta0.5") == "ta0.5 (α = 0.5, validation PSNR 29.0 dB, Dice 0.660, default)"
    assert models.label("joint0.5").startswith("joint0.5 (joint, C = 0.5")
    assert {"segmentation", "reconstruction", "joint"} <= set(models.train_tasks)


def test_reconstruct_segment_in_slabs_of_an_oblique_volume_lands_on_the_inputs_voxels(served):
    volume = Volume(ct_array((7, 28, 32), 5), oblique_ijk_to_ras())
    client = TaskAdaptiveClient(served["server"].url)
    ticks = iter(range(100))
    job = ReconstructSegmentJob(client, volume, "ta0.5", slab_slices=3, clock=lambda: float(next(ticks)))
    assert [(a, b) for a, b in job.slabs] == [(0, 3), (3, 6), (6, 7)]
    seen = []
    result = job.run(on_progress=seen.append)
    assert job.state == DONE and result.variant == "ta0.5"
    assert [p.done for p in seen] == [3, 6, 7] and seen[0].remaining is not None and seen[-1].remaining == 0
    assert seen[-1].text().startswith("7/7 slices in")
    assert job_outcome(job).startswith("Done: 7/7 slices in") and "with ta0.5" in job_outcome(job)
    for output in (result.reconstruction, result.labels):
        assert output.array.shape == volume.array.shape
        np.testing.assert_array_equal(output.ijk_to_ras, volume.ijk_to_ras)  # the input's matrix, exactly
    assert result.reconstruction.array.dtype == np.float32 and result.labels.array.dtype == np.uint8
    reconstruction, labels = in_process(served["models"], volume, "ta0.5")
    np.testing.assert_allclose(result.reconstruction.array, reconstruction, atol=1e-3)
    np.testing.assert_array_equal(result.labels.array, labels)
    assert 50 < (labels > 0).sum() < labels.size - 50, "the labels must show structure for this check to mean anything"


def test_a_volume_stored_sagittally_is_cut_into_axial_slabs_and_answers_the_same(served):
    matrix = np.zeros((4, 4))
    matrix[:3, :3] = [[0, 0, -2.0], [0, 1.8, 0], [2.5, 0, 0]]  # i -> S, j -> A, k -> L
    matrix[:3, 3] = [30.0, -20.0, -60.0]
    matrix[3, 3] = 1
    volume = Volume(ct_array((5, 26, 30), 8).transpose(2, 1, 0), matrix)  # (K = L-R, J = A-P, I = S-I)
    job = ReconstructSegmentJob(TaskAdaptiveClient(served["server"].url), volume, "baseunet", slab_slices=2)
    assert job.axis == 2 and len(job.slabs) == 3
    result = job.run()
    reconstruction, labels = in_process(served["models"], volume, "baseunet")
    np.testing.assert_allclose(result.reconstruction.array, reconstruction, atol=1e-3)
    np.testing.assert_array_equal(result.labels.array, labels)


def test_cancel_midway_stops_between_slabs_and_gives_no_result(served):
    volume = Volume(ct_array((6, 24, 24), 6), np.diag([2.0, 2.0, 3.0, 1.0]))
    job = ReconstructSegmentJob(TaskAdaptiveClient(served["server"].url), volume, slab_slices=2)
    assert job.step() is True and job.done_slices == 2
    job.cancel()
    assert job.step() is False and job.state == CANCELLED and job.done_slices == 2
    with pytest.raises(RuntimeError, match="cancelled"):
        job.result
    assert job_outcome(job) == "Cancelled after 2 of 6 slices; nothing was added to the scene."
    # a job cancelled before it started sends nothing
    never = ReconstructSegmentJob(TaskAdaptiveClient(served["server"].url), volume)
    never.cancel()
    assert never.state == CANCELLED and never.step() is False and never.done_slices == 0


def test_a_refused_connection_and_a_silent_server_are_clear_errors():
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionFailed, match=rf"cannot connect to http://127.0.0.1:{port}; is the TaskAdaptiveCT server"):
        TaskAdaptiveClient(f"http://127.0.0.1:{port}").info()
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ConnectionFailed, match=r"did not answer within 0.5 s"):
            TaskAdaptiveClient(url, read_timeout=0.5).info()
    with pytest.raises(ValueError, match="must start with http"):
        TaskAdaptiveClient("127.0.0.1:8000")


def test_server_errors_reach_the_user_as_the_servers_message(served, tmp_path):
    client = TaskAdaptiveClient(served["server"].url)
    volume = Volume(ct_array((2, 24, 24), 7), np.diag([2.0, 2.0, 3.0, 1.0]))
    job = ReconstructSegmentJob(client, volume, "ta0.7")
    with pytest.raises(RequestFailed) as caught:
        job.step()
    assert caught.value.status == 404
    assert "unknown variant 'ta0.7'; this server has baseunet, joint0.5, ta0.5" in str(caught.value)
    assert job.state == FAILED and job.error == str(caught.value) and job.step() is False
    assert job_outcome(job) == f"Failed: {caught.value}"
    # a volume that is not CT: the server's reason, not a traceback
    bad = write_volume(Volume(np.full((2, 24, 24), 0.5, dtype=np.float32), np.eye(4)), tmp_path / "normalised.nrrd")
    with pytest.raises(RequestFailed, match="the server answered 4") as caught:
        client.infer_file("reconstruct_segment", bad)
    assert "HU" in caught.value.detail or "air" in caught.value.detail
    # training on a datastore of plain volumes: refused at once, with why
    with pytest.raises(RequestFailed, match="training needs a simulated data set") as caught:
        client.train("reconstruction", {"alpha": 0.5})
    assert caught.value.status == 422
    assert client.train_status() == {"status": "NONE", "details": []}  # nothing has been trained here


class BrokenServer(http.server.BaseHTTPRequestHandler):
    """Stand-in for a misconfigured or foreign server (the app itself never answers like this)."""

    def do_GET(self):  # noqa: N802
        body = json.dumps({"name": "other", "models": {"deepedit": {}}}).encode() if self.path == "/info/" else b"<html>"
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if self.path == "/info/" else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"Internal Server Error: out of memory"
        self.send_response(500)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_foreign_servers_and_5xx_replies_are_named_not_crashed_on(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BrokenServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = TaskAdaptiveClient(f"http://127.0.0.1:{httpd.server_address[1]}")
        with pytest.raises(MalformedReply, match="has no reconstruct_segment task; it is not the TaskAdaptiveCT app"):
            client.models()
        with pytest.raises(MalformedReply, match="not JSON"):
            client.train_status()
        path = write_volume(Volume(ct_array((1, 20, 20), 0), np.eye(4)), tmp_path / "x.nrrd")
        with pytest.raises(RequestFailed, match="answered 500: Internal Server Error: out of memory"):
            client.infer_file("reconstruct_segment", path)
    finally:
        httpd.shutdown()


def test_a_correction_is_submitted_with_its_image_and_found_in_the_datastore(served):
    client = TaskAdaptiveClient(served["server"].url)
    volume = Volume(ct_array((3, 26, 30), 9), oblique_ijk_to_ras())
    liver = np.zeros(volume.array.shape, dtype=bool)
    liver[:, 6:16, 5:18] = True
    tumour = np.zeros_like(liver)
    tumour[1, 8:11, 8:12] = True
    image_id = image_id_for("Low dose CT")
    assert not client.has_image(image_id)
    reply = submit_correction(client, image_id, volume, {"Liver": liver, "Tumor": tumour})
    assert reply["image"] == image_id and client.has_image(image_id)
    stored = client.label(image_id, "final")
    assert volume.same_grid(stored, 1e-3)
    np.testing.assert_array_equal(stored.array, labels_from_segments({"Liver": liver, "Tumor": tumour}))
    assert (stored.array == 2).sum() == tumour.sum()
    # a second correction of the same image replaces the first, without a second upload
    reply = submit_correction(client, image_id, volume, {"Liver": liver})
    np.testing.assert_array_equal(client.label(image_id, "final").array, liver.astype(np.uint8))
    # an image already in the datastore is corrected in place
    stored_volume = served["stored"]
    mask = np.zeros(stored_volume.array.shape, dtype=bool)
    mask[:, 5:9, 5:9] = True
    submit_correction(client, "stored", stored_volume, {"liver": mask})
    np.testing.assert_array_equal(client.label("stored", "final").array, mask.astype(np.uint8))
    # a segment the server does not know is refused before anything is sent
    before = sorted(p.name for p in served["studies"].rglob("*"))
    with pytest.raises(ValueError, match="neither liver nor tumour"):
        submit_correction(client, "another", volume, {"Liver": liver, "Kidney": tumour})
    assert sorted(p.name for p in served["studies"].rglob("*")) == before

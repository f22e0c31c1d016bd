"""The MONAI Label app, served by a real `monailabel start_server` process and driven over HTTP.

The models are real model files (``checkpoints.save_model``) around small seeded U-Nets,
untrained: these tests are about serving (which model answers, geometry, dtypes,
storage, errors), so the reference for every result is the same model file run in this
process through ``training.inference``. Whether served models are any good is the demo
models' test (test_demo_models).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch

from app_server import (APP, NET, SPACING, MonaiLabelServer, body, imaging, in_process, multipart_result, nifti_from_bytes,
                        write_models)
from training.checkpoints import save_model
from training.networks import build_reconstruction_net, build_segmentation_net

def oblique_affine() -> np.ndarray:
    """LPS-like voxel order (i to the left, j posterior), tilted 12 degrees about an oblique axis."""
    t = np.radians(12.0)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ tilt @ np.diag([-2.0, -2.0, 3.0])
    affine[:3, 3] = [55.0, 40.0, -120.0]
    return affine


def write_nrrd(path: Path, hu: np.ndarray, affine: np.ndarray) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:, 3].tolist())
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    models = write_models(root / "models")
    studies = root / "studies"
    studies.mkdir()
    volumes = {"oblique": (body((40, 36, 5), 1), oblique_affine()),
               "fine": (body((64, 64, 3), 2), np.diag([0.7, 0.7, 2.0, 1.0]))}
    for name, (hu, affine) in volumes.items():
        nib.save(nib.Nifti1Image(hu, affine), str(studies / f"{name}.nii"))
    server = MonaiLabelServer(studies, root, conf={"models": str(root / "models"), "batch_size": "2"})
    yield {"server": server, "models": models, "studies": studies, "volumes": volumes, "root": root}
    server.stop()


def test_info_lists_every_model_of_the_folder_with_its_settings(served):
    info = served["server"].info()
    assert set(info["models"]) == {"reconstruction", "segmentation", "reconstruct_segment"}
    assert info["labels"] == ["liver", "tumor"]
    variants = info["models"]["reconstruction"]["variants"]
    assert set(variants) == {"baseunet", "ta0.5", "joint0.5"}
    assert variants["ta0.5"]["alpha"] == 0.5 and variants["joint0.5"]["C"] == 0.5
    assert variants["baseunet"]["file"].endswith("baseunet/best.pt")
    assert variants["ta0.5"]["imaging"]["pixel_spacing_mm"]["max"] == SPACING[1]
    assert variants["ta0.5"]["validation"] == {"val_dice_volume": 0.66, "val_psnr": 29.0}
    # the default: the task-adaptive model with the best validation Dice
    assert info["models"]["reconstruction"]["default_variant"] == "ta0.5"
    assert info["models"]["segmentation"]["segmenter"]["imaging"]["input"] == "fulldose"
    assert not set(info["models"]) & {"deepedit", "scribbles", "sam2"}
    assert set(info["strategies"]) >= {"random", "first"}


def test_reconstruction_by_id_keeps_the_oblique_geometry_and_matches_the_model_in_process(served):
    hu, affine = served["volumes"]["oblique"]
    # MONAI Label's Slicer plugin asks uint8 for every result: a CT must not be cut to 0-255
    params, data, name = multipart_result(served["server"].infer("reconstruction", "oblique",
                                                                 {"variant": "baseunet", "result_dtype": "uint8"}))
    result = nifti_from_bytes(data, name)
    assert result.shape == hu.shape and result.get_data_dtype() == np.float32
    np.testing.assert_allclose(result.affine, affine, atol=1e-5)
    expected = in_process(served["models"], hu, affine, "baseunet", segment=False).reconstruction_hu
    np.testing.assert_allclose(np.asarray(result.dataobj), expected, atol=1e-3)
    assert params["variant"] == "baseunet" and params["output_dtype"] == "float32" and not params["resampled"]
    hu_out = np.asarray(result.dataobj)
    assert -1100 < hu_out.min() and hu_out.max() < 3100  # f's sigmoid output is inside [0, 1] x 3071 HU


def test_reconstruction_of_an_uploaded_nrrd_comes_back_as_nrrd_on_the_same_grid_in_int16(served, tmp_path):
    hu, affine = served["volumes"]["oblique"]
    upload = tmp_path / "scan.nrrd"
    write_nrrd(upload, hu, affine)
    params, data, name = multipart_result(served["server"].infer(
        "reconstruction", params={"output_dtype": "int16", "result_extension": ".nrrd"}, upload=upload))
    assert name.endswith(".nrrd")
    out = tmp_path / "out.nrrd"
    out.write_bytes(data)
    source, result = sitk.ReadImage(str(upload)), sitk.ReadImage(str(out))
    assert result.GetSize() == source.GetSize() and result.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(result.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(result.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(result.GetSpacing(), source.GetSpacing(), atol=1e-6)
    expected = in_process(served["models"], hu, affine, "ta0.5", segment=False).reconstruction_hu
    np.testing.assert_allclose(sitk.GetArrayFromImage(result).transpose(2, 1, 0), np.rint(expected), atol=1)
    assert params["variant"] == "ta0.5"  # the default variant


def test_segmentation_returns_labels_with_their_names_on_the_inputs_voxels(served):
    hu, affine = served["volumes"]["oblique"]
    params, data, name = multipart_result(served["server"].infer("segmentation", "oblique"))
    labels = nifti_from_bytes(data, name)
    assert labels.shape == hu.shape and labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(labels.affine, affine, atol=1e-5)
    assert params["label_names"] == {"liver": 1, "tumor": 2}
    expected = in_process(served["models"], hu, affine, None, segment=True).labels
    np.testing.assert_array_equal(np.asarray(labels.dataobj), expected)
    # the same volume uploaded as NRRD: the same labels, on the NRRD's grid
    upload = served["root"] / "oblique.nrrd"
    write_nrrd(upload, hu, affine)
    _, data, name = multipart_result(served["server"].infer("segmentation", params={"result_extension": ".nrrd"},
                                                            upload=upload))
    result = served["root"] / "labels.nrrd"
    result.write_bytes(data)
    image = sitk.ReadImage(str(result))
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), expected)
    np.testing.assert_allclose(image.GetOrigin(), sitk.ReadImage(str(upload)).GetOrigin(), atol=1e-4)


def test_reconstruct_segment_stores_the_reconstruction_for_a_datastore_image(served):
    server, hu_affine = served["server"], served["volumes"]["oblique"]
    params, data, name = multipart_result(server.infer("reconstruct_segment", "oblique", {"variant": "ta0.5"}))
    expected = in_process(served["models"], *hu_affine, "ta0.5", segment=True)
    np.testing.assert_array_equal(np.asarray(nifti_from_bytes(data, name).dataobj), expected.labels)
    assert params["reconstruction"]["tag"] == "reconstruction_ta0.5"
    stored = requests.get(server.url + params["reconstruction"]["url"], timeout=30)
    assert stored.status_code == 200
    volume = nifti_from_bytes(stored.content)
    np.testing.assert_allclose(volume.affine, hu_affine[1], atol=1e-5)
    np.testing.assert_allclose(np.asarray(volume.dataobj), expected.reconstruction_hu, atol=1e-3)
    stored_files = served["studies"] / "labels" / "reconstruction_ta0.5"
    assert [p.name for p in stored_files.glob("oblique.*")] == ["oblique.nii"]  # float32: uncompressed
    # the same request in int16 replaces it (gzip-compressed): one stored reconstruction per image and variant
    params, _, _ = multipart_result(server.infer("reconstruct_segment", "oblique", {"variant": "ta0.5",
                                                                                    "output_dtype": "int16"}))
    assert [p.name for p in stored_files.glob("oblique.*")] == ["oblique.nii.gz"]
    volume = nifti_from_bytes(requests.get(server.url + params["reconstruction"]["url"], timeout=30).content)
    assert volume.get_data_dtype() == np.int16
    np.testing.assert_allclose(np.asarray(volume.dataobj), expected.reconstruction_hu, atol=0.5 + 1e-3)


def test_reconstruct_segment_of_an_upload_returns_the_reconstruction_in_the_reply(served, tmp_path):
    hu, affine = served["volumes"]["oblique"]
    upload = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(upload))
    params, data, name = multipart_result(served["server"].infer("reconstruct_segment", params={"variant": "joint0.5"},
                                                                 upload=upload))
    embedded = params["reconstruction"]
    assert embedded["encoding"] == "nifti+gzip+base64"
    volume = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(embedded["data"])))
    expected = in_process(served["models"], hu, affine, "joint0.5", segment=True)
    np.testing.assert_allclose(np.asarray(volume.dataobj), expected.reconstruction_hu, atol=1e-3)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    # a joint model is segmented by its own g, not the folder's segmenter
    assert params["segmenter"] == "joint0.5"
    np.testing.assert_array_equal(np.asarray(nifti_from_bytes(data, name).dataobj), expected.labels)


def test_inputs_unlike_the_training_data_are_served_with_a_warning(served):
    params, data, name = multipart_result(served["server"].infer("reconstruction", "fine"))
    assert params["resampled"] and params["model_spacing_mm"] == [SPACING[0], SPACING[0]]
    assert any("pixel spacing 0.7 mm" in w for w in params["warnings"])
    assert nifti_from_bytes(data, name).shape == served["volumes"]["fine"][0].shape


@pytest.mark.parametrize("task,query,params,status,message", [
    ("magic", "oblique", {}, 404, "unknown model 'magic'; this server has reconstruct_segment, reconstruction, segmentation"),
    ("reconstruction", "nobody", {}, 404, "unknown image id 'nobody'"),
    ("reconstruction", "oblique", {"variant": "ta0.7"}, 404, "unknown variant 'ta0.7'; this server has baseunet, joint0.5, ta0.5"),
    ("reconstruction", "oblique", {"output_dtype": "uint8"}, 422, "output_dtype 'uint8' is not supported"),
    ("reconstruction", "oblique", {"batch_size": 0}, 422, "batch_size must be an integer from 1 to 256"),
    ("segmentation", "oblique", {"result_extension": ".png"}, 422, "result_extension '.png' is not supported"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(served, task, query, params, status, message):
    reply = served["server"].infer(task, query, params)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["detail"]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _bad_uploads(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each bad file and a phrase its refusal must contain."""
    folder.mkdir(exist_ok=True)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    good = body((32, 32, 4), 3)
    cases = {}

    def nifti(name: str, array: np.ndarray, phrase: str) -> None:
        nib.save(nib.Nifti1Image(array, affine), str(folder / name))
        cases[name] = (folder / name, phrase)

    (folder / "empty.nii.gz").write_bytes(b"")
    cases["empty"] = (folder / "empty.nii.gz", "cannot be read as NIfTI")
    corrupt = gzip.compress(nib.Nifti1Image(good, affine).to_bytes())[:400]
    (folder / "corrupt.nii.gz").write_bytes(corrupt)
    cases["corrupt"] = (folder / "corrupt.nii.gz", "cannot be read as NIfTI")
    (folder / "notes.txt").write_text("not an image")
    cases["text"] = (folder / "notes.txt", "unsupported file type")
    nifti("flat.nii", good[:, :, 0].copy(), "array is 2-D")
    nifti("series.nii", np.stack([good, good], axis=-1), "array is 4-D")
    with_nan = good.copy()
    with_nan[3, 3, 1] = np.nan
    nifti("nan.nii", with_nan, "NaN")
    nifti("normalised.nii", np.clip((good + 1000) / 2000, 0, 1).astype(np.float32), "no air")
    nifti("tiny.nii", good[:8, :8], "too small")
    # 4096 x 4096 x 2000 voxels: a header that claims them, without the 128 GB of data
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 2000))
    header.set_data_dtype(np.int16)
    header.set_qform(affine, 1)
    (folder / "huge.nii").write_bytes(header.binaryblock + b"\x00" * 4)
    cases["huge"] = (folder / "huge.nii", "more than the")
    return cases


def test_bad_uploads_are_refused_by_name_and_the_server_keeps_serving(served, tmp_path):
    server, studies = served["server"], served["studies"]
    before = _tree(studies)
    for name, (path, phrase) in _bad_uploads(tmp_path).items():
        for task in ("reconstruction", "reconstruct_segment"):
            reply = server.infer(task, upload=path)
            assert reply.status_code == 422, f"{name} {task}: {reply.status_code} {reply.text[:300]}"
            assert phrase in reply.json()["detail"], (name, reply.json())
        stored = requests.put(f"{server.url}/datastore/", params={"image": f"bad-{name}"},
                              files={"file": (path.name, path.read_bytes())}, timeout=60)
        assert stored.status_code == 422 and phrase in stored.json()["detail"], (name, stored.text)
        assert server.info()["name"] == "TaskAdaptiveCT"
    assert _tree(studies) == before, "a refused upload changed the datastore"


def _label_file(folder: Path, array: np.ndarray, affine: np.ndarray, name: str) -> Path:
    path = folder / name
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def test_saved_labels_are_checked_against_their_image_and_stored_atomically(served, tmp_path):
    server, studies = served["server"], served["studies"]
    hu, affine = served["volumes"]["oblique"]
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[6:18, 5:15, 1:4] = 1
    labels[8:11, 7:10, 2] = 2

    def put(path: Path, image: str = "oblique", tag: str = "final") -> requests.Response:
        return requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": tag},
                            files={"label": (path.name, path.read_bytes()), "params": (None, "{}")}, timeout=60)

    before = _tree(studies)
    refused = {
        "shape": (_label_file(tmp_path, labels[:, :, :3], affine, "short.nii.gz"), "oblique", "differs from the image's"),
        "geometry": (_label_file(tmp_path, labels, affine @ np.diag([1, 1, 1.01, 1]), "moved.nii.gz"), "oblique",
                     "voxel-to-world transform differs"),
        "values": (_label_file(tmp_path, labels * 3, affine, "values.nii.gz"), "oblique", "values [3, 6] are not labels"),
        "image": (_label_file(tmp_path, labels, affine, "orphan.nii.gz"), "nobody", "unknown image id 'nobody'"),
    }
    for name, (path, image, phrase) in refused.items():
        reply = put(path, image)
        assert reply.status_code in (404, 422), (name, reply.text)
        assert phrase in reply.json()["detail"], (name, reply.json())
    assert put(refused["values"][0], tag="../escape").status_code == 422
    assert _tree(studies) == before

    # A good label, uploaded compressed, is stored as the image's label (uncompressed beside a .nii image).
    reply = put(_label_file(tmp_path, labels.astype(np.int16), affine, "good.nii.gz"))
    assert reply.status_code == 200, reply.text
    stored = nib.load(str(studies / "labels" / "final" / "oblique.nii"))
    assert stored.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(stored.dataobj), labels)
    np.testing.assert_allclose(stored.affine, affine, atol=1e-6)
    fetched = requests.get(f"{server.url}/datastore/label", params={"label": "oblique", "tag": "final"}, timeout=30)
    np.testing.assert_array_equal(np.asarray(nifti_from_bytes(fetched.content).dataobj), labels)
    assert not list((studies / "labels" / "final").glob("oblique.nii.gz")), "no second copy under another extension"
    assert not list(studies.rglob("*.tmp*")) and not list((studies / ".incoming").glob("*"))


def test_eight_concurrent_requests_all_succeed_with_the_answers_of_single_requests(served):
    server = served["server"]
    requests_ = [("reconstruction", "oblique", {"variant": v}) for v in ("ta0.5", "baseunet", "joint0.5")] + [
        ("segmentation", "oblique", {}), ("reconstruct_segment", "oblique", {"variant": "ta0.5", "return_reconstruction": False}),
        ("reconstruction", "fine", {}), ("segmentation", "fine", {}), ("reconstruction", "oblique", {"output_dtype": "int16"})]
    single = [multipart_result(server.infer(*r))[1] for r in requests_]
    answers: list = [None] * len(requests_)

    def ask(i: int) -> None:
        answers[i] = server.infer(*requests_[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests_))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    for i, reply in enumerate(answers):
        _, data, name = multipart_result(reply)
        first, again = nifti_from_bytes(single[i], name), nifti_from_bytes(data, name)
        np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(first.dataobj), err_msg=str(requests_[i]))


def test_a_model_published_into_the_folder_is_served_without_a_restart(served):
    server, models = served["server"], served["models"]
    hu, affine = served["volumes"]["oblique"]
    torch.manual_seed(42)
    newer = served["root"] / "models" / "ta0.9.pt"
    save_model(newer, "reconstruction", 0.9, NET, {"reconstructor": build_reconstruction_net(NET)}, 1,
               {"val_dice_volume": 0.9}, imaging=imaging())
    try:
        info = server.info()
        assert "ta0.9" in info["models"]["reconstruction"]["variants"]
        assert info["models"]["reconstruction"]["default_variant"] == "ta0.9"
        _, data, name = multipart_result(server.infer("reconstruction", "oblique", {"variant": "ta0.9"}))
        expected = in_process({"ta0.9": newer}, hu, affine, "ta0.9", segment=False).reconstruction_hu
        np.testing.assert_allclose(np.asarray(nifti_from_bytes(data, name).dataobj), expected, atol=1e-3)
    finally:
        newer.unlink()
    assert "ta0.9" not in server.info()["models"]["reconstruction"]["variants"]


# --------------------------------------------------------------------------- model folder, in process


@pytest.fixture()
def model_folder_module():
    """The app's `lib` package, importable as MONAI Label imports it (the app folder on the path)."""
    sys.path.insert(0, str(APP))
    try:
        import lib.models as module

        yield module
    finally:
        sys.path.remove(str(APP))


def test_model_folder_names_models_by_what_they_are_and_reports_unusable_files(model_folder_module, tmp_path):
    paths = write_models(tmp_path)
    (tmp_path / "notes.pt").write_text("not a model")
    folder = model_folder_module.ModelFolder(tmp_path)
    assert set(folder.models()) == {"segmentation", "ta0.5", "baseunet", "joint0.5"}
    assert "not a TaskAdaptiveCT model file" in folder.problems[str(tmp_path / "notes.pt")]
    # the same name twice: the file written last is served
    import os

    copy = tmp_path / "ta-copy.pt"
    copy.write_bytes(paths["ta0.5"].read_bytes())
    os.utime(copy, ns=(paths["ta0.5"].stat().st_mtime_ns + 10**9,) * 2)
    assert folder.models()["ta0.5"].model.path == copy
    assert folder.default_variant("baseunet") == "baseunet" and folder.default_variant("nothing") == "ta0.5"


def test_task_uncertainty_ranks_a_deliberately_ambiguous_image_first(model_folder_module, tmp_path):
    """The real strategy on a real MONAI Label datastore, with an f and g whose answers are known.

    f is the identity and g thresholds at 0 HU (liver) and 500 HU (tumour) (the modules of
    test_grid): an organ of 0 HU sits exactly on g's boundary, so g cannot decide there.
    """
    from monailabel.datastore.local import LocalDatastore

    from test_grid import Identity, Threshold, model_file

    from lib.activelearning.task_uncertainty import TaskUncertainty

    ServedModel = model_folder_module.ServedModel

    class KnownModels(model_folder_module.ModelFolder):
        def models(self):
            return {"segmentation": ServedModel("segmentation", model_file("segmentation", (2.0, 2.0)), Threshold()),
                    "ta0.5": ServedModel("ta0.5", model_file("reconstruction", (2.0, 2.0)), Identity())}

    studies = tmp_path / "studies"
    studies.mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    organ_hu = {"clear-a": 250.0, "ambiguous": 0.0, "clear-b": 900.0, "clear-c": 200.0}
    for name, organ in organ_hu.items():
        hu = np.full((24, 24, 3), -1000.0, dtype=np.float32)
        hu[3:21, 3:21] = 250.0
        hu[6:18, 6:18] = organ
        nib.save(nib.Nifti1Image(hu, affine), str(studies / f"{name}.nii"))
    datastore = LocalDatastore(str(studies), extensions=["*.nii"], auto_reload=False)
    strategy = TaskUncertainty(KnownModels(tmp_path / "models"), "ta0.5", batch_size=2, max_voxels=10**6)
    answer = strategy({"strategy": "task_uncertainty"}, datastore)
    assert answer["id"] == "ambiguous"
    assert [item["id"] for item in answer["ranking"]][0] == "ambiguous"
    assert answer["ranking"][0]["uncertainty"] > 2 * answer["ranking"][1]["uncertainty"]
    # an image a clinician has corrected is not proposed again
    datastore.save_label("ambiguous", str(studies / "ambiguous.nii"), "final", {"corrected": True})
    assert strategy({}, datastore)["id"] != "ambiguous"


def test_a_stop_waits_until_a_just_submitted_training_has_a_process(model_folder_module):
    """MONAI Label stops a training by killing its process; a task still SUBMITTED has none (lib.guards)."""
    import asyncio

    import lib.guards as guards
    from monailabel.utils.async_tasks.utils import background_tasks

    task = {"id": "t", "status": "SUBMITTED"}
    saved = background_tasks.get("train")
    background_tasks["train"] = [task]
    try:
        async def start_later() -> float:
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, task.update, {"status": "RUNNING"})
            began = loop.time()
            await guards._until_train_task_started(timeout=5.0)
            return loop.time() - began

        waited = asyncio.run(start_later())
        assert 0.3 <= waited < 1.0
        task["status"] = "SUBMITTED"  # one that never starts: the stop goes ahead after the timeout
        began = time.monotonic()
        asyncio.run(guards._until_train_task_started(timeout=0.2))
        assert 0.2 <= time.monotonic() - began < 1.0
    finally:
        if saved is None:
            background_tasks.pop("train", None)
        else:
            background_tasks["train"] = saved

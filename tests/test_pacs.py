"""The app on a PACS: a real Orthanc (Debian's, DICOMweb plugin) on loopback, a real MONAI Label server on it.

Series are written by ``training.dicom_series``, stored with STOW-RS, served by the app
by their Series Instance UID; results are read back from Orthanc with pydicom. Orthanc
runs a Lua ``ReceivedInstanceFilter`` (below) that refuses two kinds of instance, so that
refused stores can be tested: any instance whose Image Comments say ``refuse``, and the
app's reconstructions of the patient ``TACT-REFUSE``.

The last test stops Orthanc: keep it last.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
import requests
import SimpleITK as sitk

from app_server import MonaiLabelServer, body, free_port, in_process, multipart_result, nifti_from_bytes, write_models
from training.dicom_series import SeriesInfo, ct_series, read_series, study_dataset, write_series
from training.dicomweb import StowError, dicomweb_client, store_series, stored_instances
from training.loaders import read_volume, to_closest_canonical
from training.orthanc import OrthancServer, port_is_free

ROOT = Path(__file__).resolve().parents[1]

REFUSING_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.ImageComments == "refuse" then
    return false
  end
  local description = dicom.SeriesDescription or ""
  if dicom.PatientID == "TACT-REFUSE" and string.find(description, "TaskAdaptiveCT", 1, true) == 1 then
    return false
  end
  return true
end
"""

AFFINE = np.array([[-2.0, 0, 0, 40.0], [0, -1.6, 0, 30.0], [0, 0, 3.0, -60.0], [0, 0, 0, 1]])  # LPS voxel order


def make_series(patient: str, description: str, shape=(40, 36, 5), seed: int = 1, affine=AFFINE,
                modality: str = "CT") -> list[pydicom.Dataset]:
    study = study_dataset(patient, f"Test^{patient}", pydicom.uid.generate_uid(), "test study",
                          pydicom.uid.generate_uid())
    datasets = ct_series(body(shape, seed), affine, study,
                         SeriesInfo(description, 1, ("DERIVED", "PRIMARY", "AXIAL"), "test", pydicom.uid.generate_uid()))
    for ds in datasets:
        ds.Modality = modality
    return datasets


def header_affine(datasets: list[pydicom.Dataset]) -> np.ndarray:
    """Voxel-to-RAS affine of a series in LPS voxel order (columns, rows, slices), from its headers alone."""
    first = min(datasets, key=lambda ds: int(ds.InstanceNumber))
    last = max(datasets, key=lambda ds: int(ds.InstanceNumber))
    row_dir, col_dir = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    spacing_rows, spacing_cols = (float(v) for v in first.PixelSpacing)
    origin = np.array(first.ImagePositionPatient, float)
    step = (np.array(last.ImagePositionPatient, float) - origin) / max(len(datasets) - 1, 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * spacing_cols, col_dir * spacing_rows, step, origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    lua = root / "refuse.lua"
    lua.write_text(REFUSING_FILTER)
    server = OrthancServer(root / "orthanc", http_port=free_port(), lua_scripts=(lua,))
    server.start()
    client = dicomweb_client(server.dicomweb_url)
    series = {"good": make_series("TACT-GOOD", "Low-dose CT (test)"),
              "refuse": make_series("TACT-REFUSE", "Low-dose CT (test)", seed=2),
              "mr": make_series("TACT-MR", "An MR series", seed=3, modality="MR"),
              "one": make_series("TACT-ONE", "One slice", shape=(40, 36, 1), seed=4)}
    uneven = make_series("TACT-UNEVEN", "Missing slice", shape=(40, 36, 6), seed=5)
    series["uneven"] = uneven[:3] + uneven[4:]
    tilted = make_series("TACT-TILT", "Gantry tilt", seed=6)
    for k, ds in enumerate(tilted):  # the slices shift along y as z rises: a tilted gantry's stack
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 1.5 * k, z]
    series["tilt"] = tilted
    for datasets in series.values():
        store_series(client, datasets)
    yield {"server": server, "client": client, "series": series, "root": root}
    server.stop()


@pytest.fixture(scope="module")
def app(pacs):
    root = pacs["root"]
    models = write_models(root / "models")
    server = MonaiLabelServer(pacs["server"].dicomweb_url, root, conf={"models": str(root / "models"), "batch_size": "2"},
                              env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache")})
    yield {"server": server, "models": models}
    server.stop()


def uid(pacs, name: str) -> str:
    return str(pacs["series"][name][0].SeriesInstanceUID)


def fetch_series(client, study_uid: str, series_uid: str, folder: Path) -> list[pydicom.Dataset]:
    instances = client.retrieve_series(study_uid, series_uid)
    write_series(sorted(instances, key=lambda ds: int(ds.InstanceNumber)), folder)
    return instances


# ----------------------------------------------------------------------------- Orthanc itself

def test_orthanc_runs_on_loopback_with_its_own_configuration_and_storage(pacs):
    server = pacs["server"]
    config = json.loads((server.folder / "orthanc.json").read_text())
    assert config["RemoteAccessAllowed"] is False and config["DicomServerEnabled"] is False
    assert config["StorageDirectory"] == str(server.folder / "storage")
    assert any((server.folder / "storage").iterdir())  # what the fixture stored is there, not in /var/lib/orthanc
    system = requests.get(server.url + "/system", timeout=10).json()
    assert system["Name"] == "TaskAdaptiveCT-PACS"
    assert "dicom-web" in requests.get(server.url + "/plugins", timeout=10).json()


def test_a_second_orthanc_stops_cleanly_and_frees_its_port(tmp_path):
    port = free_port()
    with OrthancServer(tmp_path / "orthanc", http_port=port) as server:
        assert server.answers() and not port_is_free(port)
        process = server.process
    assert process.poll() == 0  # SIGTERM: Orthanc closed its database and exited normally
    assert port_is_free(port) and not server.answers()
    assert "Orthanc has stopped" in (tmp_path / "orthanc" / "orthanc.log").read_text()


def test_tact_orthanc_serves_until_sigterm_and_then_stops_orthanc(tmp_path):
    import signal
    import time

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "training.cli", "orthanc", "--dir", str(tmp_path / "pacs"),
                                "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "stop with Ctrl-C" in line:
                break
        assert f"http://127.0.0.1:{port}/dicom-web" in "".join(lines), "".join(lines)
        assert requests.get(f"http://127.0.0.1:{port}/system", timeout=10).ok
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == 0
    deadline = time.monotonic() + 10
    while not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert port_is_free(port)  # Orthanc went with it


# ----------------------------------------------------------------------------- tact export-dicom

@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """A one-case simulated data set (32 x 32 x 3)."""
    from training.phantom import write_phantom_dataset
    from training.simulate import SimulationSettings, simulate_dataset

    root = tmp_path_factory.mktemp("simulated")
    write_phantom_dataset(root / "lits", 1, size=32, slices=3, seed=2, progress=False)
    simulate_dataset(root / "lits", root / "dataset", SimulationSettings(size=32, num_angles=24, photons=1e4),
                     workers=1, progress=False)
    return root / "dataset"


def test_tact_export_dicom_round_trips_a_data_set_through_orthanc(pacs, simulated, tmp_path):
    from training.dataset import SimulatedDataset

    done = subprocess.run([sys.executable, "-m", "training.cli", "export-dicom", str(simulated), "--out",
                           str(tmp_path / "dicom"), "--stow", pacs["server"].dicomweb_url, "-q"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    dataset = SimulatedDataset(simulated)
    case = dataset.case_ids()[0]
    written = {m: read_series(tmp_path / "dicom" / case / m) for m in ("lowdose", "fulldose")}
    low, full = written["lowdose"][0], written["fulldose"][0]
    assert low.StudyInstanceUID == full.StudyInstanceUID and low.SeriesInstanceUID != full.SeriesInstanceUID
    assert low.FrameOfReferenceUID == full.FrameOfReferenceUID
    assert len({ds.SOPInstanceUID for ds in written["lowdose"] + written["fulldose"]}) == 2 * len(written["lowdose"])
    assert (low.RescaleIntercept, low.RescaleSlope, low.PixelRepresentation) == (-1024, 1, 1)
    assert low.SeriesDescription.startswith("Low-dose") and "N0 = 10000" in low.DerivationDescription
    for method, datasets in written.items():
        series = datasets[0]
        # what Orthanc holds, read back with the project's strict loader
        assert stored_instances(pacs["client"], series.StudyInstanceUID, series.SeriesInstanceUID) == \
            {ds.SOPInstanceUID for ds in datasets}
        folder = tmp_path / "back" / method
        fetch_series(pacs["client"], series.StudyInstanceUID, series.SeriesInstanceUID, folder)
        hu, affine = to_closest_canonical(*read_volume(folder))
        image = dataset.volume(method, case)
        np.testing.assert_allclose(affine, image.affine, atol=1e-4)
        assert np.abs(hu - np.asarray(image.dataobj)).max() <= 0.5 + 1e-3  # the rescale rounds to 1 HU
        spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
        assert float(series.SliceThickness) == pytest.approx(spacing[2])
        np.testing.assert_allclose([float(v) for v in series.PixelSpacing], [spacing[1], spacing[0]], atol=1e-6)
    # exporting again gives the same UIDs: the PACS does not fill with copies
    again = subprocess.run([sys.executable, "-m", "training.cli", "export-dicom", str(simulated), "--out",
                            str(tmp_path / "again"), "--methods", "lowdose", "-q"], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert read_series(tmp_path / "again" / case / "lowdose")[0].SOPInstanceUID == low.SOPInstanceUID


def test_tact_export_dicom_names_a_stow_url_it_cannot_use_before_writing_anything(simulated, tmp_path, capsys):
    from training.cli import main

    for url, problem in (("ftp://pacs/dicom-web", "starts with http:// or https://"),
                         (f"http://127.0.0.1:{free_port()}/dicom-web", "does not answer")):
        with pytest.raises(SystemExit) as exit_info:
            main(["export-dicom", str(simulated), "--out", str(tmp_path / "out"), "--stow", url, "-q"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "--stow: " in error and problem in error, error
        assert not (tmp_path / "out").exists()


def test_a_refused_store_is_reported_and_nothing_of_the_series_is_left(pacs):
    datasets = make_series("TACT-PARTIAL", "Partly refused", seed=7)
    datasets[2].ImageComments = "refuse"  # Orthanc's filter drops this one instance, yet STOW-RS reports success
    with pytest.raises(StowError, match=r"kept 4 of 5 instances.*nothing of it is left") as error:
        store_series(pacs["client"], datasets)
    assert error.value.series_uid == datasets[0].SeriesInstanceUID
    assert stored_instances(pacs["client"], datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID) == set()


# ----------------------------------------------------------------------------- the app on DICOMweb

def test_the_app_lists_the_pacs_ct_series_as_images(pacs, app):
    listing = requests.get(app["server"].url + "/datastore/", params={"output": "all"}, timeout=30)
    assert listing.status_code == 200, listing.text
    objects = listing.json()["objects"]
    for name in ("good", "refuse", "one", "uneven", "tilt"):
        assert uid(pacs, name) in objects
    assert uid(pacs, "mr") not in objects  # not CT
    info = objects[uid(pacs, "good")]["image"]["info"]
    assert (info["SeriesDescription"], info["PatientID"]) == ("Low-dose CT (test)", "TACT-GOOD")


def test_segmentation_and_reconstruction_run_on_a_series_by_its_uid_on_the_series_geometry(pacs, app, tmp_path):
    server, series = app["server"], pacs["series"]["good"]
    expected_affine = header_affine(series)
    np.testing.assert_allclose(expected_affine, AFFINE, atol=1e-6)  # the writer put the grid into the headers
    folder = tmp_path / "good"
    write_series(series, folder)
    hu, affine = read_volume(folder)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-5)  # the loader agrees with the headers
    params, data, name = multipart_result(server.infer("segmentation", uid(pacs, "good")))
    labels = nifti_from_bytes(data, name)
    np.testing.assert_allclose(labels.affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(labels.dataobj), in_process(app["models"], hu, affine, None, True).labels)
    params, data, name = multipart_result(server.infer("reconstruction", uid(pacs, "good"), {"variant": "baseunet"}))
    volume = nifti_from_bytes(data, name)
    np.testing.assert_allclose(volume.affine, expected_affine, atol=1e-4)
    reference = in_process(app["models"], hu, affine, "baseunet", False).reconstruction_hu
    np.testing.assert_allclose(np.asarray(volume.dataobj), reference, atol=1e-3)


def test_reconstruct_segment_stores_the_reconstruction_as_a_derived_series_of_the_study(pacs, app, tmp_path):
    server, source = app["server"], pacs["series"]["good"]
    params, data, name = multipart_result(server.infer("reconstruct_segment", uid(pacs, "good"), {"variant": "ta0.5"}))
    stored = params["reconstruction"]
    assert stored["study_uid"] == source[0].StudyInstanceUID and stored["series_uid"] != source[0].SeriesInstanceUID
    derived = fetch_series(pacs["client"], stored["study_uid"], stored["series_uid"], tmp_path / "derived")
    first = min(derived, key=lambda ds: int(ds.InstanceNumber))
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert first.SeriesDescription == "TaskAdaptiveCT reconstruction ta0.5 a=0.5"
    assert "ta0.5" in first.DerivationDescription and "alpha = 0.5" in first.DerivationDescription
    assert (first.PatientID, first.FrameOfReferenceUID) == (source[0].PatientID, source[0].FrameOfReferenceUID)
    by_position = {tuple(float(v) for v in ds.ImagePositionPatient): ds.SOPInstanceUID for ds in source}
    for ds in derived:  # each slice points at the source slice at its position
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == \
            by_position[tuple(float(v) for v in ds.ImagePositionPatient)]
    hu, affine = read_volume(tmp_path / "derived")
    np.testing.assert_allclose(affine, header_affine(source), atol=1e-4)  # on the source's grid
    folder = tmp_path / "good"
    write_series(source, folder)
    expected = in_process(app["models"], *read_volume(folder), "ta0.5", True)
    assert np.abs(hu - expected.reconstruction_hu).max() <= 0.5 + 1e-3
    np.testing.assert_array_equal(np.asarray(nifti_from_bytes(data, name).dataobj), expected.labels)
    # the reconstruction is not offered as an image to reconstruct again
    listing = requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert stored["series_uid"] not in listing


def test_a_corrected_label_goes_back_to_the_study_as_dicom_seg(pacs, app, tmp_path):
    server, source = app["server"], pacs["series"]["good"]
    folder = tmp_path / "good"
    write_series(source, folder)
    hu, affine = read_volume(folder)
    labels = np.zeros(hu.shape, np.uint8)
    labels[5:20, 4:18, 1:4] = 1
    labels[8:12, 6:9, 2] = 2
    path = tmp_path / "final.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), str(path))
    reply = requests.put(f"{server.url}/datastore/label", params={"image": uid(pacs, "good"), "tag": "final"},
                         files={"label": (path.name, path.read_bytes()), "params": (None, "{}")}, timeout=120)
    assert reply.status_code == 200, reply.text
    segs = pacs["client"].search_for_series(source[0].StudyInstanceUID, search_filters={"Modality": "SEG"})
    assert len(segs) == 1
    seg_uid = segs[0]["0020000E"]["Value"][0]
    seg = pacs["client"].retrieve_series(source[0].StudyInstanceUID, seg_uid)[0]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver", "Tumour"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT liver
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    image = pydicom_seg.MultiClassReader().read(seg).image
    back = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    np.testing.assert_allclose(image.GetOrigin(), [float(v) for v in source[0].ImagePositionPatient], atol=1e-4)
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("name, problem", [("mr", "is a MR series, not CT"), ("one", "1 file"),
                                           ("uneven", "not evenly spaced"), ("tilt", "gantry tilt")])
def test_series_the_app_cannot_serve_are_refused_naming_them(pacs, app, name, problem):
    reply = app["server"].infer("segmentation", uid(pacs, name))
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert uid(pacs, name) in detail and problem in detail
    cache = next((pacs["root"] / "cache").iterdir())
    assert not (cache / "dicom" / uid(pacs, name)).exists() and not list((cache / ".incoming").iterdir())


def test_a_seg_series_is_refused_as_not_ct(pacs, app):
    study = pacs["series"]["good"][0].StudyInstanceUID
    segs = pacs["client"].search_for_series(study, search_filters={"Modality": "SEG"})
    if not segs:
        pytest.fail("the DICOM SEG test must run first (it stores the SEG)")
    reply = app["server"].infer("segmentation", segs[0]["0020000E"]["Value"][0])
    assert reply.status_code == 422 and "is a SEG series, not CT" in reply.json()["detail"]


def test_a_reconstruction_the_pacs_refuses_is_reported_and_not_left_half_stored(pacs, app):
    source = pacs["series"]["refuse"][0]
    reply = app["server"].infer("reconstruct_segment", uid(pacs, "refuse"), {"variant": "ta0.5"})
    assert reply.status_code == 502, reply.text
    assert "the reconstruction" in reply.json()["detail"] and "nothing of it is left" in reply.json()["detail"]
    series = pacs["client"].search_for_series(source.StudyInstanceUID)
    assert [s["0020000E"]["Value"][0] for s in series] == [source.SeriesInstanceUID]


def test_the_ohif_viewer_shows_the_study_and_segments_it_through_the_monai_label_panel(pacs, app, tmp_path):
    """Headless Chromium on the app's /ohif/: study list, both series in the viewer, the panel's Run, its overlay."""
    from ohif_browser import (By, coloured_fraction, connect_monai_label_panel, hide_disclaimer, open_browser, page_text,
                              save_screenshot, viewport_pixels, wait_for)

    server, source = app["server"], pacs["series"]["good"][0]
    derived = [s for s in pacs["client"].search_for_series(source.StudyInstanceUID, search_filters={"Modality": "CT"})
               if s["0008103E"]["Value"][0].startswith("TaskAdaptiveCT reconstruction")]
    if not derived:
        pytest.fail("the reconstruct_segment test must run first (it stores the derived series)")
    driver = open_browser()
    try:
        driver.get(f"{server.url}/ohif/")
        wait_for(lambda: "TACT-GOOD" in page_text(driver), what="the study in OHIF's study list")
        save_screenshot(driver, tmp_path / "study-list.png")
        driver.get(f"{server.url}/ohif/viewer?StudyInstanceUIDs={source.StudyInstanceUID}")
        wait_for(lambda: "I:1 (1/5)" in page_text(driver), what="the low-dose series in the viewport")
        hide_disclaimer(driver)
        text = page_text(driver)
        assert "Low-dose CT (test)" in text and "TaskAdaptiveCT reconstruction ta0.5" in text  # both series listed
        low_dose = viewport_pixels(driver)
        assert low_dose.std() > 10  # an image is drawn, not an empty viewport
        thumbnails = driver.find_elements(By.CSS_SELECTOR, "[data-cy='study-browser-thumbnail']")
        assert len(thumbnails) == 2
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(driver).double_click(thumbnails[1]).perform()  # the derived series into the viewport
        wait_for(lambda: np.abs(viewport_pixels(driver).astype(int) - low_dose).mean() > 5,
                 what="the reconstruction series in the viewport")
        save_screenshot(driver, tmp_path / "viewer-reconstruction.png")
        # the MONAI Label mode: the panel connects to this server and runs the segmentation on the series shown
        driver.get(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={source.StudyInstanceUID}")
        wait_for(lambda: driver.find_elements(By.TAG_NAME, "canvas"), what="the MONAI Label mode's viewports")
        wait_for(lambda: viewport_pixels(driver).std() > 10, what="the image in the MONAI Label mode")
        hide_disclaimer(driver)
        before = coloured_fraction(viewport_pixels(driver))
        connect_monai_label_panel(driver, server.url)
        run = wait_for(lambda: [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Run"],
                       what="the panel's Run button (the panel did not connect)")
        requests_before = server.log.read_text().count("Infer Request")
        run[0].click()
        wait_for(lambda: coloured_fraction(viewport_pixels(driver)) > before + 0.05, timeout=120,
                 what="the segmentation overlay")
        save_screenshot(driver, tmp_path / "monai-label-panel.png")
    finally:
        driver.quit()
    # the overlay came from this server's segmentation task, run by the panel on the series shown
    asked = [line for line in server.log.read_text().splitlines() if "Infer Request" in line][requests_before:]
    assert len(asked) == 1 and "'model': 'segmentation'" in asked[0] and source.SeriesInstanceUID in asked[0]


def test_a_pacs_that_stops_gives_a_clear_error_and_the_app_keeps_serving(pacs, app):
    server = app["server"]
    pacs["server"].stop()
    reply = server.infer("segmentation", "1.2.826.0.1.3680043.8.498.1")  # a series not fetched before
    assert reply.status_code == 503
    assert pacs["server"].url in reply.json()["detail"] and "does not answer" in reply.json()["detail"]
    assert requests.get(server.url + "/info/", timeout=30).status_code == 200
    # a series fetched before is served from the cache
    params, data, name = multipart_result(server.infer("segmentation", uid(pacs, "good")))
    assert nifti_from_bytes(data, name).shape == (40, 36, 5)

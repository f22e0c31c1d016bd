"""The README's screenshots of the app on a PACS, in MONAI Label's OHIF viewer.

Starts a private Orthanc (``training.orthanc``), stores the real sample of ``tact serve``'s
demo studies as DICOM (``tact export-dicom``'s code: low-dose and full-dose series), starts
the app on it (a real ``monailabel start_server --studies <DICOMweb URL>``) with the
committed demo models, runs ``reconstruct_segment`` on the low-dose series (the derived
reconstruction series goes back to the study) and saves its labels as the study's DICOM
SEG; then opens ``/ohif/`` in headless Chromium and saves two screenshots: the viewer with
the reconstruction series displayed, and the MONAI Label mode after the panel's segmentation.

    .venv/bin/python docs/make_ohif_figure.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from app_server import MonaiLabelServer, free_port, multipart_result  # noqa: E402
from ohif_browser import (By, coloured_fraction, connect_monai_label_panel, hide_disclaimer, open_browser,  # noqa: E402
                          page_text, save_screenshot, viewport_pixels, wait_for)
from training.dicom_series import export_dataset, read_series  # noqa: E402
from training.dicomweb import dicomweb_client, store_series  # noqa: E402
from training.orthanc import OrthancServer  # noqa: E402
from training.serving import SAMPLE_CASE, prepare_studies  # noqa: E402

MODELS = ROOT / "apps" / "taskadaptive_ct" / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "serve")
    args = parser.parse_args()
    dataset = prepare_studies(MODELS, args.data).parent
    with tempfile.TemporaryDirectory(prefix="tact-ohif-") as work:
        work = Path(work)
        series = export_dataset(dataset, work / "dicom", cases=[SAMPLE_CASE])[SAMPLE_CASE]
        with OrthancServer(work / "orthanc", http_port=free_port()) as pacs:
            client = dicomweb_client(pacs.dicomweb_url)
            for folder in series.values():
                store_series(client, read_series(folder))
            low = read_series(series["lowdose"])[0]
            server = MonaiLabelServer(pacs.dicomweb_url, work, conf={"models": str(MODELS)}, threads=None,
                                      env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache")})
            try:
                params, labels, name = multipart_result(server.infer("reconstruct_segment", low.SeriesInstanceUID))
                print("reconstruction series:", params["reconstruction"]["description"])
                reply = requests.put(f"{server.url}/datastore/label",
                                     params={"image": low.SeriesInstanceUID, "tag": "final"},
                                     files={"label": (name, labels), "params": (None, "{}")}, timeout=300)
                reply.raise_for_status()
                screenshots(server.url, low.StudyInstanceUID, len(read_series(series["lowdose"])), args.out)
            finally:
                server.stop()


def screenshots(url: str, study_uid: str, slices: int, out: Path) -> None:
    driver = open_browser(1500, 860)
    try:
        driver.get(f"{url}/ohif/viewer?StudyInstanceUIDs={study_uid}")
        wait_for(lambda: f"(1/{slices})" in page_text(driver), what="the low-dose series")
        hide_disclaimer(driver)
        thumbnails = driver.find_elements(By.CSS_SELECTOR, "[data-cy='study-browser-thumbnail']")
        derived = [t for t in thumbnails if "TaskAdaptiveCT reconstruction" in t.text]
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(driver).double_click(derived[0]).perform()
        time.sleep(5)
        print("saved", save_screenshot(driver, out / "ohif_viewer.png"))
        driver.get(f"{url}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
        wait_for(lambda: viewport_pixels(driver).std() > 10, what="the MONAI Label mode")
        hide_disclaimer(driver)
        before = coloured_fraction(viewport_pixels(driver))
        connect_monai_label_panel(driver, url)
        run = wait_for(lambda: [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Run"],
                       what="the panel's Run button")
        run[0].click()
        wait_for(lambda: coloured_fraction(viewport_pixels(driver)) > before + 0.01, timeout=300, what="the overlay")
        time.sleep(2)
        print("saved", save_screenshot(driver, out / "ohif_monai_label.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()

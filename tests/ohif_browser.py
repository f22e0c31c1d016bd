"""MONAI Label's bundled OHIF viewer (``/ohif/``) in a real, headless Chromium (Debian's ``chromium``, driven
by Selenium through Debian's ``chromedriver``), for the PACS tests and the README's screenshot.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def open_browser(width: int = 1400, height: int = 900) -> webdriver.Chrome:
    """Headless Chromium; WebGL (which OHIF's viewports need) through SwiftShader, no GPU."""
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                     "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(condition: Callable[[], object], timeout: float = 60.0, what: str = "the page") -> object:
    """Poll ``condition`` until it returns something true (a vanishing element counts as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (StaleElementReferenceException, WebDriverException, IndexError):
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not appear within {timeout:g} s")


def page_text(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def hide_disclaimer(driver: webdriver.Chrome) -> None:
    """Close OHIF's 'investigational use only' banner, which covers the viewports' lower part."""
    for button in driver.find_elements(By.TAG_NAME, "button"):
        if button.text.strip() == "Confirm and Hide":
            button.click()
            return


def viewport_pixels(driver: webdriver.Chrome, index: int = 0) -> np.ndarray:
    """RGB pixels ``(H, W, 3)`` of the ``index``-th viewport's canvas as shown (the image, no text or border)."""
    element = driver.find_elements(By.TAG_NAME, "canvas")[index]
    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"))


def coloured_fraction(pixels: np.ndarray, threshold: int = 40) -> float:
    """Fraction of pixels that are clearly not grey (a CT is grey; a label overlay is coloured)."""
    channels = pixels.astype(np.int16)
    return float(((channels.max(axis=2) - channels.min(axis=2)) > threshold).mean())


def connect_monai_label_panel(driver: webdriver.Chrome, server_url: str) -> None:
    """Point the OHIF MONAI Label panel (it defaults to http://127.0.0.1:8000/) at ``server_url`` and connect."""
    def address_box():
        return [e for e in driver.find_elements(By.TAG_NAME, "input") if "http" in (e.get_attribute("value") or "")][0]

    wait_for(address_box, what="the MONAI Label panel's server address")
    address_box().send_keys(Keys.CONTROL + "a")
    address_box().send_keys(server_url.rstrip("/") + "/")
    address_box().find_element(By.XPATH, "following::button[1]").click()  # the panel's refresh/connect button


def save_screenshot(driver: webdriver.Chrome, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path

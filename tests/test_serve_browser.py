"""The viewer in a real browser: headless Chromium (the Debian package, driven by Selenium) opens the page
served by uvicorn on 127.0.0.1, enters the token, uploads a real slice and a NIfTI volume, and finds the
probabilities, the Grad-CAM overlay, the series plot and the research-use notice on the page.

Needs ``chromium`` and ``chromedriver`` on the PATH (``apt-get install chromium chromium-driver``; `.ci/run`
installs them). Without them the test is skipped, unless ``CROSSSITE_REQUIRE_BROWSER=1`` (set by CI), which
turns the skip into a failure. ``CROSSSITE_SCREENSHOT=FILE.png`` also saves the page there (the README's).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from crosssite.models.adaptation import DEFAULT_STRATEGY
from crosssite.data import read_image
from crosssite.inference import Predictor
from crosssite.serve import Service
from crosssite.serve.app import create_app
from test_serve import TOKEN, files, model_path  # noqa: F401  (module fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        message = "needs chromium and chromedriver (apt-get install chromium chromium-driver)"
        if os.environ.get("CROSSSITE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[str]:  # noqa: F811
    """The app on a free port of 127.0.0.1, served by uvicorn in a thread."""
    import uvicorn

    service = Service.from_file(model_path, top_k=3)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(service, token=TOKEN), log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    uv.should_exit = True
    thread.join(10)
    sock.close()


def central(grey: np.ndarray, h: int, w: int) -> np.ndarray:
    """The central (h, w) window of a slice: the slices of a volume share one shape."""
    top, left = (grey.shape[0] - h) // 2, (grey.shape[1] - w) // 2
    return grey[top : top + h, left : left + w]


def wait_for(driver: object, condition: str, timeout: float = 30.0) -> object:
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {condition};")
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {condition}")


def dark_fraction(png: Path) -> float:
    """The share of a screenshot's pixels that are (near) black: the empty image stage is a black box."""
    from PIL import Image

    grey = np.asarray(Image.open(png).convert("L"))
    return float((grey < 16).mean())


def test_viewer_before_any_upload_shows_no_empty_panel_and_no_error(
        browser: object, server: str, files: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """Before any upload the result panel stays hidden (no black box), the header asks for the token instead of
    reporting an error, and once the token is in, says in words how scans are normalised; after an upload of a
    4 x 4 image, the slice and its warning are on the page."""
    from selenium.webdriver.common.by import By

    browser.get(server)
    wait_for(browser, "!document.getElementById('token-box').hidden")
    line = browser.find_element(By.ID, "model-line").text
    assert "not available" not in line and "missing bearer token" not in line and "token" in line
    assert not browser.find_element(By.ID, "results").is_displayed()
    assert not browser.find_element(By.ID, "stage").is_displayed()
    before = tmp_path / "before.png"
    browser.save_screenshot(str(before))
    assert dark_fraction(before) < 0.01  # no empty black image stage

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-box button").click()
    wait_for(browser, "document.getElementById('model-line').textContent.includes('covidnet_redesign')")
    line = browser.find_element(By.ID, "model-line").text
    assert "mean-of-sites" not in line and "+standardise" not in line
    assert "average of the training hospitals' statistics" in line and "brightness and contrast" in line
    assert not browser.find_element(By.ID, "results").is_displayed()

    from PIL import Image

    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((4, 4), 90, np.uint8)).save(tiny)
    browser.find_element(By.ID, "files").send_keys(f"{files[0]}\n{tiny}")
    wait_for(browser, "document.getElementById('status').textContent.includes('slice(s)')")
    assert " 0 warning(s)" not in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "results").is_displayed()
    assert browser.find_element(By.ID, "warnings").is_displayed()
    assert "tiny.png: image of 4 x 4 pixels" in browser.find_element(By.ID, "warning-list").text
    buttons = browser.find_elements(By.CSS_SELECTOR, "#views button")
    assert buttons[1].find_elements(By.CSS_SELECTOR, ".flag")  # the tiny image's entry is flagged
    buttons[1].click()
    assert "below the minimum" in browser.find_element(By.ID, "slice-warnings").text
    assert "distance to the training sites" in browser.find_element(By.ID, "ood-line").text
    buttons[0].click()
    wait_for(browser, "document.getElementById('slice-img').complete && "
                      "document.getElementById('slice-img').naturalWidth")
    after = tmp_path / "after.png"
    browser.save_screenshot(str(after))
    rect = browser.execute_script("const r = document.getElementById('stage').getBoundingClientRect(); "
                                  "return [r.left, r.top, r.right, r.bottom].map((v) => v * devicePixelRatio);")
    from PIL import Image

    stage = np.asarray(Image.open(after).convert("L").crop(tuple(int(v) for v in rect)))
    assert stage.size > 300 * 300 and stage.std() > 20  # the slice (and its overlay) painted in the stage


def test_viewer_uploads_a_real_slice_and_shows_probability_and_overlay(
        browser: object, server: str, model_path: Path, files: list[Path], tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    slice_file = files[0]
    greys = [central(read_image(f), 190, 250) for f in files[:6]]
    nifti = tmp_path / "scan.nii.gz"
    volume = np.stack([np.round(g.T[::-1, ::-1] * 1500.0 - 1350.0) for g in greys], axis=-1)
    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.eye(4)), nifti)
    expected = Predictor.from_file(model_path, adapt=DEFAULT_STRATEGY, top_k=3).predict([slice_file, nifti])

    browser.get(server)
    assert "not a medical device" in browser.find_element(By.ID, "notice").text
    wait_for(browser, "!document.getElementById('token-box').hidden")  # /v1/model answered 401
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-box button").click()
    wait_for(browser, "document.getElementById('model-line').textContent.includes('covidnet_redesign')")

    browser.find_element(By.ID, "files").send_keys(f"{slice_file}\n{nifti}")
    wait_for(browser, "document.getElementById('status').textContent.includes('slice(s)')")
    status = browser.find_element(By.ID, "status").text
    assert "2 file(s): 7 slice(s), 1 series/volume(s), 0 error(s)" in status
    # a slice far from the training sites is a warning, unless its whole volume is (then the volume's one says it)
    far_volume = any(r.ood for r in expected if r.kind == "volume")
    flagged = sum(bool(r.ood) for r in expected if r.kind == "slice" and not (far_volume and r.volume))
    assert f" {flagged + far_volume} warning(s)" in status

    # the real slice: its probability and its Grad-CAM overlay
    assert browser.find_element(By.ID, "view-title").text == slice_file.name
    assert browser.find_element(By.ID, "p-covid").text == f"{expected[0].p_covid:.3f}"
    assert browser.find_element(By.ID, "label").text == expected[0].label
    assert wait_for(browser, "document.getElementById('cam-img').complete && "
                             "document.getElementById('cam-img').naturalWidth") == 64
    assert browser.execute_script("return document.getElementById('slice-img').naturalWidth") == 64
    opacity = browser.find_element(By.ID, "opacity")
    browser.execute_script("arguments[0].value = 60; arguments[0].dispatchEvent(new Event('input'))", opacity)
    assert browser.execute_script("return document.getElementById('cam-img').style.opacity") == "0.6"

    # the volume: the plot along the series, the scan score, scrolling to another slice
    buttons = browser.find_elements(By.CSS_SELECTOR, "#views button")
    assert len(buttons) == 2
    buttons[1].click()
    volume_row = expected[-1]
    assert f"scan score {volume_row.p_covid:.3f}" in browser.find_element(By.ID, "volume-score").text
    assert browser.find_element(By.ID, "plot").is_displayed()
    assert browser.find_element(By.ID, "slice-pos").text == "1 / 6"
    slider = browser.find_element(By.ID, "slice-range")
    browser.execute_script("arguments[0].value = 4; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert browser.find_element(By.ID, "slice-pos").text == "5 / 6"
    assert browser.find_element(By.ID, "p-covid").text == f"{expected[5].p_covid:.3f}"
    painted = browser.execute_script(
        "const c = document.getElementById('plot'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height)"
        ".data; let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i+2] > 200 && d[i] < 80) n++; return n;")
    assert painted > 50  # the blue P(COVID) line is drawn

    shot = tmp_path / "viewer.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("CROSSSITE_SCREENSHOT"):
        shutil.copy(shot, os.environ["CROSSSITE_SCREENSHOT"])


def test_viewer_names_a_bad_file_in_words(browser: object, server: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    browser.find_element(By.ID, "files").send_keys(str(bad))
    wait_for(browser, "document.getElementById('status').textContent.includes('1 error(s)')")
    (item,) = browser.find_elements(By.CSS_SELECTOR, "#error-list li")
    assert item.text.startswith("broken.png: ") and len(item.text) > len("broken.png: ") + 5
    assert browser.find_element(By.ID, "errors").is_displayed()

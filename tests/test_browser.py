"""A real headless Chromium drives the studio: upload, move a slider, Generate, see the video and the curve.

Needs /usr/bin/chromium + chromedriver and the selenium package (skipped when missing). The
screenshot lands in test-artifacts/ for a human to look at.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from lowvram_studio.ui.app import ASSETS, Studio, build_app
from lowvram_studio.ui.config_store import ConfigStore
from lowvram_studio.ui.form import FORM_NAMES
from lowvram_studio.ui.worker import JobState

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                reason="needs chromium and chromedriver")


@pytest.fixture(scope="module")
def studio_page(tmp_path_factory):
    """The studio with small settings saved from a 'previous session', and a browser on its page."""
    store = ConfigStore(tmp_path_factory.mktemp("config"))
    store.load()
    studio = Studio("demo", tmp_path_factory.mktemp("outputs"), store)
    store.save_last({**studio.default_form(FORM_NAMES), "width": 64, "height": 64, "num_frames": 4,
                     "num_inference_steps": 2})
    app = build_app(studio)
    app.queue(default_concurrency_limit=None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(studio.output_dir), str(ASSETS)])
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1700", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(f"http://127.0.0.1:{port}/")
    yield driver, studio
    driver.quit()
    studio.worker.close()
    app.close()


def _wait(driver, condition, timeout: float = 90):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))


def _open_tab(driver, name: str) -> None:
    next(t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name).click()


def _pick_budget(driver, choice: str) -> None:
    driver.find_element(By.CSS_SELECTOR, "#ctl-vram_budget input").click()
    option = _wait(driver, lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "li[role=option]")
                                    if o.get_attribute("aria-label") == choice], 10)
    option[0].click()


def _text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def test_upload_move_chunk_slider_generate_then_video_and_curve_appear(studio_page):
    driver, studio = studio_page
    steps = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#ctl-num_inference_steps input[type=number]"))
    _wait(driver, lambda d: steps.get_attribute("value") == "2", 30)  # last session's settings restored

    driver.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(ASSETS / "ball_and_box.png"))
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"), 30)

    _open_tab(driver, "Optimizations")
    fp16_unet = driver.find_element(By.CSS_SELECTOR, "#ctl-unet_dtype input[type=checkbox]")
    _pick_budget(driver, "4 GB")  # the preset fills the sliders
    _wait(driver, lambda d: fp16_unet.is_selected(), 10)
    assert driver.find_element(By.CSS_SELECTOR, "#ctl-decode_chunk input[type=number]").get_attribute("value") == "1"
    _pick_budget(driver, "Auto")  # no GPU here: Auto turns every memory saver off again
    _wait(driver, lambda d: not fp16_unet.is_selected(), 10)
    chunk = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#ctl-chunk_size input[type=range]"), 30)
    chunk.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#ctl-chunk_size input[type=number]")
          .get_attribute("value") == "3", 10)
    _wait(driver, lambda d: "chunk_size" in _text(d, "lossy-note"), 10)  # marked lossy as soon as it moves

    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: "denoise step" in _text(d, "status") or "✔" in _text(d, "status"), 60)
    _wait(driver, lambda d: "✔" in _text(d, "status"), 120)
    video = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#video video"), 30)
    assert video.get_attribute("src").split("?")[0].endswith(".mp4")
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#curve canvas, #curve svg.marks"), 30)
    assert "optimized" in _text(driver, "stats")  # chunk size made it a lossy ("optimized") run
    assert studio.store.data.last["chunk_size"] == 3
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(1.0)  # let the video's first frame paint
    driver.save_screenshot(str(ARTIFACTS / "studio.png"))


def test_leaving_the_page_mid_run_stops_its_job(studio_page):
    driver, studio = studio_page
    _open_tab(driver, "Generation")
    steps = driver.find_element(By.CSS_SELECTOR, "#ctl-num_inference_steps input[type=number]")
    steps.send_keys(Keys.CONTROL, "a")
    steps.send_keys("80", Keys.TAB)
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: "denoise step" in _text(d, "status"), 60)
    assert driver.find_element(By.ID, "generate").get_attribute("disabled")  # nothing may disturb the run
    assert steps.get_attribute("disabled")
    assert not driver.find_element(By.ID, "stop").get_attribute("disabled")
    job = studio.worker.running
    assert job is not None and job.events[-1].total == 80
    driver.get("about:blank")
    assert job.done.wait(30)
    assert job.state == JobState.CANCELLED

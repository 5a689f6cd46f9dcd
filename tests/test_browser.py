"""A real headless Chromium drives the studio as a user does: upload, move a slider, Generate, watch the
live preview animate, see the video and the curve, drop an output to reuse its settings, queue a seed sweep;
and the first ten minutes (#21 item 13): Generate on the first screen at 1366x768, typed values that snap,
conflicts with a one-click fix, starter presets with the plan's bar chart, a status that starts fresh.

Needs /usr/bin/chromium + chromedriver and the selenium package (skipped when missing). One studio and
one browser serve the whole module; each test that needs a clean page reloads it. Screenshots land in
test-artifacts/ for a human to look at.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import shutil
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import PIL.Image
import pytest

from lowvram_studio.jobs import run_job
from lowvram_studio.media import load_image
from lowvram_studio.settings import RunSettings
from lowvram_studio.ui.app import QUEUE_REFRESH_S
from lowvram_studio.ui.serve import serve_studio
from lowvram_studio.ui.studio import ASSETS, DEMO, Studio
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
INPUT_IMAGE = ASSETS / "ball_and_box.png"


class StudioPage(NamedTuple):
    """What every test drives: the browser, the studio behind the page, and the page's address."""

    driver: webdriver.Chrome
    studio: Studio
    url: str


@pytest.fixture(scope="module")
def studio_page(tmp_path_factory) -> StudioPage:
    """The studio with small settings saved from a 'previous session', and a browser on its page."""
    store = ConfigStore(tmp_path_factory.mktemp("config"))
    store.load()
    studio = Studio("demo", tmp_path_factory.mktemp("outputs"), store)
    store.save_last({**studio.default_form(FORM_NAMES), "width": 64, "height": 64, "num_frames": 4,
                     "num_inference_steps": 2})
    app, url, _ = serve_studio(studio, server_name="127.0.0.1", quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1700", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(url)
    yield StudioPage(driver, studio, url)
    driver.quit()
    studio.close()
    app.close()


def _wait(driver, condition, timeout: float = 90):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))


def _open_tab(driver, name: str) -> None:
    next(t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name).click()


def _pick(driver, element_id: str, choice: str) -> None:
    """Open a dropdown and click one of its options."""
    driver.find_element(By.CSS_SELECTOR, f"#{element_id} input").click()
    option = _wait(driver, lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "li[role=option]")
                                    if o.get_attribute("aria-label") == choice], 10)
    option[0].click()


def _pick_budget(driver, choice: str) -> None:
    _pick(driver, "ctl-vram_budget", choice)


def _text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _fresh_page(page: StudioPage) -> None:
    """Reload the studio: no image, the last used settings restored (the banner is filled with them)."""
    page.driver.get(page.url)
    _wait(page.driver, lambda d: "ℹ" in _text(d, "banner"), 30)


def _upload_image(driver) -> None:
    driver.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(INPUT_IMAGE))
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"), 30)


def _number(driver, name: str):
    return driver.find_element(By.CSS_SELECTOR, f"#ctl-{name} input[type=number]")


def _set_number(driver, name: str, value: int):
    """Type ``value`` into a control's number box and leave it, as a user does (the change event fires on blur)."""
    box = _number(driver, name)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)
    _wait(driver, lambda d: box.get_attribute("value") == str(value), 10)
    return box


def _screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


LAPTOP = {"width": 1366, "height": 768, "deviceScaleFactor": 1, "mobile": False}


def _inside_viewport(driver, selector: str) -> bool:
    """Whether the element's whole bounding box lies in the viewport as the page opens (no scrolling)."""
    return driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return r.width > 0 && r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth;",
        selector)


@contextlib.contextmanager
def _laptop_screen(page: StudioPage):
    """The page as a 1366x768 laptop shows it (the viewport itself, not the window), freshly loaded with an image."""
    page.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", LAPTOP)
    try:
        _fresh_page(page)
        _upload_image(page.driver)
        yield page.driver
    finally:
        page.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_on_a_1366x768_laptop_image_main_settings_and_generate_show_without_scrolling(studio_page):
    with _laptop_screen(studio_page) as driver:
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.execute_script("return [innerWidth, innerHeight]") == [1366, 768]
        _screenshot(driver, "studio-1366x768.png")
        for selector in ("#generate", "#stop", "#input-image", "#ctl-num_frames", "#ctl-num_inference_steps",
                         "#ctl-width", "#ctl-height", "#ctl-seed", "#starter", "#device-badge", "#progress"):
            assert _inside_viewport(driver, selector), selector


def test_upload_move_chunk_slider_generate_then_video_and_curve_appear(studio_page):
    driver, studio, _ = studio_page
    steps = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#ctl-num_inference_steps input[type=number]"))
    _wait(driver, lambda d: steps.get_attribute("value") == "2", 30)  # last session's settings restored

    _upload_image(driver)

    _open_tab(driver, "Optimizations")
    _pick_budget(driver, "4 GB")  # the planner's plan for this request (demo, 64x64, 4 frames): it fits as set
    _wait(driver, lambda d: "✔ Fits" in _text(d, "budget-note") and "64x64, 4 frames" in _text(d, "budget-note"), 10)
    _pick_budget(driver, "Manual")  # the sliders are the user's; Generate applies no budget
    _wait(driver, lambda d: _text(d, "budget-note").startswith("Manual"), 10)
    chunk = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#ctl-window_frames input[type=range]"), 30)
    chunk.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#ctl-window_frames input[type=number]")
          .get_attribute("value") == "3", 10)
    _wait(driver, lambda d: "Frame window" in _text(d, "lossy-note"), 10)  # marked lossy (by its label) as it moves

    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: "denoise step" in _text(d, "status") or "✔" in _text(d, "status"), 60)
    _wait(driver, lambda d: "✔" in _text(d, "status"), 120)
    video = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#video video"), 30)
    assert video.get_attribute("src").split("?")[0].endswith(".mp4")
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#curve canvas, #curve svg.marks"), 30)
    assert "optimized" in _text(driver, "stats")  # chunk size made it a lossy ("optimized") run
    assert studio.store.data.last["window_frames"] == 3
    driver.execute_script("window.scrollTo(0, 0)")
    _wait(driver, lambda d: video.get_property("readyState") >= 2, 30)  # its first frame is decoded
    _screenshot(driver, "studio.png")


# Records every src the live preview's <img> gets (however briefly it shows between two polls), with
# whether the status line still said the run was going at that moment.
WATCH_PREVIEW = """
const panel = document.getElementById('live-preview');
window.previewSources = [];
const record = () => {
  for (const img of panel.querySelectorAll('img')) {
    const src = img.getAttribute('src') || '';
    const seen = window.previewSources;
    if (src && (!seen.length || seen[seen.length - 1].src !== src)) {
      seen.push({src: src, running: !document.getElementById('status').innerText.includes('✔')});
    }
  }
};
window.previewWatch = new MutationObserver(record);
window.previewWatch.observe(panel, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
"""


def _shown_preview(driver) -> str | None:
    """The preview <img>'s src once the browser has decoded and laid it out (non-empty), else None."""
    return driver.execute_script(
        "const img = document.querySelector('#live-preview img');"
        "return img && img.complete && img.naturalWidth > 0 && img.getBoundingClientRect().width > 0"
        " ? img.getAttribute('src') : null;")


def _image_bytes(src: str) -> bytes:
    """The bytes behind an <img> src: an inline data: URI or a file the studio serves."""
    if src.startswith("data:"):
        return base64.b64decode(src.split(",", 1)[1])
    with urllib.request.urlopen(src, timeout=10) as response:
        return response.read()


def test_live_preview_animates_while_generating_then_gives_way_to_the_video_and_its_cost(studio_page):
    driver = studio_page.driver
    _fresh_page(studio_page)
    _upload_image(driver)
    frames, steps = 4, 24  # 64x64: several seconds on 2 cores (the page polls once a second), a preview every step
    _set_number(driver, "num_frames", frames)
    _set_number(driver, "num_inference_steps", steps)
    _open_tab(driver, "Optimizations")
    _set_number(driver, "window_frames", 0)  # a plain run, whatever an earlier test left in the saved form
    _open_tab(driver, "Generation")
    assert studio_page.studio.store.data.last.get("preview_every", 1) == 1
    driver.execute_script(WATCH_PREVIEW)

    driver.find_element(By.ID, "generate").click()
    _wait(driver, _shown_preview, 60)
    caption = driver.find_element(By.CSS_SELECTOR, "#live-preview figcaption").text
    assert re.search(rf"step \d+/{steps} · [\d.]+ ms per preview", caption), caption
    _screenshot(driver, "studio-live-preview.png")
    _wait(driver, lambda d: len(d.execute_script("return window.previewSources")) >= 2, 60)

    _wait(driver, lambda d: "✔" in _text(d, "status"), 120)
    shown = driver.execute_script("return window.previewSources")
    assert len({s["src"] for s in shown}) >= 2 and all(s["running"] for s in shown)  # it changed while running
    for source in shown:
        clip = PIL.Image.open(io.BytesIO(_image_bytes(source["src"])))
        assert clip.is_animated and clip.n_frames == frames  # the whole clip loops, not one frame
    video = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#video video"), 30)
    assert video.get_attribute("src").split("?")[0].endswith(".mp4")
    _wait(driver, lambda d: video.get_property("readyState") >= 2, 30)  # the user sees its first frame
    cost_note = r"Live preview: (\d+) previews, [\d.]+ ms each"
    note = _wait(driver, lambda d: re.search(cost_note, _text(d, "live-preview")), 30)
    assert int(note[1]) == steps
    assert not driver.find_elements(By.CSS_SELECTOR, "#live-preview img")  # the video replaced the preview
    driver.execute_script("window.scrollTo(0, 0)")
    _screenshot(driver, "studio-preview-done.png")


@pytest.fixture(scope="module")
def finished_video(studio_page, tmp_path_factory) -> tuple[Path, RunSettings]:
    """An mp4 of a finished run (with its embedded record) whose seed, frames and steps no form here uses."""
    settings = RunSettings(height=64, width=64, num_frames=6, num_inference_steps=3, seed=7)
    video = tmp_path_factory.mktemp("finished") / "finished.mp4"
    model = studio_page.studio.model(DEMO, settings)
    run_job(model, load_image(INPUT_IMAGE), settings, video, image_path=INPUT_IMAGE)
    return video, settings


REUSE_CHECKED = ("seed", "num_frames", "num_inference_steps")


def _form_values(driver) -> dict[str, str]:
    """What the form's number boxes show for the fields the reuse test checks."""
    return {name: _number(driver, name).get_attribute("value") for name in REUSE_CHECKED}


def test_dropping_an_output_mp4_restores_its_settings_and_another_file_changes_nothing(
    studio_page, finished_video, tmp_path
):
    driver = studio_page.driver
    video, recorded = finished_video
    _fresh_page(studio_page)
    before = _form_values(driver)
    expected = {name: str(getattr(recorded, name)) for name in REUSE_CHECKED}
    assert before != expected

    not_a_video = tmp_path / "notes.txt"
    not_a_video.write_text("not a video")
    driver.find_element(By.CSS_SELECTOR, "#reuse-drop input[type=file]").send_keys(str(not_a_video))
    error = _wait(driver, lambda d: [t.text for t in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")
                                     if "notes.txt" in t.text], 30)
    assert "neither an output video" in error[0] and "drop an mp4" in error[0]  # what is wrong; what to do
    assert _form_values(driver) == before
    assert not _text(driver, "reuse-note")
    assert not driver.find_elements(By.CSS_SELECTOR, "#input-image img")

    # The box empties itself after a drop, so the next file can be dropped straight away.
    drop = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#reuse-drop input[type=file]"), 10)
    drop.send_keys(str(video))
    _wait(driver, lambda d: "Restored" in _text(d, "reuse-note"), 30)
    assert f"seed {recorded.seed}" in _text(driver, "reuse-note")
    _wait(driver, lambda d: _form_values(d) == expected, 10)
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"), 10)  # its input image is back
    driver.execute_script("window.scrollTo(0, 0)")
    _screenshot(driver, "studio-reuse.png")


def _queue_rows(driver) -> list[list[str]]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#queue [role=row][data-index]')]"
        ".sort((a, b) => a.dataset.index - b.dataset.index)"
        ".map(row => [...row.querySelectorAll('[role=gridcell]')].map(cell => cell.innerText.trim()));")


def _queue_rows_when(condition):
    """A wait condition: the queue table's rows once ``condition(rows)`` holds."""
    def check(driver):
        rows = _queue_rows(driver)
        return rows if condition(rows) else None

    return check


def test_a_seed_sweep_added_to_the_queue_shows_two_rows_that_finish(studio_page):
    driver = studio_page.driver
    _fresh_page(studio_page)
    _upload_image(driver)
    _set_number(driver, "num_frames", 4)
    _set_number(driver, "num_inference_steps", 2)
    driver.find_element(By.CSS_SELECTOR, "#queue-seeds textarea, #queue-seeds input").send_keys("1..2")
    driver.find_element(By.ID, "queue-add").click()
    _wait(driver, lambda d: "Queued 2 job(s)" in _text(d, "queue-note"), 30)

    rows = _wait(driver, _queue_rows_when(lambda rows: len(rows) == 2), 10)
    assert [row[0] for row in rows] == ["1", "2"]
    assert [row[2].split(" · ")[0] for row in rows] == ["seed 1", "seed 2"]
    rows = _wait(driver, _queue_rows_when(lambda rows: [row[3] for row in rows] == ["done", "done"]), 90)
    assert all(row[4].startswith("took ") for row in rows)  # the ETA column reports the measured time
    outputs = [row[5] for row in rows]
    assert all(name.endswith(".mp4") and (studio_page.studio.output_dir / name).is_file() for name in outputs)
    driver.execute_script("document.getElementById('queue').scrollIntoView()")
    _screenshot(driver, "studio-queue.png")


def test_leaving_the_page_mid_run_stops_its_job(studio_page):
    driver, studio, _ = studio_page
    _fresh_page(studio_page)
    _upload_image(driver)
    steps = _set_number(driver, "num_inference_steps", 80)
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


def test_the_queue_timer_sleeps_while_the_tabs_run_streams_and_wakes_after_it(studio_page, monkeypatch):
    """#21: each tick of the queue's timer is a round of Gradio's loading-status updates over every component
    on the page; while the tab's own run streams, the timer must not tick (the run pays for it on a CPU)."""
    driver, studio, _ = studio_page
    _fresh_page(studio_page)
    _upload_image(driver)
    _set_number(driver, "num_inference_steps", 80)
    ticks: list[float] = []
    rows = studio.runner.rows
    monkeypatch.setattr(studio.runner, "rows", lambda: ticks.append(time.perf_counter()) or rows())
    _wait(driver, lambda d: ticks, 10)  # the idle page's timer ticks
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: "denoise step" in _text(d, "status"), 60)
    streaming = time.perf_counter()
    _wait(driver, lambda d: "✔" in _text(d, "status"), 120)
    finished = time.perf_counter()
    assert finished - streaming > 2 * QUEUE_REFRESH_S  # long enough for a running timer to tick
    assert not [t for t in ticks if streaming <= t <= finished]
    _wait(driver, lambda d: ticks[-1] > finished, 10)  # and it ticks again once the run is over


def _toast(driver, text: str, timeout: float = 30) -> str:
    """The first error/warning toast that contains ``text`` (read in the page: toasts come and go)."""
    read = "return [...document.querySelectorAll('[data-testid=toast-text]')].map(t => t.innerText)"
    return _wait(driver, lambda d: [t for t in d.execute_script(read) if text in t], timeout)[0]


def _close_toasts(driver) -> None:
    driver.execute_script("document.querySelectorAll('[data-testid=toast-close]').forEach(b => b.click())")


def _unlocked(driver) -> bool:
    """Generate, Compare, a form box and the image's upload take input again (the run's lock is lifted)."""
    boxes = [driver.find_element(By.ID, "generate"), driver.find_element(By.ID, "compare"),
             _number(driver, "num_frames")]
    return not any(box.get_attribute("disabled") for box in boxes) and bool(
        driver.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))


def test_an_error_on_generate_or_compare_leaves_the_form_usable_with_its_image(studio_page):
    studio = studio_page.studio
    saved = dict(studio.store.data.last)  # the failing run below saves its model; later tests get this back
    try:
        _errors_leave_the_form_usable(studio_page)
    finally:
        studio.store.save_last(saved)


def _errors_leave_the_form_usable(studio_page):
    driver = studio_page.driver
    _fresh_page(studio_page)
    _upload_image(driver)
    _open_tab(driver, "Optimizations")
    _set_number(driver, "window_frames", 4)
    _set_number(driver, "overlap", 6)  # conflicts with the chunk size: refused before anything runs
    for button in ("generate", "compare"):
        driver.find_element(By.ID, button).click()
        message = _toast(driver, "“Window overlap (frames)” must be")  # the labels the page shows, not field names
        assert "smaller than “Frame window (frames)” (4); got 6" in message
        _wait(driver, _unlocked, 10)
        assert driver.find_elements(By.CSS_SELECTOR, "#input-image img")  # the image is still there
        assert _number(driver, "overlap").get_attribute("value") == "6"  # and the settings as the user left them
        _close_toasts(driver)

    _set_number(driver, "overlap", 0)
    _set_number(driver, "window_frames", 0)
    _open_tab(driver, "Generation")
    model = driver.find_element(By.CSS_SELECTOR, "#ctl-model input")  # a model that fails once the run started
    model.send_keys(Keys.CONTROL, "a")
    model.send_keys("/no/such/model", Keys.ENTER)
    _wait(driver, lambda d: model.get_attribute("value") == "/no/such/model", 10)
    driver.find_element(By.ID, "generate").click()
    assert "model_index.json" in _toast(driver, "was not found", 60)
    _wait(driver, _unlocked, 10)
    assert driver.find_elements(By.CSS_SELECTOR, "#input-image img")
    _close_toasts(driver)


def test_a_file_that_is_not_an_image_is_named_with_the_fix_and_earlier_results_stay(studio_page, tmp_path):
    driver = studio_page.driver
    _fresh_page(studio_page)
    _upload_image(driver)
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: "✔" in _text(d, "status"), 120)
    finished = _text(driver, "status")

    box = "#input-image input[type=file]"
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    driver.find_element(By.CSS_SELECTOR, box).send_keys(str(notes))
    assert "Only image/* allowed" in _toast(driver, "notes.txt")  # the page itself refuses it by its name
    _close_toasts(driver)
    broken = tmp_path / "broken.png"  # named like an image, but PIL cannot read it
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    renamed = tmp_path / "holiday.jpg"
    renamed.write_text("a text file renamed to .jpg")
    for bad in (broken, renamed):
        driver.find_element(By.CSS_SELECTOR, box).send_keys(str(bad))
        message = _toast(driver, bad.name)  # what media.load_image tells the CLI user
        assert "is not an image PIL can read; use PNG, JPEG, WebP, BMP, TIFF or GIF" in message
        _wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, "#input-image img"), 10)  # box emptied
        _wait(driver, _unlocked, 10)
        _close_toasts(driver)
    assert _text(driver, "status") == finished  # the earlier run's status, video and table are kept
    assert driver.find_element(By.CSS_SELECTOR, "#video video").get_attribute("src").split("?")[0].endswith(".mp4")
    assert "FP32" in _text(driver, "stats")


def test_a_width_typed_between_steps_snaps_with_a_message(studio_page):
    driver = studio_page.driver
    _fresh_page(studio_page)
    box = _number(driver, "width")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("127", Keys.TAB)
    assert "127 became 128" in _toast(driver, "Width moves in steps of 64")
    _wait(driver, lambda d: _number(d, "width").get_attribute("value") == "128", 10)
    _close_toasts(driver)
    _set_number(driver, "width", 64)


def test_a_conflict_offers_a_one_click_fix_in_the_page_labels(studio_page):
    driver = studio_page.driver
    _fresh_page(studio_page)
    _open_tab(driver, "Optimizations")
    _set_number(driver, "window_frames", 4)
    _set_number(driver, "overlap", 6)
    _wait(driver, lambda d: "“Window overlap (frames)” must be" in _text(d, "lossy-note"), 10)
    fix = _wait(driver, lambda d: d.find_element(By.ID, "fix") if d.find_element(By.ID, "fix").is_displayed() else None,
                10)
    assert fix.text == "Fix: set Window overlap (frames) to 3"
    fix.click()
    _wait(driver, lambda d: _number(d, "overlap").get_attribute("value") == "3", 10)
    _wait(driver, lambda d: "must be" not in _text(d, "lossy-note")
          and not [b for b in d.find_elements(By.ID, "fix") if b.is_displayed()], 10)
    _set_number(driver, "window_frames", 0)
    _set_number(driver, "overlap", 0)


def test_a_starter_preset_sets_the_budget_and_settings_and_draws_the_plan(studio_page):
    driver, studio, _ = studio_page
    saved = dict(studio.store.data.last)
    _fresh_page(studio_page)
    assert "CPU" in _text(driver, "device-badge") or "GPU: " in _text(driver, "device-badge")
    _pick(driver, "starter", "GTX 1060 6 GB")
    _wait(driver, lambda d: _number(d, "width").get_attribute("value") == "512", 10)
    assert _number(driver, "num_frames").get_attribute("value") == "24"
    _open_tab(driver, "Optimizations")
    _wait(driver, lambda d: "VRAM budget 6GB" in _text(d, "budget-note"), 10)
    bars = driver.find_elements(By.CSS_SELECTOR, "#budget-chart .plan-bar")
    assert {bar.get_attribute("data-phase") for bar in bars} >= {"encode image", "denoise", "decode"}
    assert all(bar.size["width"] > 0 for bar in bars)
    driver.execute_script("document.getElementById('budget-chart').scrollIntoView()")
    _screenshot(driver, "studio-budget-chart.png")
    studio.store.save_last(saved)


# Records every text the status line shows, and the progress bar's value with it.
WATCH_STATUS = """
window.statusSeen = [];
const status = document.getElementById('status');  // its text, not Gradio's own timer drawn over it
window.note = () => window.statusSeen.push([(status.querySelector('.prose') || status).innerText,
    Number((document.querySelector('#progress progress') || {}).value)]);
window.statusWatch = new MutationObserver(note);
window.statusWatch.observe(status, {subtree: true, childList: true, characterData: true});
"""


def test_a_new_run_clears_the_last_status_and_its_bar_fills_from_zero(studio_page):
    driver = studio_page.driver
    _fresh_page(studio_page)
    _upload_image(driver)
    _set_number(driver, "num_inference_steps", 2)
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: "✔" in _text(d, "status"), 120)
    assert driver.find_element(By.CSS_SELECTOR, "#progress progress").get_attribute("value") == "100"
    driver.execute_script(WATCH_STATUS)
    first = driver.execute_script("window.statusWatch.takeRecords(); note(); return window.statusSeen.pop()[0]")
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: "✔" in _text(d, "status") and _text(d, "status") != first, 120)
    seen = driver.execute_script("return window.statusSeen")
    while seen and seen[0][0] == first:  # Gradio redrawing what was there as the click is handled
        seen.pop(0)
    assert seen[0][0].startswith("⏳ Starting") and seen[0][1] == 0  # the old status and full bar go first
    assert all(first not in text for text, _ in seen)  # and never come back
    values = [value for _, value in seen]
    assert values == sorted(values)  # the bar only moves forward ...
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#progress progress").get_attribute("value") == "100",
          10)  # ... and is full once the run is (the bar may redraw a moment after the status line)


def _unwatched_seconds_per_step(studio: Studio, settings: RunSettings) -> float:
    """The same run on the same worker with no page following it."""
    job = studio.worker.submit("nobody-watching", "Generate", lambda on_event, cancel: studio._generate(
        DEMO, load_image(INPUT_IMAGE), INPUT_IMAGE, settings, studio.output_dir / f"unwatched-{time.time_ns()}.mp4",
        False, on_event, cancel))
    assert job.done.wait(300) and job.state == JobState.DONE, job.error
    return job.result.result.seconds_per_step


def test_watching_a_run_costs_it_little_against_the_same_run_unwatched(studio_page):
    """#21: a watched CPU run took 1.3-1.6 s/step against 0.37 unwatched. A ratio within one test (before,
    between and after), not an absolute time, and generous: other work on two shared cores moves one run's
    s/step by 3x. The paced updates themselves are counted in test_studio_page.py."""
    driver, studio, _ = studio_page
    settings = RunSettings(width=128, height=128, num_frames=8, num_inference_steps=16, preview_every=1)
    _fresh_page(studio_page)
    _upload_image(driver)
    for name in ("width", "height", "num_frames", "num_inference_steps"):
        _set_number(driver, name, getattr(settings, name))
    before = _unwatched_seconds_per_step(studio, settings)
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: "✔ 8 frames at 128x128" in _text(d, "status"), 300)
    watched = float(re.search(r"\(([\d.]+) s/step", _text(driver, "status"))[1])
    after = _unwatched_seconds_per_step(studio, settings)
    print(f"s/step unwatched {before:.3f} / {after:.3f}, watched {watched:.3f}")
    assert watched <= 2.0 * max(before, after)


def test_compare_shows_fidelity_in_view_each_run_in_its_colour_and_the_runs_side_by_side(studio_page):
    with _laptop_screen(studio_page) as driver:
        _set_number(driver, "num_frames", 2)
        _set_number(driver, "num_inference_steps", 1)
        driver.find_element(By.ID, "compare").click()
        _wait(driver, lambda d: "✔ Compare finished" in _text(d, "status"), 180)
        side = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#compare-video video"), 30)
        assert side.get_attribute("src").split("?")[0].endswith("side_by_side.mp4")
        driver.execute_script("document.getElementById('stats').scrollIntoView()")
        headers = driver.execute_script(
            "return [...document.querySelectorAll('#stats th')].filter(h => {const r = h.getBoundingClientRect();"
            " return r.width > 0 && r.left >= 0 && r.right <= innerWidth;}).map(h => h.innerText.trim())")
        assert "PSNR (dB)" in headers and "SSIM" in headers  # in view, no sideways scrolling
        wide = driver.execute_script(  # the table and each box in it fit their width: nothing scrolls sideways
            "return [document.getElementById('stats'), ...document.querySelectorAll('#stats *')]"
            ".filter(e => e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 0 && (e.innerText.trim()"
            " || ['auto', 'scroll'].includes(getComputedStyle(e).overflowX)))"  # not Gradio's empty sizing row
            ".map(e => `${e.tagName} ${e.scrollWidth} > ${e.clientWidth}: ${e.innerText.slice(0, 40)}`)")
        assert not wide, wide
        assert headers[-1] == "pruned %"  # the last column too is in view
        driver.execute_script("window.scrollTo(0, 0)")
        _screenshot(driver, "studio-compare-1366x768.png")
        driver.execute_script("document.getElementById('stats').scrollIntoView()")
        _screenshot(driver, "studio-compare-table-1366x768.png")


def _shown(driver, element_id: str) -> bool:
    """Whether the control is on the page and displayed (Gradio may leave a hidden one out altogether); read in
    one script, as the page re-renders the controls while it switches them."""
    return driver.execute_script("const e = document.getElementById(arguments[0]);"
                                 "return !!e && e.getClientRects().length > 0;", element_id)


def test_the_prompt_boxes_appear_for_a_wan_model_and_go_again_for_the_demo(studio_page, tmp_path):
    from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

    folder = tmp_path / "toy-wan"
    build_toy_wan_pipeline().save_pretrained(folder)
    driver = studio_page.driver
    _fresh_page(studio_page)
    assert not _shown(driver, "ctl-prompt")  # the demo is SVD: steered by the image alone
    _open_tab(driver, "Generation")
    model = driver.find_element(By.CSS_SELECTOR, "#ctl-model input")
    model.send_keys(Keys.CONTROL, "a")
    model.send_keys(str(folder), Keys.ENTER)
    _wait(driver, lambda d: _shown(d, "ctl-prompt") and _shown(d, "ctl-negative_prompt"), 30)
    _wait(driver, lambda d: _shown(d, "ctl-guidance_scale") and not _shown(d, "ctl-motion_bucket_id"), 10)
    _wait(driver, lambda d: (int(_number(d, "num_frames").get_attribute("value")) - 1) % 4 == 0, 10)  # 4k+1
    _screenshot(driver, "studio-wan-model.png")
    assert not driver.find_element(By.CSS_SELECTOR, "#ctl-vram_budget input").get_attribute("disabled")  # Wan's own
    _upload_image(driver)
    for name, value in (("width", 64), ("height", 64), ("num_inference_steps", 2)):
        _set_number(driver, name, value)
    saved = dict(studio_page.studio.store.data.last)  # the run saves its Wan model; later tests get this back
    try:
        driver.find_element(By.ID, "generate").click()
        _wait(driver, lambda d: "✔" in _text(d, "status"), 120)
    finally:
        studio_page.studio.store.save_last(saved)
    _wait(driver, _unlocked, 10)  # the form unlocks after the run, the budget with it
    assert not driver.find_element(By.CSS_SELECTOR, "#ctl-vram_budget input").get_attribute("disabled")
    _pick(driver, "ctl-model", DEMO)
    _wait(driver, lambda d: not _shown(d, "ctl-prompt") and _shown(d, "ctl-motion_bucket_id"), 30)

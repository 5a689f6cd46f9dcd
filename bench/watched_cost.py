"""What watching a run costs it: s/step of a CPU run on the demo model followed by the studio page in a real
headless Chromium (live curve, live preview, status and bar) against the same run with no page open.

Runs alternate watched / unwatched on one studio and one browser, so drift on the shared cores hits both
alike; each row is one run, the summary the median s/step of each kind and their ratio. Unwatched: the
browser shows about:blank (no page, no timers), the run is submitted to the same worker.

    python bench/watched_cost.py --out bench/results/watched_cost_$(date +%Y%m%d).json   # ~3 minutes, 2 cores
    python bench/watched_cost.py --runs 1 --steps 4 --out /tmp/watched_cost.json          # checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from bench.common import new_report, write_report  # noqa: E402
from lowvram_studio.media import load_image  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402
from lowvram_studio.ui.serve import serve_studio  # noqa: E402
from lowvram_studio.ui.studio import ASSETS, DEMO, Studio  # noqa: E402
from lowvram_studio.ui.config_store import ConfigStore  # noqa: E402
from lowvram_studio.ui.form import FORM_NAMES  # noqa: E402
from lowvram_studio.ui.worker import JobState  # noqa: E402

IMAGE = ASSETS / "ball_and_box.png"
SETTLE_S = 3.0
LAPTOP = {"width": 1366, "height": 768, "deviceScaleFactor": 1, "mobile": False}


def serve(folder: Path, settings: RunSettings) -> tuple[Studio, str]:
    """A studio on the demo model whose saved form is ``settings`` (so a reloaded page runs exactly them)."""
    store = ConfigStore(folder / "config")
    store.load()
    studio = Studio(DEMO, folder / "outputs", store, queue_dir=folder / "queue")
    form = studio.default_form(FORM_NAMES)
    store.save_last({**form, **{name: getattr(settings, name) for name in
                                ("width", "height", "num_frames", "num_inference_steps", "preview_every", "device")},
                     "window_frames": 0, "gif": False})
    _, url, _ = serve_studio(studio, server_name="127.0.0.1", quiet=True)
    return studio, url


def browser(profile: Path) -> webdriver.Chrome:
    """Headless Chromium showing pages as a 1366x768 laptop does."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", LAPTOP)
    return driver


def status(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.ID, "status").text


def watched_run(driver: webdriver.Chrome, url: str, studio: Studio, settings: RunSettings) -> tuple[float, dict]:
    """Open the page, drop the image, press Generate; the finished run's s/step from its record (the status line
    rounds it to 10 ms) and the CPU seconds used from the click to the end."""
    driver.get(url)
    wait = WebDriverWait(driver, 600, poll_frequency=0.5)
    wait.until(lambda d: "ℹ" in d.find_element(By.ID, "banner").text)
    driver.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(IMAGE))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
    time.sleep(SETTLE_S)  # what loading the page and the image cost is not what watching a run costs
    before = cpu_seconds(driver)
    driver.find_element(By.ID, "generate").click()
    done = f"✔ {settings.num_frames} frames at {settings.width}x{settings.height}"
    wait.until(lambda d: done in status(d) or "✖" in status(d))
    if done not in status(driver):
        raise RuntimeError(f"the watched run did not finish: {status(driver)}")
    records = [p for p in studio.output_dir.glob("*.json") if not p.name.startswith("unwatched-")]
    newest = max(records, key=lambda p: p.stat().st_mtime)
    return float(json.loads(newest.read_text(encoding="utf-8"))["results"]["seconds_per_step"]), used_since(driver, before)


def unwatched_run(driver: webdriver.Chrome, studio: Studio, settings: RunSettings) -> tuple[float, dict]:
    """The same run on the same worker while the browser shows no studio page, and the CPU seconds it used."""
    driver.get("about:blank")
    before = cpu_seconds(driver)
    video = studio.output_dir / f"unwatched-{time.time_ns()}.mp4"
    job = studio.worker.submit("nobody-watching", "Generate", lambda on_event, cancel: studio._generate(
        DEMO, load_image(IMAGE), IMAGE, settings, video, False, on_event, cancel))
    if not job.done.wait(600) or job.state != JobState.DONE:
        raise RuntimeError(f"the unwatched run did not finish: {job.state} {job.error}")
    return job.result.result.seconds_per_step, used_since(driver, before)


def cpu_seconds(driver: webdriver.Chrome) -> dict[str, float]:
    """CPU seconds used so far by the browser (all its processes) and by this process (server, worker, monitor)."""
    browser = psutil.Process(driver.service.process.pid).children(recursive=True)
    used = sum(sum(p.cpu_times()[:2]) for p in browser if p.is_running())
    return {"browser": used, "studio": sum(psutil.Process().cpu_times()[:2])}


def used_since(driver: webdriver.Chrome, before: dict[str, float]) -> dict[str, float]:
    return {f"{name}_cpu_s": used - before[name] for name, used in cpu_seconds(driver).items()}


def summary(rows: list[dict]) -> dict:
    """Median s/step watched and unwatched, their ratio, and the watched cost as a fraction of a step."""
    median = {kind: statistics.median(r["seconds_per_step"] for r in rows if r["kind"] == kind)
              for kind in ("watched", "unwatched")}
    ratio = median["watched"] / median["unwatched"]
    return {"median_watched": median["watched"], "median_unwatched": median["unwatched"], "ratio": ratio,
            "cost_fraction_of_step": ratio - 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="width and height in pixels")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--label", default="", help="what this measurement is of, e.g. 'before' (kept in the report)")
    args = parser.parse_args()
    settings = RunSettings(width=args.size, height=args.size, num_frames=args.frames, num_inference_steps=args.steps, preview_every=1,
                           device="cpu", unet_dtype="fp32", vae_dtype="fp32", encoder_dtype="fp32", seed=0)
    with tempfile.TemporaryDirectory() as folder:
        studio, url = serve(Path(folder), settings)
        driver = browser(Path(folder) / "chromium")
        try:
            unwatched_run(driver, studio, settings)  # warm-up: model load and first-call costs belong to no row
            rows = []
            for index in range(args.runs):
                for kind in ("watched", "unwatched") if index % 2 == 0 else ("unwatched", "watched"):
                    seconds, cpu = watched_run(driver, url, studio, settings) if kind == "watched" else unwatched_run(
                        driver, studio, settings)
                    rows.append({"run": index, "kind": kind, "seconds_per_step": seconds, **cpu})
                    print(rows[-1], flush=True)
        finally:
            driver.quit()
            studio.close()
    result = summary(rows)
    report = new_report(label=args.label, settings=settings.to_dict(), summary=result, rows=rows)
    lines = [f"{args.label}: " if args.label else "",
             f"Demo model on the CPU, {settings.width}x{settings.height}x{settings.num_frames}, {args.steps} steps, "
             f"preview every step; {args.runs} runs of each kind, alternating.", "",
             "| kind | runs | median s/step | all s/step | browser CPU s in the run | studio CPU s in the run |",
             "|---|---|---|---|---|---|"]
    for kind in ("watched", "unwatched"):
        mine = [r for r in rows if r["kind"] == kind]
        values = [r["seconds_per_step"] for r in mine]
        lines.append(f"| {kind} | {len(values)} | {statistics.median(values):.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in values)} | "
                     f"{statistics.median(r['browser_cpu_s'] for r in mine):.2f} | "
                     f"{statistics.median(r['studio_cpu_s'] for r in mine):.2f} |")
    lines += ["", f"Watched / unwatched: **{result['ratio']:.3f}** (watching costs "
                  f"{100 * result['cost_fraction_of_step']:.1f} % of a step)."]
    write_report(args.out, "What watching a run costs it", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

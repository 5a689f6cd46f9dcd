"""The studio: a Gradio Blocks app over the same engine the CLI uses.

Functions first (the ``Studio`` and its handlers), then the layout (``build_app``), then the wiring;
nothing runs at import. GPU work never runs in a Gradio handler: handlers submit a job to the
background ``Worker`` and stream its progress to the page once a second and its memory curve every few
seconds: each update costs the browser a redraw, and on a CPU run that competes with the run itself
(#21: a page redrawing 2.5x a second made a CPU run 4x slower).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image

from ..engine.events import CancelToken, EventCallback, Phase, RunEvent
from ..engine.oom import first_line, is_host_out_of_memory, is_out_of_memory
from ..engine.precision import PrecisionPolicy, detect_gpu, execution_path, rounded_components
from ..engine.pruning import draw_pruning_map
from ..engine.sampler import resolve_device
from ..jobs import JobOutput, check_outputs_free, new_output_path, run_job
from ..media import MediaError, fit_image, load_image, unique_path
from ..monitor.record import ReuseError
from ..models.demo import demo_model_info
from ..models.discovery import DiscoveryConfig, discover_models
from ..models.load import LoadedModel, load_model
from ..models.source_family import source_family
from ..settings import RunSettings, SettingsError
from ..settings_adapter import precision_request
from ..sysinfo import check_torch_runs, collect_env, torch_gpu_problem
from .budget import PLANNED_FIELDS, REPLAN_INPUTS, plan_budget, speed_line
from .config_store import ConfigStore, PresetError, default_output_dir
from .curves import CurveRun, phase_caption, write_curve_png
from .family_form import (
    FAMILY_CONTROLS,
    FITTED,
    MANUAL,
    SNAPPED,
    budget_problem,
    compare_refusal,
    family_props,
    fit_to_family,
    locked_out,
    picked,
    sliders_for,
)
from .form import (
    BUDGET_GIB,
    FORM_NAMES,
    GIF,
    MODEL,
    form_to_settings,
    lossy_summary,
    prune_warning,
    resolve_auto_precision,
    settings_to_form,
    upgrade_stored_form,
)
from .badge import device_badge
from .job_queue import JobQueue, QueueEntry, QueueError, parse_seeds
from .labels import in_user_words, suggest_fix
from .layout import FormControls, generation_controls, main_controls, optimization_controls, prompt_controls
from .preview_view import PreviewPanel
from .progress import progress_html
from .queue_lock import QUEUE_FOLDER, default_queue_dir
from .queue_runner import QUEUE_COLUMNS, QueueRunner
from .runs_view import (
    STATS_MAX_CHARS,
    STATS_WIDTHS,
    TabHistory,
    curve_update,
    phase_marks,
    stats_headers,
    stats_row,
)
from .reuse import restore_form
from .share import LoginGuard, serve_options, share_report
from .sliders import SLIDERS, off_step_problems, snap_note
from .starters import STARTERS, starter_form
from .worker import Job, JobState, Worker

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets"
STATUS_REFRESH_S = 1.0  # the status line and progress bar: a few hundred bytes, redrawn once a second
CURVE_REFRESH_S = 6.0  # the live curve at most every 6 s, only when it grew: a redraw is ~0.3 CPU-s in the browser
QUEUE_REFRESH_S = 1.0  # the queue table is checked once a second and redrawn only when it changed
DEMO = "demo"


# ---- helpers ------------------------------------------------------------------------------------
def discovered_models() -> list[str]:
    """SVD and Wan models found on disk for the picker (ComfyUI folders, the HF cache, COMFYUI_ROOT)."""
    return [str(c.path) for c in discover_models(DiscoveryConfig.from_env())]


def user_message(exc: BaseException) -> str:
    """What a failed job tells the user: what went wrong and what to do."""
    text = str(exc)
    if isinstance(exc, ValueError | NotImplementedError):  # MediaError, ModelError, SettingsError, CompareError
        return text
    if is_out_of_memory(exc):
        return (f"the GPU ran out of memory ({first_line(exc)[:200]}); pick a smaller VRAM budget preset, "
                "turn on FP16 or offload, or lower frames / size; your previous results are kept")
    if is_host_out_of_memory(exc):
        return (f"the computer ran out of RAM ({first_line(exc)[:200]}); lower frames / size or close other "
                "programs; your previous results are kept")
    return f"the run failed ({type(exc).__name__}: {text[:300]}); see the terminal for details, then try again"


def check_compare(source: str) -> None:
    """Raise ``gr.Error`` with what to do instead when Compare cannot run ``source`` (before anything is queued)."""
    refusal = compare_refusal(source)
    if refusal:
        raise gr.Error(refusal)


def check_image_upload(path: Path, name: str | None) -> None:
    """Raise ``gr.Error`` with ``media.load_image``'s message (the CLI's) when PIL cannot read the upload,
    naming the file as the user knows it rather than Gradio's temporary copy."""
    try:
        load_image(path.read_bytes())
    except MediaError as exc:
        raise gr.Error(f"{name or path.name}: {exc}") from exc


class LiveCurve:
    """Paces one run's live curve: an update when CURVE_REFRESH_S passed since the last one and the curve
    has new points (or a new phase began), else ``gr.skip()``. The first comes CURVE_REFRESH_S after the
    start (a chart of a second's points tells nothing and costs the run a redraw), or at once when the chart
    still shows a stopped or failed run's live line."""

    def __init__(self, studio: "Studio", job: Job, history: TabHistory):
        self.studio, self.job, self.history = studio, job, history
        self._last_at: float | None = None if history.stale_live_line else time.perf_counter()
        self._last_size = (-1, -1)

    def due(self) -> Any:
        now = time.perf_counter()
        size = (len(self.job.monitor.samples) if self.job.monitor is not None else 0, len(phase_marks(self.job)))
        if self._last_at is not None and (now - self._last_at < CURVE_REFRESH_S or size == self._last_size):
            return gr.skip()
        self._last_at, self._last_size = now, size
        return self.studio.live_curve(self.job, self.history)


class Studio:
    """Models, output folder, saved settings and the worker one studio process works with."""

    def __init__(self, model_source: str = DEMO, output_dir: Path | None = None, store: ConfigStore | None = None,
                 queue_dir: Path | None = None):
        """``queue_dir`` holds the job queue (default: ``queue/`` beside ``store``'s settings when a store is
        given, else in the user data folder); a second studio on the same folder raises ``QueueLocked``.
        A queue restored from there resumes at once."""
        self.model_source = model_source or DEMO
        self.output_dir = Path(output_dir) if output_dir is not None else default_output_dir()
        if queue_dir is None:
            queue_dir = store.folder / QUEUE_FOLDER if store is not None else default_queue_dir()
        self.store = store or ConfigStore()
        self.startup_warning = self.store.load().warning
        self.env = collect_env()  # read once: the GPU and torch do not change
        self.torch_problem = torch_gpu_problem(self.env)
        self.execution_path = None if self.torch_problem else execution_path(detect_gpu(resolve_device("auto")))
        self.worker = Worker()
        self._model: LoadedModel | None = None
        self._model_lock = threading.Lock()
        self.queue = JobQueue(Path(queue_dir))
        self.runner = QueueRunner(self.queue, self.worker, self.output_dir, self._run_entry, user_message)
        self.runner.start()

    def close(self) -> None:
        """Stop the worker (a running queued job waits again for the next start) and free the queue folder."""
        self.runner.close()
        self.worker.close()
        self.queue.close()

    # ---- resources ----------------------------------------------------------------------------
    def model(self, source: str, settings: RunSettings | None = None) -> LoadedModel:
        """The loaded model for ``source``; one model stays loaded, another source replaces it.

        It is also reloaded when an earlier run rounded weights below what ``settings`` asks for
        (an FP32 run after an FP16 one must not compute with fp16-rounded weights).
        """
        source = (source or DEMO).strip()
        with self._model_lock:
            stale = (
                self._model is not None
                and settings is not None
                and rounded_components(
                    self._model.pipeline,
                    PrecisionPolicy.resolve(precision_request(settings), detect_gpu(resolve_device(settings.device)),
                                            self._model.family.components),  # Wan's transformer, SVD's UNet
                )
            )
            if self._model is None or self._model.source != source or stale:
                check_torch_runs(settings.device if settings is not None else "auto")
                self._model = None  # let the old weights go before the new ones load
                self._model = load_model(source)
            return self._model

    @property
    def loaded_model(self) -> LoadedModel | None:
        """The model loaded now, if any (the budget panel counts its dimensions instead of assuming them)."""
        return self._model

    def output_problem(self) -> str | None:
        """Why outputs cannot be written to the output folder, or None."""
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return (f"cannot create the output folder {self.output_dir} ({exc.strerror}); "
                    "start the studio with --outputs DIR")
        if not os.access(self.output_dir, os.W_OK):
            return (f"cannot write to the output folder {self.output_dir}: permission denied; "
                    "start the studio with --outputs DIR")
        return None

    def banner(self) -> str:
        """Warnings for the top of the page (damaged settings, unwritable outputs, CPU-only torch) and the demo note."""
        warnings = (self.startup_warning, self.queue.warning, self.output_problem(), self.torch_problem)
        notes = [f"⚠ {w}" for w in warnings if w]
        if self.execution_path is not None:
            notes.append(f"ℹ Execution path: {self.execution_path.describe()}")
        if self.model_source == DEMO:
            notes.append(f"ℹ {demo_model_info().note}")
        return "\n\n".join(notes)

    # ---- settings -----------------------------------------------------------------------------
    def default_form(self, names: list[str]) -> dict[str, Any]:
        """The defaults, fitted to the start model's family (a Wan model: 4k+1 frames, no VRAM budget)."""
        form = settings_to_form(resolve_auto_precision(RunSettings())[0], names)  # FP16 on a GPU, FP32 on the CPU
        form.update({MODEL: self.model_source, GIF: True})
        return {**form, **picked(form).changes}

    def restored_form(self, names: list[str]) -> tuple[dict[str, Any], str]:
        """The last used form (or defaults with a note when it no longer validates)."""
        form = self.default_form(names)
        last = self.store.data.last
        if not last:
            return form, ""
        candidate = {**form, **{k: v for k, v in upgrade_stored_form(last).items() if k in form}}
        try:
            form_to_settings(candidate)
        except SettingsError as exc:
            return form, f"⚠ Your last settings no longer fit ({exc}); the defaults are shown."
        return candidate, ""

    # ---- jobs ---------------------------------------------------------------------------------
    def prepare(self, image_path: str | None, form: dict[str, Any]) -> tuple[PIL.Image.Image, RunSettings]:
        """``check_request``, then remember the form for the next start."""
        image, settings = self.check_request(image_path, form)
        self.store.save_last(form)
        return image, settings

    def check_request(self, image_path: str | None, form: dict[str, Any]) -> tuple[PIL.Image.Image, RunSettings]:
        """Check everything the user can fix before any job is queued; raise ``gr.Error`` with the fix, the
        settings named by their labels on the page."""
        if not image_path:
            raise gr.Error("No input image; drop an image or pick an example first.")
        problem = self.output_problem()
        if problem:
            raise gr.Error(problem)
        try:
            image = load_image(image_path)
            problems = off_step_problems(form, sliders_for(source_family(form.get(MODEL))))
            budget = budget_problem(form.get(MODEL))
            if budget and form.get("vram_budget") != MANUAL:
                problems.append(budget)
            if problems:
                raise SettingsError(problems)
            settings = form_to_settings(form)
        except MediaError as exc:
            raise gr.Error(str(exc)) from exc
        except SettingsError as exc:
            raise gr.Error(in_user_words(str(exc))) from exc
        return image, settings

    def submit_generate(self, owner: str, image: PIL.Image.Image, settings: RunSettings, form: dict[str, Any],
                        image_path: str | None = None) -> Job:
        video = new_output_path(self.output_dir)  # unique per job: ten submits in one second all run
        gif = bool(form.get(GIF))
        try:
            check_outputs_free(video, gif)
        except MediaError as exc:
            raise gr.Error(str(exc)) from exc
        source = form.get(MODEL) or DEMO

        def work(on_event, cancel) -> JobOutput:
            return self._generate(source, image, image_path, settings, video, gif, on_event, cancel)

        return self.worker.submit(owner, "Generate", work)

    def _generate(self, source: str, image: PIL.Image.Image, image_path: str | Path | None, settings: RunSettings,
                  video: Path, gif: bool, on_event: EventCallback, cancel: CancelToken) -> JobOutput:
        """One Generate (from the button or the queue) on the worker thread; its speed is kept for queue ETAs."""
        started = time.perf_counter()
        on_event(RunEvent(Phase.LOAD, message=f"loading model {source}"))
        model = self.model(source, settings)
        output = run_job(model, image, settings, video, on_event=on_event, cancel=cancel, gif=gif,
                         image_path=image_path)
        self.queue.record_speed(source, settings, output.result.seconds_per_step, time.perf_counter() - started)
        return output

    def _run_entry(self, entry: QueueEntry, image_path: Path, on_event: EventCallback, cancel: CancelToken) -> JobOutput:
        return self._generate(entry.model, load_image(image_path), image_path, entry.run_settings(), Path(entry.video),
                              entry.gif, on_event, cancel)

    def queue_jobs(self, image_path: str | None, seeds: str | None, form: dict[str, Any]) -> str:
        """Queue one job per seed (``seeds`` like '1..8'; empty: the form's seed); returns what was queued."""
        image, settings = self.prepare(image_path, form)
        try:
            entries = self.runner.add(image, settings, form.get(MODEL) or DEMO, parse_seeds(seeds, settings.seed),
                                      bool(form.get(GIF)))
        except (QueueError, SettingsError) as exc:
            raise gr.Error(str(exc)) from exc
        ids = ", ".join(e.id for e in entries)
        return f"Queued {len(entries)} job(s) ({ids}); they run one after another and survive a restart."

    def submit_compare(self, owner: str, image: PIL.Image.Image, settings: RunSettings, form: dict[str, Any]) -> Job:
        from ..compare import run_compare

        source = form.get(MODEL) or DEMO
        check_compare(source)
        out_dir = new_output_path(self.output_dir, "compare", "")

        def work(on_event, cancel):
            on_event(RunEvent(Phase.LOAD, message=f"loading model {source}"))
            fp32 = settings.replace(unet_dtype="fp32", vae_dtype="fp32", encoder_dtype="fp32")
            model = self.model(source, fp32)  # run (a) needs the original fp32 weights
            fitted = fit_image(image, settings.width, settings.height)
            return run_compare(model, fitted, settings, out_dir, on_event=on_event, cancel=cancel)

        return self.worker.submit(owner, "Compare FP32 vs FP16", work)

    # ---- what the page shows ------------------------------------------------------------------
    def live_status(self, job: Job) -> str:
        if job.state == JobState.QUEUED:
            ahead = self.worker.position(job)
            if not ahead:  # between submit and the worker taking it
                return "⏳ Starting ..."
            return f"⏳ **Waiting for the GPU**: {ahead} job(s) ahead of yours (one GPU job runs at a time)."
        points = job.curve()
        label = getattr(job.monitor, "memory_label", "memory")
        memory = f" · {label} {points[-1][1]:.0f} MiB (peak {max(m for _, m in points):.0f})" if points else ""
        elapsed = time.perf_counter() - (job.started_at or time.perf_counter())
        notes = "".join(f"\n\nℹ {note}" for note in job.notes)
        return f"▶ **{job.label}**: {job.progress_text()}{memory} · {elapsed:.0f} s{notes}"

    def live_curve(self, job: Job, history: TabHistory) -> dict:
        live = CurveRun(f"{job.label} (running)", "live", job.curve(), phase_marks(job))
        return curve_update([*history.runs, live], getattr(job.monitor, "memory_label", "memory"))

    def finish_generate(self, job: Job, history: TabHistory) -> tuple:
        output: JobOutput = job.result
        settings = output.result.settings
        group = "optimized" if settings.lossy_settings() else "fp32"
        run = CurveRun(f"{'FP32' if group == 'fp32' else 'optimized'} {output.video.stem}", group, job.curve(),
                       phase_marks(job))
        label = getattr(job.monitor, "memory_label", "memory")
        results = output.record.results
        peak = results.get("process_peak_mib") or run.peak_mib
        torch_peak = results.get("torch_peak_mib") or getattr(job.monitor, "torch_peak_mib", None)
        row = stats_row(run.label, peak, torch_peak, results)
        history = TabHistory(history.runs, history.rows, label)
        history.add(run, row)
        png_path = unique_path(self.output_dir, f"{output.video.stem}-curve", ".png")
        curve_png = write_curve_png(history.runs, label, png_path)
        files = [str(p) for p in (output.video, output.gif, output.record_path, curve_png) if p]
        frames = output.result.frames.shape[0]
        status = (f"✔ {frames} frames at {settings.width}x{settings.height} in {output.result.seconds_total:.1f} s "
                  f"({output.result.seconds_per_step:.2f} s/step on {output.result.device}); "
                  f"saved to {output.video.parent}")
        pruning = output.result.info.get("pruning")
        pruning_map = draw_pruning_map(pruning["map"], title="computed / reused per frame and step") if pruning else None
        return status, history, str(output.video), files, pruning_map, None

    def finish_compare(self, job: Job, history: TabHistory) -> tuple:
        result = job.result
        groups = {"FP32": "fp32", "FP16 only": "fp16"}
        history = TabHistory(history.runs, history.rows, history.memory_label)
        for record in result.records:
            t, mib = record.curve()
            group = next((g for prefix, g in groups.items() if record.label.startswith(prefix)), "optimized")
            phases = [(span.start_s, span.phase.value) for span in record.phase_spans()]
            res = record.results
            row = stats_row(record.label, res.get("process_peak_mib") or res.get("ram_peak_mib"),
                            res.get("torch_peak_mib"), res)
            history.memory_label = record.memory_label
            history.add(CurveRun(record.label, group, list(zip(t.tolist(), mib.tolist())), phases), row)
        status = "✔ Compare finished: " + "; ".join(result.notes or ["see the table below"])
        side_by_side = result.files.get("video")
        return (status, history, None, [str(p) for p in result.files.values()], None,
                str(side_by_side) if side_by_side else None)

    def follow(self, job: Job, history: TabHistory, finish: Callable[[Job, TabHistory], tuple]) -> Iterator[tuple]:
        """Stream (status, progress, curve, video, stats, files, pruning map, history, preview, compare video)
        until ``job`` ends: status and bar every STATUS_REFRESH_S, the curve every CURVE_REFRESH_S while it grows.

        Leaving early (the tab closed, the event was cancelled) stops the job.
        """
        skip, panel, curve = gr.skip(), PreviewPanel(), LiveCurve(self, job, history)
        try:
            while True:
                yield (self.live_status(job), progress_html(job, job.progress_text()), curve.due(),
                       skip, skip, skip, skip, skip, panel.live(job), skip)
                if job.done.wait(STATUS_REFRESH_S):
                    break
        finally:
            if not job.done.is_set():
                self.worker.cancel(job)
        if job.state == JobState.CANCELLED:
            stopped = job.last_event.label if job.last_event else "before it started"
            yield (f"⏹ Stopped ({stopped}); its memory was released.", progress_html(job, "stopped"),
                   self.live_curve(job, history), skip, skip, skip, skip, replace(history, stale_live_line=True),
                   panel.finished(job), skip)
            return
        if job.state == JobState.FAILED:
            message = user_message(job.error)
            yield (f"✖ {message}", progress_html(job, "failed"), skip, skip, skip, skip, skip,
                   replace(history, stale_live_line=True), panel.finished(job), skip)
            raise gr.Error(message)
        status, history, video, files, pruning_map, side_by_side = finish(job, history)
        curve = curve_update(history.runs, history.memory_label)
        status = "\n\n".join(line for line in (status, phase_caption(history.runs)) if line)
        stats = gr.update(value=history.rows, headers=stats_headers(history.memory_label))
        yield (status, progress_html(job, "done"), curve, video if video else skip, stats, files,
               pruning_map if pruning_map is not None else skip, history, panel.finished(job),
               side_by_side if side_by_side else skip)

    def stop_owner(self, owner: str) -> str:
        stopped = self.worker.cancel_owner(owner)
        if stopped:
            return "⏹ Stopping at the next step ..."
        if self.runner.running_id is not None:
            return (f"Nothing of this tab is running; queued job {self.runner.running_id} is. "
                    "To stop it, select it in the job queue and press Remove / stop.")
        return "Nothing is running."


def with_named_values(fn: Callable, names: list[str]) -> Callable:
    """Give ``fn(..., *values)`` one named parameter per control, so API callers (gradio_client) pass keywords."""
    signature = inspect.signature(fn)
    fixed = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_POSITIONAL]
    named = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
    fn.__signature__ = signature.replace(parameters=fixed + named)
    return fn


def free_port(start: int = 7860, tries: int = 100) -> int:
    """The first port from ``start`` that nothing listens on locally."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise OSError(f"no free port between {start} and {start + tries - 1}; close other servers or pass --port")


# ---- layout -------------------------------------------------------------------------------------
# Tightens Gradio's spacing so image, main settings and Generate fit a 1366x768 laptop screen unscrolled.
COMPACT_CSS = """
#title h1 { font-size: 1.5em; margin: 0; }
#title p { margin: 0; }
#banner p { margin: 2px 0; font-size: 0.85em; }
"""


def build_app(studio: Studio) -> gr.Blocks:
    """The page. First screen: the image | main settings, Generate and progress | live curve and video.
    Below: the other settings in tabs, the runs table, Compare's side-by-side video, downloads, the queue."""
    examples = sorted(str(p) for p in ASSETS.glob("*.png"))
    init = studio.default_form(FORM_NAMES)
    form = FormControls(init, family_props(init))
    controls = form.controls
    with gr.Blocks(title="LowVRAM Studio") as app:
        with gr.Row(equal_height=True):
            gr.Markdown("## LowVRAM Studio\nImage to video with Stable Video Diffusion and Wan 2.x on small GPUs; "
                        "every memory trick measured live.", elem_id="title")
            gr.HTML(device_badge(studio.env, studio.torch_problem), elem_id="device-badge")
        history = gr.State(TabHistory())
        with gr.Row():
            with gr.Column(scale=4, min_width=300):
                image = gr.Image(type="filepath", label="Input image", height=220, elem_id="input-image")
                gr.Examples(examples, inputs=image, examples_per_page=6)
                banner = gr.Markdown(elem_id="banner")  # warnings and notes, still on the first screen
            with gr.Column(scale=4, min_width=320):
                starter = gr.Dropdown(list(STARTERS), value=None, label="Starter preset for your GPU",
                                      elem_id="starter", info="sets the VRAM budget and settings for that card")
                prompt_controls(form)
                main_controls(form)
                lossy_note = gr.Markdown(in_user_words(lossy_summary(form_to_settings(form.init))), elem_id="lossy-note")
                fix = gr.Button("Fix", visible=False, elem_id="fix", size="sm")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate", scale=2)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                compare = gr.Button("Compare FP32 vs FP16", elem_id="compare", size="sm")
                progress = gr.HTML(progress_html(None, "ready"), elem_id="progress")
                status = gr.Markdown("Ready.", elem_id="status")
            with gr.Column(scale=5, min_width=360):
                curve = gr.LinePlot(x="t_s", y="mib", color="series", x_title="seconds since the run started",
                                    y_title="memory (MiB)", label="Memory curve (this tab's runs overlaid)",
                                    color_title="run", elem_id="curve")  # a fixed height clips the legend
                preview = gr.HTML(elem_id="live-preview", min_width=160)
                video = gr.Video(label="Video", elem_id="video", autoplay=True, loop=True, height=300)
        with gr.Row():
            with gr.Column(scale=5):
                form.add(MODEL, gr.Dropdown, [DEMO, *discovered_models()], allow_custom_value=True,
                         info="demo (built in), a diffusers SVD or Wan folder (with model_index.json) "
                              "or an svd_xt.safetensors file")
                family_note = gr.Markdown(elem_id="family-note")  # what a switch of model family changed
                with gr.Tab("Optimizations"):
                    prune_note, budget_note, budget_chart = optimization_controls(form)
                with gr.Tab("Generation"):
                    generation_controls(form)
                with gr.Tab("Presets"):
                    preset_name = gr.Dropdown([], allow_custom_value=True, label="Preset",
                                              info="type a name to save the current settings, or pick one")
                    with gr.Row():
                        save_preset = gr.Button("Save preset")
                        load_preset = gr.Button("Load")
                        delete_preset = gr.Button("Delete")
                        reset = gr.Button("Reset to defaults")
                    form.add(GIF, gr.Checkbox)
                reuse_file = gr.File(label="Use these settings again: drop an output mp4 or its .json record",
                                     type="filepath", height=120, elem_id="reuse-drop")
                reuse_note = gr.Markdown(elem_id="reuse-note")
                with gr.Row():
                    seeds = gr.Textbox(label="Seeds for the queue", placeholder="e.g. 1..8 or 3, 7, 11 (empty: the seed)",
                                       elem_id="queue-seeds", scale=3)
                    add_queue = gr.Button("Add to queue", elem_id="queue-add", scale=1)
            with gr.Column(scale=6):
                stats = gr.Dataframe(headers=stats_headers("memory"), label="Runs in this tab", interactive=False,
                                     elem_id="stats", wrap=True, column_widths=STATS_WIDTHS,
                                     max_chars=STATS_MAX_CHARS)
                compare_video = gr.Video(label="Compared runs side by side: FP32 | FP16 only | FP16 + optimizations",
                                         elem_id="compare-video", autoplay=True, loop=True, height=240)
                with gr.Row():
                    downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")
                    pruning_map = gr.Image(label="Pruning map (when pruning is on)", interactive=False)
                with gr.Accordion("Job queue (saved; survives a restart)", open=True):
                    queue_table = gr.Dataframe(headers=QUEUE_COLUMNS, interactive=False, elem_id="queue", wrap=True,
                                               column_widths=["5%", "14%", "29%", "14%", "18%", "20%"],
                                               label="Click a row to select a job; a done one shows its video")
                    with gr.Row():
                        job_id = gr.Textbox(label="Selected job", elem_id="queue-job", scale=2)
                        move_up = gr.Button("Up", elem_id="queue-up", scale=1)
                        move_down = gr.Button("Down", elem_id="queue-down", scale=1)
                        remove_job = gr.Button("Remove / stop", elem_id="queue-remove", scale=1)
                        clear_done = gr.Button("Clear finished", elem_id="queue-clear", scale=1)
                    queue_note = gr.Markdown(elem_id="queue-note")
                queue_timer = gr.Timer(QUEUE_REFRESH_S)
                queue_shown = gr.State(None)  # the rows this tab shows: a tick with the same rows redraws nothing

        names = list(FORM_NAMES)  # the API's parameter order
        components = [controls[name] for name in names]
        planned = [controls[name] for name in PLANNED_FIELDS]
        lockable = [image, *components, generate, compare, save_preset, load_preset, delete_preset, reset, reuse_file]
        results = [status, progress, curve, video, stats, downloads, pruning_map, history, preview, compare_video]

        # ---- wiring -----------------------------------------------------------------------------
        def form_of(values: tuple) -> dict[str, Any]:
            return dict(zip(names, values, strict=True))

        def values_of(form: dict[str, Any]) -> list[Any]:
            return [form.get(name) for name in names]

        def restore() -> list[Any]:
            form, note = studio.restored_form(names)
            return [*values_of(form), "\n\n".join(n for n in (studio.banner(), note) if n),
                    gr.update(choices=studio.store.preset_names())]

        def run_generate(tab: TabHistory, request: gr.Request, image_path: str | None, *values: Any):
            form = form_of(values)
            picture, settings = studio.prepare(image_path, form)
            job = studio.submit_generate(request.session_hash or "anonymous", picture, settings, form, image_path)
            yield from studio.follow(job, tab, studio.finish_generate)

        def run_compare(tab: TabHistory, request: gr.Request, image_path: str | None, *values: Any):
            form = form_of(values)
            picture, settings = studio.prepare(image_path, form)
            job = studio.submit_compare(request.session_hash or "anonymous", picture, settings, form)
            yield from studio.follow(job, tab, studio.finish_compare)

        def check_request(image_path: str | None, *values: Any) -> None:
            studio.check_request(image_path, form_of(values))

        def check_compare_request(image_path: str | None, *values: Any) -> None:
            check_compare(form_of(values).get(MODEL) or DEMO)
            check_request(image_path, *values)

        def check_upload(upload: dict | None) -> None:
            if upload and upload.get("path"):
                check_image_upload(Path(upload["path"]), upload.get("orig_name"))

        def stop_run(request: gr.Request) -> str:
            return studio.stop_owner(request.session_hash or "anonymous")

        def tab_closed(request: gr.Request) -> None:
            if studio.worker.cancel_owner(request.session_hash or "anonymous"):
                logger.info("a browser tab closed during its run; the run was stopped")

        def set_locked(locked: bool, source: str | None = None) -> list[dict]:
            """Lock (or unlock) the form, but for the controls ``source``'s family keeps locked (a budget that
            cannot be planned); the queue's timer pauses while the tab's run streams: each tick is a round of
            Gradio's loading-status updates over every component the page has, which a CPU run pays."""
            kept = {controls[name] for name in locked_out(source)}
            return [*(gr.update(interactive=not locked and c not in kept) for c in lockable),
                    gr.Timer(active=not locked)]

        def unlock(source: str | None) -> list[dict]:
            return set_locked(False, source)

        def starting() -> list[Any]:
            """Lock the form and clear the last run's status and bar: nothing stale while the new run starts."""
            return [*set_locked(True), "⏳ Starting ...", progress_html(None, "starting")]

        def pick_model(*values: Any) -> list[Any]:
            """The picked model's family: its controls shown, the others hidden, what it cannot take moved (with
            the note), the budget locked where none can be planned, and the budget's note for this model."""
            form = form_of(values)
            fit = picked(form)
            props = family_props(form)
            answer = plan_budget({**form, **fit.changes}, studio.loaded_model)
            updates = [gr.update(**props[name], **({"value": fit.changes[name]} if name in fit.changes else {}))
                       for name in FAMILY_CONTROLS]
            return [*updates, fit.note, answer.note, answer.chart]

        def fit_family(*values: Any) -> list[Any]:
            """A value the model's family cannot take, set by a preset, a starter or a re-used record, moved."""
            fit = fit_to_family(form_of(values))
            return [*(fit.changes.get(name, gr.skip()) for name in FITTED), fit.note or gr.skip()]

        def apply_budget(*values: Any) -> list[Any]:
            """The budget's plan into the planned controls (only those it changes), its note and its chart."""
            answer = plan_budget(form_of(values), studio.loaded_model)
            changes = answer.changes or {}
            return [*(changes[name] if name in changes else gr.skip() for name in PLANNED_FIELDS), answer.note,
                    answer.chart]

        def apply_starter(name: str | None, *values: Any) -> list[Any]:
            """A starter's budget and settings, then that budget's plan, into the whole form."""
            if not name:
                return [*(gr.skip() for _ in names), gr.skip(), gr.skip()]
            try:
                form = starter_form(name, form_of(values))
            except ValueError as exc:
                raise gr.Error(str(exc)) from exc
            answer = plan_budget(form, studio.loaded_model)
            return [*values_of({**form, **(answer.changes or {})}), answer.note, answer.chart]

        def describe(*values: Any) -> tuple[str, dict]:
            """The lossy note and, on a GPU, the time estimate; or the conflict in the page's words with its
            one-click fix when there is one."""
            form = form_of(values)
            try:
                settings = form_to_settings(form)
                note = in_user_words(lossy_summary(settings))
                estimate = speed_line(form, settings, studio.loaded_model)
                return "\n\n".join(part for part in (note, estimate) if part), gr.update(visible=False)
            except SettingsError as exc:
                remedy = suggest_fix(form)
                button = gr.update(visible=True, value=remedy.label) if remedy else gr.update(visible=False)
                return f"⚠ {in_user_words(str(exc))}", button

        def apply_fix(*values: Any) -> list[Any]:
            remedy = suggest_fix(form_of(values))
            changes = remedy.changes if remedy else {}
            return [changes[name] if name in changes else gr.skip() for name in names]

        def snap(source: str | None, *values: Any) -> list[Any]:
            """A value typed between a slider's steps (the model family's) moves to the nearest step, and the user
            is told."""
            out, specs = [], sliders_for(source_family(source))
            for name, value in zip(SLIDERS, values, strict=True):
                snapped = snap_note(name, value, specs)
                if snapped is not None:
                    gr.Warning(snapped[1])
                out.append(gr.skip() if snapped is None else snapped[0])
            return out

        def save_named(name: str | None, *values: Any) -> dict:
            try:
                saved = studio.store.save_preset(name or "", form_of(values))
            except PresetError as exc:
                raise gr.Error(str(exc)) from exc
            gr.Info(f"Saved preset {saved!r}.")
            return gr.update(choices=studio.store.preset_names(), value=saved)

        def load_named(name: str | None) -> list[Any]:
            try:
                stored = studio.store.preset(name or "")
            except PresetError as exc:
                raise gr.Error(str(exc)) from exc
            form = {**studio.default_form(names), **{k: v for k, v in upgrade_stored_form(stored).items() if k in names}}
            return values_of(form)

        def delete_named(name: str | None) -> dict:
            try:
                studio.store.delete_preset(name or "")
            except PresetError as exc:
                raise gr.Error(str(exc)) from exc
            return gr.update(choices=studio.store.preset_names(), value=None)

        def reset_defaults() -> list[Any]:
            form = studio.default_form(names)
            studio.store.save_last(form)
            return values_of(form)

        def queue_view() -> dict:
            return gr.update(value=studio.runner.rows(), headers=QUEUE_COLUMNS)

        def queue_tick(shown: Any) -> tuple[Any, Any]:
            """The timer's redraw, only when the rows differ from what this tab shows."""
            rows = studio.runner.rows()
            if rows == shown:
                return gr.skip(), gr.skip()
            return gr.update(value=rows, headers=QUEUE_COLUMNS), rows

        def queue_add(image_path: str | None, seed_list: str | None, *values: Any) -> tuple[dict, str]:
            message = studio.queue_jobs(image_path, seed_list, form_of(values))
            return queue_view(), message

        def queue_change(action: Callable[[], str]) -> tuple[dict, str]:
            try:
                message = action()
            except QueueError as exc:
                raise gr.Error(str(exc)) from exc
            return queue_view(), message

        def queue_move(selected: str, delta: float) -> tuple[dict, str]:
            return queue_change(lambda: studio.runner.move((selected or "").strip(), int(delta)))

        def queue_remove(selected: str) -> tuple[dict, str]:
            return queue_change(lambda: studio.runner.remove((selected or "").strip()))

        def queue_clear() -> tuple[dict, str]:
            return queue_change(lambda: f"Cleared {studio.queue.clear_finished()} finished job(s).")

        def queue_select(event: gr.SelectData) -> tuple[str, Any]:
            selected = str(event.row_value[1])
            try:
                entry = studio.queue.get(selected)
            except QueueError:
                return selected, gr.skip()
            done = entry.state == JobState.DONE and entry.video and Path(entry.video).is_file()
            return selected, entry.video if done else gr.skip()

        def reuse_drop(path: str | None) -> list[Any]:
            try:
                restored = restore_form(path, names, served=[studio.output_dir, ASSETS, studio.queue.inputs])
            except ReuseError as exc:
                raise gr.Error(str(exc)) from exc
            values = [restored.values[name] if name in restored.values else gr.skip() for name in names]
            return [*values, restored.image if restored.image is not None else gr.skip(), restored.message]

        app.load(restore, outputs=[*components, banner, preset_name], api_name="restore")
        app.unload(tab_closed)
        # Generate and Compare check the request first, so a fixable problem locks nothing; the form is locked
        # while the run goes and unlocked however it ends. Gradio 6.31's page fires a `.then()` step only when
        # the step before it succeeded (an error fires just the `.failure()` steps), so the unlock hangs on both.
        # The check is queued: the page shows no toast for a gr.Error of a queue=False step.
        for button, check, handler, api_name in ((generate, check_request, run_generate, "generate"),
                                                 (compare, check_compare_request, run_compare, "compare")):
            run = button.click(check, [image, *components], api_name=False, concurrency_limit=None,
                               show_progress="hidden").success(
                starting, outputs=[*lockable, queue_timer, status, progress], queue=False, api_name=False,
                show_progress="hidden").then(
                with_named_values(handler, names), inputs=[history, image, *components], outputs=results,
                api_name=api_name,
                concurrency_limit=None, show_progress="hidden",
            )
            run.then(unlock, controls[MODEL], [*lockable, queue_timer], queue=False, api_name=False)
            run.failure(unlock, controls[MODEL], [*lockable, queue_timer], queue=False, api_name=False)
        # An upload PIL cannot read is named with the fix at once and the box emptied for the next file; the
        # check reads the upload itself (preprocess=False): Gradio's own decoding would fail with a bare "Error".
        image.upload(check_upload, image, preprocess=False, api_name=False, concurrency_limit=None,
                     show_progress="hidden").failure(lambda: None, outputs=image, queue=False, api_name=False)
        stop.click(stop_run, outputs=status, api_name="stop", concurrency_limit=None)
        # A budget plans when picked and again when the model, size, frames, device or precision change.
        budget_triggers = [controls[name].input for name in ("vram_budget", BUDGET_GIB, *REPLAN_INPUTS)]
        gr.on(budget_triggers, with_named_values(apply_budget, names), components, [*planned, budget_note, budget_chart],
              queue=False, api_name="plan_budget", show_progress="hidden")
        starter.input(with_named_values(apply_starter, names), [starter, *components],
                      [*components, budget_note, budget_chart], queue=False, api_name="starter", show_progress="hidden")
        gr.on([c.change for c in components], describe, components, [lossy_note, fix], queue=False, api_name=False,
              show_progress="hidden")
        fix.click(apply_fix, components, components, queue=False, api_name=False, show_progress="hidden")
        # Typed values snap to the step: a slider's number box takes any number and sends no input event. Queued:
        # the page shows no toast from a queue=False step.
        sliders = [controls[name] for name in SLIDERS]
        gr.on([c.change for c in sliders], snap, [controls[MODEL], *sliders], sliders, api_name=False,
              concurrency_limit=None, show_progress="hidden")
        # The model's family decides which controls show; whatever sets the model (a pick, a preset, a re-used
        # record) fits the form to it, and a preset or starter that sets what the family cannot take is fitted too.
        controls[MODEL].change(with_named_values(pick_model, names), components, [*(controls[name] for name in FAMILY_CONTROLS), family_note,
                                                        budget_note, budget_chart], queue=False, api_name="pick_model",
                               show_progress="hidden")
        gr.on([controls[name].change for name in FITTED if name not in SNAPPED], fit_family, components,
              [*(controls[name] for name in FITTED), family_note], queue=False, api_name=False, show_progress="hidden")
        controls["prune_threshold"].change(prune_warning, controls["prune_threshold"], prune_note, queue=False,
                                           api_name=False)
        save_preset.click(with_named_values(save_named, names), [preset_name, *components], preset_name,
                          api_name="save_preset")
        load_preset.click(load_named, preset_name, components, api_name="load_preset")
        delete_preset.click(delete_named, preset_name, preset_name, api_name="delete_preset")
        reset.click(reset_defaults, outputs=components, api_name="reset")
        add_queue.click(with_named_values(queue_add, names), [image, seeds, *components], [queue_table, queue_note],
                        api_name="queue_add", concurrency_limit=None)
        queue_timer.tick(queue_tick, queue_shown, [queue_table, queue_shown], api_name=False, queue=False,
                         show_progress="hidden")
        app.load(queue_view, outputs=queue_table, api_name="queue_view", queue=False, show_progress="hidden")
        move_up.click(lambda selected: queue_move(selected, -1), job_id, [queue_table, queue_note], api_name=False)
        move_down.click(lambda selected: queue_move(selected, 1), job_id, [queue_table, queue_note], api_name=False)
        gr.api(queue_move, api_name="queue_move")
        remove_job.click(queue_remove, job_id, [queue_table, queue_note], api_name="queue_remove")
        clear_done.click(queue_clear, outputs=[queue_table, queue_note], api_name="queue_clear")
        queue_table.select(queue_select, outputs=[job_id, video], api_name=False)
        # Empty the drop box afterwards (also after an error) so the next file can be dropped straight away;
        # the note names the file that was restored.
        reuse_file.upload(reuse_drop, reuse_file, [*components, image, reuse_note], api_name="reuse")
        reuse_file.upload(lambda: None, outputs=reuse_file, queue=False, api_name=False)
    return app


@dataclass
class RunningStudio:
    """A started studio: the app, its studio, the addresses, and what to tell the user about sharing."""

    app: gr.Blocks
    studio: Studio
    local_url: str
    share_url: str | None
    share_report: str | None

    def close(self) -> None:
        self.studio.close()
        self.app.close()


def serve_studio(studio: Studio, port: int | None = None, **launch: Any) -> tuple[gr.Blocks, str, str | None]:
    """Build ``studio``'s page and serve it without blocking (the CLI, the tests and bench/watched_cost.py):
    on ``port`` or the first free one from 7860, serving only its outputs and the assets. ``launch``: more
    ``gr.Blocks.launch`` options. Returns the app, its local URL and its share URL (None unless shared)."""
    app = build_app(studio)
    app.queue(default_concurrency_limit=None)
    _, local_url, share_url = app.launch(
        server_port=port or free_port(),
        allowed_paths=[str(studio.output_dir), str(ASSETS)],  # nothing else of this machine is served
        prevent_thread_lock=True,
        **launch,
    )
    return app, local_url, share_url


def start_studio(args: argparse.Namespace) -> RunningStudio:
    """Start serving without blocking (``launch_studio`` blocks; tests use this)."""
    options = serve_options(args.listen, args.share, args.auth, args.insecure_share)
    outputs = getattr(args, "outputs", None)
    studio = Studio(args.model, Path(outputs) if outputs else None)  # QueueLocked if another studio runs
    problem = studio.output_problem()  # also creates the folder
    if problem:
        logger.warning(problem)
    app, local_url, share_url = serve_studio(
        studio,
        args.port,
        server_name=options.server_name,
        inbrowser=not args.no_browser,
        share=options.share,
        auth=LoginGuard(*options.auth) if options.auth else None,
    )
    studio.queue.set_owner(local_url)  # a second studio on this queue says where this one is
    return RunningStudio(app, studio, local_url, share_url, share_report(options.share, share_url, local_url))


def launch_studio(args: argparse.Namespace) -> int:
    """Start the studio for ``lowvram-studio ui``; blocks until Ctrl+C."""
    running = start_studio(args)
    try:
        if running.share_report:
            logger.warning(running.share_report)
        logger.warning("videos, records and curves are saved to %s", running.studio.output_dir)
        running.app.block_thread()
    finally:
        running.studio.close()
    return 0

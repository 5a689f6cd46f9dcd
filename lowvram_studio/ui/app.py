"""The studio: a Gradio Blocks app over the same engine the CLI uses.

Functions first (the ``Studio`` and its handlers), then the layout (``build_app``), then the wiring;
nothing runs at import. GPU work never runs in a Gradio handler: handlers submit a job to the
background ``Worker`` and stream its progress and memory curve to the page 2.5 times a second.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image

from ..engine.events import CancelToken, EventCallback, Phase, RunEvent
from ..engine.precision import PrecisionPolicy, detect_gpu, execution_path, rounded_components
from ..engine.pruning import draw_pruning_map
from ..engine.sampler import resolve_device
from ..jobs import JobOutput, check_outputs_free, new_output_path, run_job
from ..media import MediaError, fit_image, load_image, unique_path
from ..monitor.record import ReuseError
from ..models.demo import demo_model_info
from ..models.discovery import DiscoveryConfig, discover_models
from ..models.load import LoadedModel, load_model
from ..settings import RunSettings, SettingsError
from ..sysinfo import check_torch_runs, collect_env, torch_gpu_problem
from .budget import PLANNED_FIELDS, REPLAN_INPUTS, plan_budget
from .config_store import ConfigStore, PresetError, default_output_dir
from .curves import MAX_RUNS, CurveRun, curve_frame, phase_caption, write_curve_png
from .form import (
    BUDGET_CHOICES,
    BUDGET_GIB,
    FORM_NAMES,
    GIF,
    INFO,
    MODEL,
    UNET_PRECISION_CHOICES,
    form_to_settings,
    lossy_summary,
    prune_warning,
    resolve_auto_precision,
    settings_to_form,
    upgrade_stored_form,
)
from .job_queue import JobQueue, QueueEntry, QueueError, parse_seeds
from .preview_view import PreviewPanel
from .queue_lock import QUEUE_FOLDER, default_queue_dir
from .queue_runner import QUEUE_COLUMNS, QueueRunner
from .reuse import restore_form
from .share import LoginGuard, serve_options, share_report
from .worker import Job, JobState, Worker

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets"
REFRESH_S = 0.4  # the live curve and progress redraw 2.5x a second (the issue asks for at least 2x)
QUEUE_REFRESH_S = 1.0  # the queue table redraws once a second
STATS_COLUMNS = ["run", "peak memory (MiB)", "measured as", "torch peak (MiB)", "s/step", "output FPS",
                 "pruned %", "PSNR (dB)", "SSIM"]
DEMO = "demo"


# ---- helpers ------------------------------------------------------------------------------------
def discovered_models() -> list[str]:
    """Models found on disk for the picker (ComfyUI folders, the HF cache, COMFYUI_ROOT)."""
    return [str(c.path) for c in discover_models(DiscoveryConfig.from_env())]


def user_message(exc: BaseException) -> str:
    """What a failed job tells the user: what went wrong and what to do."""
    text = str(exc)
    if isinstance(exc, ValueError | NotImplementedError):  # MediaError, ModelError, SettingsError, CompareError
        return text
    if "out of memory" in text.lower():
        return (f"the GPU ran out of memory ({text.splitlines()[0][:200]}); pick a smaller VRAM budget preset, "
                "turn on FP16 or offload, or lower frames / size; your previous results are kept")
    return f"the run failed ({type(exc).__name__}: {text[:300]}); see the terminal for details, then try again"


def check_image_upload(path: Path, name: str | None) -> None:
    """Raise ``gr.Error`` with ``media.load_image``'s message (the CLI's) when PIL cannot read the upload,
    naming the file as the user knows it rather than Gradio's temporary copy."""
    try:
        load_image(path.read_bytes())
    except MediaError as exc:
        raise gr.Error(f"{name or path.name}: {exc}") from exc


def _fmt(value: Any, digits: int = 1, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{float(value) * scale:.{digits}f}"


def phase_marks(job: Job) -> list[tuple[float, str]]:
    """(seconds since the job started, label) where each phase began; compare runs are prefixed."""
    marks: list[tuple[float, str]] = []
    last = None
    for event in job.events:
        run = event.data.get("compare_run")
        key = (run, event.phase)
        if key == last or event.phase == Phase.DONE or job.started_at is None:
            continue
        last = key
        label = event.phase.value if run is None else f"{run}: {event.phase.value}"
        marks.append((event.time - job.started_at, label))
    return marks


def curve_update(runs: list[CurveRun], memory_label: str) -> dict:
    """The LinePlot update for ``runs``: colours per run, legend without the phase marks, marks named below."""
    frame, colors = curve_frame(runs)
    legend = [name for name in colors if not name.startswith("|")]
    return gr.update(value=frame, color_map=colors, colors_in_legend=legend, y_title=f"{memory_label} (MiB)")


@dataclass
class TabHistory:
    """What one browser tab remembers: its finished runs' curves and stats rows."""

    runs: list[CurveRun] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    memory_label: str = "memory"

    def add(self, run: CurveRun, row: list[str]) -> None:
        self.runs = [*self.runs, run][-MAX_RUNS:]
        self.rows = [*self.rows, row][-MAX_RUNS:]


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
        self.torch_problem = torch_gpu_problem(collect_env())  # read once: the GPU and torch do not change
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
                    PrecisionPolicy.from_settings(settings, detect_gpu(resolve_device(settings.device))),
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
        form = settings_to_form(resolve_auto_precision(RunSettings())[0], names)  # FP16 on a GPU, FP32 on the CPU
        form.update({MODEL: self.model_source, GIF: True})
        return form

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
        """Check everything the user can fix before any job is queued; raise ``gr.Error`` with the fix."""
        if not image_path:
            raise gr.Error("No input image; drop an image or pick an example first.")
        problem = self.output_problem()
        if problem:
            raise gr.Error(problem)
        try:
            image = load_image(image_path)
            settings = form_to_settings(form)
        except (MediaError, SettingsError) as exc:
            raise gr.Error(str(exc)) from exc
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

        out_dir = new_output_path(self.output_dir, "compare", "")
        source = form.get(MODEL) or DEMO

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
        row = [run.label, _fmt(peak, 0), label, _fmt(torch_peak, 0),
               _fmt(results.get("seconds_per_step"), 2), _fmt(results.get("output_fps"), 2),
               _fmt(results.get("pruned_fraction"), 1, 100.0), "n/a", "n/a"]
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
        return status, history, str(output.video), files, pruning_map

    def finish_compare(self, job: Job, history: TabHistory) -> tuple:
        result = job.result
        groups = {"FP32": "fp32", "FP16 only": "fp16"}
        history = TabHistory(history.runs, history.rows, history.memory_label)
        for record in result.records:
            t, mib = record.curve()
            group = next((g for prefix, g in groups.items() if record.label.startswith(prefix)), "optimized")
            phases = [(span.start_s, span.phase.value) for span in record.phase_spans()]
            res = record.results
            row = [record.label, _fmt(res.get("process_peak_mib") or res.get("ram_peak_mib"), 0), record.memory_label,
                   _fmt(res.get("torch_peak_mib"), 0), _fmt(res.get("seconds_per_step"), 2),
                   _fmt(res.get("output_fps"), 2), _fmt(res.get("pruned_fraction"), 1, 100.0),
                   _fmt(res.get("psnr_db"), 1), _fmt(res.get("ssim"), 4)]
            history.memory_label = record.memory_label
            history.add(CurveRun(record.label, group, list(zip(t.tolist(), mib.tolist())), phases), row)
        status = "✔ Compare finished: " + "; ".join(result.notes or ["see the table below"])
        return status, history, None, [str(p) for p in result.files.values()], None

    def follow(self, job: Job, history: TabHistory, finish: Callable[[Job, TabHistory], tuple]) -> Iterator[tuple]:
        """Stream (status, curve, video, stats, files, pruning map, history, preview) until ``job`` ends.

        Leaving early (the tab closed, the event was cancelled) stops the job.
        """
        skip, panel = gr.skip(), PreviewPanel()
        try:
            yield self.live_status(job), self.live_curve(job, history), skip, skip, skip, skip, skip, panel.live(job)
            while not job.done.wait(REFRESH_S):
                yield self.live_status(job), self.live_curve(job, history), skip, skip, skip, skip, skip, panel.live(job)
        finally:
            if not job.done.is_set():
                self.worker.cancel(job)
        if job.state == JobState.CANCELLED:
            stopped = job.last_event.label if job.last_event else "before it started"
            yield (f"⏹ Stopped ({stopped}); its memory was released.", self.live_curve(job, history),
                   skip, skip, skip, skip, skip, panel.finished(job))
            return
        if job.state == JobState.FAILED:
            message = user_message(job.error)
            yield f"✖ {message}", skip, skip, skip, skip, skip, skip, panel.finished(job)
            raise gr.Error(message)
        status, history, video, files, pruning_map = finish(job, history)
        curve = curve_update(history.runs, history.memory_label)
        status = "\n\n".join(line for line in (status, phase_caption(history.runs)) if line)
        stats = gr.update(value=history.rows, headers=STATS_COLUMNS)
        yield (status, curve, video if video else skip, stats, files, pruning_map if pruning_map is not None else skip,
               history, panel.finished(job))

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
class _Form:
    """Creates the form's controls: each named after its RunSettings field, with its saved value and info text."""

    def __init__(self, init: dict[str, Any]):
        self.init = init
        self.controls: dict[str, gr.components.Component] = {}

    def add(self, name: str, factory: Callable[..., gr.components.Component], *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("info", INFO.get(name))
        self.controls[name] = factory(*args, value=self.init[name], elem_id=f"ctl-{name}", **kwargs)


def _generation_controls(form: _Form) -> None:
    with gr.Row():
        form.add("num_frames", gr.Slider, 2, 128, step=1, label="Frames")
        form.add("num_inference_steps", gr.Slider, 1, 100, step=1, label="Steps")
    with gr.Row():
        form.add("width", gr.Slider, 64, 1024, step=64, label="Width")
        form.add("height", gr.Slider, 64, 1024, step=64, label="Height")
    with gr.Row():
        form.add("seed", gr.Number, precision=0, minimum=0, label="Seed")
        form.add("fps", gr.Slider, 1, 60, step=1, label="FPS", info="SVD's fps conditioning and the video's frame rate")
    with gr.Accordion("More generation settings", open=False):
        form.add("motion_bucket_id", gr.Slider, 0, 1023, step=1, label="Motion bucket", info="more = more motion")
        form.add("noise_aug_strength", gr.Slider, 0, 1, step=0.01, label="Noise augmentation")
        with gr.Row():
            form.add("min_guidance_scale", gr.Slider, 0, 20, step=0.1, label="Min guidance (first frame)")
            form.add("max_guidance_scale", gr.Slider, 0, 20, step=0.1,
                     label="Max guidance (last frame; ≤ 1 = no CFG)")
        form.add("device", gr.Radio, ["auto", "cpu", "cuda"], label="Device")
        form.add("preview_every", gr.Slider, 0, 10, step=1, label="Live preview every N steps (0 = off)")


def _optimization_controls(form: _Form) -> tuple[gr.Markdown, gr.Markdown]:
    """Every control here is one RunSettings field; lossy ones carry ⚠ in their label.
    Returns the pruning warning and the budget's plan note."""
    with gr.Row():
        form.add("vram_budget", gr.Dropdown, list(BUDGET_CHOICES), label="VRAM budget")
        form.add(BUDGET_GIB, gr.Number, label="Custom budget (GB)", minimum=0.5, maximum=1024,
                 info="used when the VRAM budget is Custom")
    budget_note = gr.Markdown(elem_id="budget-note")
    with gr.Row():
        form.add("unet_dtype", gr.Dropdown, UNET_PRECISION_CHOICES, label="UNet precision")
        form.add("vae_dtype", gr.Checkbox, label="VAE FP16 ⚠ lossy")
        form.add("encoder_dtype", gr.Checkbox, label="Image encoder FP16 ⚠ lossy")
        form.add("half_compute", gr.Dropdown, ["auto", "fp16", "fp32"], label="FP16 weights compute in")
    with gr.Row():
        form.add("chunk_size", gr.Slider, 0, 64, step=1, label="Temporal chunk size ⚠ lossy")
        form.add("overlap", gr.Slider, 0, 16, step=1, label="Chunk overlap")
    form.add("prune_threshold", gr.Slider, 0, 0.1, step=0.001, label="Pruning threshold ⚠ lossy")
    warning = gr.Markdown(elem_id="prune-warning")
    with gr.Row():
        form.add("offload", gr.Radio, ["none", "model", "stream"], label="Offload")
        form.add("decode_chunk", gr.Slider, 0, 32, step=1, label="Decode chunk ⚠ lossy")
    form.add("interpolate", gr.Radio, ["1", "2", "4"], label="Interpolation ⚠ lossy")
    with gr.Accordion("Lossless memory savers", open=False):
        form.add("cfg_split", gr.Checkbox, label="CFG split")
        with gr.Row():
            form.add("spatial_chunk", gr.Slider, 0, 32, step=1, label="Spatial chunk")
            form.add("temporal_chunk", gr.Slider, 0, 16384, step=256, label="Temporal chunk")
            form.add("ff_chunk", gr.Slider, 0, 16384, step=256, label="Feed-forward chunk")
        form.add("vae_tile", gr.Slider, 0, 1024, step=64, label="VAE tile (px) ⚠ lossy")
    return warning, budget_note


def build_app(studio: Studio) -> gr.Blocks:
    """The page: inputs and settings on the left, the live curve and results on the right."""
    examples = sorted(str(p) for p in ASSETS.glob("*.png"))
    form = _Form(studio.default_form(FORM_NAMES))
    controls = form.controls
    with gr.Blocks(title="LowVRAM Studio") as app:
        gr.Markdown("# LowVRAM Studio\n"
                    "Image to video with Stable Video Diffusion on small GPUs; every memory trick measured live.")
        banner = gr.Markdown(elem_id="banner")
        history = gr.State(TabHistory())
        with gr.Row():
            with gr.Column(scale=5):
                image = gr.Image(type="filepath", label="Input image", height=260, elem_id="input-image")
                gr.Examples(examples, inputs=image)
                reuse_file = gr.File(label="Use these settings again: drop an output mp4 or its .json record",
                                     type="filepath", height=120, elem_id="reuse-drop")
                reuse_note = gr.Markdown(elem_id="reuse-note")
                form.add(MODEL, gr.Dropdown, [DEMO, *discovered_models()], allow_custom_value=True, label="Model",
                         info="demo (built in), a diffusers SVD folder (with model_index.json) "
                              "or an svd_xt.safetensors file")
                with gr.Tab("Generation"):
                    _generation_controls(form)
                with gr.Tab("Optimizations"):
                    prune_note, budget_note = _optimization_controls(form)
                with gr.Tab("Presets"):
                    preset_name = gr.Dropdown([], allow_custom_value=True, label="Preset",
                                              info="type a name to save the current settings, or pick one")
                    with gr.Row():
                        save_preset = gr.Button("Save preset")
                        load_preset = gr.Button("Load")
                        delete_preset = gr.Button("Delete")
                        reset = gr.Button("Reset to defaults")
                    form.add(GIF, gr.Checkbox, label="Also write a GIF")
                lossy_note = gr.Markdown(lossy_summary(form_to_settings(form.init)), elem_id="lossy-note")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    compare = gr.Button("Compare FP32 vs FP16", elem_id="compare")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Row():
                    seeds = gr.Textbox(label="Seeds for the queue", placeholder="e.g. 1..8 or 3, 7, 11 (empty: the seed)",
                                       elem_id="queue-seeds", scale=3)
                    add_queue = gr.Button("Add to queue", elem_id="queue-add", scale=1)
            with gr.Column(scale=6):
                status = gr.Markdown("Ready.", elem_id="status")
                with gr.Row(equal_height=False):
                    curve = gr.LinePlot(x="t_s", y="mib", color="series", x_title="seconds since the run started",
                                        y_title="memory (MiB)", label="Memory curve (this tab's runs overlaid)",
                                        color_title="run", elem_id="curve", scale=3)  # a fixed height clips the legend
                    preview = gr.HTML(elem_id="live-preview", min_width=160, scale=1)
                video = gr.Video(label="Video", elem_id="video", autoplay=True, loop=True, height=320)
                stats = gr.Dataframe(headers=STATS_COLUMNS, label="Runs in this tab", interactive=False,
                                     elem_id="stats")
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

        names = list(FORM_NAMES)  # the API's parameter order
        components = [controls[name] for name in names]
        planned = [controls[name] for name in PLANNED_FIELDS]
        lockable = [image, *components, generate, compare, save_preset, load_preset, delete_preset, reset, reuse_file]
        results = [status, curve, video, stats, downloads, pruning_map, history, preview]

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

        def check_upload(upload: dict | None) -> None:
            if upload and upload.get("path"):
                check_image_upload(Path(upload["path"]), upload.get("orig_name"))

        def stop_run(request: gr.Request) -> str:
            return studio.stop_owner(request.session_hash or "anonymous")

        def tab_closed(request: gr.Request) -> None:
            if studio.worker.cancel_owner(request.session_hash or "anonymous"):
                logger.info("a browser tab closed during its run; the run was stopped")

        def set_locked(locked: bool) -> Callable[[], list[dict]]:
            def update() -> list[dict]:
                return [gr.update(interactive=not locked) for _ in lockable]

            return update

        def apply_budget(*values: Any) -> list[Any]:
            """The budget's plan into the planned controls (only those it changes) and its note beside them."""
            answer = plan_budget(form_of(values), studio.loaded_model)
            changes = answer.changes or {}
            return [*(changes[name] if name in changes else gr.skip() for name in PLANNED_FIELDS), answer.note]

        def describe(*values: Any) -> str:
            try:
                return lossy_summary(form_to_settings(form_of(values)))
            except SettingsError as exc:
                return f"⚠ {exc}"

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
        for button, handler, api_name in ((generate, run_generate, "generate"), (compare, run_compare, "compare")):
            run = button.click(check_request, [image, *components], api_name=False, concurrency_limit=None,
                               show_progress="hidden").success(
                set_locked(True), outputs=lockable, queue=False, api_name=False).then(
                with_named_values(handler, names), inputs=[history, image, *components], outputs=results,
                api_name=api_name,
                concurrency_limit=None, show_progress="hidden",
            )
            run.then(set_locked(False), outputs=lockable, queue=False, api_name=False)
            run.failure(set_locked(False), outputs=lockable, queue=False, api_name=False)
        # An upload PIL cannot read is named with the fix at once and the box emptied for the next file; the
        # check reads the upload itself (preprocess=False): Gradio's own decoding would fail with a bare "Error".
        image.upload(check_upload, image, preprocess=False, api_name=False, concurrency_limit=None,
                     show_progress="hidden").failure(lambda: None, outputs=image, queue=False, api_name=False)
        stop.click(stop_run, outputs=status, api_name="stop", concurrency_limit=None)
        # A budget plans when picked and again when the model, size, frames, device or precision change.
        budget_triggers = [controls[name].input for name in ("vram_budget", BUDGET_GIB, *REPLAN_INPUTS)]
        gr.on(budget_triggers, with_named_values(apply_budget, names), components, [*planned, budget_note],
              queue=False, api_name="plan_budget", show_progress="hidden")
        gr.on([c.change for c in components], describe, components, lossy_note, queue=False, api_name=False,
              show_progress="hidden")
        controls["prune_threshold"].change(prune_warning, controls["prune_threshold"], prune_note, queue=False,
                                           api_name=False)
        save_preset.click(with_named_values(save_named, names), [preset_name, *components], preset_name,
                          api_name="save_preset")
        load_preset.click(load_named, preset_name, components, api_name="load_preset")
        delete_preset.click(delete_named, preset_name, preset_name, api_name="delete_preset")
        reset.click(reset_defaults, outputs=components, api_name="reset")
        add_queue.click(with_named_values(queue_add, names), [image, seeds, *components], [queue_table, queue_note],
                        api_name="queue_add", concurrency_limit=None)
        queue_timer.tick(queue_view, outputs=queue_table, api_name="queue_view", queue=False, show_progress="hidden")
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


def start_studio(args: argparse.Namespace) -> RunningStudio:
    """Start serving without blocking (``launch_studio`` blocks; tests use this)."""
    options = serve_options(args.listen, args.share, args.auth, args.insecure_share)
    outputs = getattr(args, "outputs", None)
    studio = Studio(args.model, Path(outputs) if outputs else None)  # QueueLocked if another studio runs
    problem = studio.output_problem()  # also creates the folder
    if problem:
        logger.warning(problem)
    app = build_app(studio)
    app.queue(default_concurrency_limit=None)
    _, local_url, share_url = app.launch(
        server_name=options.server_name,
        server_port=args.port or free_port(),
        inbrowser=not args.no_browser,
        share=options.share,
        auth=LoginGuard(*options.auth) if options.auth else None,
        allowed_paths=[str(studio.output_dir), str(ASSETS)],  # nothing else of this machine is served
        prevent_thread_lock=True,
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

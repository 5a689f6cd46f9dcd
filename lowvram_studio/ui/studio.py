"""The studio's state and handlers: its models, output folder, saved settings, the worker, and what each
button does (``Studio``), apart from the page that shows them (``app.build_app``). GPU work never runs in
a Gradio handler: handlers submit a job to the background ``Worker`` and stream its progress.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image

from ..engine.events import CancelToken, EventCallback, Phase, RunEvent
from ..engine.oom import first_line, is_host_out_of_memory, is_out_of_memory
from ..engine.precision import (
    PrecisionPolicy,
    detect_gpu,
    execution_path,
    rounded_components,
)
from ..engine.pruning_record import draw_pruning_map
from ..engine.sampler import resolve_device
from ..jobs import JobOutput, check_outputs_free, new_output_path, run_job
from ..media import MediaError, fit_image, load_image, unique_path
from ..models.demo import demo_model_info
from ..models.load import LoadedModel, load_model
from ..models.source_family import source_family
from ..settings import RunSettings, SettingsError
from ..settings_adapter import precision_request
from ..sysinfo import check_torch_runs, collect_env, torch_gpu_problem
from .config_store import ConfigStore, default_output_dir
from .curves import CurveRun, phase_caption, write_curve_png
from .family_form import picked, sliders_for
from .form import (
    GIF,
    MODEL,
    form_to_settings,
    resolve_auto_precision,
    settings_to_form,
    upgrade_stored_form,
)
from .job_queue import JobQueue
from .labels import in_user_words
from .preview_view import PreviewPanel
from .progress import progress_html
from .queue_entry import QueueEntry, QueueError, parse_seeds
from .queue_lock import QUEUE_FOLDER, default_queue_dir
from .queue_runner import QueueRunner
from .runs_view import (
    TabHistory,
    curve_update,
    phase_marks,
    stats_headers,
    stats_row,
)
from .sliders import off_step_problems
from .worker import Job, JobState, Worker

ASSETS = Path(__file__).resolve().parents[2] / "assets"
STATUS_REFRESH_S = 1.0  # the status line and progress bar: a few hundred bytes, redrawn once a second
CURVE_REFRESH_S = 6.0  # the live curve at most every 6 s, only when it grew: a redraw is ~0.3 CPU-s in the browser
DEMO = "demo"


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

"""One job from image to files on disk: fit the image, run it (planned_run), export the video and its record.

The CLI and the studio's worker both call this, so every output gets the same record.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from . import media
from .engine.events import CancelToken, EventCallback, Phase, RunCancelled, RunEvent
from .interpolate import interpolate_frames, output_fps
from .models.load import LoadedModel
from .monitor.record import RunRecord
from .monitor.reuse import input_image_info, reuse_comment
from .monitor.vram import VramMonitor, measure_idle_baseline, take_offered_monitor
from .planned_run import execute, plan_run
from .settings import RunSettings
from .settings_adapter import RunResult

logger = logging.getLogger(__name__)


@dataclass
class JobOutput:
    video: Path
    record_path: Path
    gif: Path | None
    result: RunResult
    record: RunRecord


def output_paths(video: str | Path, gif: bool = False) -> dict[str, Path]:
    """The files a job writes beside each other: OUT.mp4, OUT.json and optionally OUT.gif."""
    video = Path(video)
    paths = {"video": video, "record": video.with_suffix(".json")}
    if gif:
        paths["gif"] = video.with_suffix(".gif")
    return paths


def new_output_path(folder: str | Path, kind: str = "video", suffix: str = ".mp4") -> Path:
    """A free name like ``video-20250101-120000-3fa9c1.mp4`` for a job submitted now.

    Names are chosen when a job is submitted but written when it runs, so the time alone gave every
    job submitted in the same second the same name and all but the first failed (issue #21); the
    random part keeps them apart. Should two names still meet, the second write fails, never overwrites.
    """
    return media.unique_path(folder, f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", suffix)


def check_outputs_free(video: str | Path, gif: bool = False) -> None:
    """Fail before any computing when an output exists or the folder is not writable."""
    video = Path(video)
    if video.suffix.lower() != ".mp4":
        raise media.MediaError(f"the output {video} must end in .mp4; e.g. --out result.mp4")
    for path in output_paths(video, gif).values():
        if path.exists():
            raise media.MediaError(f"{path} already exists; choose another name or delete it first")
    folder = video.parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise media.MediaError(f"cannot write to {folder}: permission denied; choose a writable output folder")


def _emit(event: RunEvent, result: RunResult, on_event: EventCallback | None) -> RunEvent:
    result.events.append(event)
    if on_event:
        on_event(event)
    return event


def _interpolate(result: RunResult, on_event: EventCallback | None, cancel: CancelToken) -> None:
    """Deliver ``interpolate`` x the generated frames (CPU optical flow; lossy, marked in the record)."""
    factor = result.settings.interpolate
    pairs = result.frames.shape[0] - 1
    started = _emit(RunEvent(Phase.INTERPOLATE, step=0, total=pairs), result, on_event).time

    def on_pair(done: int, total: int) -> None:
        cancel.raise_if_cancelled()
        _emit(RunEvent(Phase.INTERPOLATE, step=done, total=total), result, on_event)

    clip = interpolate_frames(result.frames, factor, progress=on_pair)
    result.frames = clip.frames
    result.info["interpolation"] = clip.to_record()
    result.phase_seconds[Phase.INTERPOLATE.value] = time.perf_counter() - started


def _export(
    result: RunResult, paths: dict[str, Path], fps: float, comment: str, gif: bool, cancel: CancelToken,
    on_event: EventCallback | None,
) -> Path | None:
    """Write the mp4 (and GIF), one EXPORT event per file; a Stop while writing ends the writer within a
    frame and deletes what this export wrote, so a stopped run leaves no outputs, as one stopped while
    sampling does."""
    writers = [(paths["video"], lambda path, stop: media.write_mp4(result.frames, path, fps, comment, stop))]
    if gif:
        writers.append((paths["gif"], lambda path, stop: media.write_gif(result.frames, path, fps, stop)))
    written: list[Path] = []
    try:
        for path, write in writers:
            _emit(RunEvent(Phase.EXPORT, message=path.name), result, on_event)
            written.append(write(path, cancel.raise_if_cancelled))
    except RunCancelled:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written[1] if gif else None


def run_job(
    model: LoadedModel,
    image: PIL.Image.Image,
    settings: RunSettings,
    video_path: str | Path,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
    gif: bool = False,
    monitor: VramMonitor | None = None,
    image_path: str | Path | None = None,
) -> JobOutput:
    """Generate from ``image`` with ``settings`` and write OUT.mp4 + OUT.json (+ OUT.gif).

    The whole job runs under one memory monitor, whose samples and peaks go into the run record:
    ``monitor`` if given, else the running one the caller offered (``offer_monitor``: the studio's
    worker, which draws the live curve from it since the job began, model loading included, so curve
    and record are the same samples), else a fresh one (the CLI). A monitor that is not running yet is started here. Either way the job stops
    it before recording, on every path, so the record has its last sample and torch peak. ``image_path``
    (where ``image`` was read from) goes into the record and, with the settings and model, into the
    mp4's comment tag, so the video alone can restore its run ("use these settings again").
    Each output appears whole under its name or not at all and never replaces a file, even one made
    during the run (``media``'s output rule); killed writers' temporaries in the folder are swept first.
    """
    settings.validate()
    check_outputs_free(video_path, gif)
    paths = output_paths(video_path, gif)
    for stale in media.sweep_partial_outputs(paths["video"].parent):
        logger.info("deleted %s, left half-written by a writer that was killed", stale)
    fitted = media.fit_image(image, settings.width, settings.height)
    cancel = cancel or CancelToken()
    input_info = input_image_info(image_path)
    baseline = measure_idle_baseline()
    planned = plan_run(model, settings)  # the budget's plan (or the decode rule) and the RAM check, decided once
    planned.announce(on_event)
    monitor = monitor or take_offered_monitor() or VramMonitor()
    if not monitor.running:
        monitor.start()
    try:
        result = execute(model, fitted, planned, on_event=on_event, cancel=cancel)
        settings = result.settings
        if settings.interpolate > 1:
            _interpolate(result, on_event, cancel)
        fps = output_fps(settings.fps, settings.interpolate)
        cancel.raise_if_cancelled()
        started = time.perf_counter()
        comment = reuse_comment(settings, model.describe(), input_info)
        gif_path = _export(result, paths, fps, comment, gif, cancel, on_event)
        result.phase_seconds[Phase.EXPORT.value] = time.perf_counter() - started
        _emit(RunEvent(Phase.DONE), result, on_event)
    finally:
        monitor.stop()
    record = RunRecord.from_result(result, monitor, model=model.describe(), baseline=baseline)
    record.input = input_info
    record.results.update(
        video_fps=fps,
        interpolation=result.info.get("interpolation"),
    )
    try:
        record.save(paths["record"])
    except media.MediaError as exc:
        raise media.MediaError(f"{exc} (the video was saved without its record: {paths['video']})") from exc
    return JobOutput(paths["video"], paths["record"], gif_path, result, record)

"""One job from image to files on disk: fit the image, generate, export the video and its run record.

The CLI, the studio's worker and the benchmarks call this, so every output gets the same record.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from . import media
from .engine.events import CancelToken, EventCallback, Phase, RunEvent
from .engine.sampler import RunResult, generate
from .interpolate import interpolate_frames, output_fps
from .models.load import LoadedModel
from .settings import RunSettings
from .sysinfo import collect_env

logger = logging.getLogger(__name__)

RECORD_VERSION = 1


@dataclass
class JobOutput:
    video: Path
    record_path: Path
    gif: Path | None
    result: RunResult
    record: dict


def output_paths(video: str | Path, gif: bool = False) -> dict[str, Path]:
    """The files a job writes beside each other: OUT.mp4, OUT.json and optionally OUT.gif."""
    video = Path(video)
    paths = {"video": video, "record": video.with_suffix(".json")}
    if gif:
        paths["gif"] = video.with_suffix(".gif")
    return paths


def check_outputs_free(video: str | Path, gif: bool = False) -> None:
    """Fail before any computing when an output exists or the folder is not writable."""
    video = Path(video)
    if video.suffix.lower() != ".mp4":
        raise media.MediaError(f"the output {video} must end in .mp4; e.g. --out result.mp4")
    for path in output_paths(video, gif).values():
        if path.exists():
            raise media.MediaError(f"{path} already exists; choose another name or delete it first")
    folder = video.parent if str(video.parent) else Path(".")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise media.MediaError(f"cannot write to {folder}: permission denied; choose a writable output folder")


def build_record(model: LoadedModel, result: RunResult) -> dict:
    """The run record of DESIGN §7; figures this run cannot know are null, never invented."""
    frames = int(result.frames.shape[0])
    return {
        "version": RECORD_VERSION,
        "settings": result.settings.to_dict(),
        "model": model.describe(),
        "env": collect_env(),
        "results": {
            "frames": frames,
            "seconds_total": result.seconds_total,
            "seconds_per_step": result.seconds_per_step,
            "output_fps": frames / result.seconds_total if result.seconds_total > 0 else None,
            "process_peak_mib": None,
            "torch_peak_mib": None,
            "device_peak_mib": None,
            "ram_peak_mib": None,
            "pruned_fraction": result.info.get("pruned_fraction"),
            "video_fps": output_fps(result.settings.fps, result.settings.interpolate),
            "interpolation": result.info.get("interpolation"),
            "psnr_db": None,
            "ssim": None,
            "device": result.device,
            "phase_seconds": result.phase_seconds,
        },
        "events": [event.to_dict() for event in result.events],
        "samples": [],
    }


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


def run_job(
    model: LoadedModel,
    image: PIL.Image.Image,
    settings: RunSettings,
    video_path: str | Path,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
    gif: bool = False,
) -> JobOutput:
    """Generate from ``image`` with ``settings`` and write OUT.mp4 + OUT.json (+ OUT.gif)."""
    settings.validate()
    check_outputs_free(video_path, gif)
    paths = output_paths(video_path, gif)
    fitted = media.fit_image(image, settings.width, settings.height)
    cancel = cancel or CancelToken()
    result = generate(model.pipeline, fitted, settings, on_event=on_event, cancel=cancel)
    if settings.interpolate > 1:
        _interpolate(result, on_event, cancel)
    fps = output_fps(settings.fps, settings.interpolate)

    _emit(RunEvent(Phase.EXPORT), result, on_event)
    started = time.perf_counter()
    media.write_mp4(result.frames, paths["video"], fps=fps)
    gif_path = media.write_gif(result.frames, paths["gif"], fps=fps) if gif else None
    result.phase_seconds[Phase.EXPORT.value] = time.perf_counter() - started
    record = build_record(model, result)
    media.write_json(record, paths["record"])
    _emit(RunEvent(Phase.DONE), result, on_event)
    return JobOutput(paths["video"], paths["record"], gif_path, result, record)

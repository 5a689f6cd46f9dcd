"""The studio's job queue on disk: what waits for the GPU survives a restart or a crash.

One folder (by default ``queue/`` in the user data folder, see ``queue_lock.default_queue_dir``) holds
- ``queue.json``: the entries in run order (input image copy, settings with the seed, model source,
  state, output) and the measured speed of earlier runs, for ETAs. Every change rewrites it
  atomically (temporary file + ``os.replace``), so a crash leaves the previous or the new queue.
- ``inputs/``: a PNG copy of each queued image (named by a hash of its pixels: a seed sweep shares one).
- ``queue.lock`` + ``owner.json``: keep a second studio from running the same queue (queue_lock.py).

On start, a job that was running when the studio stopped runs again from the beginning: its partial
output (the mp4 linked before its record was written, and ``.partial`` temporaries that a killed
writer left behind) is deleted first. A job whose record exists had finished and is marked done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from ..media import unique_path
from ..monitor.record import write_text_atomic
from ..settings import RunSettings
from .queue_lock import QueueLock
from .worker import JobState

logger = logging.getLogger(__name__)

QUEUE_VERSION = 1
FILE_NAME = "queue.json"
INPUTS = "inputs"
MAX_SWEEP = 64  # jobs one "Add to queue" may create
FINISHED = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class QueueError(ValueError):
    """A queue request the user can fix (unknown job, job already running, bad seed list)."""


def parse_seeds(text: str | None, default: int) -> list[int]:
    """'1..8' -> 1..8, '1, 5, 9' -> those, '1..3, 10' -> both; empty -> [default]."""
    text = (text or "").strip()
    if not text:
        return [default]
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*(?:\.\.|-)\s*(\d+)|(\d+)", part)
        if match is None:
            raise QueueError(f"seeds must look like 1..8 or 1, 5, 9; got {part!r}")
        first, last = (int(match[1]), int(match[2])) if match[3] is None else (int(match[3]), int(match[3]))
        if last < first:
            raise QueueError(f"a seed range counts up, e.g. 1..8; got {part!r}")
        if len(seeds) + last - first + 1 > MAX_SWEEP:
            raise QueueError(f"at most {MAX_SWEEP} jobs can be queued at once; got more from {text!r}")
        seeds.extend(range(first, last + 1))
    return seeds


@dataclass
class QueueEntry:
    """One queued job: everything needed to run it again after a restart."""

    id: str
    image: str  # file name in the queue's inputs/ folder
    settings: dict[str, Any]  # RunSettings.to_dict(), the seed included
    model: str  # model source: "demo", a folder, a .safetensors file
    gif: bool = False
    state: JobState = JobState.QUEUED
    video: str | None = None  # the mp4 it writes, chosen when it starts
    error: str | None = None
    note: str | None = None  # e.g. that it restarted after the studio stopped during its run
    created: float = field(default_factory=time.time)
    seconds: float | None = None  # wall time of the finished run

    @property
    def label(self) -> str:
        s = self.settings
        model = Path(self.model).name or self.model
        return (f"seed {s['seed']} · {s['width']}x{s['height']} · {s['num_frames']} frames · "
                f"{s['num_inference_steps']} steps · {model}")

    def run_settings(self) -> RunSettings:
        return RunSettings.from_dict_lenient(self.settings)[0].validate()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QueueEntry":
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = JobState(values.get("state", JobState.QUEUED))
        return cls(**values)


@dataclass
class Speed:
    """Measured cost of a run: seconds per denoise step plus everything else (load, encode, decode, export)."""

    seconds_per_step: float
    overhead_s: float

    def estimate(self, steps: int) -> float:
        return steps * self.seconds_per_step + self.overhead_s


# Settings that change how long a run of a given size takes (precision, CFG split, chunks, offload, decode,
# windows, pruning, budget plan, interpolation, guidance); seed, motion and fps conditioning do not.
COST_FIELDS = (
    "unet_dtype", "vae_dtype", "encoder_dtype", "cfg_split", "spatial_chunk", "temporal_chunk", "ff_chunk", "offload",
    "decode_chunk", "vae_tile", "chunk_size", "overlap", "prune_threshold", "prune_mode", "vram_budget", "interpolate",
    "max_guidance_scale", "extra",
)


def speed_key(model: str, settings: RunSettings | dict[str, Any], same_settings: bool = False) -> str:
    """Key of the runs whose speed predicts this one's: same model, device choice and size (width x height x
    frames), and with ``same_settings`` also the same time-changing settings (``COST_FIELDS``)."""
    s = settings.to_dict() if isinstance(settings, RunSettings) else settings
    key = f"{model}|{s['device']}|{s['width']}x{s['height']}x{s['num_frames']}"
    if same_settings:
        key += "|" + json.dumps({name: s.get(name) for name in COST_FIELDS}, sort_keys=True, default=str)
    return key


@dataclass(frozen=True)
class Estimate:
    """Seconds a queued job should take, and whether they come from a run with the same settings."""

    seconds: float
    same_settings: bool


class JobQueue:
    """The queue's entries, their order and states, kept on disk after every change; thread safe."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self.inputs = self.folder / INPUTS
        self.warning: str | None = None  # for the page's banner (a damaged queue file)
        self._lock = threading.RLock()
        self._file_lock = self._acquire()  # QueueLocked when another studio runs this queue
        self.entries: list[QueueEntry] = []
        self.speeds: dict[str, Speed] = {}
        self._load()
        self._recover()
        self._save()

    # ---- one studio per queue ------------------------------------------------------------------
    def _acquire(self) -> QueueLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QueueError(f"cannot create the queue folder {self.folder} ({exc.strerror}); "
                             "make it writable, or set LOWVRAM_STUDIO_CONFIG_DIR to a writable folder") from exc
        lock = QueueLock(self.folder).acquire()
        lock.set_owner(url=None)
        return lock

    def set_owner(self, url: str | None) -> None:
        """Say where this studio's page is, for a second studio's message."""
        self._file_lock.set_owner(url)

    def close(self) -> None:
        """Release the folder for the next studio (the OS releases it too if this process dies)."""
        self._file_lock.release()

    # ---- file --------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            entries = [QueueEntry.from_dict(e) for e in raw["entries"]]
            speeds = {k: Speed(**v) for k, v in raw.get("speeds", {}).items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(f"{FILE_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.replace(aside)
            self.warning = f"The saved job queue could not be read ({exc}); it was moved to {aside} and the queue starts empty."
            logger.warning(self.warning)
            return
        self.entries, self.speeds = entries, speeds

    def _save(self) -> None:
        payload = {
            "version": QUEUE_VERSION,
            "entries": [e.to_dict() for e in self.entries],
            "speeds": {k: asdict(v) for k, v in self.speeds.items()},
        }
        write_text_atomic(self.path, json.dumps(payload, indent=1))

    def _recover(self) -> None:
        """After a restart: a job that was running either finished (its record exists) or runs again."""
        for entry in self.entries:
            if entry.state != JobState.RUNNING:
                continue
            video = Path(entry.video) if entry.video else None
            if video is not None and video.with_suffix(".json").is_file():
                entry.state = JobState.DONE
                entry.note = "finished just before the studio stopped"
                continue
            discarded = discard_partial_outputs(video) if video is not None else []
            entry.state, entry.video = JobState.QUEUED, None
            entry.note = "runs again from the beginning: the studio stopped during its run" + (
                f" (its partial output {', '.join(p.name for p in discarded)} was deleted)" if discarded else "")
            logger.warning("queued job %s %s", entry.id, entry.note)

    # ---- changes (each saved at once) -----------------------------------------------------------
    def add(self, image: PIL.Image.Image, settings: RunSettings, model: str, seeds: list[int],
            gif: bool = False) -> list[QueueEntry]:
        """Queue one job per seed (a seed sweep), all from one stored copy of ``image``."""
        name = self._store_image(image)
        entries = [QueueEntry(uuid.uuid4().hex[:8], name, settings.replace(seed=seed).validate().to_dict(), model, gif)
                   for seed in seeds]
        with self._lock:
            self.entries.extend(entries)
            self._save()
        return entries

    def _store_image(self, image: PIL.Image.Image) -> str:
        rgb = image.convert("RGB")
        digest = hashlib.sha256(rgb.tobytes() + repr(rgb.size).encode()).hexdigest()[:16]
        name = f"{digest}.png"
        path = self.inputs / name
        if not path.exists():
            self.inputs.mkdir(parents=True, exist_ok=True)
            temp = self.inputs / f".{name}.partial"
            rgb.save(temp, format="PNG")
            os.replace(temp, path)
        return name

    def image_path(self, entry: QueueEntry) -> Path:
        return self.inputs / entry.image

    def get(self, entry_id: str) -> QueueEntry:
        with self._lock:
            for entry in self.entries:
                if entry.id == entry_id:
                    return entry
        raise QueueError(f"there is no queued job {entry_id!r}; pick one from the queue table")

    def remove(self, entry_id: str) -> QueueEntry:
        """Take a job that is not running out of the queue (a running one is stopped by the runner first)."""
        with self._lock:
            entry = self.get(entry_id)
            if entry.state == JobState.RUNNING:
                raise QueueError(f"job {entry_id} is running; stop it first")
            self.entries.remove(entry)
            self._drop_unused_images()
            self._save()
        return entry

    def clear_finished(self) -> int:
        with self._lock:
            kept = [e for e in self.entries if e.state not in FINISHED]
            removed = len(self.entries) - len(kept)
            self.entries = kept
            self._drop_unused_images()
            self._save()
        return removed

    def move(self, entry_id: str, delta: int) -> None:
        """Move a waiting job ``delta`` places among the waiting jobs (negative = earlier)."""
        with self._lock:
            entry = self.get(entry_id)
            if entry.state != JobState.QUEUED:
                raise QueueError(f"job {entry_id} is {entry.state.value}; only waiting jobs can be moved")
            waiting = [e for e in self.entries if e.state == JobState.QUEUED]
            index = waiting.index(entry)
            target = min(max(index + delta, 0), len(waiting) - 1)
            if target == index:
                return
            self.entries.remove(entry)
            neighbour = waiting[target]
            at = self.entries.index(neighbour)
            self.entries.insert(at + (1 if target > index else 0), entry)
            self._save()

    def start_next(self, output_dir: Path) -> QueueEntry | None:
        """Mark the first waiting job running, choosing its output file; None when nothing waits."""
        with self._lock:
            entry = next((e for e in self.entries if e.state == JobState.QUEUED), None)
            if entry is None:
                return None
            entry.state = JobState.RUNNING
            stem = f"queue-{entry.id}-seed{entry.settings['seed']}"
            entry.video = str(unique_path(Path(output_dir).resolve(), stem, ".mp4"))  # absolute: found after a restart
            entry.error = None
            self._save()
            return entry

    def finish(self, entry_id: str, state: JobState, error: str | None = None, seconds: float | None = None) -> None:
        with self._lock:
            entry = self.get(entry_id)
            entry.state, entry.error, entry.seconds = state, error, seconds
            if state != JobState.DONE:
                entry.video = None
            self._save()

    def requeue(self, entry_id: str, note: str) -> None:
        """Put a job whose run was interrupted (the studio is closing) back to the front of the waiting jobs."""
        with self._lock:
            entry = self.get(entry_id)
            entry.state, entry.video, entry.note = JobState.QUEUED, None, note
            self._save()

    def record_speed(self, model: str, settings: RunSettings, seconds_per_step: float | None, seconds: float) -> None:
        """Remember how long a finished run of this model and size took, for later ETAs."""
        if not seconds_per_step:
            return
        steps = settings.num_inference_steps
        with self._lock:
            speed = Speed(seconds_per_step, max(seconds - steps * seconds_per_step, 0.0))
            # The latest run of this size answers for any settings until one with the same settings was measured.
            self.speeds[speed_key(model, settings)] = speed
            self.speeds[speed_key(model, settings, same_settings=True)] = speed
            self._save()

    # ---- reading -----------------------------------------------------------------------------
    def snapshot(self) -> list[QueueEntry]:
        with self._lock:
            return [QueueEntry.from_dict(e.to_dict()) for e in self.entries]

    def has_waiting(self) -> bool:
        with self._lock:
            return any(e.state == JobState.QUEUED for e in self.entries)

    def estimate(self, entry: QueueEntry) -> Estimate | None:
        """How long the whole job should take, from an earlier run of this model and size with the same
        settings, else with other settings; None if there was none."""
        steps = entry.settings["num_inference_steps"]
        for same in (True, False):
            speed = self.speeds.get(speed_key(entry.model, entry.settings, same_settings=same))
            if speed is not None:
                return Estimate(speed.estimate(steps), same_settings=same)
        return None

    def _drop_unused_images(self) -> None:
        used = {e.image for e in self.entries}
        for path in self.inputs.glob("*.png"):
            if path.name not in used:
                path.unlink(missing_ok=True)


def discard_partial_outputs(video: Path) -> list[Path]:
    """Delete what an interrupted job left: its mp4 / gif (written before the record) and writer temporaries."""
    leftovers = [video.with_suffix(s) for s in (".mp4", ".gif", ".json")]
    leftovers += list(video.parent.glob(f".{video.stem}.*"))  # temporaries of media and record writers
    removed = [p for p in leftovers if p.exists()]
    for path in removed:
        path.unlink()
    return removed

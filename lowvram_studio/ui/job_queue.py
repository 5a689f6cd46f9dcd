"""The studio's job queue on disk: what waits for the GPU survives a restart or a crash.

One folder (by default ``queue/`` in the user data folder, see ``queue_lock.default_queue_dir``) holds
- ``queue.json``: the entries in run order (input image copy, settings with the seed, model source,
  state, output) and the measured speed of earlier runs, for ETAs. Every change rewrites it
  atomically (temporary file + ``os.replace``), so a crash leaves the previous or the new queue.
- ``inputs/``: a PNG copy of each queued image (named by a hash of its pixels: a seed sweep shares one).
- ``set-aside.json``: entries that could not be read (``queue_entry.QueueEntry.from_dict`` says why), with
  the reason. They are taken out of the queue when it loads, so the rest runs, and the page's banner
  (``JobQueue.warning``) names them.
- ``queue.lock`` + ``owner.json``: keep a second studio from running the same queue (queue_lock.py).

On start (``JobQueue.recover``, called by the runner, which knows the output folder), a job that was
running when the studio stopped runs again from the beginning. Its partial output (the mp4 linked
before its record was written, and ``.partial`` temporaries that a killed writer left behind) is
deleted first, but only if it is what this queue makes: a ``queue-<id>-seed<seed>.mp4`` of that job,
directly in the output folder. A job whose record exists had finished and is marked done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import PIL.Image

from ..media import sweep_partial_outputs, unique_path, write_atomically
from ..monitor.record import write_text_atomic
from ..settings import RunSettings
from .queue_entry import ENTRY_ID, INPUTS, EntryError, Estimate, QueueEntry, QueueError, Speed, output_stem, speed_key
from .queue_lock import QueueLock
from .worker import JobState

logger = logging.getLogger(__name__)

QUEUE_VERSION = 1
FILE_NAME = "queue.json"
SET_ASIDE = "set-aside.json"
FINISHED = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobQueue:
    """The queue's entries, their order and states, kept on disk after every change; thread safe."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self.inputs = self.folder / INPUTS
        self.warning: str | None = None  # for the page's banner (a damaged queue file, entries set aside)
        self._lock = threading.RLock()
        self._file_lock = self._acquire()  # QueueLocked when another studio runs this queue
        self.entries: list[QueueEntry] = []
        self.speeds: dict[str, Speed] = {}
        self.set_aside: list[dict[str, Any]] = []  # {"entry": as stored, "problem": why, "time": when}
        sweep_partial_outputs(self.inputs)  # input copies a killed studio was writing
        self._load()
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
        self._load_set_aside()
        if not self.path.exists():
            return
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            stored, speeds = raw["entries"], raw.get("speeds", {})
            if not isinstance(stored, list):
                raise TypeError(f"entries must be a list; got {stored!r:.80}")
            speeds = {str(k): Speed(float(v["seconds_per_step"]), float(v["overhead_s"])) for k, v in speeds.items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self._move_damaged(self.path)
            self._warn(f"The saved job queue could not be read ({exc}); it was moved to {aside} "
                       "and the queue starts empty.")
            return
        self.speeds = speeds
        problems = []
        for data in stored:  # one entry that cannot run is set aside; the others stay queued
            try:
                entry = QueueEntry.from_dict(data)
                if any(e.id == entry.id for e in self.entries):
                    raise EntryError(f"id {entry.id!r} is used by an earlier entry")
            except EntryError as exc:
                logger.warning("queued job %s set aside: %s", _entry_name(data), exc)
                problems.append({"entry": data, "problem": str(exc), "time": time.strftime("%Y-%m-%d %H:%M:%S")})
                continue
            self.entries.append(entry)
        if problems:
            self.set_aside.extend(problems)
            payload = {"version": QUEUE_VERSION, "entries": self.set_aside}
            write_text_atomic(self.folder / SET_ASIDE, json.dumps(payload, indent=1))
        if self.set_aside:
            self._warn(self._set_aside_message())

    def _load_set_aside(self) -> None:
        path = self.folder / SET_ASIDE
        if not path.exists():
            return
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
            if not isinstance(entries, list) or not all(isinstance(e, dict) and "problem" in e for e in entries):
                raise TypeError("entries must be a list of {entry, problem}")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            aside = self._move_damaged(path)
            self._warn(f"The list of set-aside queue jobs could not be read ({exc}); it was moved to {aside}.")
            return
        self.set_aside = entries

    def _set_aside_message(self) -> str:
        shown = "; ".join(f"job {_entry_name(e['entry'])}: {e['problem']}" for e in self.set_aside[:3])
        more = f"; and {len(self.set_aside) - 3} more" if len(self.set_aside) > 3 else ""
        return (f"{len(self.set_aside)} queued job(s) could not be run as stored and were set aside in "
                f"{self.folder / SET_ASIDE} ({shown}{more}); the rest of the queue runs. Queue them again "
                "from the page to run them, and delete that file once you no longer need it.")

    def _warn(self, message: str) -> None:
        logger.warning(message)
        self.warning = f"{self.warning} {message}" if self.warning else message

    @staticmethod
    def _move_damaged(path: Path) -> Path:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        path.replace(aside)
        return aside

    def _save(self) -> None:
        payload = {
            "version": QUEUE_VERSION,
            "entries": [e.to_dict() for e in self.entries],
            "speeds": {k: asdict(v) for k, v in self.speeds.items()},
        }
        write_text_atomic(self.path, json.dumps(payload, indent=1))

    def recover(self, output_dir: Path) -> None:
        """After a restart: a job that was running either finished (its record exists) or runs again.
        What it left is deleted only if this queue made it in ``output_dir`` (``made_by_queue``)."""
        with self._lock:
            for entry in self.entries:
                if entry.state == JobState.RUNNING:
                    self._recover(entry, Path(output_dir))
            self._save()

    @staticmethod
    def _recover(entry: QueueEntry, output_dir: Path) -> None:
        video = Path(entry.video) if entry.video else None
        if video is not None and video.with_suffix(".json").is_file():
            entry.state = JobState.DONE
            entry.note = "finished just before the studio stopped"
            return
        note = "runs again from the beginning: the studio stopped during its run"
        if video is not None and made_by_queue(entry, video, output_dir):
            discarded = discard_partial_outputs(video)
            if discarded:
                note += f" (its partial output {', '.join(p.name for p in discarded)} was deleted)"
        elif video is not None and video.exists():
            note += f" ({video} was left in place: it is not a video this queue writes in {output_dir})"
        entry.state, entry.video, entry.note = JobState.QUEUED, None, note
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
        if not path.exists():  # a temporary named like media's outputs: one a killed write left is swept
            write_atomically(path, lambda temp: rgb.save(temp, format="PNG"), replace=True)
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
            stem = output_stem(entry.id, entry.settings["seed"])
            video = unique_path(Path(output_dir).resolve(), stem, ".mp4")  # absolute: found after a restart
            entry.state, entry.video, entry.error = JobState.RUNNING, str(video), None
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
        used |= {e["entry"].get("image") for e in self.set_aside if isinstance(e.get("entry"), dict)}
        for path in self.inputs.glob("*.png"):
            if path.name not in used:
                path.unlink(missing_ok=True)


def _entry_name(data: Any) -> str:
    """An entry's id for messages, whatever the stored entry looks like."""
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and ENTRY_ID.fullmatch(value) else "without a readable id"


def made_by_queue(entry: QueueEntry, video: Path, output_dir: Path) -> bool:
    """Whether ``video`` is the file ``start_next`` chose for ``entry``: named ``queue-<its id>-seed<its
    seed>[-n].mp4`` and directly in the output folder (symlinks resolved). Anything else, e.g. a path
    from a hand-edited queue file or from another output folder, was not made by this queue."""
    pattern = re.escape(output_stem(entry.id, entry.settings["seed"])) + r"(-\d+)?\.mp4"
    if not video.is_absolute() or re.fullmatch(pattern, video.name) is None or video.is_symlink():
        return False
    try:
        return video.parent.resolve(strict=True) == Path(output_dir).resolve(strict=True)
    except OSError:  # the folder is gone: nothing to delete
        return False


def discard_partial_outputs(video: Path) -> list[Path]:
    """Delete what an interrupted job left: its mp4 / gif (written before the record) and writer temporaries.
    Only for a ``video`` that ``made_by_queue`` confirmed."""
    leftovers = [video.with_suffix(s) for s in (".mp4", ".gif", ".json")]
    leftovers += list(video.parent.glob(f".{video.stem}.*"))  # temporaries of media and record writers
    removed = [p for p in leftovers if p.is_file() and not p.is_symlink()]
    for path in removed:
        path.unlink()
    return removed

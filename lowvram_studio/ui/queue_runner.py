"""Feeds the on-disk job queue to the studio's single GPU worker, one job at a time, and describes it.

The worker holds at most one "queue slot" job. When the slot starts it takes the first waiting
entry, so removing or reordering waiting jobs only touches the ``JobQueue`` until the very moment a
job starts; when it ends, the next slot is submitted. A Generate pressed meanwhile waits in the
worker like any other job, so it runs between two queued jobs, never beside one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PIL.Image

from ..engine.events import CancelToken, EventCallback, Phase, RunCancelled
from ..settings import RunSettings
from .job_queue import FINISHED, JobQueue
from .queue_entry import QueueEntry, QueueError
from .worker import Job, JobState, Worker

logger = logging.getLogger(__name__)

QUEUE_OWNER = "job queue"  # the worker's owner of queued jobs: closing a browser tab does not cancel them
QUEUE_COLUMNS = ["#", "id", "job", "state", "ETA", "output / note"]

# Runs one entry: (entry, its input image path, event callback, cancel token) -> the job's output.
RunEntry = Callable[[QueueEntry, Path, EventCallback, CancelToken], Any]


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


class QueueRunner:
    """Runs the queue's waiting entries through ``worker`` in order; remove / move / add for the page.

    Made once per studio, before any of its jobs runs: a job the queue lists as running was running when
    the studio last stopped, and is recovered (``JobQueue.recover``): it waits again, and what it left
    in this studio's output folder is deleted."""

    def __init__(self, queue: JobQueue, worker: Worker, output_dir: Path, run_entry: RunEntry,
                 describe_error: Callable[[BaseException], str] = str):
        queue.recover(output_dir)
        self.queue = queue
        self.worker = worker
        self.output_dir = Path(output_dir)
        self._run_entry = run_entry
        self._describe_error = describe_error
        self._lock = threading.Lock()
        self._slot: Job | None = None
        self._running: tuple[str, Job] | None = None  # (entry id, the worker job running it)
        self._closing = False

    # ---- what the page asks --------------------------------------------------------------------
    def start(self) -> None:
        """Resume a restored queue."""
        self._ensure_slot()

    def add(self, image: PIL.Image.Image, settings: RunSettings, model: str, seeds: list[int],
            gif: bool = False) -> list[QueueEntry]:
        entries = self.queue.add(image, settings, model, seeds, gif)
        self._ensure_slot()
        return entries

    def remove(self, entry_id: str) -> str:
        """Remove a waiting or finished job; a running one is stopped (and stays listed as cancelled)."""
        running = self._running
        if running is not None and running[0] == entry_id:
            self.worker.cancel(running[1])
            return f"Stopping job {entry_id} at the next step."
        entry = self.queue.remove(entry_id)
        return f"Removed job {entry.id} ({entry.label})."

    def move(self, entry_id: str, delta: int) -> str:
        self.queue.move(entry_id, delta)
        return f"Moved job {entry_id} {'up' if delta < 0 else 'down'}."

    @property
    def running_id(self) -> str | None:
        """The id of the queued job on the GPU now, if any."""
        running = self._running
        return running[0] if running is not None else None

    def close(self) -> None:
        """The studio is shutting down: a running entry goes back to waiting (the worker cancels it)."""
        self._closing = True

    # ---- running -----------------------------------------------------------------------------
    def _ensure_slot(self) -> None:
        with self._lock:
            if self._closing or (self._slot is not None and not self._slot.done.is_set()):
                return
            if not self.queue.has_waiting():
                return
            try:
                self._slot = self.worker.submit(QUEUE_OWNER, "Queued job", self._work)
            except RuntimeError:  # the worker is shutting down; the queue resumes on the next start
                self._slot = None

    def _work(self, on_event: EventCallback, cancel: CancelToken) -> Any:
        entry = self.queue.start_next(self.output_dir)
        if entry is None:  # every waiting job was removed before the slot started
            self._next()
            return None
        with self._lock:  # _ensure_slot holds it until it has stored the job this slot runs in
            self._running = (entry.id, self._slot)
        started = time.perf_counter()
        try:
            output = self._run_entry(entry, self.queue.image_path(entry), on_event, cancel)
        except RunCancelled:
            if self._closing:
                self.queue.requeue(entry.id, "runs again from the beginning: the studio was closed during its run")
            else:
                self.queue.finish(entry.id, JobState.CANCELLED)
            raise
        except Exception as exc:  # noqa: BLE001 - shown in the queue table, then re-raised for the worker's log
            self.queue.finish(entry.id, JobState.FAILED, error=self._describe_error(exc))
            raise
        else:
            self.queue.finish(entry.id, JobState.DONE, seconds=time.perf_counter() - started)
            return output
        finally:
            self._running = None
            self._next()

    def _next(self) -> None:
        """This slot is ending: queue the next one (it runs after any job already waiting in the worker)."""
        with self._lock:
            self._slot = None
        self._ensure_slot()

    # ---- what the page shows -------------------------------------------------------------------
    def rows(self) -> list[list[str]]:
        """The queue table: order, id, job, state, ETA ("unknown" without an earlier run to measure), output."""
        running = self._running
        ahead = self._running_remaining(running)
        slot = self._slot
        others = self.worker.position(slot) if slot is not None and slot.state == JobState.QUEUED else 0
        if others:  # Generate / Compare jobs of open tabs run first; their length is not known here
            ahead = None
        rows = []
        for index, entry in enumerate(self.queue.snapshot(), start=1):
            eta, ahead = self._eta(entry, running, ahead, others)
            output = entry.error or (Path(entry.video).name if entry.video else "")
            if entry.note:
                output = f"{output} · {entry.note}" if output else entry.note
            rows.append([str(index), entry.id, entry.label, self._state(entry, running), eta, output])
        return rows

    def _state(self, entry: QueueEntry, running: tuple[str, Job] | None) -> str:
        if entry.state == JobState.RUNNING and running is not None and running[0] == entry.id:
            return f"running: {running[1].progress_text()}"
        return entry.state.value

    def _running_remaining(self, running: tuple[str, Job] | None) -> float | None:
        """Seconds the running queue job still needs: its live s/step, else the estimate minus elapsed time."""
        if running is None:
            return 0.0
        entry_id, job = running
        denoise = [e for e in job.events if e.phase == Phase.DENOISE and e.total]
        done = [e for e in denoise if e.step]
        if done:
            per_step = (done[-1].time - denoise[0].time) / done[-1].step
            return per_step * (done[-1].total - done[-1].step)
        try:
            estimate = self.queue.estimate(self.queue.get(entry_id))
        except QueueError:
            return None
        if estimate is None or job.started_at is None:
            return None
        return max(estimate.seconds - (time.perf_counter() - job.started_at), 0.0)

    def _eta(self, entry: QueueEntry, running: tuple[str, Job] | None, ahead: float | None,
             others: int) -> tuple[str, float | None]:
        """(ETA text, seconds until the jobs so far are done) for one row, in queue order."""
        if entry.state in FINISHED:
            return (f"took {_seconds(entry.seconds)}" if entry.seconds else "—"), ahead
        if entry.state == JobState.RUNNING:
            return (f"≈ {_seconds(ahead)} left" if ahead is not None else "unknown"), ahead
        estimate = self.queue.estimate(entry)
        if estimate is None:
            return "unknown (no earlier run of this model and size)", None
        done_in = None if ahead is None else ahead + estimate.seconds
        text = f"≈ {_seconds(estimate.seconds)}" + (f", done in ≈ {_seconds(done_in)}" if done_in is not None else "")
        if not estimate.same_settings:
            text += " (measured with other optimisation settings)"
        if others:
            text += f", after {others} other studio job(s)"
        return text, done_in

"""The studio's background worker: one GPU job at a time on its own thread, the rest queued.

The page's event handlers only submit jobs and poll them, so the page stays responsive while the
sampler runs. Each job carries a ``CancelToken``: Stop, a closed browser tab or a removed queued
job set it, and the run ends as cancelled at the first of: its next denoise step, its next decode
chunk or tile (the token is the run's ``current_token`` on the worker thread), or the next phase
or step it reports (so at the latest before export starts: a stopped job writes no video). One
memory monitor watches each job: it draws the live curve and is offered to the job's run
(``offer_monitor``), whose record then holds the same samples.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


from ..engine.events import CancelToken, EventCallback, Phase, RunCancelled, RunEvent
from ..engine.placement import release_memory
from ..engine.preview import PreviewFrames, split_preview
from ..monitor.vram import VramMonitor, offer_monitor

logger = logging.getLogger(__name__)


# A job's work: called on the worker thread with the job's event callback and cancel token.
Work = Callable[[EventCallback, CancelToken], Any]


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


def start_memory_monitor() -> Any:
    """A started memory monitor (NVML on an NVIDIA GPU, process RSS otherwise): live curve and run record."""
    return VramMonitor().start()


# The curve shows the first of these a sample has: what the GPU holds for us, else CPU RAM.
CURVE_METRICS = ("process_used_mib", "device_used_mib", "torch_allocated_mib", "rss_mib")


def sample_value(sample: Any) -> float | None:
    """The curve's value of one monitor sample (dict or ``Sample`` object), in MiB."""
    for name in CURVE_METRICS:
        value = sample.get(name) if isinstance(sample, dict) else getattr(sample, name, None)
        if value is not None:
            return float(value)
    return None


def sample_time(sample: Any) -> float:
    return float(sample["t"] if isinstance(sample, dict) else sample.t)


@dataclass
class Job:
    """One submitted piece of GPU work and everything the page polls about it."""

    id: int
    owner: str  # the browser session that submitted it; closing that tab cancels it
    label: str
    work: Work = field(repr=False)
    cancel: CancelToken = field(default_factory=CancelToken, repr=False)
    state: JobState = JobState.QUEUED
    events: list[RunEvent] = field(default_factory=list, repr=False)
    result: Any = field(default=None, repr=False)
    error: BaseException | None = None
    monitor: Any = field(default=None, repr=False)
    started_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    preview: PreviewFrames | None = field(default=None, repr=False)  # the latest live preview only

    def on_event(self, event: RunEvent) -> None:
        event, preview = split_preview(event)
        if preview is not None:
            self.preview = preview
        self.events.append(event)

    def report(self, event: RunEvent) -> None:
        """The callback a job's work gets: a stopped run ends here instead of starting the phase or step it
        reports, else the event is kept. Not at ``done``: the files are written by then, and stopping would
        only leave them without a record."""
        if event.phase != Phase.DONE:
            self.cancel.raise_if_cancelled()
        self.on_event(event)

    @property
    def last_event(self) -> RunEvent | None:
        return self.events[-1] if self.events else None

    def curve(self) -> list[tuple[float, float]]:
        """(seconds since the job started, MiB) so far; safe to call while the job runs."""
        if self.monitor is None or self.started_at is None:
            return []
        points = []
        for sample in self.monitor.samples:
            value = sample_value(sample)
            if value is not None:
                points.append((sample_time(sample) - self.started_at, value))
        return points

    @property
    def notes(self) -> list[str]:
        """What the engine told the user during the run: the budget plan, out-of-memory re-plans."""
        return [event.message for event in self.events if event.message]

    def progress_text(self) -> str:
        """Phase, step i/N and the denoise ETA, e.g. 'denoise step 3/20 · 0.41 s/step · ETA 7 s'."""
        event = self.last_event
        if event is None:
            return "starting"
        if event.phase != Phase.DENOISE or not event.total:
            return event.label
        run = event.data.get("compare_run")
        started = next(e.time for e in self.events if e.phase == Phase.DENOISE and e.data.get("compare_run") == run)
        step = event.step or 0
        text = f"denoise step {step}/{event.total}"
        if step:
            per_step = (event.time - started) / step
            text += f" · {per_step:.2f} s/step · ETA {per_step * (event.total - step):.0f} s"
        return text


class Worker:
    """Runs submitted jobs one after another on a single background thread."""

    def __init__(self) -> None:
        self._queue: list[Job] = []
        self._running: Job | None = None
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, owner: str, label: str, work: Work) -> Job:
        job = Job(next(self._ids), owner, label, work)
        with self._lock:
            if self._closed:
                raise RuntimeError("the studio is shutting down; start it again")
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lowvram-worker", daemon=True)
                self._thread.start()
            self._lock.notify_all()
        return job

    def position(self, job: Job) -> int:
        """0 while running or finished, else how many jobs run before it."""
        with self._lock:
            if job not in self._queue:
                return 0
            return self._queue.index(job) + (1 if self._running is not None else 0)

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a queued job never starts, a running one ends at the next sampler step."""
        job.cancel.cancel()
        with self._lock:
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, JobState.CANCELLED)

    def cancel_owner(self, owner: str) -> int:
        """Cancel every job of one browser session (its tab was closed); returns how many."""
        with self._lock:
            jobs = [j for j in [self._running, *self._queue] if j is not None and j.owner == owner]
        for job in jobs:
            self.cancel(job)
        return len(jobs)

    @property
    def running(self) -> Job | None:
        return self._running

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything and wait for the thread (used when the studio shuts down and in tests)."""
        with self._lock:
            self._closed = True
            jobs = [j for j in [self._running, *self._queue] if j is not None]
            self._lock.notify_all()
        for job in jobs:
            self.cancel(job)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed and not self._queue:
                    return
                job = self._queue.pop(0)
                self._running = job
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job) -> None:
        job.state = JobState.RUNNING
        job.started_at = time.perf_counter()
        state = JobState.DONE
        try:
            job.monitor = start_memory_monitor()  # inside the try: a monitor that cannot start fails the job
            with offer_monitor(job.monitor), job.cancel.current():  # run_job records with this monitor
                job.result = job.work(job.report, job.cancel)
        except RunCancelled:
            state = JobState.CANCELLED
        except Exception as exc:  # noqa: BLE001 - any failure belongs to the job and is shown on its page
            logger.warning("job %s (%s) failed: %s", job.id, job.label, exc, exc_info=not _is_user_error(exc))
            job.error = exc
            state = JobState.FAILED
        finally:
            if job.monitor is not None:
                job.monitor.stop()  # a no-op when the job's run_job already stopped it for its record
            release_memory()  # what a finished or stopped job held goes back for the next one
            self._finish(job, state)

    @staticmethod
    def _finish(job: Job, state: JobState) -> None:
        job.state = state
        job.finished_at = time.perf_counter()
        job.done.set()


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, ValueError)  # MediaError, ModelError, SettingsError: the message says it all



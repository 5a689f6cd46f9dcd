"""The memory sampler: a background thread that records what a run costs, many times a second.

Each sample holds the device's used memory and this process's share (NVML), torch's allocated and
reserved bytes (only once the run itself has initialised CUDA: the thread never creates a CUDA
context), and the process RSS. Without an NVIDIA driver the curve is the RSS, labelled "CPU RAM".
Samples are stamped with ``time.perf_counter()``, the clock of ``RunEvent``, so phases line up.
One monitor per job: a caller that already watches (the studio's worker) offers its monitor to the run.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields
from types import TracebackType
from typing import Any

import psutil

from lowvram_studio.monitor.nvml import MIB, GpuInfo, NvmlGpu, open_gpu

LOG = logging.getLogger(__name__)

VRAM = "VRAM"
CPU_RAM = "CPU RAM"
MIN_RATE_HZ = 20.0
THREAD_NAME = "lowvram-vram-monitor"


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading; a metric the system cannot give is None (shown as "n/a")."""

    t: float
    device_used_mib: float | None = None
    process_used_mib: float | None = None
    torch_allocated_mib: float | None = None
    torch_reserved_mib: float | None = None
    rss_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sample":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class MonitorConfig:
    """How the sampler watches: rate (>= 20 Hz), which CUDA device, whether to reset torch peaks."""

    rate_hz: float = 50.0
    cuda_index: int = 0
    reset_torch_peak: bool = True  # so torch_peak_mib is this run's, not the process lifetime's
    # Device memory used by other processes, measured before this process initialised CUDA
    # (``measure_idle_baseline()`` at start-up). The process-peak fallback subtracts it.
    device_baseline_mib: float | None = None


@dataclass(frozen=True)
class IdleBaseline:
    """Memory in use before a run starts, with nothing of the run allocated yet.

    Taken before this process initialised CUDA (``cuda_initialized`` False), ``device_used_mib`` is
    what other processes use: the process-peak fallback subtracts it. Taken later it also holds this
    process's context and weights, so it is recorded but not subtracted.
    """

    device_used_mib: float | None
    process_used_mib: float | None
    torch_reserved_mib: float | None
    rss_mib: float | None
    cuda_initialized: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Reader:
    """Reads one ``Sample``; shared by the sampler thread and the idle baseline."""

    def __init__(self, gpu: NvmlGpu | None, cuda_index: int) -> None:
        self.gpu = gpu
        self._cuda_index = cuda_index
        self._pid = os.getpid()
        self._process = psutil.Process(self._pid)
        self._rss_failed = False

    def read(self) -> Sample:
        gpu = self.gpu
        allocated, reserved = self._torch_mib()
        return Sample(
            t=time.perf_counter(),
            device_used_mib=gpu.device_used_mib() if gpu else None,
            process_used_mib=gpu.process_used_mib(self._pid) if gpu else None,
            torch_allocated_mib=allocated,
            torch_reserved_mib=reserved,
            rss_mib=self._rss_mib(),
        )

    def _torch_mib(self) -> tuple[float | None, float | None]:
        # torch is only consulted if the program imported it and CUDA is already up: calling into
        # CUDA from this thread before that would create a context (~0.5 GiB) the run never asked for.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return None, None
        try:
            return (
                torch.cuda.memory_allocated(self._cuda_index) / MIB,
                torch.cuda.memory_reserved(self._cuda_index) / MIB,
            )
        except RuntimeError as error:
            LOG.debug("torch memory stats unavailable: %s", error)
            return None, None

    def _rss_mib(self) -> float | None:
        try:
            return self._process.memory_info().rss / MIB
        except psutil.Error as error:
            if not self._rss_failed:
                self._rss_failed = True
                LOG.info("cannot read process RSS (%s); CPU RAM is shown as n/a", error)
            return None


class VramMonitor:
    """Samples memory on a background thread between ``start()`` and ``stop()`` (or ``with``).

    One monitor records one run. The schedule is deadline-based (ticks at start + k / rate_hz, missed
    ticks skipped, not bunched), so the rate holds while the run keeps the GIL busy.
    """

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        if self.config.rate_hz < MIN_RATE_HZ:
            raise ValueError(f"rate_hz must be at least {MIN_RATE_HZ:g}; got {self.config.rate_hz!r}")
        self._samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: _Reader | None = None
        self.gpu_info: GpuInfo | None = None
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self.torch_peak_mib: float | None = None
        self._thread_cpu_s = 0.0

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "VramMonitor":
        if self._thread is not None or self.stopped_at is not None:
            raise RuntimeError("this monitor already recorded a run; create a new VramMonitor for the next one")
        gpu = open_gpu(self.config.cuda_index)
        self.gpu_info = gpu.info() if gpu else None
        self._reader = _Reader(gpu, self.config.cuda_index)
        if self.config.reset_torch_peak:
            _reset_torch_peak(self.config.cuda_index)
        self.started_at = time.perf_counter()
        self._samples.append(self._reader.read())  # the curve starts at t = 0 however late the thread runs
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "VramMonitor":
        """Stop sampling (idempotent); takes a last sample so the curve reaches the end of the run."""
        if self._thread is None or self.stopped_at is not None:
            return self
        self._stop.set()
        self._thread.join()
        assert self._reader is not None
        self._samples.append(self._reader.read())
        self.stopped_at = time.perf_counter()
        self.torch_peak_mib = _torch_max_allocated_mib(self.config.cuda_index)
        if self._reader.gpu is not None:
            self._reader.gpu.close()
        return self

    def __enter__(self) -> "VramMonitor":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        assert self._reader is not None
        cpu_start = time.thread_time()
        interval = 1.0 / self.config.rate_hz
        deadline = self.started_at
        try:
            while True:
                deadline += interval
                now = time.perf_counter()
                if deadline < now:  # the run held the GIL past a tick: skip to the next tick on the grid
                    deadline += math.ceil((now - deadline) / interval) * interval
                if self._stop.wait(deadline - now):
                    break
                self._samples.append(self._reader.read())
        finally:
            self._thread_cpu_s = time.thread_time() - cpu_start

    # ---- results ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self.stopped_at is None

    @property
    def samples(self) -> list[Sample]:
        """A snapshot of the samples so far (safe to call while running, e.g. for a live curve)."""
        return list(self._samples)

    @property
    def memory_label(self) -> str:
        """ "VRAM" when NVML watches a GPU, else "CPU RAM" (the curve is the process RSS)."""
        return VRAM if self.gpu_info is not None else CPU_RAM

    @property
    def overhead_fraction(self) -> float | None:
        """CPU time the sampler thread used / wall time it ran: its cost to the run (after stop)."""
        if self.started_at is None or self.stopped_at is None:
            return None
        wall = self.stopped_at - self.started_at
        return self._thread_cpu_s / wall if wall > 0 else None

    def peaks(self, baseline: IdleBaseline | None = None) -> dict[str, float | None]:
        """The four peak figures of the run record (DESIGN §3), None where not measured."""
        samples = self.samples
        return {
            "process_peak_mib": process_peak_mib(samples, baseline, self.config.device_baseline_mib),
            "torch_peak_mib": self.torch_peak_mib,
            "device_peak_mib": peak(samples, "device_used_mib"),
            "ram_peak_mib": peak(samples, "rss_mib"),
        }


# The running monitor a caller offers to the run it is about to do (``offer_monitor``), if any.
_OFFERED: ContextVar[VramMonitor | None] = ContextVar("lowvram_offered_monitor", default=None)


@contextmanager
def offer_monitor(monitor: VramMonitor) -> Iterator[VramMonitor]:
    """Let the run recorded inside this block (on this thread) record with ``monitor``, already running.

    The studio's worker watches each job from its first moment for the live curve; ``run_job`` takes
    that monitor (``take_offered_monitor``) for the run record instead of starting a second sampler:
    two 50 Hz samplers cost twice the CPU (~5 % of a core each on an H100 box) and drew two curves of
    one run that could disagree.
    """
    token = _OFFERED.set(monitor)
    try:
        yield monitor
    finally:
        _OFFERED.reset(token)


def take_offered_monitor() -> VramMonitor | None:
    """The running monitor offered to this run, or None (none offered, or an earlier run took it).

    Whoever takes it records with it and stops it, so a second run in the same block starts its own.
    """
    monitor = _OFFERED.get()
    _OFFERED.set(None)
    return monitor if monitor is not None and monitor.running else None


def measure_idle_baseline(cuda_index: int = 0, readings: int = 5, interval_s: float = 0.02) -> IdleBaseline:
    """Median of a few readings taken now (call it with memory released, before a run)."""
    gpu = open_gpu(cuda_index)
    reader = _Reader(gpu, cuda_index)
    try:
        samples = []
        for _ in range(readings):
            samples.append(reader.read())
            time.sleep(interval_s)
    finally:
        if gpu is not None:
            gpu.close()

    def median(name: str) -> float | None:
        values = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        return statistics.median(values) if values else None

    return IdleBaseline(
        device_used_mib=median("device_used_mib"),
        process_used_mib=median("process_used_mib"),
        torch_reserved_mib=median("torch_reserved_mib"),
        rss_mib=median("rss_mib"),
        cuda_initialized=_cuda_initialized(),
    )


def peak(samples: list[Sample], name: str) -> float | None:
    """Largest value of one metric over the samples; None if it was never measured."""
    values = [getattr(s, name) for s in samples if getattr(s, name) is not None]
    return max(values) if values else None


def process_peak_mib(
    samples: list[Sample], baseline: IdleBaseline | None, device_baseline_mib: float | None = None
) -> float | None:
    """Per-process NVML peak (CUDA context included).

    Where the driver hides processes (WDDM, containers): the device peak minus what other processes
    used, i.e. ``device_baseline_mib`` or a ``baseline`` taken before this process initialised CUDA.
    Without either the figure is None: subtracting a later baseline would drop our own context and
    weights and understate the peak.
    """
    direct = peak(samples, "process_used_mib")
    if direct is not None:
        return direct
    device = peak(samples, "device_used_mib")
    if device_baseline_mib is None and baseline is not None and not baseline.cuda_initialized:
        device_baseline_mib = baseline.device_used_mib
    if device is None or device_baseline_mib is None:
        return None
    return max(device - device_baseline_mib, 0.0)


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def _reset_torch_peak(cuda_index: int) -> None:
    if _cuda_initialized():
        sys.modules["torch"].cuda.reset_peak_memory_stats(cuda_index)


def _torch_max_allocated_mib(cuda_index: int) -> float | None:
    if not _cuda_initialized():
        return None
    return sys.modules["torch"].cuda.max_memory_allocated(cuda_index) / MIB

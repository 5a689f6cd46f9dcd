"""RunRecord: one run's settings, environment, results, phase events and memory curve (DESIGN §7).

The same JSON serves the CLI (``OUT.json`` next to the video), the UI (live curve, downloads),
compare (three records in ``compare.json``) and the benchmarks. Figures that were not measured
are ``null``, never guessed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lowvram_studio.engine.events import Phase, RunEvent
from lowvram_studio.media import write_atomically, write_text
from lowvram_studio.monitor.vram import CPU_RAM, IdleBaseline, MonitorConfig, Sample, VramMonitor, measure_idle_baseline
from lowvram_studio.sysinfo import collect_env

if TYPE_CHECKING:
    from lowvram_studio.settings_adapter import RunResult
    from lowvram_studio.settings import RunSettings

LOG = logging.getLogger(__name__)

RECORD_VERSION = 1
RESULT_KEYS = (
    "frames",
    "seconds_total",
    "seconds_per_step",
    "output_fps",
    "process_peak_mib",
    "torch_peak_mib",
    "device_peak_mib",
    "ram_peak_mib",
    "ram_peak_by_phase_mib",  # {phase: peak RSS}: which phase needs the machine's RAM (loading, encoding, decoding)
    "pruned_fraction",
    "psnr_db",
    "ssim",
)
# Curve series names, in the order a reader prefers them for "the" curve of a run.
SERIES = {
    "process_used_mib": "process VRAM",
    "device_used_mib": "device VRAM",
    "torch_allocated_mib": "torch allocated",
    "torch_reserved_mib": "torch reserved",
    "rss_mib": CPU_RAM,
}
CURVE_PREFERENCE = ("process_used_mib", "device_used_mib", "rss_mib")


@dataclass(frozen=True)
class PhaseSpan:
    """A phase from ``start_s`` to ``end_s``, seconds since the monitor started."""

    phase: Phase
    start_s: float
    end_s: float


@dataclass
class RunRecord:
    """Everything one run cost. Build with ``from_result`` (or ``record_run``); ``save`` / ``load``."""

    label: str
    settings: dict[str, Any]
    model: dict[str, Any]
    env: dict[str, Any]
    results: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    memory_label: str = CPU_RAM  # "VRAM" when NVML watched a GPU, "CPU RAM" otherwise
    t0: float | None = None  # perf_counter() when sampling started: t = 0 of the curve
    baseline: dict[str, Any] | None = None  # IdleBaseline.to_dict() measured before the run
    monitor: dict[str, Any] = field(default_factory=dict)  # rate_hz, cpu_fraction, device_baseline_mib, gpu
    info: dict[str, Any] = field(default_factory=dict)  # the engine's technique figures
    device: str | None = None  # where the run computed ("cuda", "cpu")
    phase_seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why the run produced no frames (e.g. out of memory)
    input: dict[str, Any] = field(default_factory=dict)  # the input image: {"image": path, "sha256": of its bytes}
    version: int = RECORD_VERSION

    # ---- building -----------------------------------------------------------------------------
    @classmethod
    def from_result(
        cls,
        result: "RunResult",
        monitor: VramMonitor,
        *,
        model: dict[str, Any],
        label: str = "",
        baseline: IdleBaseline | None = None,
        env: dict[str, Any] | None = None,
    ) -> "RunRecord":
        """Record a finished run: ``result`` is the sampler's ``RunResult``, ``monitor`` watched it."""
        frames = int(len(result.frames))
        seconds = float(result.seconds_total)
        results = _empty_results()
        results.update(monitor.peaks(baseline))
        results.update(
            frames=frames,
            seconds_total=seconds,
            seconds_per_step=_float_or_none(result.seconds_per_step),
            # the write-up's FPS: delivered frames over the run's wall time, model already loaded
            output_fps=frames / seconds if seconds > 0 else None,
            pruned_fraction=_float_or_none(result.info.get("pruning", {}).get("pruned_fraction")),
        )
        record = cls._build(result.settings, monitor, model, label, baseline, env, results, result.events, result.info)
        record.device = str(result.device)
        record.phase_seconds = dict(result.phase_seconds)
        return record

    @classmethod
    def from_failure(
        cls,
        error: BaseException,
        settings: "RunSettings",
        monitor: VramMonitor,
        *,
        model: dict[str, Any],
        label: str = "",
        baseline: IdleBaseline | None = None,
        env: dict[str, Any] | None = None,
        events: list[RunEvent] | None = None,
    ) -> "RunRecord":
        """Record a run that ended without frames; the memory and events it reached are kept."""
        results = _empty_results()
        results.update(monitor.peaks(baseline))
        record = cls._build(settings, monitor, model, label, baseline, env, results, events or [], {})
        record.error = _describe_error(error)
        return record

    @classmethod
    def _build(
        cls,
        settings: "RunSettings",
        monitor: VramMonitor,
        model: dict[str, Any],
        label: str,
        baseline: IdleBaseline | None,
        env: dict[str, Any] | None,
        results: dict[str, Any],
        events: list[RunEvent],
        info: dict[str, Any],
    ) -> "RunRecord":
        record = cls(
            label=label,
            settings=settings.to_dict(),
            model=dict(model),
            env=env if env is not None else collect_env(),
            results=results,
            events=[event.to_dict() for event in events],
            samples=monitor.samples,
            memory_label=monitor.memory_label,
            t0=monitor.started_at,
            baseline=baseline.to_dict() if baseline else None,
            monitor={
                "rate_hz": monitor.config.rate_hz,
                "cpu_fraction": monitor.overhead_fraction,
                "device_baseline_mib": monitor.config.device_baseline_mib,
                "gpu": monitor.gpu_info.name if monitor.gpu_info else None,
            },
            info=jsonable(info),
        )
        record.results["ram_peak_by_phase_mib"] = record.phase_peaks("rss_mib") or None
        return record

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["samples"] = [s.to_dict() for s in self.samples]
        return jsonable(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        if not isinstance(data, dict) or "results" not in data or "settings" not in data:
            raise ValueError("this is not a LowVRAM Studio run record (no settings/results); pick a run's .json file")
        version = data.get("version", RECORD_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):  # a dropped or edited file: say so, no TypeError
            raise ValueError(f"this run record's version is {version!r}, not a whole number like {RECORD_VERSION}; "
                             "pick a .json file saved by LowVRAM Studio")
        if version > RECORD_VERSION:
            LOG.warning("run record version %s is newer than this LowVRAM Studio reads (%s)", version, RECORD_VERSION)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["samples"] = [Sample.from_dict(s) for s in data.get("samples", [])]
        values["results"] = {**_empty_results(), **data["results"]}
        values.setdefault("label", "")
        values.setdefault("model", {})
        values.setdefault("env", {})
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        """Write the record as JSON, whole or not at all, never over an existing file (``MediaError``)."""
        return write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True), path)

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read run record {path} ({error}); check the path or re-run") from error
        return cls.from_dict(data)

    # ---- views --------------------------------------------------------------------------------
    def _seconds(self, t: float) -> float:
        return max(t - self.t0, 0.0) if self.t0 is not None else t

    def to_dataframe(self, metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
        """Long format (``t_s``, ``mib``, ``series``) for ``gr.LinePlot(x="t_s", y="mib", color="series")``."""
        return samples_dataframe(self.samples, self.t0, metrics)

    def curve_metric(self) -> str | None:
        """The Sample field that best answers "how much memory did this run take"."""
        for name in CURVE_PREFERENCE:
            if any(getattr(s, name) is not None for s in self.samples):
                return name
        return None

    def curve(self, metric: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(seconds, MiB) of ``metric`` (default ``curve_metric()``); empty arrays when nothing was measured."""
        name = metric or self.curve_metric()
        points = [(self._seconds(s.t), getattr(s, name)) for s in self.samples if name and getattr(s, name) is not None]
        data = np.array(points, dtype=float).reshape(-1, 2)
        return data[:, 0], data[:, 1]

    def phase_spans(self) -> list[PhaseSpan]:
        """Phases as time spans: each starts at its first event and ends where the next phase starts."""
        starts: list[tuple[Phase, float]] = []
        for event in self.events:
            phase = Phase(event["phase"])
            if not starts or starts[-1][0] != phase:
                starts.append((phase, self._seconds(event["time"])))
        end_of_run = self._seconds(self.samples[-1].t) if self.samples else (starts[-1][1] if starts else 0.0)
        spans = []
        for i, (phase, start) in enumerate(starts):
            if phase == Phase.DONE:
                break
            end = starts[i + 1][1] if i + 1 < len(starts) else end_of_run
            spans.append(PhaseSpan(phase, start, max(end, start)))
        return spans

    def phase_peaks(self, metric: str | None = None) -> dict[str, float]:
        """Highest ``metric`` value (default ``curve_metric()``) within each phase: which phase sets the peak."""
        t, mib = self.curve(metric)
        out: dict[str, float] = {}
        for span in self.phase_spans():
            inside = mib[(t >= span.start_s) & (t <= span.end_s)]
            if inside.size:
                out[span.phase.value] = max(out.get(span.phase.value, 0.0), float(inside.max()))
        return out

    def step_times(self) -> list[float]:
        """Seconds at which denoise steps finished (for step ticks on a curve)."""
        return [self._seconds(e["time"]) for e in self.events if e["phase"] == Phase.DENOISE.value and e.get("step")]


def samples_dataframe(samples: list[Sample], t0: float | None, metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Samples in long format (``t_s`` since ``t0``, ``mib``, ``series``); also for a live curve.

    ``metrics`` picks Sample fields (default: every one); unmeasured values are dropped, so a
    CPU run shows only "CPU RAM". While a run goes: ``samples_dataframe(monitor.samples, monitor.started_at)``.
    """
    rows = []
    for name in metrics or tuple(SERIES):
        for s in samples:
            value = getattr(s, name)
            if value is not None:
                rows.append((max(s.t - t0, 0.0) if t0 is not None else s.t, value, SERIES[name]))
    return pd.DataFrame(rows, columns=["t_s", "mib", "series"])


def record_run(
    run: Callable[[], "RunResult"],
    settings: "RunSettings",
    *,
    model: dict[str, Any],
    label: str = "",
    config: MonitorConfig | None = None,
    baseline: IdleBaseline | None = None,
    record_out_of_memory: bool = False,
    events: list[RunEvent] | None = None,
) -> tuple["RunResult | None", RunRecord]:
    """Run ``run()`` (a call of the sampler's ``generate``) under a fresh monitor; return (result, record).

    With ``record_out_of_memory`` an out-of-memory error becomes a record with ``error`` set and
    result None (compare shows "OOM" like the write-up's table); otherwise every error propagates.
    ``events`` is the list the caller's ``on_event`` fills; it is kept when the run fails.
    """
    config = config or MonitorConfig()
    baseline = baseline or measure_idle_baseline(config.cuda_index)
    monitor = VramMonitor(config)
    try:
        with monitor:
            result = run()
    except Exception as error:
        from ..engine.oom import ran_out_of_memory  # torch only once a run failed

        if not (record_out_of_memory and ran_out_of_memory(error)):
            raise
        LOG.warning("%s ran out of memory: %s", label or "the run", error)
        failed = RunRecord.from_failure(error, settings, monitor, model=model, label=label, baseline=baseline, events=events)
        return None, failed
    return result, RunRecord.from_result(result, monitor, model=model, label=label, baseline=baseline)


def _describe_error(error: BaseException) -> str:
    from ..engine.oom import ran_out_of_memory  # torch only once a run failed

    if ran_out_of_memory(error):
        return f"out of memory: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    return f"{type(error).__name__}: {error}"


def write_text_atomic(path: Path, text: str) -> Path:
    """Rewrite a state file (queue, settings) whole: a reader sees the old text or the new, never half."""
    return write_atomically(path, lambda temp: temp.write_text(text, encoding="utf-8"), replace=True)


def _empty_results() -> dict[str, Any]:
    return dict.fromkeys(RESULT_KEYS)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def jsonable(value: Any) -> Any:
    """Plain JSON types from what runs produce (numpy scalars, enums, paths, tuples, dtypes)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)

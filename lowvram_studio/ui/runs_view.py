"""What one browser tab shows of its runs: the runs table's rows and headers, and the memory curve's update
with each phase's start marked. ``app.Studio`` fills them as runs finish; the live curve draws from them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from ..engine.events import Phase
from ..monitor.report import THROUGHPUT
from .curves import MAX_RUNS, CurveRun, curve_frame
from .worker import Job

# Fidelity right after the run's name: the columns a Compare is for stay in view on a laptop screen. The peak
# column's header names what was measured (one studio process measures every run the same way: its GPU's
# VRAM or, without NVML, CPU RAM), so no column repeats it: the table fits a 1366 px screen unscrolled.
STATS_COLUMNS = ["run", "PSNR (dB)", "SSIM", "peak {memory} (MiB)", "torch peak (MiB)", "s/step", THROUGHPUT,
                 "pruned %"]
STATS_MAX_CHARS = 18  # a longer run name is cut in its cell (a click shows it whole): a long word cannot wrap
STATS_WIDTHS = ["24%", "9%", "9%", "11%", "11%", "9%", "15%", "12%"]


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


def stats_row(label: str, peak: Any, torch_peak: Any, results: dict[str, Any]) -> list[str]:
    """One row of the runs table, in STATS_COLUMNS' order."""
    return [label, _fmt(results.get("psnr_db"), 1), _fmt(results.get("ssim"), 4), _fmt(peak, 0), _fmt(torch_peak, 0),
            _fmt(results.get("seconds_per_step"), 2), _fmt(results.get("output_fps"), 2),
            _fmt(results.get("pruned_fraction"), 1, 100.0)]


def stats_headers(memory_label: str) -> list[str]:
    """STATS_COLUMNS with the peak column naming what was measured, e.g. 'peak CPU RAM (MiB)'."""
    return [name.format(memory=memory_label) for name in STATS_COLUMNS]


def curve_update(runs: list[CurveRun], memory_label: str) -> dict:
    """The LinePlot update for ``runs``: colours per run, legend without the phase marks, marks named below."""
    frame, colors = curve_frame(runs)
    legend = [name for name in colors if not name.startswith("|")]
    return gr.update(value=frame, color_map=colors, colors_in_legend=legend, y_title=f"{memory_label} (MiB)")


@dataclass
class TabHistory:
    """What one browser tab remembers: its finished runs' curves and stats rows, and whether its chart still
    shows the live line of a run that did not finish (the next run's first curve update must clear it)."""

    runs: list[CurveRun] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    memory_label: str = "memory"
    stale_live_line: bool = False

    def add(self, run: CurveRun, row: list[str]) -> None:
        self.runs = [*self.runs, run][-MAX_RUNS:]
        self.rows = [*self.rows, row][-MAX_RUNS:]

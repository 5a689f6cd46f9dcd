"""The memory curves a browser tab shows: the live run, this tab's earlier runs, and phase marks.

A curve is a list of (seconds since its run started, MiB). The tab keeps its finished runs as
``CurveRun`` entries (FP32 runs drawn red, optimized ones green) and ``curve_frame`` turns them plus
the live run into the long-format table ``gr.LinePlot`` draws (one line per series).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..media import write_atomically

COLORS = {"fp32": "#d62728", "fp16": "#1f77b4", "optimized": "#2ca02c", "live": "#ff7f0e", "phase": "#9e9e9e"}
# When a tab's runs share a group (two optimized runs), the later ones take the first unused of these.
SPARE_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79")
MAX_POINTS = 200  # per series: enough for the eye, cheap for the browser to redraw 2.5x a second
MAX_RUNS = 6  # earlier runs kept per tab


@dataclass
class CurveRun:
    """One finished (or running) run's curve, ready to overlay."""

    label: str
    group: str  # "fp32" | "fp16" | "optimized" | "live": picks the colour
    points: list[tuple[float, float]]
    phases: list[tuple[float, str]] = field(default_factory=list)  # (seconds, phase name) where each began

    @property
    def peak_mib(self) -> float | None:
        return max((mib for _, mib in self.points), default=None)


def thin(points: Sequence[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """Every k-th point (always keeping the peak and the last) so a series stays under ``limit`` points."""
    if len(points) <= limit:
        return list(points)
    step = math.ceil(len(points) / limit)
    keep = set(range(0, len(points), step)) | {len(points) - 1}
    keep.add(max(range(len(points)), key=lambda i: points[i][1]))
    return [points[i] for i in sorted(keep)]


def phase_caption(runs: Sequence[CurveRun]) -> str:
    """Names the grey phase marks of the newest run, e.g. 'Grey lines: load 0.0 s · denoise 2.4 s'."""
    if not runs or not runs[-1].phases:
        return ""
    return "Grey lines, phase starts of the newest run: " + " · ".join(f"{p} {t:.1f} s" for t, p in runs[-1].phases)


def run_colors(runs: Sequence[CurveRun]) -> list[str]:
    """One colour per run, none shared: its group's (FP32 red, optimized green, ...) while that is free."""
    colors: list[str] = []
    for run in runs:
        wanted = COLORS.get(run.group, COLORS["optimized"])
        spare = (c for c in SPARE_COLORS if c not in colors)
        colors.append(wanted if wanted not in colors else next(spare))
    return colors


LEGEND_CHARS = 20  # the plot's legend cuts longer names off (about 160 px)
GROUP_NAMES = {"fp32": "FP32", "fp16": "FP16", "optimized": "optimized", "live": "running"}


def series_name(number: int, run: CurveRun) -> str:
    """The legend's name of a run: its label when that fits the legend, else its number and group
    ('#3 optimized'); the runs table below has the full label in the same order."""
    return f"#{number} {run.label if len(run.label) <= LEGEND_CHARS else GROUP_NAMES.get(run.group, run.group)}"


def curve_frame(runs: Sequence[CurveRun]) -> tuple[pd.DataFrame, dict[str, str]]:
    """(table for gr.LinePlot with columns t_s, mib, series; colour per series).

    Series names are unique ("#2 FP32 original"); the newest run also gets a grey vertical mark where
    each phase began, so encode / denoise / decode read straight off the curve.
    """
    rows: list[tuple[float, float, str]] = []
    colors: dict[str, str] = {}
    for number, (run, color) in enumerate(zip(runs, run_colors(runs), strict=True), start=1):
        name = series_name(number, run)
        colors[name] = color
        rows.extend((t, mib, name) for t, mib in thin(run.points))
    if runs and runs[-1].points:
        top = max(mib for run in runs for _, mib in run.points)
        for t, phase in runs[-1].phases:
            name = f"| {phase}"
            colors[name] = COLORS["phase"]
            rows.extend([(t, 0.0, name), (t, top, name)])
    frame = pd.DataFrame(rows, columns=["t_s", "mib", "series"])
    return frame, colors


def write_curve_png(runs: Sequence[CurveRun], memory_label: str, path: Path) -> Path:
    """The curves as a PNG for download (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4), dpi=100)
    axes = figure.subplots()
    for number, (run, color) in enumerate(zip(runs, run_colors(runs), strict=True), start=1):
        if run.points:
            t, mib = zip(*run.points)
            axes.plot(t, mib, color=color, label=f"#{number} {run.label}")
    if runs:
        for t, phase in runs[-1].phases:
            axes.axvline(t, color=COLORS["phase"], linewidth=0.8, linestyle="--")
            axes.annotate(phase, (t, 0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                          va="bottom", ha="right", color="#555555")
    axes.set_xlabel("seconds since the run started")
    axes.set_ylabel(f"{memory_label} (MiB)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    return write_atomically(path, lambda temp: figure.savefig(temp, format="png"))  # never a cut PNG

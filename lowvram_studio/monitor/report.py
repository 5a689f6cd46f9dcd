"""What a set of runs cost, shown: fidelity numbers, the memory-curve PNG and the comparison table.

Fidelity uses scikit-image's metrics; the plot is plain matplotlib (its object API, no pyplot
state, so it is safe from worker threads); the DataFrame view feeds ``gr.LinePlot``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lowvram_studio.engine.events import Phase
from lowvram_studio.media import write_atomically
from lowvram_studio.monitor.record import SERIES, RunRecord
from lowvram_studio.monitor.vram import CPU_RAM

PHASE_COLORS = {
    Phase.LOAD: "#d9d9d9",
    Phase.ENCODE: "#fdd9a0",
    Phase.DENOISE: "#c6dbef",
    Phase.DECODE: "#d5c4e8",
    Phase.INTERPOLATE: "#c7e9c0",
    Phase.EXPORT: "#f2f2aa",
}
# The record's ``output_fps`` (DESIGN §3: delivered frames / wall seconds with the model loaded) is how fast
# frames are made, not the video's frame rate (the fps setting); it is named so it cannot be read as one.
THROUGHPUT = "frames generated per s"
DEFAULT_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown")


def psnr_ssim(frames: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """PSNR (dB, over all frames at once; inf when identical) and mean per-frame SSIM, both in [0, 1].

    Frames are (F, H, W, 3) floats in [0, 1], as ``RunResult.frames``.
    """
    frames = np.asarray(frames, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if frames.shape != reference.shape:
        raise ValueError(
            f"cannot compare videos of shapes {frames.shape} and {reference.shape}; "
            "run both with the same frames, height and width"
        )
    with np.errstate(divide="ignore"):  # identical videos: MSE 0 -> PSNR inf, which is the answer
        psnr = float(peak_signal_noise_ratio(reference, frames, data_range=1.0))
    ssim = float(
        np.mean(
            [structural_similarity(r, f, data_range=1.0, channel_axis=-1) for r, f in zip(reference, frames, strict=True)]
        )
    )
    return psnr, ssim


def curves_dataframe(records: Sequence[RunRecord]) -> pd.DataFrame:
    """Each run's main curve in long format (``t_s``, ``mib``, ``series`` = run label) for an overlay."""
    parts = []
    for record in records:
        t, mib = record.curve()
        parts.append(pd.DataFrame({"t_s": t, "mib": mib, "series": record.label}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["t_s", "mib", "series"])


def plot_curves(
    records: Sequence[RunRecord], path: str | Path, colors: dict[str, str] | None = None, title: str | None = None
) -> Path:
    """Write a PNG: all curves overlaid on top, then one panel per run with its phases shaded.

    x is seconds since each run's monitor started, y is MiB of each run's ``curve_metric``.
    ``colors`` maps run labels to matplotlib colours (else red, blue, green, ... in order).
    """
    colors = {r.label: (colors or {}).get(r.label, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i, r in enumerate(records)}
    panels = 1 + len(records) if len(records) > 1 else 1
    fig = Figure(figsize=(10, 2.6 + 2.0 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    if len(records) > 1:
        overlay = axes[0]
        for record in records:
            t, mib = record.curve()
            overlay.plot(t, mib, color=colors[record.label], lw=1.6, label=_legend(record))
        overlay.set_title(title or "Memory over time")
        overlay.legend(loc="best", fontsize=8)
        run_axes = axes[1:]
    else:
        run_axes = axes
        if title:
            axes[0].set_title(title)
    longest = max((float(r.curve()[0].max(initial=0.0)) for r in records), default=0.0)
    for ax, record in zip(run_axes, records, strict=True):
        _draw_run(ax, record, colors[record.label], min_label_s=0.06 * longest)
    for ax in axes:
        ax.set_ylabel("MiB")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("seconds since the run started")
    # Whole or not at all: a full disk or a killed process leaves a swept temporary, never a cut PNG.
    return write_atomically(path, lambda temp: fig.savefig(temp, dpi=110, format="png"))


def _draw_run(ax, record: RunRecord, color: str, min_label_s: float) -> None:
    t, mib = record.curve()
    ax.plot(t, mib, color=color, lw=1.6)
    for span in record.phase_spans():
        ax.axvspan(span.start_s, span.end_s, color=PHASE_COLORS.get(span.phase, "#eeeeee"), alpha=0.6, lw=0)
        if span.end_s - span.start_s < min_label_s:
            continue  # too narrow for its name; the colour still shows it
        ax.text(
            (span.start_s + span.end_s) / 2, 0.97, span.phase.value, transform=ax.get_xaxis_transform(),
            ha="center", va="top", fontsize=7, clip_on=True,
        )
    for step in record.step_times():
        ax.axvline(step, color="grey", lw=0.5, alpha=0.6)
    ax.set_title(f"{record.label}: {_metric_name(record)}" + (f" ({record.error})" if record.error else ""), fontsize=9)


def _metric_name(record: RunRecord) -> str:
    metric = record.curve_metric()
    return SERIES[metric] if metric else "n/a"


def _legend(record: RunRecord) -> str:
    key, name = memory_figure([record])
    return f"{record.label} ({name.split(' (')[1][:-1]} {_mib(record.results[key])})" + _oom(record)


def compare_table_md(records: Sequence[RunRecord], reference: int = 0, optimized: int = -1) -> str:
    """The write-up's table (GPU, frames, original / optimized memory and FPS), then one row per run.

    Memory is the process peak on a GPU (context included) and the peak RSS on CPU; the second
    table names every figure and adds s/step and PSNR/SSIM against ``records[reference]``.
    """
    ref, opt = records[reference], records[optimized]
    memory_key, memory_name = memory_figure(records)
    device = ref.env.get("gpu") or "CPU"
    lines = [
        f"| device | frames | {ref.label} {memory_name} | {opt.label} {memory_name} | {ref.label} {THROUGHPUT} "
        f"| {opt.label} {THROUGHPUT} |",
        "|---|---|---|---|---|---|",
        f"| {device} | {_value(opt.results.get('frames') or ref.settings.get('num_frames'))} "
        f"| {_mib(ref.results[memory_key])}{_oom(ref)} | {_mib(opt.results[memory_key])}{_oom(opt)} "
        f"| {_num(ref.results['output_fps'], 3)} | {_num(opt.results['output_fps'], 3)} |",
        "",
        f"| run | process peak | torch peak | device peak | RAM peak | s/step | {THROUGHPUT} | PSNR vs {ref.label} | SSIM vs {ref.label} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        r = record.results
        lines.append(
            f"| {record.label}{_oom(record)} | {_mib(r['process_peak_mib'])} | {_mib(r['torch_peak_mib'])} "
            f"| {_mib(r['device_peak_mib'])} | {_mib(r['ram_peak_mib'])} | {_num(r['seconds_per_step'], 3)} "
            f"| {_num(r['output_fps'], 3)} | {_db(r['psnr_db'])} | {_num(r['ssim'], 4)} |"
        )
    return "\n".join(lines) + "\n"


def memory_figure(records: Sequence[RunRecord]) -> tuple[str, str]:
    """Which peak stands for "memory" in a table, and its name: the process peak (context included)
    on a GPU, the torch peak where the driver hides processes, the peak RSS on CPU."""
    if all(r.memory_label == CPU_RAM for r in records):
        return "ram_peak_mib", "CPU RAM (peak RSS)"
    if any(r.results["process_peak_mib"] is not None for r in records):
        return "process_peak_mib", "VRAM (process peak)"
    return "torch_peak_mib", "VRAM (torch peak)"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB"


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _db(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf (identical)" if math.isinf(value) else f"{value:.2f} dB"


def _value(value: object) -> str:
    return "n/a" if value is None else str(value)


def _oom(record: RunRecord) -> str:
    return " OOM" if record.error and record.error.startswith("out of memory") else (" failed" if record.error else "")

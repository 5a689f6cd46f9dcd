"""Pruning's record: what one run reused, as a frames x steps map of codes and a summary, and the map drawn.

One job: the result format shared by SVD's pruning hooks (``pruning.py``) and the DiT step cache
(``step_cache.py``), read by the run record and the studio, which draws the map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import PIL.Image


class MapCode(IntEnum):
    """One cell of the pruning map (frame, step)."""

    COMPUTED = 0
    NEIGHBOUR = 1  # spatial layers copied from the frame's anchor in this step
    PREVIOUS_STEP = 2  # deep features reused from the last computed step


@dataclass
class PruningSummary:
    """What pruning did in one run; ``map`` is frames x steps of ``MapCode`` values."""

    threshold: float
    mode: str
    step_signal: str
    frame_signal: str
    map: list[list[int]]
    pruned_fraction: float
    neighbour_fraction: float
    previous_step_fraction: float
    reused_steps: int
    speedup_estimate: float | None
    full_tflop: float | None
    executed_tflop: float | None
    cache_mib: float
    step_decision: str
    signals: list[dict[str, float | None]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- drawing --------------------------------------------------------------------------------------

_MAP_COLOURS = {
    MapCode.COMPUTED: ((60, 60, 60), "computed"),
    MapCode.NEIGHBOUR: ((240, 150, 40), "copied from neighbour frame"),
    MapCode.PREVIOUS_STEP: ((70, 140, 230), "reused from previous step"),
}


def draw_pruning_map(pruning_map: np.ndarray | list, title: str = "", cell: int = 16) -> PIL.Image.Image:
    """The map as an image: frames down, steps across, one colour per ``MapCode``, with a legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    grid = np.asarray(pruning_map, dtype=np.int8)
    frames, steps = grid.shape
    colours = [tuple(c / 255 for c in _MAP_COLOURS[code][0]) for code in MapCode]
    width = max(4.0, steps * cell / 72 + 2.5)
    height = max(2.5, frames * cell / 72 + 1.6)
    figure = Figure(figsize=(width, height), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=len(MapCode) - 1, aspect="auto",
                interpolation="nearest")
    axes.set_xlabel("step")
    axes.set_ylabel("frame")
    pruned = float((grid != MapCode.COMPUTED).mean()) if grid.size else 0.0
    axes.set_title(f"{title + ' - ' if title else ''}pruned {pruned:.0%}", fontsize=10)
    handles = [Patch(color=colours[code], label=_MAP_COLOURS[code][1]) for code in MapCode]
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize=8, frameon=False)
    figure.tight_layout()
    canvas.draw()
    return PIL.Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())

"""How often the page may redraw a live view while a run goes: a budget, a fraction of the run's time.

On a CPU run the page's updates and the run share the same cores (and the server's updates share the
run's GIL), so every update is time the run loses: #21 measured a watched CPU run 2-26 % slower per step.
Each kind of update therefore gets a share of the run's time: after an update that cost ``c`` seconds
(measured here while building it, plus what the browser spends drawing it), the next one waits
``c / share`` seconds, and at least ``floor_s``. A costly redraw so comes rarely, a cheap one often, and
together they stay under the sum of their shares.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class UpdateBudget:
    """Paces one kind of update (the curve, the preview) to ``share`` of the run's time."""

    share: float  # fraction of wall time this kind may cost, e.g. 0.01 = 1 % of each step
    floor_s: float  # never more often than this, however cheap the update
    browser_s: float  # what the browser spends drawing one (not visible to the server; measured by bench/watched_cost.py)
    clock: Callable[[], float] = time.perf_counter
    _next_at: float | None = None
    cost_s: float = 0.0  # the last update's cost, server and browser

    def __post_init__(self) -> None:
        if not 0 < self.share < 1 or self.floor_s < 0 or self.browser_s < 0:
            raise ValueError(f"an update budget needs 0 < share < 1 and no negative times, not {self}")

    def due(self) -> bool:
        """Whether an update may go now: the first always may (it clears the previous run's view)."""
        return self._next_at is None or self.clock() >= self._next_at

    def spend(self, build: Callable[[], T]) -> T:
        """Build the update, time it, and set when the next one may go from what this one cost."""
        started = self.clock()
        value = build()
        finished = self.clock()
        self.cost_s = finished - started + self.browser_s
        self._next_at = finished + max(self.floor_s, self.cost_s / self.share)
        return value

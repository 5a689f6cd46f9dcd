"""The run's progress bar: how far a job is, from its phase events, drawn as a real bar with its text.

Denoising is most of a run, so it gets most of the bar; each other phase a fixed slice. A Compare is
three runs: each gets a third, filled the same way. The bar is an HTML ``<progress>`` (its value is
what a browser test and a screen reader read), with the status line's phase, step and ETA beside it.
"""

from __future__ import annotations

import html

from ..engine.events import Phase, RunEvent
from .worker import Job, JobState

# Where each phase starts on the bar (fractions of one run); denoise fills its slice step by step.
PHASE_START = {Phase.LOAD: 0.0, Phase.ENCODE: 0.05, Phase.DENOISE: 0.10, Phase.DECODE: 0.85,
               Phase.INTERPOLATE: 0.93, Phase.EXPORT: 0.95, Phase.DONE: 1.0}


def run_fraction(event: RunEvent) -> float:
    """How far one run is after ``event`` (0..1)."""
    start = PHASE_START[event.phase]
    if event.phase == Phase.DENOISE and event.total:
        return start + (PHASE_START[Phase.DECODE] - start) * (event.step or 0) / event.total
    return start


def job_fraction(job: Job) -> float:
    """How far the whole job is (0..1): a Compare's runs each fill their share."""
    if job.state == JobState.DONE:
        return 1.0
    event = job.last_event
    if event is None:
        return 0.0
    index, total = event.data.get("compare_index", 0), event.data.get("compare_total", 1)
    return (index + run_fraction(event)) / total


def progress_html(job: Job | None, text: str = "") -> str:
    """The bar for ``job`` (None: an empty bar, e.g. while a new run is being checked) and ``text`` beside it."""
    percent = 0 if job is None else round(100 * job_fraction(job))
    return (f'<div class="run-progress"><progress max="100" value="{percent}" aria-label="run progress" '
            f'style="width:100%;height:14px"></progress>'
            f'<span style="font-size:0.85em">{percent} % {html.escape(text)}</span></div>')

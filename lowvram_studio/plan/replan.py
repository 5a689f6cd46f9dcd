"""Re-plan after a real out-of-memory error: free memory and run again with the next tighter settings.

The planner's moves for the phase that failed, restricted to the decode moves inside the run
(``decode_retry``: the engine decodes again from the kept latents) and to every move around it
(``run_with_replan``: an OOM while encoding or denoising re-runs with tighter settings).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ..engine.events import EventCallback, Phase, RunEvent
from ..engine.oom import DecodeTightener, OomRetry, OutOfMemoryAfterRetries, first_line, settings_diff, try_once
from ..engine.placement import release_memory
from ..settings import RunSettings
from .planner import Planner

logger = logging.getLogger(__name__)

MAX_RETRIES = 5
# What a decode retry can change without re-running the denoise loop.
DECODE_MOVES = ("vae_tile", "decode_frames")
T = TypeVar("T")


def decode_retry(planner: Planner) -> DecodeTightener:
    """The tighter decode settings after an OOM while decoding, for ``generate(decode_retry=...)``."""
    return lambda settings: planner.tighten(settings, Phase.DECODE, allowed=DECODE_MOVES)


def run_with_replan(
    run_fn: Callable[[RunSettings, EventCallback], T],
    settings: RunSettings,
    planner: Planner,
    on_event: EventCallback | None = None,
    max_retries: int = MAX_RETRIES,
) -> T:
    """Run ``run_fn(settings, on_event)`` (usually ``generate``); on OOM free memory and re-run with the
    planner's next tighter settings for the phase that failed. The result's ``info["oom_retries"]`` lists
    every retry (decode fallbacks inside the run included)."""
    retries: list[dict[str, Any]] = []
    phase = Phase.LOAD

    def track(event: RunEvent) -> None:
        nonlocal phase
        phase = event.phase
        if on_event is not None:
            on_event(event)

    current = settings
    for attempt in range(1, max_retries + 2):
        phase = Phase.LOAD
        result, error = try_once(lambda: run_fn(current, track))
        if error is None:
            info = getattr(result, "info", None)
            if isinstance(info, dict):
                info["oom_retries"] = retries + list(info.get("oom_retries", []))
                # what ran: the re-plans' settings, with any decode fallback inside the run on top
                info["final_settings_changed"] = settings_diff(settings, getattr(result, "settings", current))
            return result
        message = first_line(error)
        del error
        release_memory()
        tighter = planner.tighten(current, phase) if attempt <= max_retries else None
        if tighter is None:
            break
        retry = OomRetry(phase.value, attempt, message, tighter[1], settings_diff(current, tighter[0]))
        logger.warning(retry.message)
        retries.append(retry.to_dict())
        track(RunEvent(phase, message=retry.message, data={"oom_retry": retry.to_dict()}))
        current = tighter[0]
    tried = "; ".join(r["message"] for r in retries) or "no tighter settings were left"
    raise OutOfMemoryAfterRetries(
        f"out of GPU memory during {phase.value} even after {len(retries)} re-plan(s) ({tried}); "
        "lower the size or frame count, or close other programs using the GPU"
    )

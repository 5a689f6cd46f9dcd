"""Out-of-memory re-planning: an OOM frees memory and the run retries with the next tighter plan.

Two layers, so that no result is ever thrown away:

* ``decode_with_fallback`` (inside the sampler): an OOM while decoding keeps the denoised latents and
  decodes again in tiles / fewer frames per call;
* ``run_with_replan`` (around ``generate``; CLI, UI and benchmarks call it): an OOM in any other phase
  re-runs with the planner's next tighter settings for the phase that failed.

Every retry is logged in ``RunResult.info["oom_retries"]`` and reported as a ``RunEvent`` whose message
says what was changed. Tries are bounded; when they run out the user gets one clear error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch

from ..settings import RunSettings
from .events import EventCallback, Phase, RunEvent
from .placement import release_memory
from .planner import Planner

logger = logging.getLogger(__name__)

MAX_RETRIES = 5
MAX_DECODE_RETRIES = 8  # decode retries are cheap (the latents are kept) and go one lossy level at a time
# What a decode retry can change without re-running the denoise loop.
DECODE_MOVES = ("vae_tile", "decode_chunk")
T = TypeVar("T")


class OutOfMemoryAfterRetries(RuntimeError):
    """Every tighter plan still ran out of memory; the message says what was tried and what to do."""


@dataclass(frozen=True)
class OomRetry:
    """One re-plan: where memory ran out, what changed, and the message the user sees."""

    phase: str
    attempt: int
    error: str
    changes: list[str]
    changed_settings: dict[str, list[Any]]

    @property
    def message(self) -> str:
        return (
            f"Out of GPU memory during {self.phase}; retry {self.attempt} with: " + "; ".join(self.changes)
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OOM, or the allocation failures cuBLAS / cuDNN report as plain RuntimeErrors."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _diff(before: RunSettings, after: RunSettings) -> dict[str, list[Any]]:
    old, new = before.to_dict(), after.to_dict()
    return {k: [old[k], new[k]] for k in new if old[k] != new[k]}


def _attempt(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    """Run ``fn``; return its value, or the OOM it raised. Other errors propagate unchanged.

    The error is returned (not handled inside an ``except`` block) so that the caller frees memory after
    the traceback, and the tensors its frames hold, are gone.
    """
    try:
        return fn(), None
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        error.__traceback__ = None
        return None, error


def decode_with_fallback(
    decode_fn: Callable[[RunSettings], T],
    settings: RunSettings,
    planner: Planner,
    report: Callable[[OomRetry], None],
    max_retries: int = MAX_DECODE_RETRIES,
) -> tuple[T, RunSettings]:
    """Decode with ``decode_fn(settings)``; on OOM retry with tighter decode settings (tiles, fewer frames).

    Returns the decode's value and the settings it finally ran with, so the run's result, record and mp4
    tag name the tiles and chunks that produced the frames, not the ones that ran out of memory."""
    current = settings
    for attempt in range(1, max_retries + 2):
        result, error = _attempt(lambda: decode_fn(current))
        if error is None:
            return result, current
        message = _first_line(error)
        del error
        release_memory()
        tighter = planner.tighten(current, Phase.DECODE, allowed=DECODE_MOVES) if attempt <= max_retries else None
        if tighter is None:
            break
        retry = OomRetry(Phase.DECODE.value, attempt, message, tighter[1], _diff(current, tighter[0]))
        logger.warning(retry.message)
        report(retry)
        current = tighter[0]
    raise OutOfMemoryAfterRetries(
        f"out of GPU memory while decoding, even with decode_chunk={current.decode_chunk} and "
        f"vae_tile={current.vae_tile}; lower the size, or close other programs using the GPU"
    )


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
        result, error = _attempt(lambda: run_fn(current, track))
        if error is None:
            info = getattr(result, "info", None)
            if isinstance(info, dict):
                info["oom_retries"] = retries + list(info.get("oom_retries", []))
                info["final_settings_changed"] = _diff(settings, current)
            return result
        message = _first_line(error)
        del error
        release_memory()
        tighter = planner.tighten(current, phase) if attempt <= max_retries else None
        if tighter is None:
            break
        retry = OomRetry(phase.value, attempt, message, tighter[1], _diff(current, tighter[0]))
        logger.warning(retry.message)
        retries.append(retry.to_dict())
        track(RunEvent(phase, message=retry.message, data={"oom_retry": retry.to_dict()}))
        current = tighter[0]
    tried = "; ".join(r["message"] for r in retries) or "no tighter settings were left"
    raise OutOfMemoryAfterRetries(
        f"out of GPU memory during {phase.value} even after {len(retries)} re-plan(s) ({tried}); "
        "lower the size or frame count, or close other programs using the GPU"
    )

"""Out-of-memory errors: recognising them, and decoding again without losing the denoised latents.

Two layers, so that no result is ever thrown away:

* ``decode_with_fallback`` (here, inside the sampler): an OOM while decoding keeps the denoised latents
  and decodes again with the tighter decode settings the caller's ``tighten`` names (tiles, fewer frames
  per call); the engine does not plan, the plan stage passes its planner's moves in;
* ``plan.replan.run_with_replan`` (around ``generate``): an OOM in any other phase re-runs with the
  planner's next tighter settings for the phase that failed.

Every retry is logged in ``RunResult.info["oom_retries"]`` and reported as a ``RunEvent`` whose message
says what was changed. Tries are bounded; when they run out the user gets one clear error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch

from .events import Phase
from .placement import release_memory

logger = logging.getLogger(__name__)

MAX_DECODE_RETRIES = 8  # decode retries are cheap (the latents are kept) and go one lossy level at a time
T = TypeVar("T")
S = TypeVar("S")  # the decode's settings: anything whose to_dict() names decode_frames and vae_tile (vae.DecodeConfig)
# The tighter decode settings after an OOM and the reasons, or None when nothing is left to try.
DecodeTightener = Callable[[S], "tuple[S, list[str]] | None"]


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


def is_host_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, or torch's CPU allocator failing: the machine's RAM, which no VRAM plan frees."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def ran_out_of_memory(error: BaseException) -> bool:
    """Either memory: the one classifier the record, the CLI and the studio use to say "out of memory"."""
    return is_out_of_memory(error) or is_host_out_of_memory(error)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def settings_diff(before: Any, after: Any) -> dict[str, list[Any]]:
    """Each field that differs, as [before, after] (settings objects with ``to_dict``)."""
    old, new = before.to_dict(), after.to_dict()
    return {k: [old[k], new[k]] for k in new if old[k] != new[k]}


def try_once(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
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
    decode_fn: Callable[[S], T],
    settings: S,
    tighten: DecodeTightener | None,
    report: Callable[[OomRetry], None],
    max_retries: int = MAX_DECODE_RETRIES,
) -> tuple[T, S]:
    """Decode with ``decode_fn(settings)``; on OOM retry with ``tighten``'s decode settings (tiles, fewer
    frames); without ``tighten`` the first OOM ends in the clear error.

    Returns the decode's value and the settings it finally ran with, so the run's result, record and mp4
    tag name the tiles and chunks that produced the frames, not the ones that ran out of memory."""
    current = settings
    for attempt in range(1, max_retries + 2):
        result, error = try_once(lambda: decode_fn(current))
        if error is None:
            return result, current
        message = first_line(error)
        del error
        release_memory()
        tighter = tighten(current) if tighten is not None and attempt <= max_retries else None
        if tighter is None:
            break
        retry = OomRetry(Phase.DECODE.value, attempt, message, tighter[1], settings_diff(current, tighter[0]))
        logger.warning(retry.message)
        report(retry)
        current = tighter[0]
    last = current.to_dict()
    raise OutOfMemoryAfterRetries(
        f"out of GPU memory while decoding, even with decode_frames={last['decode_frames']} and "
        f"vae_tile={last['vae_tile']}; decode fewer frames at a time (decode_frames) or in tiles (vae_tile), "
        "lower the size, or close other programs using the GPU"
    )

"""Phase and step events a run emits: the seam between the sampler and the monitor, UI and CLI.

Events carry ``time.perf_counter()`` stamps, the same clock the VRAM monitor samples on, so a
curve can be shaded by phase without any conversion.

Stop is a ``CancelToken``: the sampler checks the one it is handed between denoise steps; loops deeper
in the engine that are not handed one (VAE decode chunks and tiles) check the token of the run on
their thread, ``current_token()``, which the studio's worker sets around each job (``token.current()``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Phase(str, Enum):
    """The stages of a run, in order; their values are the progress labels users see."""

    LOAD = "load"
    ENCODE = "encode image"
    DENOISE = "denoise"
    DECODE = "decode"
    INTERPOLATE = "interpolate"
    EXPORT = "export"
    DONE = "done"


@dataclass(frozen=True)
class RunEvent:
    """One stamp: a phase started (step None), or denoise step ``step`` of ``total`` finished."""

    phase: Phase
    time: float = field(default_factory=time.perf_counter)
    step: int | None = None
    total: int | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.step is not None and self.total:
            return f"{self.phase.value} step {self.step}/{self.total}"
        return self.phase.value

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["phase"] = self.phase.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunEvent":
        return cls(**{**data, "phase": Phase(data["phase"])})


EventCallback = Callable[[RunEvent], None]


class RunCancelled(Exception):
    """The user stopped the run; raised between sampler steps or decode chunks, memory is released by the sampler."""


class CancelToken:
    """A thread-safe stop flag the UI or CLI sets and the sampler checks between steps and decode chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise RunCancelled("the run was stopped")

    @contextmanager
    def current(self) -> Iterator["CancelToken"]:
        """Make this the stop flag of the run on this thread (and its context) until the block ends."""
        reset = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(reset)


# One per thread (context), not per process: two runs on two threads each see their own token.
_CURRENT: ContextVar[CancelToken | None] = ContextVar("lowvram_studio_cancel_token", default=None)


def current_token() -> CancelToken | None:
    """The stop flag of the run on this thread (``CancelToken.current``), if any."""
    return _CURRENT.get()

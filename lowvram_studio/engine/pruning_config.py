"""Pruning's settings: the knobs of static-frame pruning / step reuse, their defaults, checks and warnings.

One job: what a run asks pruning to do (``PruningConfig``), so the settings, the adapter and every family can
hold and validate it without importing the UNet hooks (``pruning.py``, ``pruning_hooks.py``) that carry it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from .options import PruneMode

DEFAULT_THRESHOLD = 0.012  # the write-up's THRESHOLD
GHOSTING_BELOW = 0.008  # the write-up: "ghosting" under this threshold
LARGE_MOTION_THRESHOLD = 0.02  # the write-up: large-motion clips use at least this threshold


class StepSignal(str, Enum):
    """What the across-steps decision measures (the change since the last computed step)."""

    INPUT = "input"  # the noisy latents entering the UNet, accumulated step to step (TeaCache)
    SHALLOW = "shallow"  # the first down block's output, i.e. the deep path's own input


class FrameSignal(str, Enum):
    """What the across-frames grouping compares between neighbouring frames."""

    LATENTS = "latents"  # the noisy latents entering the UNet this step
    DENOISED = "denoised"  # the scheduler's denoised estimate from the previous step


def ghosting_warning(threshold: float) -> str | None:
    """A user-facing warning for a threshold the write-up or our measurements flag, else None."""
    if 0 < threshold < GHOSTING_BELOW:
        return (
            f"pruning threshold {threshold:g} is below {GHOSTING_BELOW:g}: the write-up reports ghosting there; "
            f"raise it to {DEFAULT_THRESHOLD:g} or set 0 to turn pruning off"
        )
    return None


def _strict_bool(value: Any) -> bool:
    """true or false only: ``bool("no")`` is True, which would turn a knob on that the user meant off."""
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    return float(value)


@dataclass
class PruningConfig:
    """How the UNet reuses work. ``threshold`` 0 turns pruning off."""

    threshold: float = DEFAULT_THRESHOLD
    mode: PruneMode = PruneMode.STEPS
    step_signal: StepSignal = StepSignal.SHALLOW
    frame_signal: FrameSignal = FrameSignal.LATENTS
    max_consecutive_reuse: int = 3  # DeepCache's cache interval minus one
    # Layers of the first down block kept on a reused step (None: the whole block). 0 keeps only conv_in
    # and the last up layer: at equal threshold ~1.25x more speed for ~1 dB (bench/results/pruning_branches_20261126.md,
    # demo_fidelity_20261126.md).
    branch_layers: int | None = 0
    motion_adaptive: bool = False  # raise the threshold to LARGE_MOTION_THRESHOLD on large motion
    large_motion: float = 0.1  # clip motion (median inter-frame change of the denoised estimate) deemed large
    record_signals: bool = False  # also record the deep-feature and output change each step (for measurements)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @property
    def reuse_steps(self) -> bool:
        return self.enabled and self.mode in (PruneMode.STEPS, PruneMode.BOTH)

    @property
    def reuse_frames(self) -> bool:
        return self.enabled and self.mode in (PruneMode.FRAMES, PruneMode.BOTH)

    def problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.threshold <= 1.0:
            out.append(f"prune threshold must be between 0 (off) and 1; got {self.threshold!r}")
        if not (isinstance(self.max_consecutive_reuse, int) and self.max_consecutive_reuse >= 0):
            out.append(
                f"prune_max_reuse must be a whole number of steps, 0 or more; got {self.max_consecutive_reuse!r}"
            )
        if self.branch_layers is not None and not (isinstance(self.branch_layers, int) and self.branch_layers >= 0):
            out.append(f"prune_branch_layers must be a whole number, 0 or more (or unset); got {self.branch_layers!r}")
        if self.large_motion <= 0:
            out.append(f"prune_large_motion must be positive; got {self.large_motion!r}")
        return out

    def validate(self) -> "PruningConfig":
        found = self.problems()
        if found:
            raise ValueError("; ".join(found))
        return self

    @classmethod
    def from_knobs(cls, threshold: float, mode: PruneMode | str, extra: dict[str, Any]) -> "PruningConfig":
        """Threshold and mode, and the finer knobs from the ``extra`` keys ``prune_*`` of a settings file.

        A bad value raises ValueError naming its ``extra`` key and the values it takes (the settings'
        validation reports it before any run).
        """

        def knob(key: str, convert: Any, default: Any, expected: str) -> Any:
            value = extra.get(key, default)
            try:
                return convert(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"extra {key} must be {expected}; got {value!r}") from error

        def choice(key: str, kind: type[Enum], default: Enum) -> Any:
            return knob(key, kind, default.value, "one of " + ", ".join(e.value for e in kind))

        config = cls(
            threshold=threshold,
            mode=PruneMode(mode),
            step_signal=choice("prune_step_signal", StepSignal, cls.step_signal),
            frame_signal=choice("prune_frame_signal", FrameSignal, cls.frame_signal),
            max_consecutive_reuse=extra.get("prune_max_reuse", cls.max_consecutive_reuse),
            branch_layers=extra.get("prune_branch_layers", cls.branch_layers),
            motion_adaptive=knob("prune_motion_adaptive", _strict_bool, cls.motion_adaptive, "true or false"),
            large_motion=knob("prune_large_motion", _number, cls.large_motion, "a number"),
            record_signals=knob("prune_record_signals", _strict_bool, cls.record_signals, "true or false"),
        )
        return config.validate()

"""The form's sliders (range and step, from the settings table), and snapping a typed value onto its step.

A slider's number box takes any typed number; a value between steps (127 in a step-64 box) would
otherwise run as typed, as some fields accept it (``temporal_chunk`` any whole number). The page snaps
what is typed to the nearest step and says so; ``off_step_problems`` refuses a value between steps from
API callers, whose requests never pass through the page (beyond the range is theirs to ask for).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..settings_table import TABLE
from .labels import LABELS


@dataclass(frozen=True)
class SliderSpec:
    minimum: float
    maximum: float
    step: float

    def snap(self, value: float) -> float:
        """The nearest value on this slider's steps, inside its range (whole numbers stay whole)."""
        steps = round((float(value) - self.minimum) / self.step)
        snapped = min(max(self.minimum + steps * self.step, self.minimum), self.maximum)
        return int(snapped) if float(self.step).is_integer() else round(snapped, 6)

    def on_step(self, value: float) -> bool:
        """On a step (beyond the range too: the API may ask for more than the slider shows)."""
        steps = (float(value) - self.minimum) / self.step
        return abs(steps - round(steps)) <= 1e-6


SLIDERS = {name: SliderSpec(*row.slider) for name, row in TABLE.items() if row.slider is not None}


def snap_note(name: str, value: Any, specs: Mapping[str, SliderSpec] = SLIDERS) -> tuple[float, str] | None:
    """(snapped value, what to tell the user) when ``value`` is off ``name``'s steps, else None; ``specs``: the
    sliders of the model's family (``family_form.sliders_for``)."""
    spec = specs[name]
    if value is None or spec.on_step(value):
        return None
    snapped = spec.snap(value)
    return snapped, f"{LABELS[name]} moves in steps of {spec.step:g} from {spec.minimum:g}: {value:g} became {snapped:g}."


def off_step_problems(form: dict[str, Any], specs: Mapping[str, SliderSpec] = SLIDERS) -> list[str]:
    """What a request with a value between the steps of a slider must change, named by the label."""
    problems = []
    for name, spec in specs.items():
        value = form.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and not spec.on_step(value):
            problems.append(f"“{LABELS[name]}” moves in steps of {spec.step:g} from {spec.minimum:g}; "
                            f"{value:g} is not one of them: use {spec.snap(value):g}")
    return problems

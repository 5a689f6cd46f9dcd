"""The names the user sees for each setting, and conflicts said in those names with a one-click fix.

``RunSettings.problems`` speaks in field names (``window_frames``), which the CLI user types; the studio's
user knows the controls by their labels. One table (``LABELS``) names every control on the page and
turns the settings' messages into the page's words, so a label is changed in one place. ``suggest_fix``
knows, for the conflicts that have one obvious remedy, which control values resolve them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..settings_table import LOSSY_MARK, TABLE
from .form import BUDGET_GIB, GIF, MODEL

# Every control's label: the settings' from their table (settings_table), the form's own three here.
LABELS = {
    MODEL: "Model",
    **{name: row.studio_label for name, row in TABLE.items() if name != "extra"},
    BUDGET_GIB: "Custom budget (GB)",
    GIF: "Also write a GIF",
}
_SHORT = {name: label.removesuffix(LOSSY_MARK) for name, label in LABELS.items()}
# "model" and "gif" are form controls, not settings fields, and everyday words in messages ("a memory model").
_FIELDS = [name for name in _SHORT if name not in (MODEL, GIF)]
_FIELD = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _FIELDS), key=len, reverse=True)) + r")\b")


def short_label(name: str) -> str:
    """``name``'s label without its lossy mark, as a message quotes it."""
    return _SHORT[name]


def in_user_words(message: str) -> str:
    """``message`` with each setting's field name replaced by its label as the page shows it, in quotes."""
    return _FIELD.sub(lambda match: f"“{_SHORT[match[1]]}”", message)


@dataclass(frozen=True)
class Fix:
    """One click's worth of change: control values that resolve a conflict, and the button's words."""

    changes: dict[str, Any]

    @property
    def label(self) -> str:
        return "Fix: " + ", ".join(f"set {_SHORT[name]} to {value:g}" for name, value in self.changes.items())


def suggest_fix(form: dict[str, Any]) -> Fix | None:
    """The change that resolves the form's first conflict with one obvious remedy, else None.

    Remedies keep what the user chose last where they can: the window keeps its size and loses overlap,
    windows win over pruning (the windows set the memory), the maximum guidance is kept.
    """
    chunk, overlap = int(form.get("window_frames") or 0), int(form.get("overlap") or 0)
    if chunk and overlap >= chunk:
        return Fix({"overlap": max(chunk - 1, 0)})
    if float(form.get("prune_threshold") or 0) > 0 and 0 < chunk < int(form.get("num_frames") or 0):
        return Fix({"prune_threshold": 0})
    low, high = float(form.get("min_guidance_scale") or 0), float(form.get("max_guidance_scale") or 0)
    if low > high:
        return Fix({"min_guidance_scale": high})
    return None

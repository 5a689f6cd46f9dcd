"""Use these settings again in the studio: a dropped output (mp4 or run record JSON) -> the form's values.

The record holds the settings actually used (a VRAM budget's plan and out-of-memory re-plans
included), so the restored form reproduces the run, seed and model included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from ..media import MediaError, load_image
from ..monitor.record import ReuseError, load_reuse
from .form import MODEL, settings_to_form


@dataclass
class RestoredForm:
    """Control values to set (controls not named stay as they are), the input image if found, and the message."""

    values: dict[str, Any]
    image: PIL.Image.Image | None
    message: str


def restore_form(path: str | Path | None, names: list[str]) -> RestoredForm:
    """What dropping ``path`` onto the studio sets; ``ReuseError`` (nothing changes) for any other file."""
    if not path:
        raise ReuseError("no file was dropped; drop an mp4 made by LowVRAM Studio or its .json record")
    reused = load_reuse(path)
    values = settings_to_form(reused.settings, names)
    values[MODEL] = reused.model
    image = None
    notes = list(reused.notes)
    if reused.image is not None:
        try:
            image = load_image(reused.image)
        except MediaError as exc:
            notes.append(f"its input image could not be read ({exc})")
    if reused.image_note:
        notes.append(reused.image_note)
    message = "✔ " + reused.summary() + "." + "".join(f"\n\nℹ {note[0].upper()}{note[1:]}." for note in notes)
    return RestoredForm(values, image, message)

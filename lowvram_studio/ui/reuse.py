"""Use these settings again in the studio: a dropped output (mp4 or run record JSON) -> the form's values.

The record holds the settings actually used (a VRAM budget's plan and out-of-memory re-plans
included), so the restored form reproduces the run, seed and model included. A dropped record may come
from anyone who can reach the studio, so its input image is read back only from Gradio's upload folder
and the folders the studio serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio.utils
import PIL.Image

from ..media import MediaError, load_image
from ..models.source_family import WAN, source_family
from ..monitor.reuse import ReuseError, load_reuse
from ..settings import Precision, RunSettings
from .form import FP16_TOGGLES, MODEL, resolve_auto_precision, settings_to_form


@dataclass
class RestoredForm:
    """Control values to set (controls not named stay as they are), the input image if found, and the message."""

    values: dict[str, Any]
    image: PIL.Image.Image | None
    message: str


def restore_form(path: str | Path | None, names: list[str], served: Sequence[Path]) -> RestoredForm:
    """What dropping ``path`` onto the studio sets; ``ReuseError`` (nothing changes) for any other file.

    The record's input image is read only from Gradio's upload folder or ``served`` (the studio's output
    and asset folders): never another file of this machine.
    """
    if not path:
        raise ReuseError("no file was dropped; drop an mp4 made by LowVRAM Studio or its .json record")
    reused = load_reuse(path, image_folders=[Path(gradio.utils.get_upload_folder()), *served])
    settings, notes = _as_toggles(reused.settings, source_family(reused.model))
    notes += _without_controls(settings, names)
    values = settings_to_form(settings, names)
    values[MODEL] = reused.model
    image = None
    notes = [*reused.notes, *notes]
    if reused.image is not None:
        try:
            image = load_image(reused.image)
        except MediaError as exc:
            notes.append(f"its input image could not be read ({exc})")
    if reused.image_note:
        notes.append(reused.image_note)
    message = "✔ " + reused.summary() + "." + "".join(f"\n\nℹ {note}." for note in notes)
    return RestoredForm(values, image, message)


def _as_toggles(settings: RunSettings, family: str) -> tuple[RunSettings, list[str]]:
    """The studio's precision controls have no 'auto' (a CLI run): it is resolved as the engine resolves it on this
    machine (but a Wan encoder's auto is what its checkbox means); the VAE / encoder FP16 checkboxes cannot show
    bf16 / fp8, which a note says."""
    settings, changes = resolve_auto_precision(settings, keep=("encoder_dtype",) if family == WAN else ())
    notes = [f"{name} was auto; on this machine that is {value}, set explicitly" for name, value in changes.items()]
    other = [f"{name}={Precision(getattr(settings, name)).value}" for name in FP16_TOGGLES
             if Precision(getattr(settings, name)) not in (Precision.FP16, Precision.FP32, Precision.AUTO)]
    if other:
        notes.append(f"the studio's VAE / encoder FP16 switches cannot express {', '.join(other)}; they show FP32 here. "
                     "Run it with `lowvram-studio generate --from-record` to reproduce it exactly")
    return settings, notes


def _without_controls(settings: RunSettings, names: list[str]) -> list[str]:
    """A note naming recorded values the form has no control for (the studio runs their defaults)."""
    data, defaults = settings.to_dict(), RunSettings().to_dict()
    unshown = [f"{name}={data[name]}" for name in data if name not in names and data[name] != defaults[name]]
    if not unshown:
        return []
    return [f"the studio has no control for {', '.join(unshown)} and runs the default instead; "
            "use `lowvram-studio generate --from-record` to reproduce it exactly"]

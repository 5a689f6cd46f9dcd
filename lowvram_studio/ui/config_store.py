"""The studio's memory between starts: last used settings and named presets in the user's config folder.

One JSON file, ``studio.json``: ``{"version": 1, "last": {...}, "presets": {name: {...}}}`` where each
entry holds the RunSettings fields plus ``model``. A file that cannot be read is renamed aside
(``studio.json.corrupt-<time>``) and the studio starts from defaults with a warning; it never crashes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..userdirs import config_dir, data_dir

logger = logging.getLogger(__name__)

OUTPUTS_ENV = "LOWVRAM_STUDIO_OUTPUTS"
FILE_NAME = "studio.json"
STORE_VERSION = 1
MAX_PRESET_NAME = 60


class PresetError(ValueError):
    """A preset name or lookup the user can fix."""


def default_output_dir() -> Path:
    """Where videos go unless --outputs says otherwise; ``LOWVRAM_STUDIO_OUTPUTS`` overrides."""
    override = os.environ.get(OUTPUTS_ENV)
    return Path(override).expanduser() if override else data_dir() / "outputs"


@dataclass
class StoredConfig:
    """What was read at start: the last settings, the presets, and a warning for the user if any."""

    last: dict[str, Any] = field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    warning: str | None = None


class ConfigStore:
    """Reads and writes ``studio.json``; every write replaces the file atomically."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else config_dir()
        self.path = self.folder / FILE_NAME
        self._data = StoredConfig()

    def load(self) -> StoredConfig:
        """Read the file; a damaged one is set aside and reported in ``warning``."""
        if not self.path.exists():
            self._data = StoredConfig()
            return self._data
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("the top level is not a JSON object")
            last = raw.get("last", {})
            presets = raw.get("presets", {})
            if not isinstance(last, dict) or not isinstance(presets, dict):
                raise ValueError("'last' and 'presets' must be JSON objects")
            if not all(isinstance(v, dict) for v in presets.values()):
                raise ValueError("every preset must be a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self._data = StoredConfig(warning=self._set_aside(exc))
            return self._data
        self._data = StoredConfig(last=last, presets=presets)
        return self._data

    def _set_aside(self, problem: Exception) -> str:
        aside = self.path.with_name(f"{FILE_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            self.path.replace(aside)
        except OSError as exc:
            logger.warning("cannot move the damaged settings file %s aside: %s", self.path, exc)
            return (
                f"Your saved settings ({self.path}) could not be read ({problem}) nor moved aside ({exc.strerror}); "
                "the studio starts from defaults. Delete that file to silence this warning."
            )
        logger.warning("settings file %s was damaged (%s); moved to %s", self.path, problem, aside)
        return (
            f"Your saved settings could not be read ({problem}); the damaged file was moved to {aside} "
            "and the studio starts from defaults."
        )

    @property
    def data(self) -> StoredConfig:
        return self._data

    def save_last(self, values: dict[str, Any]) -> None:
        self._data.last = dict(values)
        self._write()

    def save_preset(self, name: str, values: dict[str, Any]) -> str:
        """Store ``values`` under ``name`` (trimmed); returns the name used."""
        name = (name or "").strip()
        if not name or len(name) > MAX_PRESET_NAME:
            raise PresetError(f"a preset needs a name of 1 to {MAX_PRESET_NAME} characters; type one first")
        self._data.presets[name] = dict(values)
        self._write()
        return name

    def preset(self, name: str) -> dict[str, Any]:
        try:
            return dict(self._data.presets[name])
        except KeyError as exc:
            raise PresetError(f"there is no preset named {name!r}; pick one from the list") from exc

    def delete_preset(self, name: str) -> None:
        if self._data.presets.pop(name, None) is None:
            raise PresetError(f"there is no preset named {name!r}; pick one from the list")
        self._write()

    def preset_names(self) -> list[str]:
        return sorted(self._data.presets)

    def _write(self) -> None:
        """Write through a temporary file and ``os.replace`` so a crash never leaves half a file."""
        payload = {"version": STORE_VERSION, "last": self._data.last, "presets": self._data.presets}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=".studio.", suffix=".json", dir=self.folder)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(payload, out, indent=2, sort_keys=True)
            os.replace(temp, self.path)
        except OSError as exc:
            # Not being able to remember settings must not stop a run; say so in the log.
            logger.warning("cannot save settings to %s: %s", self.path, exc)

"""Per-user folders outside any project: where the studio keeps what it can recompute (caches).

Config (settings, presets, the queue) lives in ``ui.config_store.config_dir()``; data that is
derived from models, such as fitted latent-preview projections, lives under ``data_dir()``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .ui.config_store import _platform_folder  # one place knows each OS's convention (see there)

DATA_ENV = "LOWVRAM_STUDIO_DATA_DIR"


def data_dir() -> Path:
    """The user's data folder (e.g. ~/.local/share/lowvram-studio); ``LOWVRAM_STUDIO_DATA_DIR`` overrides."""
    override = os.environ.get(DATA_ENV)
    return Path(override).expanduser() if override else _platform_folder("data")


def cache_dir() -> Path:
    """Recomputable files (deleting the folder only costs the time to recompute them)."""
    return data_dir() / "cache"

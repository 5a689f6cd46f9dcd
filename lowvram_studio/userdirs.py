"""Per-user folders outside any project, by each OS's convention, each with an environment override.

Config (settings, presets) lives in ``config_dir()``; the job queue, outputs and data derived from
models (fitted latent-preview projections) live under ``data_dir()``. Written by hand (a dozen
lines) rather than adding platformdirs for two paths.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP_NAME = "LowVRAM Studio"
CONFIG_ENV = "LOWVRAM_STUDIO_CONFIG_DIR"
DATA_ENV = "LOWVRAM_STUDIO_DATA_DIR"


def platform_folder(kind: str) -> Path:
    """The per-user folder for ``kind`` ('config' or 'data') by each OS's convention."""
    home = Path.home()
    if sys.platform == "win32":
        variable = "APPDATA" if kind == "config" else "LOCALAPPDATA"
        return Path(os.environ.get(variable, home / "AppData" / "Roaming")) / APP_NAME
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / APP_NAME
    if kind == "config":
        return Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "lowvram-studio"
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "lowvram-studio"


def config_dir() -> Path:
    """Where settings live; ``LOWVRAM_STUDIO_CONFIG_DIR`` overrides (tests, portable installs)."""
    override = os.environ.get(CONFIG_ENV)
    return Path(override).expanduser() if override else platform_folder("config")


def data_dir() -> Path:
    """The user's data folder (e.g. ~/.local/share/lowvram-studio); ``LOWVRAM_STUDIO_DATA_DIR`` overrides."""
    override = os.environ.get(DATA_ENV)
    return Path(override).expanduser() if override else platform_folder("data")


def cache_dir() -> Path:
    """Recomputable files (deleting the folder only costs the time to recompute them)."""
    return data_dir() / "cache"

"""Which model family a model source names, from metadata alone (model_index.json, safetensors headers): the
studio shapes its form to the family before anything is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .demo import DEMO_MODEL_NAME
from .discovery import SVD_PIPELINE_CLASS, folder_pipeline, hf_cache_dir, hf_snapshot
from .wan_split_set import TI2V_LATENT_CHANNELS, names_wan_split_set

SVD, WAN = "svd", "wan"


def wan_fps(vae_z_dim: int) -> int:
    """The frame rate a Wan model was made for: Wan2.2 TI2V 24 fps, Wan2.1 16 (told apart by the VAE)."""
    return 24 if vae_z_dim == TI2V_LATENT_CHANNELS else 16


def native_fps(source: str | None) -> int | None:
    """A Wan source's frame rate from its VAE's config.json (a ComfyUI set is Wan2.2 TI2V, the one that loads);
    None for SVD, whose frame rate is a conditioning the user picks."""
    if source_family(source) != WAN:
        return None
    config = local_folder(str(source)) / "vae" / "config.json"
    try:
        z_dim = json.loads(config.read_text(encoding="utf-8")).get("z_dim", TI2V_LATENT_CHANNELS)
    except (OSError, ValueError, AttributeError):  # a ComfyUI set has no config.json
        z_dim = TI2V_LATENT_CHANNELS
    return wan_fps(z_dim)


def local_folder(source: str) -> Path:
    """``source`` as a path; a Hugging Face id ("Wan-AI/Wan2.2-TI2V-5B-Diffusers") as its cached snapshot
    when one is cached (the loader never downloads either)."""
    path = Path(source).expanduser()
    parts = source.split("/")
    if path.exists() or len(parts) != 2 or not all(parts) or source.startswith((".", "~")):
        return path
    snapshot = hf_snapshot(hf_cache_dir(os.environ) / f"models--{parts[0]}--{parts[1]}")
    return snapshot or path


def source_family(source: str | None) -> str:
    """WAN for a diffusers folder whose model_index.json names a Wan pipeline or a ComfyUI Wan model (its
    transformer file or folder), else SVD (the demo, SVD folders, single files, a name not found: loading it
    says what is wrong with it); only headers are read."""
    text = (source or "").strip()
    if text in ("", DEMO_MODEL_NAME):
        return SVD
    path = local_folder(text)
    pipeline = folder_pipeline(path) if path.is_dir() else None
    if pipeline is None:
        return WAN if names_wan_split_set(path) else SVD
    return SVD if pipeline == SVD_PIPELINE_CLASS else WAN

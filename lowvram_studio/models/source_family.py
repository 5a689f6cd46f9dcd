"""Which model family a model source names, from metadata alone (model_index.json, safetensors headers): the
studio shapes its form to the family before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from .demo import DEMO_MODEL_NAME
from .discovery import SVD_PIPELINE_CLASS, folder_pipeline
from .wan_split_set import names_wan_split_set

SVD, WAN = "svd", "wan"


def source_family(source: str | None) -> str:
    """WAN for a diffusers folder whose model_index.json names a Wan pipeline or a ComfyUI Wan model (its
    transformer file or folder), else SVD (the demo, SVD folders, single files, a name not found: loading it
    says what is wrong with it); only headers are read."""
    text = (source or "").strip()
    if text in ("", DEMO_MODEL_NAME):
        return SVD
    path = Path(text).expanduser()
    pipeline = folder_pipeline(path) if path.is_dir() else None
    if pipeline is None:
        return WAN if names_wan_split_set(path) else SVD
    return SVD if pipeline == SVD_PIPELINE_CLASS else WAN

"""Which family a loaded diffusers pipeline belongs to, by its class (the one its model_index.json names)."""

from __future__ import annotations

from typing import Any

from .family import VideoFamily
from .svd import SvdFamily
from .wan import WanFamily

WAN_PIPELINES = ("WanImageToVideoPipeline",)


def family_for(pipeline: Any, name: str | None = None) -> VideoFamily:
    """``WanFamily`` for a Wan image-to-video pipeline, else ``SvdFamily`` (SVD, SVD-XT, the built-in demo)."""
    if type(pipeline).__name__ in WAN_PIPELINES:
        return WanFamily(pipeline, name or "wan")
    return SvdFamily(pipeline, name or "svd")

"""Which family a loaded diffusers pipeline belongs to, by its class (the one its model_index.json names)."""

from __future__ import annotations

from typing import Any

from .components import ComponentSource
from .family import VideoFamily
from .prompt_cache import PromptCache
from .svd import SvdFamily
from .wan import WanFamily

WAN_PIPELINES = ("WanImageToVideoPipeline",)


def family_for(pipeline: Any, name: str | None = None, prompt_cache: PromptCache | None = None,
               text_encoder_source: ComponentSource | None = None) -> VideoFamily:
    """``WanFamily`` for a Wan image-to-video pipeline, else ``SvdFamily`` (SVD, SVD-XT, the built-in demo).

    ``prompt_cache``: where a family steered by text keeps its prompt embeddings between runs;
    ``text_encoder_source``: its text encoder, when the loader left it on disk (``WanFamily``)."""
    if type(pipeline).__name__ in WAN_PIPELINES:
        return WanFamily(pipeline, name or "wan", prompt_cache, text_encoder_source)
    return SvdFamily(pipeline, name or "svd")

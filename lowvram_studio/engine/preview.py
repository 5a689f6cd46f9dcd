"""Live latent preview at run time: a 3x4 linear latent -> RGB projection applied to each step's x0.

Users want to watch the clip form while it denoises; a VAE decode per step would cost a decode's
memory and time. In SD-family VAEs a latent cell's colour is close to a linear function of its four
channels, which is what the community's "latent2rgb" previews rely on (ComfyUI's
``latent_formats.SD15.latent_rgb_factors``; Keturn, "decoding latents to RGB without upscaling",
discuss.huggingface.co/t/2600). The projection is data the model brings (``LatentRgb``, attached to the
pipeline by models/); fitting and storing it per model is models/latent_rgb.py's job.

The sampler shows the denoised estimate x0 of each step (the Euler step's ``pred_original_sample``),
not the noisy latents: x0 is what the clip will look like, the noisy latents are mostly noise until the
last steps. x0 is copied to the CPU and projected there, so the preview holds no GPU memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from .events import RunEvent

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PREVIEW_KEY = "preview"  # RunEvent.data key of a step's PreviewFrames (for live display, never recorded)
PREVIEW_MAX_SIDE = 128  # longer side of a preview frame in pixels (never more than the output)


@dataclass(frozen=True)
class LatentRgb:
    """RGB in [0, 1] = ``matrix`` @ latent + ``bias`` per latent cell; latents as the sampler holds them
    (VAE posterior mean x ``scaling_factor``). ``fit`` says what it was fitted on and how well."""

    matrix: tuple[tuple[float, float, float, float], ...]  # 3 rows (R, G, B) x 4 latent channels
    bias: tuple[float, float, float]
    vae_fingerprint: str
    fit: dict[str, Any] = field(default_factory=dict)

    def project(self, latents: np.ndarray) -> np.ndarray:
        """(F, C, h, w) latents -> (F, h, w, 3) float32 RGB, roughly in [0, 1] (not clamped)."""
        matrix = np.asarray(self.matrix, dtype=np.float32)
        rgb = np.einsum("fchw,rc->fhwr", np.asarray(latents, dtype=np.float32), matrix)  # no BLAS threads
        return rgb + np.asarray(self.bias, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "vae_fingerprint": self.vae_fingerprint,
            "matrix": [list(row) for row in self.matrix],
            "bias": list(self.bias),
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatentRgb":
        matrix = tuple(tuple(float(v) for v in row) for row in data["matrix"])
        bias = tuple(float(v) for v in data["bias"])
        if len(matrix) != 3 or any(len(row) != 4 for row in matrix) or len(bias) != 3:
            raise ValueError("matrix must be 3x4 and bias 3 long")
        return cls(matrix, bias, str(data["vae_fingerprint"]), dict(data.get("fit", {})))


@dataclass(frozen=True, eq=False)
class PreviewFrames:
    """One live preview: uint8 frames (F, H, W, 3) of the step's x0, and what making previews cost so far."""

    frames: np.ndarray
    step: int
    total: int
    ms: float  # this preview: copy to the CPU + project + upsample
    mean_ms: float  # mean over this run's previews so far
    count: int  # previews made in this run so far
    every: int


# ---- where the sampler finds the projection -----------------------------------------------------
def attach_latent_rgb(pipeline: Any, projection: LatentRgb) -> None:
    """Store the projection with the loaded pipeline, where the sampler finds it."""
    pipeline.latent_rgb = projection


def latent_rgb_of(pipeline: Any) -> LatentRgb | None:
    """The pipeline's projection; None for pipelines not built by models/ (e.g. benchmark builds)."""
    return getattr(pipeline, "latent_rgb", None)


# ---- the run side: make previews ----------------------------------------------------------------
def preview_frames(projection: LatentRgb, latents: np.ndarray, max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray:
    """(F, 4, h, w) latents -> uint8 (F, H, W, 3), resized so the longer side is ``max_side`` (or the
    output's, 8 px per latent cell, if smaller): bilinear up, area down.

    NumPy's einsum and OpenCV rather than torch (or BLAS) on purpose: those split these tiny ops over a
    thread pool, and on a CPU busy with the run that costs ~50 ms a preview instead of ~1 ms (measured
    on 2 cores). Colours are projected and rounded to uint8 at latent size, then resized: the same
    linear map on 1/64 of the values.
    """
    rgb = np.clip(projection.project(latents) * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    frames, h, w, _ = rgb.shape
    scale = min(8.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # OpenCV's (width, height)
    if size == (w, h):
        return rgb
    interpolation = cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA
    return np.stack([cv2.resize(frame, size, interpolation=interpolation) for frame in rgb])


class LivePreview:
    """Makes a run's previews every ``every`` denoise steps (and at the last) and times them."""

    def __init__(self, projection: LatentRgb | None, every: int):
        self.projection = projection
        self.every = every
        self.costs_ms: list[float] = []

    @classmethod
    def for_run(cls, pipeline: Any, every: int) -> "LivePreview":
        projection = latent_rgb_of(pipeline) if every > 0 else None
        if every > 0 and projection is None:
            logger.info("this pipeline has no latent preview projection (it was not loaded by "
                        "lowvram_studio.models); the run shows no live preview")
        return cls(projection, every)

    def due(self, step: int, total: int) -> bool:
        """Whether finished step ``step`` (1-based) of ``total`` gets a preview."""
        return self.projection is not None and (step % self.every == 0 or step == total)

    def capture(self, x0: torch.Tensor, step: int, total: int) -> PreviewFrames:
        """Copy the step's x0 (1, F, C, h, w) to the CPU (then to fp32 there) and project it."""
        started = time.perf_counter()
        latents = x0[0].detach().to("cpu").float().numpy()
        frames = preview_frames(self.projection, latents)
        self.costs_ms.append((time.perf_counter() - started) * 1000.0)
        return PreviewFrames(frames, step, total, self.costs_ms[-1], float(np.mean(self.costs_ms)),
                             len(self.costs_ms), self.every)

    def summary(self) -> dict[str, Any]:
        """The run record's ``info["preview"]``: how often, how many, and the cost per preview."""
        return {
            "every": self.every,
            "count": len(self.costs_ms),
            "ms_per_preview": round(float(np.mean(self.costs_ms)), 3) if self.costs_ms else None,
            "ms_max": round(max(self.costs_ms), 3) if self.costs_ms else None,
            "projection": None if self.projection is None else self.projection.vae_fingerprint,
        }


def split_preview(event: RunEvent) -> tuple[RunEvent, PreviewFrames | None]:
    """The event without its preview frames (to keep or record) and the frames (to show once)."""
    preview = event.data.get(PREVIEW_KEY)
    if preview is None:
        return event, None
    data = {k: v for k, v in event.data.items() if k != PREVIEW_KEY}
    return RunEvent(event.phase, event.time, event.step, event.total, event.message, data), preview

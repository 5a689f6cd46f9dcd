"""Live latent preview: a 3x4 linear latent -> RGB projection, fitted against the model's own VAE.

Users want to watch the clip form while it denoises; a VAE decode per step would cost a decode's
memory and time. In SD-family VAEs a latent cell's colour is close to a linear function of its four
channels, which is what the community's "latent2rgb" previews rely on (ComfyUI's
``latent_formats.SD15.latent_rgb_factors``; Keturn, "decoding latents to RGB without upscaling",
discuss.huggingface.co/t/2600). We do not copy anyone's factors: ``fit_latent_rgb`` finds them per
model by least squares against its real VAE, and the result is stored with the model, keyed by a
fingerprint of the VAE weights so that retrained weights are never previewed with stale factors.

The sampler shows the denoised estimate x0 of each step (the Euler step's ``pred_original_sample``),
not the noisy latents: x0 is what the clip will look like, the noisy latents are mostly noise until the
last steps. x0 is copied to the CPU and projected there, so the preview holds no GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..demo_training.procedural import ClipSpec, MotionClass, make_clip
from ..media import fit_image, load_image
from .events import RunEvent

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILE_NAME = "latent_rgb.json"
PREVIEW_KEY = "preview"  # RunEvent.data key of a step's PreviewFrames (for live display, never recorded)
PREVIEW_MAX_SIDE = 128  # longer side of a preview frame in pixels (never more than the output)
FIT_SIZE = 64  # fitting pictures are this many pixels square: the full SVD VAE fits on six in ~2.2 s on 2 cores
FINGERPRINT_SAMPLES = 1 << 16  # values hashed per weight tensor (evenly strided); see vae_fingerprint
ASSETS = Path(__file__).resolve().parents[2] / "assets"
# Procedural fitting scenes: each class brings its own cue shape, background texture and colours.
FIT_SCENES: tuple[tuple[int, MotionClass], ...] = (
    (11, MotionClass.STILL),
    (12, MotionClass.ROTATE),
    (13, MotionClass.ZOOM_IN),
    (14, MotionClass.PAN_LEFT),
)


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

    def save(self, path: Path) -> Path:
        """Write atomically, so a reader never sees half a file."""
        from ..monitor.record import write_text_atomic  # here, not at the top: the sampler needs no monitor

        return write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "LatentRgb | None":
        """The projection stored at ``path``, or None (with a log line) when it is missing or unreadable."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("latent preview projection %s cannot be read (%s); it will be fitted again", path, exc)
            return None


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


# ---- the model side: fingerprint, fit, store ----------------------------------------------------
def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of the VAE's weights: names, shapes and up to 65,536 evenly strided values per tensor,
    as fp16 (so fp32 and fp16 copies of the same weights agree). Sampling keeps it at 0.03 s for the
    98 M-parameter SVD VAE on 2 cores; retraining or fine-tuning changes every sampled tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, math.ceil(flat.numel() / FINGERPRINT_SAMPLES))
        sample = flat[::stride].to("cpu", torch.float16).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def fitting_images(size: int = FIT_SIZE) -> np.ndarray:
    """uint8 (N, size, size, 3): procedural scenes (lowvram_studio.demo_training.procedural) and the
    example pictures in assets/, the same on every call."""
    images = [make_clip(seed, ClipSpec(num_frames=2, size=size), motion).frames[0] for seed, motion in FIT_SCENES]
    for path in sorted(ASSETS.glob("*.png")):
        images.append(np.asarray(fit_image(load_image(path), size, size), dtype=np.uint8))
    return np.stack(images)


def _fp32_cpu(vae: torch.nn.Module) -> torch.nn.Module:
    """The VAE itself when it is fp32 on the CPU (as models/ load it), else an fp32 CPU copy: fitting
    must neither touch the GPU nor depend on fp16 CPU kernels."""
    first = next(vae.parameters())
    if first.dtype == torch.float32 and first.device.type == "cpu":
        return vae
    return copy.deepcopy(vae).to("cpu", torch.float32)


def fit_latent_rgb(vae: torch.nn.Module, images: np.ndarray | Sequence[np.ndarray]) -> LatentRgb:
    """Least squares from VAE latents to the RGB the VAE decodes them to.

    ``images``: uint8 (N, H, W, 3), H and W multiples of 8. Latents are the encoder's posterior means
    x ``scaling_factor`` (the sampler's latent space). Each latent cell is paired with the area-average
    of the 8x8 pixels the decoder makes of it; [matrix | bias] minimises the squared RGB error over all
    cells (numpy.linalg.lstsq). The target is the decode, not the input picture, because the preview
    stands in for the decode: for a faithful VAE the two agree, for a blurry one (the demo's) the
    decode-fitted projection is the closer preview (measured in tests/test_preview.py).
    """
    started = time.perf_counter()
    model = _fp32_cpu(vae)
    scale = float(model.config.scaling_factor)
    pixels = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).permute(0, 3, 1, 2) * 2.0 - 1.0
    with torch.inference_mode():
        latents = model.encode(pixels).latent_dist.mean * scale  # (N, 4, h, w)
        decoded = model.decode(latents / scale, num_frames=1).sample  # each picture a one-frame clip
    n, channels, h, w = latents.shape
    decoded = (decoded.clamp(-1.0, 1.0) / 2.0 + 0.5).permute(0, 2, 3, 1).numpy()
    targets = np.stack([cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA) for image in decoded])
    design = latents.permute(0, 2, 3, 1).reshape(-1, channels).double().numpy()
    design = np.concatenate([design, np.ones((design.shape[0], 1))], axis=1)
    targets = targets.reshape(-1, 3).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, targets, rcond=None)
    residual = design @ solution - targets
    fit = {
        "images": n,
        "size": [int(pixels.shape[2]), int(pixels.shape[3])],
        "cells": int(design.shape[0]),
        "target": "vae decode",
        "rmse": round(float(np.sqrt(np.mean(residual**2))), 5),
        "seconds": round(time.perf_counter() - started, 3),
    }
    matrix = tuple(tuple(round(float(v), 6) for v in row) for row in solution[:channels].T)
    bias = tuple(round(float(v), 6) for v in solution[channels])
    return LatentRgb(matrix, bias, vae_fingerprint(vae), fit)


def load_or_fit_latent_rgb(vae: torch.nn.Module, path: Path, save: bool) -> LatentRgb:
    """The projection stored at ``path`` when it was fitted on these VAE weights, else a fresh fit
    (written to ``path`` when ``save``; a cache that cannot be written only costs a refit next time)."""
    fingerprint = vae_fingerprint(vae)
    stored = LatentRgb.load(path)
    if stored is not None and stored.vae_fingerprint == fingerprint:
        return stored
    if stored is not None:
        logger.warning(
            "the latent preview projection in %s was fitted on other VAE weights (%s, these are %s); "
            "fitting it again for this session%s",
            path, stored.vae_fingerprint, fingerprint,
            "" if save else " (run python -m lowvram_studio.engine.preview --fit-demo to update the file)",
        )
    projection = fit_latent_rgb(vae, fitting_images())
    logger.info("fitted the latent preview projection in %.1f s (RMSE %.3f)", projection.fit["seconds"],
                projection.fit["rmse"])
    if save:
        try:
            projection.save(path)
        except OSError as exc:
            logger.warning("cannot cache the latent preview projection at %s (%s); it is refitted next time", path, exc)
    return projection


def cached_projection_path(cache_dir: Path, fingerprint: str) -> Path:
    """Where a user model's projection is cached: one file per VAE fingerprint."""
    return Path(cache_dir) / "latent_rgb" / f"{fingerprint.removeprefix('sha256:')}.json"


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


# ---- python -m lowvram_studio.engine.preview --fit-demo ------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Refit the demo model's projection against its current VAE weights and rewrite the shipped JSON."""
    parser = argparse.ArgumentParser(prog="python -m lowvram_studio.engine.preview", description=main.__doc__)
    parser.add_argument("--fit-demo", action="store_true", required=True,
                        help="fit against assets/demo-model/vae.safetensors and write assets/demo-model/latent_rgb.json")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..models.demo import DEFAULT_WEIGHTS_DIR, build_demo_pipeline, demo_model_info

    if not demo_model_info().trained:
        logger.error("error: trained demo weights not found in %s; restore them first", DEFAULT_WEIGHTS_DIR)
        return 2
    vae = build_demo_pipeline(with_preview=False).vae
    projection = fit_latent_rgb(vae, fitting_images())
    path = projection.save(DEFAULT_WEIGHTS_DIR / FILE_NAME)
    logger.info("wrote %s: VAE %s, RMSE %.4f on %d images in %.1f s", path, projection.vae_fingerprint,
                projection.fit["rmse"], projection.fit["images"], projection.fit["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The model side of the live preview: fit each model's latent -> RGB projection against its own VAE and
store it with the model, keyed by a fingerprint of the VAE weights, so that retrained weights are never
previewed with stale factors. We do not copy anyone's factors (see engine/preview.py for the idea's
sources): ``fit_latent_rgb`` finds them per model by least squares against the model's real VAE.
The shipped demo model's projection is refitted with ``python -m lowvram_studio.models.fit_demo_preview``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from ..demo_training.procedural import ClipSpec, MotionClass, make_clip
from ..engine.fingerprint import weights_fingerprint
from ..engine.preview import LatentRgb
from ..media import fit_image, load_image
from ..monitor.record import write_text_atomic

logger = logging.getLogger(__name__)

FILE_NAME = "latent_rgb.json"
FIT_SIZE = 64  # fitting pictures are this many pixels square: the full SVD VAE fits on six in ~2.2 s on 2 cores
ASSETS = Path(__file__).resolve().parents[2] / "assets"
# Procedural fitting scenes: each class brings its own cue shape, background texture and colours.
FIT_SCENES: tuple[tuple[int, MotionClass], ...] = (
    (11, MotionClass.STILL),
    (12, MotionClass.ROTATE),
    (13, MotionClass.ZOOM_IN),
    (14, MotionClass.PAN_LEFT),
)


def save_latent_rgb(projection: LatentRgb, path: Path) -> Path:
    """Write atomically, so a reader never sees half a file."""
    return write_text_atomic(Path(path), json.dumps(projection.to_dict(), indent=2) + "\n")


def load_latent_rgb(path: Path) -> LatentRgb | None:
    """The projection stored at ``path``, or None (with a log line) when it is missing or unreadable."""
    try:
        return LatentRgb.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("latent preview projection %s cannot be read (%s); it will be fitted again", path, exc)
        return None


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
    return LatentRgb(matrix, bias, weights_fingerprint(vae), fit)


def load_or_fit_latent_rgb(vae: torch.nn.Module, path: Path, save: bool) -> LatentRgb:
    """The projection stored at ``path`` when it was fitted on these VAE weights, else a fresh fit
    (written to ``path`` when ``save``; a cache that cannot be written only costs a refit next time)."""
    fingerprint = weights_fingerprint(vae)
    stored = load_latent_rgb(path)
    if stored is not None and stored.vae_fingerprint == fingerprint:
        return stored
    if stored is not None:
        logger.warning(
            "the latent preview projection in %s was fitted on other VAE weights (%s, these are %s); "
            "fitting it again for this session%s",
            path, stored.vae_fingerprint, fingerprint,
            "" if save else " (run python -m lowvram_studio.models.fit_demo_preview to update the file)",
        )
    projection = fit_latent_rgb(vae, fitting_images())
    logger.info("fitted the latent preview projection in %.1f s (RMSE %.3f)", projection.fit["seconds"],
                projection.fit["rmse"])
    if save:
        try:
            save_latent_rgb(projection, path)
        except OSError as exc:
            logger.warning("cannot cache the latent preview projection at %s (%s); it is refitted next time", path, exc)
    return projection


def cached_projection_path(cache_dir: Path, fingerprint: str) -> Path:
    """Where a user model's projection is cached: one file per VAE fingerprint."""
    return Path(cache_dir) / "latent_rgb" / f"{fingerprint.removeprefix('sha256:')}.json"

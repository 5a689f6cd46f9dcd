"""Temporal windows (the write-up's "time chunk"): denoise a clip in overlapping windows of frames.

The SVD UNet takes its frame count from the input (``UNetSpatioTemporalConditionModel.forward``
reads ``batch_size, num_frames = sample.shape[:2]``), so a window is simply a shorter clip: every
window sees the same image embedding, motion/fps time ids and image latents, and the per-frame
guidance scale of its own frames. Each step's noise prediction is the blend of the windows'
predictions, weighted per frame and normalised so the weights of every frame sum to one.

Peak memory follows the window length, not the clip length, so clips longer than the model's native
frame count (96 frames from SVD-XT) run at the peak of one window. Windows are lossy (DESIGN §3):
temporal attention only sees the frames of its window. To keep the seams from sitting at the same
frames in every step, window offsets shift each step (FreeNoise, Qiu et al. 2023,
arXiv:2310.15169, fuses overlapping windows the same way; its "pyramid" weights are Eq. 9 there and
``FreeNoiseTransformerBlock._get_frame_weights`` in diffusers). diffusers has no such windowing for
SVD (its FreeNoise lives inside AnimateDiff's motion blocks), so the scheduling is written here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .options import WindowBlend

logger = logging.getLogger(__name__)

# One step's windows visit this many offsets before repeating (see ``window_starts``).
SHIFT_PHASES = 3

PredictFn = Callable[[torch.Tensor, slice], torch.Tensor]


@dataclass(frozen=True)
class WindowConfig:
    """size: frames per window (0 = whole clip). overlap: frames shared by neighbours. shift: move offsets per step."""

    size: int = 0
    overlap: int = 2
    blend: WindowBlend = WindowBlend.PYRAMID
    shift: bool = True

    def active(self, num_frames: int) -> bool:
        """Windows only change anything when they are shorter than the clip."""
        return 0 < self.size < num_frames

    @property
    def stride(self) -> int:
        return max(self.size - self.overlap, 1)


def window_starts(num_frames: int, step_index: int, config: WindowConfig) -> list[int]:
    """First frame of every window in step ``step_index``; windows are ``config.size`` long and cover every frame.

    The grid of starts (one every ``stride`` frames) moves back by ``phase * stride / SHIFT_PHASES`` frames
    each step. A window that would start before frame 0 or end after the last frame is clamped inside the
    clip (it keeps its full length and overlaps its neighbour more) rather than wrapped around: frames from
    the end and the start of a clip are not neighbours in time, and temporal attention would treat them so.
    """
    if not config.active(num_frames):
        return [0]
    stride, size = config.stride, config.size
    phases = min(SHIFT_PHASES, stride) if config.shift else 1
    offset = (step_index % phases) * stride // phases
    last = num_frames - size
    starts = []
    grid = -offset
    while True:
        start = min(max(grid, 0), last)
        if not starts or start > starts[-1]:
            starts.append(start)
        if start == last:
            return starts
        grid += stride


def blend_weights(length: int, config: WindowConfig, at_clip_start: bool, at_clip_end: bool) -> torch.Tensor:
    """Unnormalised weight of each frame of one window (float64, all > 0).

    flat: 1 everywhere. pyramid: rises to the middle and falls again (FreeNoise Eq. 9), so a frame leans
    on the window where it sits most central. linear: 1 inside, ramps over the overlap at edges that meet
    another window (not at the clip's own ends, where no other window can take over).
    """
    if config.blend == WindowBlend.FLAT:
        return torch.ones(length, dtype=torch.float64)
    index = torch.arange(length, dtype=torch.float64)
    if config.blend == WindowBlend.PYRAMID:
        return torch.minimum(index + 1, length - index)
    ramp = max(min(config.overlap, length // 2), 1)
    weight = torch.ones(length, dtype=torch.float64)
    if not at_clip_start:
        weight = torch.minimum(weight, (index + 1) / (ramp + 1))
    if not at_clip_end:
        weight = torch.minimum(weight, (length - index) / (ramp + 1))
    return weight


def frame_weights(num_frames: int, step_index: int, config: WindowConfig) -> list[tuple[slice, torch.Tensor]]:
    """Each window of the step as (frames, normalised per-frame weights); the weights of every frame sum to 1.

    A frame that only one window covers gets exactly 1.0, so a single window spanning the clip
    reproduces the plain prediction bit for bit.
    """
    starts = window_starts(num_frames, step_index, config)
    length = min(config.size, num_frames) if config.active(num_frames) else num_frames
    raw = []
    total = torch.zeros(num_frames, dtype=torch.float64)
    for start in starts:
        weight = blend_weights(length, config, at_clip_start=start == 0, at_clip_end=start + length == num_frames)
        raw.append((slice(start, start + length), weight))
        total[start : start + length] += weight
    return [(frames, weight / total[frames]) for frames, weight in raw]


def windowed_noise_prediction(
    predict_fn: PredictFn, latents: torch.Tensor, step_index: int, config: WindowConfig
) -> torch.Tensor:
    """The step's noise prediction for latents ``(B, F, C, h, w)``, window by window.

    ``predict_fn(latent_slice, frames)`` returns the guided prediction for ``latents[:, frames]``; it slices
    its own per-frame conditioning (image latents, guidance scale) with the same ``frames``. Without
    active windows it is called once on the whole clip.
    """
    num_frames = latents.shape[1]
    if not config.active(num_frames):
        return predict_fn(latents, slice(0, num_frames))
    out = None
    for frames, weight in frame_weights(num_frames, step_index, config):
        piece = predict_fn(latents[:, frames], frames)
        if out is None:
            out = torch.zeros((latents.shape[0], num_frames, *piece.shape[2:]), dtype=piece.dtype, device=piece.device)
        out[:, frames] += piece * weight.to(device=piece.device, dtype=piece.dtype).view(1, -1, 1, 1, 1)
        del piece
    return out


def window_boundaries(num_frames: int, step_index: int, config: WindowConfig) -> list[int]:
    """Frames ``t`` where a window begins or ends between frame ``t - 1`` and ``t`` (0 < t < num_frames)."""
    if not config.active(num_frames):
        return []
    found = set()
    for start in window_starts(num_frames, step_index, config):
        found.update(t for t in (start, start + config.size) if 0 < t < num_frames)
    return sorted(found)


def seam_ratio(frames: np.ndarray, boundaries: list[int]) -> float | None:
    """Mean frame-to-frame change across window boundaries divided by the mean change inside windows.

    ``frames`` is the decoded clip ``(F, H, W, 3)``; ``boundaries`` as ``window_boundaries`` gives them
    (use the last step's: its windows shape the finest detail). About 1.0 means seams are invisible in
    the motion statistics; well above 1 means jumps at the seams. None without boundaries or interior.
    """
    if not boundaries or len(frames) < 3:
        return None
    change = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=tuple(range(1, frames.ndim)))
    at_seam = np.zeros(len(change), dtype=bool)
    at_seam[[t - 1 for t in boundaries]] = True
    if at_seam.all():
        return None
    inside = float(change[~at_seam].mean())
    return float(change[at_seam].mean() / inside) if inside > 0 else None


def describe_windows(num_frames: int, config: WindowConfig) -> dict[str, Any]:
    """Run-record entry: the window layout of the first step."""
    return {
        "size": config.size,
        "overlap": config.overlap,
        "blend": config.blend.value,
        "shift": config.shift,
        "windows_per_step": len(window_starts(num_frames, 0, config)),
    }

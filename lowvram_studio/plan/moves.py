"""The planner's moves: each tightens one setting (lossless ones first, then lossy ones by fidelity cost,
DESIGN §3) and can loosen it again towards the request (the planner's relax pass), with the one-line
reason the UI shows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.dims import ModelDims
from ..engine.events import Phase
from ..engine.options import OffloadMode, Precision
from ..settings import RunSettings
from .memory_model import PHASES, window_frames


@dataclass(frozen=True)
class Move:
    """One tightening: ``apply`` returns the tighter settings, or None when it no longer applies;
    ``loosen(settings, request)`` lists the looser settings between them and the request, loosest first."""

    name: str
    lossy: bool
    phases: tuple[Phase, ...]
    apply: Callable[[RunSettings, ModelDims], RunSettings | None]
    reason: Callable[[RunSettings, ModelDims], str]
    loosen: Callable[[RunSettings, RunSettings], list[RunSettings]]


def _next_level(current: int, levels: tuple[int, ...], limit: int) -> int | None:
    """The next tighter level below ``current`` (0 = off = loosest) and below ``limit`` (beyond it, no effect)."""
    for level in levels:
        if level < limit and (current == 0 or level < current):
            return level
    return None


def _level_move(name: str, levels: tuple[int, ...], limit: Callable[[RunSettings, ModelDims], int]):
    def apply(settings: RunSettings, dims: ModelDims) -> RunSettings | None:
        level = _next_level(getattr(settings, name), levels, limit(settings, dims))
        return None if level is None else settings.replace(**{name: level})

    return apply


def _level_loosen(name: str, levels: tuple[int, ...]) -> Callable[[RunSettings, RunSettings], list[RunSettings]]:
    """The request's own level, then the ladder's levels between it and the current one, loosest first."""
    def loosen(settings: RunSettings, request: RunSettings) -> list[RunSettings]:
        current, asked = getattr(settings, name), getattr(request, name)
        if current == asked:
            return []
        between = [level for level in levels if level > current and (asked == 0 or level < asked)]
        return [settings.replace(**{name: level}) for level in (asked, *between)]

    return loosen


def _undo(*names: str) -> Callable[[RunSettings, RunSettings], list[RunSettings]]:
    """Loosening back to the request's values of ``names``, the only looser setting of an on/off move."""
    def loosen(settings: RunSettings, request: RunSettings) -> list[RunSettings]:
        asked = {name: getattr(request, name) for name in names}
        return [] if all(getattr(settings, n) == v for n, v in asked.items()) else [settings.replace(**asked)]

    return loosen


def _window_length(latent_frames: int, dims: ModelDims) -> str:
    """A window's length as the user counts it: SVD's frames; Wan's latent frames, with the frames they make."""
    if dims.temporal_scale == 1:
        return f"{latent_frames} frames"
    return f"{latent_frames} latent frames ({(latent_frames - 1) * dims.temporal_scale + 1} frames)"


def _fitting_overlap(settings: RunSettings, request_overlap: int) -> RunSettings:
    """Windows overlap by fewer frames than they hold: the request's overlap, cut to the window's length - 1."""
    if not settings.window_frames:
        return settings.replace(overlap=request_overlap)
    return settings.replace(overlap=min(request_overlap, settings.window_frames - 1))


def _with_fitting_overlap(apply: Callable[[RunSettings, ModelDims], RunSettings | None]):
    def windows(settings: RunSettings, dims: ModelDims) -> RunSettings | None:
        tighter = apply(settings, dims)
        return None if tighter is None else _fitting_overlap(tighter, settings.overlap)

    return windows


def _windows_loosen(settings: RunSettings, request: RunSettings) -> list[RunSettings]:
    return [_fitting_overlap(looser, request.overlap)
            for looser in _level_loosen("window_frames", WINDOW_LEVELS)(settings, request)]


def _cfg_split(settings: RunSettings, dims: ModelDims) -> RunSettings | None:
    return settings.replace(cfg_split=True) if settings.guidance_enabled and not settings.cfg_split else None


def _offload(mode: OffloadMode) -> Callable[[RunSettings, ModelDims], RunSettings | None]:
    order = list(OffloadMode)

    def apply(settings: RunSettings, dims: ModelDims) -> RunSettings | None:
        return settings.replace(offload=mode) if order.index(settings.offload) < order.index(mode) else None

    return apply


def _offload_loosen(mode: OffloadMode) -> Callable[[RunSettings, RunSettings], list[RunSettings]]:
    """From ``mode`` back to the request's offload mode, or to any mode between them, loosest first."""
    order = list(OffloadMode)

    def loosen(settings: RunSettings, request: RunSettings) -> list[RunSettings]:
        if settings.offload != mode:
            return []
        modes = order[order.index(request.offload):order.index(mode)]
        return [settings.replace(offload=looser) for looser in modes]

    return loosen


def _vae_bf16(settings: RunSettings, dims: ModelDims) -> RunSettings | None:
    return settings.replace(vae_dtype=Precision.BF16) if settings.vae_dtype in (Precision.FP32, Precision.AUTO) else None


def _fp8(settings: RunSettings, dims: ModelDims) -> RunSettings | None:
    return None if settings.unet_dtype == Precision.FP8 else settings.replace(unet_dtype=Precision.FP8)


def _halve_frames(settings: RunSettings) -> RunSettings:
    return settings.replace(interpolate=settings.interpolate * 2, num_frames=math.ceil(settings.num_frames / 2))


def _interpolate(settings: RunSettings, dims: ModelDims) -> RunSettings | None:
    if settings.interpolate >= 4 or settings.num_frames < 4:
        return None
    halved = _halve_frames(settings)  # a clip the model can make: Wan's are 4k+1 frames
    return halved if (halved.num_frames - 1) % dims.temporal_scale == 0 else None


def _interpolate_loosen(settings: RunSettings, request: RunSettings) -> list[RunSettings]:
    """The request's frame count, then each halving the ladder took on the way, loosest first."""
    looser = []
    step = request
    while step.interpolate < settings.interpolate:
        looser.append(settings.replace(interpolate=step.interpolate, num_frames=step.num_frames))
        step = _halve_frames(step)
    return looser


# The levels each chunking move steps through, loosest first (0 = off is looser than any)
FF_LEVELS, SPATIAL_LEVELS, TEMPORAL_LEVELS = (16384, 4096), (4, 1), (2048, 512)
TILE_LEVELS, DECODE_LEVELS, WINDOW_LEVELS = (512, 256, 128), (8, 4, 2, 1), (16, 12, 8, 6, 4, 2)

# Priority order: lossless first (cheapest slowdown first), then lossy by fidelity cost (DESIGN §3).
MOVES: tuple[Move, ...] = (
    Move("cfg_split", False, (Phase.DENOISE,), _cfg_split,
         lambda s, d: "CFG split: the two guidance branches run one after the other, halving UNet activations (lossless)",
         _undo("cfg_split")),
    Move("ff_chunk", False, (Phase.DENOISE,), _level_move("ff_chunk", FF_LEVELS, lambda s, d: 1 << 62),
         lambda s, d: f"feed-forward chunks of {s.ff_chunk} tokens: the widest UNet layers run in pieces (lossless)",
         _level_loosen("ff_chunk", FF_LEVELS)),
    Move("spatial_chunk", False, (Phase.DENOISE,),
         _level_move("spatial_chunk", SPATIAL_LEVELS, lambda s, d: 2 * window_frames(s, d)),
         lambda s, d: f"spatial layers {s.spatial_chunk} frame(s) at a time (lossless)",
         _level_loosen("spatial_chunk", SPATIAL_LEVELS)),
    Move("temporal_chunk", False, (Phase.DENOISE,),
         _level_move("temporal_chunk", TEMPORAL_LEVELS, lambda s, d: d.tokens_per_latent_frame(s.height, s.width)),
         lambda s, d: f"temporal layers {s.temporal_chunk} positions at a time (lossless)",
         _level_loosen("temporal_chunk", TEMPORAL_LEVELS)),
    Move("offload_model", False, PHASES, _offload(OffloadMode.MODEL),
         lambda s, d: "model offload: only the component at work stays on the GPU (lossless, a few s per run)",
         _offload_loosen(OffloadMode.MODEL)),
    Move("offload_stream", False, (Phase.ENCODE, Phase.DENOISE), _offload(OffloadMode.STREAM),
         lambda s, d: "weight streaming: UNet blocks stream in one at a time (lossless, slower per step)",
         _offload_loosen(OffloadMode.STREAM)),
    Move("vae_tile", True, (Phase.DECODE,),
         _level_move("vae_tile", TILE_LEVELS, lambda s, d: max(s.height, s.width)),
         lambda s, d: f"VAE decode in {s.vae_tile} px tiles (lossy: blended tile seams)",
         _level_loosen("vae_tile", TILE_LEVELS)),
    Move("vae_bf16", True, (Phase.ENCODE, Phase.DECODE), _vae_bf16,
         lambda s, d: "VAE in bf16, half its weights and activations (lossy: 8 mantissa bits; Wan ships its VAE in fp32)",
         _undo("vae_dtype")),
    Move("decode_frames", True, (Phase.DECODE,),
         _level_move("decode_frames", DECODE_LEVELS, lambda s, d: s.num_frames),
         lambda s, d: f"decode {s.decode_frames} frame(s) at a time (lossy: the temporal decoder sees fewer frames)",
         _level_loosen("decode_frames", DECODE_LEVELS)),
    Move("window_frames", True, (Phase.DENOISE,),
         _with_fitting_overlap(_level_move("window_frames", WINDOW_LEVELS,
                                           lambda s, d: min(d.latent_frames(s.num_frames), d.native_frames + 1))),
         lambda s, d: f"temporal windows of {_window_length(s.window_frames, d)} (lossy: motion is coherent within a window)",
         _windows_loosen),
    Move("fp8", True, PHASES, _fp8, lambda s, d: "UNet weights stored in fp8, computed in 16 bit (lossy)",
         _undo("unet_dtype")),
    Move("interpolate", True, (Phase.DENOISE, Phase.DECODE), _interpolate,
         lambda s, d: f"generate {s.num_frames} frames and interpolate {s.interpolate}x (lossy: in-between frames are synthesised)",
         _interpolate_loosen),
)


# The moves a family's model can take, by family kind: Wan's transformer has no UNet layers for spatial /
# temporal chunks, and its VAE decodes frame by frame whatever decode_frames says; SVD's VAE stays in fp32
# unless the user asks (its fp16 decode is known to overflow), so only Wan's VAE may be halved, on a card
# with bf16 (``Planner``).
FAMILY_MOVES = {
    "svd": tuple(move.name for move in MOVES if move.name != "vae_bf16"),
    "wan": tuple(move.name for move in MOVES if move.name not in ("spatial_chunk", "temporal_chunk", "decode_frames")),
}

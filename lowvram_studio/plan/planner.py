"""Fit a run into a VRAM budget: a memory model of the process peak, and a planner that tightens settings.

The memory model predicts the process peak (MiB, DESIGN §3) of each phase of a run as

    context + overhead + weights resident in the phase + activations of the phase

with activations linear in a few sizes: UNet latent tokens x frames per window x CFG branches (skip
connections, spatial, feed-forward and temporal transients, each shrunk by its chunking), VAE encode
pixels, VAE decode pixels x frames per decode call (or per tile), and the decoded output. The run's
peak is the largest phase. Coefficients live in ``memory_model.json``; ``calibrate`` re-fits them
from benchmark rows (``bench/planner.py``) by least squares.

The planner walks a ladder of moves, lossless ones first, then lossy ones in order of fidelity cost
(DESIGN §3), always taking the first move in that order that lowers the predicted peak, and stops at
the first rung that fits the budget: so a smaller budget never reaches a looser rung. The ladder
serves the phase that sets the peak at each rung, so an early move can turn out unneeded once later
ones lowered the other phases (SVD-XT at 8 GB: 128 px VAE tiles taken before weight streaming); a
relax pass then loosens such moves again, lossy ones first, while the plan still fits. Each move
carries the one-line reason the UI shows. The same moves, restricted to the phase that failed, are
the next tighter plan after a real out-of-memory error (plan/replan.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.dims import ModelDims
from ..engine.events import Phase
from ..engine.options import HalfCompute, OffloadMode, Precision
from ..engine.precision import GpuInfo, execution_path
from ..engine.speed_model import CardSpeed
from ..settings import RunSettings, budget_gib
from ..settings_adapter import step_config

logger = logging.getLogger(__name__)

MIB = 2**20
MEMORY_MODEL_PATH = Path(__file__).with_name("memory_model.json")
# Each family's memory model, by ``ModelDims.kind``: a family without one gets no VRAM budget (jobs.budget_refusal)
MEMORY_MODEL_PATHS = {"svd": MEMORY_MODEL_PATH, "wan": Path(__file__).with_name("memory_model_wan.json")}
PHASES = (Phase.ENCODE, Phase.DENOISE, Phase.DECODE)


# Counted on the SVD-XT configs of models/svd_configs.py (meta device); SVD differs only in native frames.
SVD_XT_DIMS = ModelDims("svd-xt", 1_524_623_082, 97_742_847, 632_076_800, 205_388_486, 25)
SVD_DIMS = replace(SVD_XT_DIMS, name="svd", native_frames=14)


# ---- the memory model ---------------------------------------------------------------------------
def _storage_bytes(precision: Precision, device_type: str) -> int:
    if precision == Precision.AUTO:
        return 2 if device_type == "cuda" else 4
    return {Precision.FP32: 4, Precision.FP16: 2, Precision.BF16: 2, Precision.FP8: 1}[precision]


def _compute_bytes(precision: Precision, device_type: str, settings: RunSettings, auto_fp32_compute: bool) -> int:
    """Bytes per activation element. fp8 is storage only (layerwise casting computes in 16 bit); fp16 storage
    computes in fp32 where ``half_compute`` says so, or where it is auto and the card's execution path
    does (Pascal, Volta, GTX 16xx: ``auto_fp32_compute``) -- measured on the H100 at case B, that path's
    denoise peak is 15.1 GiB against 9.8 for fp16 compute (bench/results/budgets_20261207.md)."""
    stored = _storage_bytes(precision, device_type)
    if stored >= 4 or precision == Precision.BF16:
        return max(stored, 2)
    fp32 = settings.half_compute == HalfCompute.FP32 or (settings.half_compute == HalfCompute.AUTO and auto_fp32_compute)
    return 4 if fp32 else 2


def window_frames(settings: RunSettings, dims: ModelDims) -> int:
    """Latent frames the denoiser sees in one call: the window length when temporal windows are on (windows
    count latent frames: SVD's are its pixel frames, Wan's each stand for four)."""
    frames = dims.latent_frames(settings.num_frames)
    return settings.chunk_size if settings.chunk_size and settings.chunk_size < frames else frames


def vae_and_encoder_bytes(dims: ModelDims, settings: RunSettings, device_type: str = "cuda") -> float:
    """Weight bytes of the VAE and the image encoder as stored: what an offload mode moves once per run
    besides the UNet (the speed model's ``other_component_bytes``)."""
    return (dims.vae_params * _storage_bytes(settings.vae_dtype, device_type)
            + dims.encoder_params * _storage_bytes(settings.encoder_dtype, device_type))


def resident_weights_mib(dims: ModelDims, settings: RunSettings, phase: Phase, device_type: str = "cuda") -> float:
    """Weights on the GPU during ``phase``, given the offload mode (engine/placement.py)."""
    unet = dims.unet_params * _storage_bytes(settings.unet_dtype, device_type)
    vae = dims.vae_params * _storage_bytes(settings.vae_dtype, device_type)
    encoder = dims.encoder_params * _storage_bytes(settings.encoder_dtype, device_type)
    if settings.offload == OffloadMode.NONE:
        total = unet + vae + (encoder if phase == Phase.ENCODE or not dims.encoder_dropped else 0)
    elif phase == Phase.ENCODE:
        # model: one whole component at a time; stream: the encoder streams leaf by leaf (its largest weight
        # on the GPU at once), then the VAE moves in whole (engine/wan.py hands the encoder's memory back first)
        streamed = dims.encoder_stream_params * _storage_bytes(settings.encoder_dtype, device_type)
        total = max(encoder if settings.offload == OffloadMode.MODEL else streamed, vae)
    elif phase == Phase.DENOISE:
        streamed = dims.unet_stream_params * _storage_bytes(settings.unet_dtype, device_type)
        total = unet if settings.offload == OffloadMode.MODEL else streamed
    else:
        total = vae
    return total / MIB


def phase_features(
    dims: ModelDims, settings: RunSettings, phase: Phase, device_type: str = "cuda", auto_fp32_compute: bool = False
) -> dict[str, float]:
    """The linear features of one phase's peak (MiB per unit coefficient); names match the coefficients.

    ``auto_fp32_compute``: the card computes fp16-stored weights in fp32 when ``half_compute`` is auto.
    """
    height, width = settings.height, settings.width
    features = {"overhead_mib": 1.0, "weights": resident_weights_mib(dims, settings, phase, device_type)}
    vae_bytes = _compute_bytes(settings.vae_dtype, device_type, settings, auto_fp32_compute)
    if phase == Phase.ENCODE:
        features["vae_encode"] = height * width * vae_bytes * dims.vae_width / MIB
        return features
    if dims.kind == "wan":
        return {**features, **_wan_features(dims, settings, phase, device_type, auto_fp32_compute, vae_bytes)}
    if phase == Phase.DENOISE:
        tokens = (height // dims.latent_scale) * (width // dims.latent_scale)
        frames = window_frames(settings, dims)
        branches = 2 if settings.guidance_enabled and not settings.cfg_split else 1
        unet_bytes = _compute_bytes(settings.unet_dtype, device_type, settings, auto_fp32_compute)
        per_channel = tokens * frames * branches * unet_bytes * dims.unet_width / MIB
        rows = branches * frames
        spatial = min(1.0, settings.spatial_chunk / rows) if settings.spatial_chunk else 1.0
        temporal = min(1.0, settings.temporal_chunk / tokens) if settings.temporal_chunk else 1.0
        ff = min(1.0, settings.ff_chunk / (rows * tokens)) if settings.ff_chunk else 1.0
        features.update(
            unet_skip=per_channel,
            unet_spatial=per_channel * spatial,
            unet_ff=per_channel * min(spatial, ff),
            unet_temporal=per_channel * temporal,
            # CUDA streams keep their own allocator pools; on the CPU streaming is a no-op
            stream_extra_mib=1.0 if settings.offload == OffloadMode.STREAM and device_type == "cuda" else 0.0,
        )
        return features
    frames_per_call = min(settings.decode_chunk or settings.num_frames, settings.num_frames)
    features["vae_decode"] = _decoded_px(settings) * frames_per_call * vae_bytes * dims.vae_width / MIB
    features["decode_output"] = settings.num_frames * height * width * 3 / MIB
    return features


def _decoded_px(settings: RunSettings) -> int:
    """Pixels of a frame the VAE decodes at once: a tile's, when tiling is on."""
    tile = settings.vae_tile
    return min(tile, settings.height) * min(tile, settings.width) if tile else settings.height * settings.width


def _wan_features(dims: ModelDims, settings: RunSettings, phase: Phase, device_type: str, auto_fp32_compute: bool,
                  vae_bytes: int) -> dict[str, float]:
    """Wan's denoise and decode features. The transformer's activations are per token (latent frames x patches
    of latent cells) and hidden channel; the feed-forward's share shrinks with ``ff_chunk``. Its VAE decodes
    latent frame after latent frame with a feature cache, so the decode's transient scales with a frame's (or
    a tile's) pixels, not with the clip's frames, while the decoded clip itself is held whole."""
    if phase == Phase.DENOISE:
        tokens = dims.tokens_per_latent_frame(settings.height, settings.width) * window_frames(settings, dims)
        branches = 2 if settings.guidance_enabled and not settings.cfg_split else 1
        unet_bytes = _compute_bytes(settings.unet_dtype, device_type, settings, auto_fp32_compute)
        per_channel = tokens * branches * unet_bytes * dims.unet_width / MIB
        ff = min(1.0, settings.ff_chunk / (branches * tokens)) if settings.ff_chunk else 1.0
        return {"dit_tokens": per_channel, "dit_ff": per_channel * ff,
                "stream_extra_mib": 1.0 if settings.offload == OffloadMode.STREAM and device_type == "cuda" else 0.0}
    return {"vae_decode": _decoded_px(settings) * vae_bytes * dims.vae_width / MIB,
            "decode_output": settings.num_frames * settings.height * settings.width * 3 / MIB}


@dataclass(frozen=True)
class Prediction:
    """Predicted process peak per phase (MiB) and the phase that sets the run's peak."""

    phases: dict[str, float]
    context_mib: float

    @property
    def peak_mib(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


@dataclass
class MemoryModel:
    """Coefficients of the per-phase peak; ``context_mib`` per device kind (the CUDA context is a constant)."""

    coefficients: dict[str, float]
    context_mib: dict[str, float]
    source: str = ""

    @classmethod
    def load(cls, path: Path = MEMORY_MODEL_PATH) -> "MemoryModel":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["coefficients"], data["context_mib"], data.get("source", ""))

    @classmethod
    def for_kind(cls, kind: str) -> "MemoryModel":
        """The memory model fitted on ``kind``'s models (``MEMORY_MODEL_PATHS``)."""
        if kind not in MEMORY_MODEL_PATHS:
            raise ValueError(f"no memory model is fitted for {kind} models yet")
        return cls.load(MEMORY_MODEL_PATHS[kind])

    def save(self, path: Path) -> None:
        data = {"version": 1, "source": self.source, "context_mib": self.context_mib, "coefficients": self.coefficients}
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def phase_mib(self, features: dict[str, float]) -> float:
        return sum(self.coefficients[name] * value for name, value in features.items())

    def predict(
        self, dims: ModelDims, settings: RunSettings, context_mib: float | None = None, device_type: str = "cuda",
        auto_fp32_compute: bool = False,
    ) -> Prediction:
        context = self.context_mib.get(device_type, 0.0) if context_mib is None else context_mib
        phases = {
            phase.value: context + self.phase_mib(phase_features(dims, settings, phase, device_type, auto_fp32_compute))
            for phase in PHASES
        }
        return Prediction(phases, context)


def calibrate(
    rows: list[dict[str, Any]], prior: MemoryModel | None = None, prior_weight: float = 1e-3, rounds: int = 8,
    fixed: tuple[str, ...] = (),
) -> MemoryModel:
    """Least-squares fit of the coefficients to measured rows, in relative error (we promise +/-15 %).

    Each row: ``dims`` (ModelDims or its dict), ``settings`` (RunSettings or dict), ``process_peak_mib`` and
    ``context_mib`` as measured. The peak is the max over phases, so the fit alternates: assign each row
    its peak phase under the current coefficients, solve the linear problem, repeat. A row may instead give
    ``phase_peaks_mib`` ({phase: MiB}, the phases whose own peak it measured): each is then fitted as is.
    A small pull towards the prior keeps coefficients the rows do not constrain (e.g. streaming when no
    row streams); ``fixed`` coefficients keep the prior's value (the weights' 1.0: their bytes are counted).
    """
    from scipy.optimize import lsq_linear  # scipy comes with scikit-image; imported here, used only here

    model = prior or MemoryModel.load()
    names = sorted(set(model.coefficients) - set(fixed))
    held = {name: model.coefficients[name] for name in fixed}
    prepared = []  # (target MiB less the context, {phase: features}, the phase it is, or None: the peak phase)
    for row in rows:
        dims = row["dims"] if isinstance(row["dims"], ModelDims) else ModelDims(**row["dims"])
        settings = row["settings"] if isinstance(row["settings"], RunSettings) else RunSettings.from_dict(row["settings"])
        feats = {p: phase_features(dims, settings, p) for p in PHASES}
        context = float(row["context_mib"])
        if row.get("phase_peaks_mib"):
            prepared.extend((float(mib) - context, feats, Phase(phase)) for phase, mib in row["phase_peaks_mib"].items())
        else:
            prepared.append((float(row["process_peak_mib"]) - context, feats, None))
    coefs = dict(model.coefficients)
    for _ in range(rounds):
        matrix, targets = [], []
        for target, feats, measured in prepared:
            phase = measured or max(PHASES, key=lambda p: sum(coefs[n] * v for n, v in feats[p].items()))
            rest = target - sum(value * feats[phase].get(name, 0.0) for name, value in held.items())
            matrix.append([feats[phase].get(n, 0.0) / target for n in names])
            targets.append(rest / target)
        for index, name in enumerate(names):  # prior rows: (c - c0) / c0, weighted
            prior_row = [0.0] * len(names)
            scale = max(abs(model.coefficients[name]), 1e-9)
            prior_row[index] = math.sqrt(prior_weight) / scale
            matrix.append(prior_row)
            targets.append(math.sqrt(prior_weight))
        fit = lsq_linear(np.asarray(matrix), np.asarray(targets), bounds=(0.0, np.inf))
        coefs = {**held, **dict(zip(names, (float(v) for v in fit.x)))}
    return MemoryModel(coefs, dict(model.context_mib), source=f"calibrated on {len(rows)} rows")


# ---- budgets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """VRAM the run may use as a process peak: ``total_mib - reserve_mib``; ``context_mib`` is that card's CUDA context."""

    label: str
    total_mib: float
    context_mib: float
    reserve_mib: float = 0.0
    note: str = ""

    @property
    def available_mib(self) -> float:
        return self.total_mib - self.reserve_mib

    @property
    def plan_to_mib(self) -> float:
        """The predicted peak a plan may reach: ``available_mib`` less the memory model's error margin."""
        return self.available_mib * (1.0 - PLAN_MARGIN)


# The CUDA context (with cuBLAS/cuDNN workspaces) as NVML counts it: 0.60-0.77 GiB on the H100 in this
# project's benches (#21: 400 MiB was assumed and the 6 GB plan peaked at 7.9 GiB). A budget is a promise,
# so the plan assumes the large end; consumer cards with lazy module loading need less.
SMALL_CARD_CONTEXT_MIB = 800.0
# The memory model's leave-one-out error is within +/-15 %: plan to this share of the budget so that an
# under-prediction of that size still fits the card.
PLAN_MARGIN = 0.12
# With no budget, decode chunks stay at least this long: the chunk diffusers' SVD guide decodes with
NO_BUDGET_MIN_DECODE_CHUNK = 8
# ... and act only when the all-frames decode is this far above the other phases (a few % is not worth a seam)
NO_BUDGET_DECODE_SLACK = 1.25
DESKTOP_RESERVE_MIB = 256.0  # the desktop and other programs keep some VRAM on a consumer card
# Weight streaming this much slower per step than resident weights (speed_model) counts as free: on such a
# card (a GTX 1060 computes a step ~60x longer than an H100) the plan streams before any other move.
FREE_STREAMING_OVERHEAD = 0.05

# The write-up's table (reference/gtx1060-video-writeup.zh.txt): card and frames it ran.
PRESETS: dict[str, Budget] = {
    "4GB": Budget("4GB", 4096, SMALL_CARD_CONTEXT_MIB, DESKTOP_RESERVE_MIB, "e.g. GTX 1050 Ti 4 GB"),
    "6GB": Budget("6GB", 6144, SMALL_CARD_CONTEXT_MIB, DESKTOP_RESERVE_MIB, "GTX 1060 6 GB: the write-up ran 24 frames"),
    "8GB": Budget("8GB", 8192, SMALL_CARD_CONTEXT_MIB, DESKTOP_RESERVE_MIB, "e.g. RTX 3070 8 GB"),
    "12GB": Budget(
        "12GB", 12288, SMALL_CARD_CONTEXT_MIB, DESKTOP_RESERVE_MIB, "RTX 2060 / 3060 12 GB: the write-up ran 32 / 48 frames"
    ),
    "24GB": Budget("24GB", 24576, SMALL_CARD_CONTEXT_MIB, DESKTOP_RESERVE_MIB, "RTX 4090 24 GB: the write-up ran 64 frames at once"),
}


def free_vram_mib(device: int = 0) -> float:
    """Driver free memory plus what our allocator holds but does not use (FramePack's policy)."""
    free, _ = torch.cuda.mem_get_info(device)
    return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) / MIB


def auto_budget(model: MemoryModel, reserve_mib: float = 512.0, device: int = 0) -> Budget:
    """'auto': what this process may grow to now. The memory model predicts the whole process peak, so
    the memory this process already holds (its context and live tensors) is added back to the free VRAM."""
    held = torch.cuda.memory_allocated(device) / MIB
    context = model.context_mib.get("cuda", 0.0)
    total = free_vram_mib(device) + held + context
    return Budget("auto", total, context, reserve_mib, f"{free_vram_mib(device):.0f} MiB free now")


def budget_for(vram_budget: str, model: MemoryModel) -> Budget | None:
    """The Budget a settings string names; None for 'off' or when 'auto' has no CUDA GPU."""
    if vram_budget == "off":
        return None
    if vram_budget == "auto":
        return auto_budget(model) if torch.cuda.is_available() else None
    if vram_budget in PRESETS:
        return PRESETS[vram_budget]
    gib = budget_gib(vram_budget)
    return Budget(vram_budget, gib * 1024, SMALL_CARD_CONTEXT_MIB, DESKTOP_RESERVE_MIB) if gib else None


@contextlib.contextmanager
def simulated_budget(budget: Budget, device: int = 0) -> Iterator[float]:
    """Make a big GPU behave like ``budget``'s card: cap the caching allocator at the budget minus the
    card's context (the context lives outside the allocator). Yields the cap in MiB."""
    total = torch.cuda.get_device_properties(device).total_memory
    cap_mib = budget.available_mib - budget.context_mib
    torch.cuda.set_per_process_memory_fraction(min(cap_mib * MIB / total, 1.0), device)
    try:
        yield cap_mib
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# ---- moves and plans ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Move:
    """One tightening: ``apply`` returns the tighter settings, or None when it no longer applies;
    ``loosen(settings, request)`` lists the looser settings between them and the request, loosest first."""

    name: str
    lossy: bool
    phases: tuple[Phase, ...]
    apply: Callable[[RunSettings, ModelDims], RunSettings | None]
    reason: Callable[[RunSettings], str]
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


def _fitting_overlap(settings: RunSettings, request_overlap: int) -> RunSettings:
    """Windows overlap by fewer frames than they hold: the request's overlap, cut to the window's length - 1."""
    if not settings.chunk_size:
        return settings.replace(overlap=request_overlap)
    return settings.replace(overlap=min(request_overlap, settings.chunk_size - 1))


def _with_fitting_overlap(apply: Callable[[RunSettings, ModelDims], RunSettings | None]):
    def windows(settings: RunSettings, dims: ModelDims) -> RunSettings | None:
        tighter = apply(settings, dims)
        return None if tighter is None else _fitting_overlap(tighter, settings.overlap)

    return windows


def _windows_loosen(settings: RunSettings, request: RunSettings) -> list[RunSettings]:
    return [_fitting_overlap(looser, request.overlap)
            for looser in _level_loosen("chunk_size", WINDOW_LEVELS)(settings, request)]


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


def _tokens(settings: RunSettings, dims: ModelDims) -> int:
    return (settings.height // dims.latent_scale) * (settings.width // dims.latent_scale)


# Priority order: lossless first (cheapest slowdown first), then lossy by fidelity cost (DESIGN §3).
# The levels each chunking move steps through, loosest first (0 = off is looser than any)
FF_LEVELS, SPATIAL_LEVELS, TEMPORAL_LEVELS = (16384, 4096), (4, 1), (2048, 512)
TILE_LEVELS, DECODE_LEVELS, WINDOW_LEVELS = (512, 256, 128), (8, 4, 2, 1), (16, 12, 8, 6, 4, 2)

MOVES: tuple[Move, ...] = (
    Move("cfg_split", False, (Phase.DENOISE,), _cfg_split,
         lambda s: "CFG split: the two guidance branches run one after the other, halving UNet activations (lossless)",
         _undo("cfg_split")),
    Move("ff_chunk", False, (Phase.DENOISE,), _level_move("ff_chunk", FF_LEVELS, lambda s, d: 1 << 62),
         lambda s: f"feed-forward chunks of {s.ff_chunk} tokens: the widest UNet layers run in pieces (lossless)",
         _level_loosen("ff_chunk", FF_LEVELS)),
    Move("spatial_chunk", False, (Phase.DENOISE,),
         _level_move("spatial_chunk", SPATIAL_LEVELS, lambda s, d: 2 * window_frames(s, d)),
         lambda s: f"spatial layers {s.spatial_chunk} frame(s) at a time (lossless)",
         _level_loosen("spatial_chunk", SPATIAL_LEVELS)),
    Move("temporal_chunk", False, (Phase.DENOISE,), _level_move("temporal_chunk", TEMPORAL_LEVELS, _tokens),
         lambda s: f"temporal layers {s.temporal_chunk} positions at a time (lossless)",
         _level_loosen("temporal_chunk", TEMPORAL_LEVELS)),
    Move("offload_model", False, PHASES, _offload(OffloadMode.MODEL),
         lambda s: "model offload: only the component at work stays on the GPU (lossless, a few s per run)",
         _offload_loosen(OffloadMode.MODEL)),
    Move("offload_stream", False, (Phase.ENCODE, Phase.DENOISE), _offload(OffloadMode.STREAM),
         lambda s: "weight streaming: UNet blocks stream in one at a time (lossless, slower per step)",
         _offload_loosen(OffloadMode.STREAM)),
    Move("vae_tile", True, (Phase.DECODE,),
         _level_move("vae_tile", TILE_LEVELS, lambda s, d: max(s.height, s.width)),
         lambda s: f"VAE decode in {s.vae_tile} px tiles (lossy: blended tile seams)",
         _level_loosen("vae_tile", TILE_LEVELS)),
    Move("decode_chunk", True, (Phase.DECODE,),
         _level_move("decode_chunk", DECODE_LEVELS, lambda s, d: s.num_frames),
         lambda s: f"decode {s.decode_chunk} frame(s) at a time (lossy: the temporal decoder sees fewer frames)",
         _level_loosen("decode_chunk", DECODE_LEVELS)),
    Move("chunk_size", True, (Phase.DENOISE,),
         _with_fitting_overlap(_level_move("chunk_size", WINDOW_LEVELS,
                                           lambda s, d: min(d.latent_frames(s.num_frames), d.native_frames + 1))),
         lambda s: f"temporal windows of {s.chunk_size} frames (lossy: motion is coherent within a window)",
         _windows_loosen),
    Move("fp8", True, PHASES, _fp8, lambda s: "UNet weights stored in fp8, computed in 16 bit (lossy)",
         _undo("unet_dtype")),
    Move("interpolate", True, (Phase.DENOISE, Phase.DECODE), _interpolate,
         lambda s: f"generate {s.num_frames} frames and interpolate {s.interpolate}x (lossy: in-between frames are synthesised)",
         _interpolate_loosen),
)


# The moves a family's model can take, by family kind (absent: every move): Wan's transformer has no UNet
# layers for spatial / temporal chunks, and its VAE decodes frame by frame whatever decode_chunk says.
FAMILY_MOVES = {"wan": tuple(move.name for move in MOVES
                             if move.name not in ("spatial_chunk", "temporal_chunk", "decode_chunk"))}


@dataclass
class Plan:
    """Settings chosen for a budget, with the reason for every change and the predicted peak."""

    settings: RunSettings
    prediction: Prediction
    reasons: list[str]
    budget: Budget | None
    fits: bool
    rung: int = 0

    def summary(self) -> list[str]:
        head = f"predicted peak {self.prediction.peak_mib / 1024:.2f} GiB ({self.prediction.peak_phase})"
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            head += f" {verdict} {self.budget.label} ({self.budget.available_mib / 1024:.2f} GiB usable)"
        return [head, *self.reasons]

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "predicted_peak_mib": round(self.prediction.peak_mib, 1),
            "predicted_phases_mib": {k: round(v, 1) for k, v in self.prediction.phases.items()},
            "reasons": self.reasons,
            "budget": None if self.budget is None else self.budget.label,
            "fits": self.fits,
            "rung": self.rung,
        }


@dataclass
class Rung:
    """One step of the ladder: settings, their prediction, and the reasons that led there."""

    settings: RunSettings
    prediction: Prediction
    reasons: list[str] = field(default_factory=list)


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB"


@dataclass
class Planner:
    """Plans for one model on one kind of device; ``context_mib`` overrides the model's CUDA context.

    ``speed``: the user's card (engine/speed_model.py); where it makes streaming nearly free, streaming is
    the first move of every ladder, ahead of slower chunking and of lossy moves. ``auto_fp32_compute``:
    the card's execution path computes fp16 weights in fp32 (``for_gpu`` sets it), which doubles the
    activations the plan must fit.
    """

    dims: ModelDims
    model: MemoryModel = None  # type: ignore[assignment]  # None: the memory model of the dims' family
    device_type: str = "cuda"
    min_gain: float = 0.01  # a move must lower the predicted peak by 1 % to count as helping
    speed: CardSpeed | None = None
    auto_fp32_compute: bool = False
    moves: tuple[str, ...] | None = None  # the moves this model can take (``FAMILY_MOVES``); None: all

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = MemoryModel.for_kind(self.dims.kind)

    @classmethod
    def for_gpu(cls, dims: ModelDims, gpu: GpuInfo | None, unet_config: dict[str, Any] | None = None,
                **kwargs: Any) -> "Planner":
        """A planner for this card (None: the CPU): its execution path decides what fp16 weights compute in,
        and with the UNet's config the speed model of the card (``CardSpeed``) decides whether streaming is
        nearly free on it."""
        if gpu is None:
            return cls(dims, device_type="cpu", **kwargs)
        speed = CardSpeed.for_gpu(unet_config, gpu.name)[0] if unet_config is not None else None
        return cls(dims, device_type="cuda", auto_fp32_compute=execution_path(gpu).half_compute == torch.float32,
                   speed=speed, **kwargs)

    def predict(self, settings: RunSettings, context_mib: float | None = None) -> Prediction:
        return self.model.predict(self.dims, settings, context_mib, self.device_type, self.auto_fp32_compute)

    def base(self, settings: RunSettings) -> tuple[RunSettings, list[str]]:
        """The request, plus windows of the model's native length for clips longer than it was trained on."""
        if self.dims.latent_frames(settings.num_frames) > self.dims.native_frames and not settings.chunk_size:
            native = self.dims.native_frames
            windowed = settings.replace(chunk_size=native, overlap=min(settings.overlap, 4) or 4)
            latent = "" if self.dims.temporal_scale == 1 else " latent"
            reason = (
                f"temporal windows of {native}{latent} frames: {self.dims.name} was trained on {native}; "
                "longer clips run window by window at one window's peak (lossy)"
            )
            return windowed, [reason]
        return settings, []

    def ladder(self, settings: RunSettings, context_mib: float | None = None,
               allowed: tuple[str, ...] | None = None) -> list[Rung]:
        """Rungs from the request to the tightest settings; each adds the first move (in priority order,
        among ``allowed`` by name when given) that lowers the phase setting the predicted peak without
        raising the peak. The path does not depend on the budget."""
        current, reasons = self.base(settings)
        rungs = [Rung(current, self.predict(current, context_mib), list(reasons))]
        free = self._free_streaming(current, rungs[0].prediction, context_mib)
        if free is not None:
            current, reason, prediction = free
            rungs.append(Rung(current, prediction, [*reasons, reason]))
        while True:
            step = self._first_helping_move(current, rungs[-1].prediction, None, context_mib, allowed)
            if step is None:
                return rungs
            current, reason, prediction, _ = step
            rungs.append(Rung(current, prediction, [*rungs[-1].reasons, reason]))

    def _free_streaming(
        self, settings: RunSettings, before: Prediction, context_mib: float | None
    ) -> tuple[RunSettings, str, Prediction] | None:
        """Streaming as the first move, where the card hides the transfers behind compute: it lowers the
        denoise and encode phases at no speed cost, so later moves (lossy ones included) are needed less."""
        if self.speed is None or settings.offload == OffloadMode.STREAM:
            return None
        overhead = self.speed.streaming_overhead(step_config(settings, self.speed.gpu.info))
        if overhead > FREE_STREAMING_OVERHEAD:
            return None
        streamed = settings.replace(offload=OffloadMode.STREAM)
        after = self.predict(streamed, context_mib)
        if after.peak_mib > before.peak_mib + 1e-6:
            return None
        reason = (f"weight streaming first: on a {self.speed.gpu.name} a step computes far longer than the UNet's "
                  f"weights take to cross PCIe, so streaming costs about {max(overhead, 0.0):.0%} per step (lossless); "
                  f"predicted peak {_gib(before.peak_mib)} -> {_gib(after.peak_mib)}")
        return streamed, reason, after

    def _first_helping_move(
        self,
        settings: RunSettings,
        before: Prediction,
        phase: Phase | None,
        context_mib: float | None,
        allowed: tuple[str, ...] | None = None,
    ) -> tuple[RunSettings, str, Prediction, Move] | None:
        """First move in priority order that lowers ``phase`` (default: the peak phase) by ``min_gain`` of
        its weights and activations, and does not raise the peak."""
        target = phase.value if phase is not None else before.peak_phase
        variable = before.phases[target] - self._fixed_mib(before)
        for move in self._moves(allowed):
            if Phase(target) not in move.phases:
                continue
            tighter = move.apply(settings, self.dims)
            if tighter is None:
                continue
            after = self.predict(tighter, context_mib)
            lowers = after.phases[target] <= before.phases[target] - self.min_gain * variable
            if lowers and after.peak_mib <= before.peak_mib + 1e-6:
                change = f"{_gib(before.peak_mib)} -> {_gib(after.peak_mib)}"
                return tighter, f"{move.reason(tighter)}; predicted peak {change}", after, move
        return None

    def plan(self, settings: RunSettings, budget: Budget, allowed: tuple[str, ...] | None = None) -> Plan:
        """The loosest (fastest) rung whose predicted peak fits ``budget``, or the tightest one, marked unfit;
        ``allowed``: only these moves (by name)."""
        rungs = self.ladder(settings, budget.context_mib, allowed)
        for index, rung in enumerate(rungs):
            if rung.prediction.peak_mib <= budget.plan_to_mib:
                relaxed, prediction, loosened = self._relax(rung, rungs[0].settings, budget, allowed)
                return Plan(relaxed, prediction, [*rung.reasons, *loosened], budget, True, index)
        last = rungs[-1]
        reasons = [
            *last.reasons,
            f"even these settings are predicted at {_gib(last.prediction.peak_mib)}, over {_gib(budget.plan_to_mib)} "
            f"({_gib(budget.available_mib)} less a {PLAN_MARGIN:.0%} safety margin); "
            "lower the size or frame count, or close other programs using the GPU",
        ]
        return Plan(last.settings, last.prediction, reasons, budget, False, len(rungs) - 1)

    def _relax(
        self, rung: Rung, request: RunSettings, budget: Budget, allowed: tuple[str, ...] | None
    ) -> tuple[RunSettings, Prediction, list[str]]:
        """Loosen the fitting rung's moves back towards the request while the plan still fits: lossy moves
        first (most lossy first: fidelity before speed), then lossless ones (slowest first). Each move takes
        its loosest setting that fits. Loosening only raises the peak, so one pass in this order is enough."""
        moves = self._moves(allowed)
        order = [m for m in reversed(moves) if m.lossy] + [m for m in reversed(moves) if not m.lossy]
        # an offload mode between the request's and the plan's is a setting only its own move may choose
        offload_modes = {request.offload} | {OffloadMode(m.name.removeprefix("offload_")) for m in moves
                                             if m.name.startswith("offload_")}
        current, prediction, reasons = rung.settings, rung.prediction, []
        for move in order:
            for looser in move.loosen(current, request):
                after = self.predict(looser, budget.context_mib)
                if after.peak_mib > budget.plan_to_mib or looser.offload not in offload_modes:
                    continue
                change = f"predicted peak {_gib(prediction.peak_mib)} -> {_gib(after.peak_mib)}"
                if move.loosen(looser, request):  # still tighter than the request: a looser level of the move
                    reasons.append(f"loosened again: {move.reason(looser)} is enough once later moves lowered "
                                   f"the other phases; {change}")
                else:
                    reasons.append(f"undone: {move.reason(current)} -- not needed once later moves lowered "
                                   f"the other phases; {change}")
                current, prediction = looser, after
                break
        return current, prediction, reasons

    def no_budget(self, settings: RunSettings) -> Plan | None:
        """Without a budget the user's settings run as they are, with one exception on a GPU: when decoding
        every frame at once (``decode_chunk`` 0) alone would set the run's peak (by more than
        ``NO_BUDGET_DECODE_SLACK``), the frames are decoded in
        the fewest equal chunks that keep the decode at or under the other phases' peak, but never fewer
        than ``NO_BUDGET_MIN_DECODE_CHUNK`` frames (or half the clip) a chunk: with no budget, temporal coherence outranks
        memory. The VAE's fp32 decode of 25 frames at 576x1024 otherwise peaks far above the denoise loop
        (76.9 GiB measured on the H100, diffusers fp16 60). ``decode_chunk`` = the frame count asks for all
        frames at once."""
        frames = settings.num_frames
        smallest = min(NO_BUDGET_MIN_DECODE_CHUNK, math.ceil(frames / 2))
        if self.device_type != "cuda" or settings.decode_chunk or settings.vae_tile or not self._moves(("decode_chunk",)):
            return None  # (a model whose VAE decodes frame by frame has no decode chunk: Wan)
        prediction = self.predict(settings)
        decode = prediction.phases[Phase.DECODE.value]
        others = max(mib for phase, mib in prediction.phases.items() if phase != Phase.DECODE.value)
        if decode <= others * NO_BUDGET_DECODE_SLACK:
            return None
        chunked, chunked_prediction = settings, prediction
        for count in range(2, frames + 1):
            chunk = math.ceil(frames / count)
            if chunk < smallest:
                break
            chunked = settings.replace(decode_chunk=chunk)
            chunked_prediction = self.predict(chunked)
            if chunked_prediction.phases[Phase.DECODE.value] <= others:
                break
        floor = "" if chunked_prediction.phases[Phase.DECODE.value] <= others else (
            f" (still above them: no budget never cuts below {smallest} frame(s) a chunk; a VRAM budget goes further)")
        reason = (
            f"decode {chunked.decode_chunk} frame(s) at a time (lossy: the temporal decoder sees fewer frames): all "
            f"{frames} at once would alone set the peak at {_gib(decode)}, above the other phases' {_gib(others)}; "
            f"now {_gib(chunked_prediction.phases[Phase.DECODE.value])}{floor}; "
            f"set decode_chunk to {frames} to decode all frames at once anyway"
        )
        return Plan(chunked, chunked_prediction, [reason], None, True)

    def tighten(
        self, settings: RunSettings, phase: Phase, target: float = 0.7, allowed: tuple[str, ...] | None = None
    ) -> tuple[RunSettings, list[str]] | None:
        """The next tighter settings after an out-of-memory error in ``phase``: moves for that phase (and in
        ``allowed``, by name, when given) in priority order until the phase's predicted weights and
        activations fall to ``target`` of what failed; at least one move. None when none is left."""
        phase = Phase.ENCODE if phase == Phase.LOAD else phase  # loading fails on weights: the encode-phase moves
        if phase not in PHASES:  # interpolate / export: the model has no such phase; tighten the denoise loop
            phase = Phase.DENOISE
        prediction = self.predict(settings)
        fixed = self._fixed_mib(prediction)
        goal = fixed + (prediction.phases[phase.value] - fixed) * target
        current, reasons = settings, []
        while prediction.phases[phase.value] > goal:
            step = self._first_helping_move(current, prediction, phase, None, allowed)
            if step is None and not reasons:
                step = self._first_applicable_move(current, phase, allowed)
            if step is None or (reasons and step[3].lossy):
                break  # a lossy change comes alone, once the changes before it have been tried for real
            current, reason, prediction, move = step
            reasons.append(reason)
            if move.lossy:
                break
        return (current, reasons) if reasons else None

    def _moves(self, allowed: tuple[str, ...] | None) -> list[Move]:
        """MOVES in priority order, among ``allowed`` and the model's own (``moves``) when given."""
        return [move for move in MOVES if (allowed is None or move.name in allowed)
                and (self.moves is None or move.name in self.moves)]

    def _fixed_mib(self, prediction: Prediction) -> float:
        """The part of every phase's peak no setting changes: context and allocator overhead."""
        return prediction.context_mib + self.model.coefficients.get("overhead_mib", 0.0)

    def _first_applicable_move(
        self, settings: RunSettings, phase: Phase, allowed: tuple[str, ...] | None
    ) -> tuple[RunSettings, str, Prediction, Move] | None:
        """Any move for the phase, even one the model thinks does not help: the model just proved wrong."""
        for move in self._moves(allowed):
            if phase not in move.phases:
                continue
            tighter = move.apply(settings, self.dims)
            if tighter is not None:
                return tighter, move.reason(tighter), self.predict(tighter), move
        return None


def plan_for_settings(planner: Planner, settings: RunSettings) -> Plan | None:
    """Apply ``settings.vram_budget``; with no budget, only the decode rule of ``Planner.no_budget``
    (None when that changes nothing)."""
    budget = budget_for(settings.vram_budget, planner.model)
    return planner.no_budget(settings) if budget is None else planner.plan(settings, budget)

"""The memory model: the process peak (MiB, DESIGN §3) of each phase of a run, predicted as

    context + overhead + weights resident in the phase + activations of the phase

with activations linear in a few sizes: for SVD's UNet, latent tokens x frames per window x CFG branches
(skip connections, spatial, feed-forward and temporal transients, each shrunk by its chunking); for Wan's
transformer, tokens x branches (its feed-forward share shrunk by ``ff_chunk``); VAE encode pixels, VAE
decode pixels (x frames per decode call for SVD; per tile when tiling) and the decoded output. The
run's peak is the largest phase. Each family's coefficients live in its own file (``MEMORY_MODEL_PATHS``);
``calibrate`` re-fits them from benchmark rows (``bench/planner.py``, ``bench/wan_memory_model.py``) by
least squares.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.dims import ModelDims
from ..engine.events import Phase
from ..engine.options import HalfCompute, OffloadMode, Precision
from ..settings import RunSettings

MIB = 2**20
MEMORY_MODEL_PATH = Path(__file__).with_name("memory_model.json")
# Each family's memory model, by ``ModelDims.kind`` (a new family needs its own, fitted on its measured runs)
MEMORY_MODEL_PATHS = {"svd": MEMORY_MODEL_PATH, "wan": Path(__file__).with_name("memory_model_wan.json")}
PHASES = (Phase.ENCODE, Phase.DENOISE, Phase.DECODE)


# Counted on the SVD-XT configs of models/svd_configs.py (meta device); SVD differs only in native frames.
SVD_XT_DIMS = ModelDims("svd-xt", 1_524_623_082, 97_742_847, 632_076_800, 205_388_486, 25)
SVD_DIMS = replace(SVD_XT_DIMS, name="svd", native_frames=14)


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
    return settings.window_frames if settings.window_frames and settings.window_frames < frames else frames


def vae_and_encoder_bytes(dims: ModelDims, settings: RunSettings, device_type: str = "cuda") -> float:
    """Weight bytes of the VAE and the image encoder as stored: what an offload mode moves once per run
    besides the UNet (the speed model's ``other_component_bytes``)."""
    return (dims.vae_params * _storage_bytes(settings.vae_dtype, device_type)
            + dims.encoder_params * _storage_bytes(settings.encoder_dtype, device_type))


def resident_weights_mib(dims: ModelDims, settings: RunSettings, phase: Phase, device_type: str = "cuda") -> float:
    """Weights on the GPU during ``phase``, given the offload mode (engine/placement.py)."""
    unet = dims.unet_params * _storage_bytes(settings.unet_dtype, device_type)
    vae_bytes = _storage_bytes(settings.vae_dtype, device_type)
    vae = dims.vae_params * vae_bytes
    encoder = dims.encoder_params * _storage_bytes(settings.encoder_dtype, device_type)
    if settings.offload == OffloadMode.NONE:
        total = unet + vae + (encoder if phase == Phase.ENCODE or not dims.encoder_dropped else 0)
    elif phase == Phase.ENCODE:
        # model: one whole component at a time; stream: the encoder streams leaf by leaf (its largest weight
        # on the GPU at once), then the VAE moves in, or only its encoder half (engine/wan.py hands the text
        # encoder's memory back first)
        streamed = dims.encoder_stream_params * _storage_bytes(settings.encoder_dtype, device_type)
        total = max(encoder if settings.offload == OffloadMode.MODEL else streamed,
                    (dims.vae_encode_params or dims.vae_params) * vae_bytes)
    elif phase == Phase.DENOISE:
        streamed = dims.unet_stream_params * _storage_bytes(settings.unet_dtype, device_type)
        total = unet if settings.offload == OffloadMode.MODEL else streamed
    else:
        total = (dims.vae_params - dims.vae_encode_params) * vae_bytes  # the decoder half, or the whole VAE
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
        tokens = dims.tokens_per_latent_frame(height, width)
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
    frames_per_call = min(settings.decode_frames or settings.num_frames, settings.num_frames)
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
    a tile's) pixels, not with the clip's frames; the decoded clip is held whole on the GPU unless its frames move
    to the CPU as they are made (``dims.decode_to_host``: then one latent frame's pixel frames)."""
    if phase == Phase.DENOISE:
        tokens = dims.tokens_per_latent_frame(settings.height, settings.width) * window_frames(settings, dims)
        branches = 2 if settings.guidance_enabled and not settings.cfg_split else 1
        unet_bytes = _compute_bytes(settings.unet_dtype, device_type, settings, auto_fp32_compute)
        per_channel = tokens * branches * unet_bytes * dims.unet_width / MIB
        ff = min(1.0, settings.ff_chunk / (branches * tokens)) if settings.ff_chunk else 1.0
        return {"dit_tokens": per_channel, "dit_ff": per_channel * ff,
                "stream_extra_mib": 1.0 if settings.offload == OffloadMode.STREAM and device_type == "cuda" else 0.0}
    held = min(dims.temporal_scale, settings.num_frames) if dims.decode_to_host else settings.num_frames
    return {"vae_decode": _decoded_px(settings) * vae_bytes * dims.vae_width / MIB,
            "decode_output": held * settings.height * settings.width * 3 / MIB}


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



"""The one adapter from the app's ``RunSettings`` to the engine's words (``EngineConfig``, ``SvdRequest``).

The engine never reads ``RunSettings``: the studio, the CLI, the queue, compare and the benchmarks speak
settings (the run record's vocabulary, DESIGN §7), and this module alone says which setting is which
engine knob. ``generate`` is ``engine.sampler.sample`` for a settings-speaking caller: its result carries
the settings that actually ran (a decode retry's tiles included), as the record and the mp4 tag store them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import PIL.Image
import torch

from .engine.chunking import SPATIAL_MIN_BYTES, ChunkingConfig
from .engine.components import ComponentSource
from .engine.config import EngineConfig
from .engine.events import CancelToken, EventCallback
from .engine.families import family_for
from .engine.family import ClipRequest, VideoFamily
from .engine.oom import DecodeTightener
from .engine.options import DeviceChoice, OffloadMode, PruneMode, WindowBlend
from .engine.precision import GpuInfo, PrecisionPolicy, PrecisionRequest
from .engine.prompt_cache import PromptCache
from .engine.pruning_config import PruningConfig
from .engine.sampler import EngineResult, prepare, sample
from .engine.speed_model import StepConfig
from .engine.svd import SvdFamily, SvdRequest
from .engine.vae import DecodeConfig
from .engine.wan import WanFamily, WanRequest
from .engine.windows import WindowConfig
from .settings import RunSettings, SettingsError
from .userdirs import cache_dir

PROMPT_CACHE_FOLDER = "prompt_embeddings"  # under the user's cache folder


@dataclass
class RunResult(EngineResult):
    """An engine result with the settings that made its frames (after every retry)."""

    settings: RunSettings = field(default_factory=RunSettings)


def precision_request(settings: RunSettings) -> PrecisionRequest:
    return PrecisionRequest(settings.unet_dtype, settings.vae_dtype, settings.encoder_dtype, settings.half_compute)


def precision_policy(settings: RunSettings, gpu: GpuInfo | None) -> PrecisionPolicy:
    """What ``settings`` store and compute each component in on ``gpu`` (None: the CPU)."""
    return PrecisionPolicy.resolve(precision_request(settings), gpu)


def step_config(settings: RunSettings, gpu: GpuInfo | None) -> StepConfig:
    """What one denoise step of ``settings`` does, as the speed model reads it, on ``gpu``'s execution path
    (None: the CPU's): the window length and count, the guidance branches, the placement and the UNet's
    storage and compute dtypes."""
    frames = settings.num_frames
    window = settings.window_frames if settings.window_frames and settings.window_frames < frames else frames
    windows = 1 if window == frames else math.ceil((frames - settings.overlap) / max(window - settings.overlap, 1))
    denoiser = precision_policy(settings, gpu).denoiser
    compute = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(denoiser.compute, "fp32")
    return StepConfig(settings.height, settings.width, window, windows, 2 if settings.guidance_enabled else 1,
                      bool(settings.cfg_split), OffloadMode(settings.offload).value, compute, denoiser.storage.itemsize)


def decode_config(settings: RunSettings) -> DecodeConfig:
    return DecodeConfig(chunk=settings.decode_frames, tile=settings.vae_tile)


def engine_config(settings: RunSettings) -> EngineConfig:
    """Every technique's part of ``settings``, in the engine's types."""
    return EngineConfig(
        device=DeviceChoice(settings.device),
        precision=precision_request(settings),
        cfg_split=settings.cfg_split,
        chunking=ChunkingConfig(settings.spatial_chunk, settings.temporal_chunk, settings.ff_chunk, SPATIAL_MIN_BYTES),
        offload=OffloadMode(settings.offload),
        decode=decode_config(settings),
        windows=WindowConfig(size=settings.window_frames, overlap=settings.overlap, blend=WindowBlend(settings.window_blend)),
        reuse=PruningConfig.from_knobs(settings.prune_threshold, settings.prune_mode, settings.extra),
        preview_every=settings.preview_every,
    )


def clip_fields(settings: RunSettings) -> dict[str, int]:
    """What every family's request takes from ``settings`` (``ClipRequest``'s fields)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(ClipRequest)}


def svd_request(settings: RunSettings, image: PIL.Image.Image) -> SvdRequest:
    """The clip ``settings`` ask SVD for, from ``image`` (already fitted to width x height)."""
    return SvdRequest(
        **clip_fields(settings),
        image=image,
        fps=settings.fps,
        motion_bucket_id=settings.motion_bucket_id,
        noise_aug_strength=settings.noise_aug_strength,
        min_guidance_scale=settings.min_guidance_scale,
        max_guidance_scale=settings.max_guidance_scale,
    )


def wan_request(settings: RunSettings, image: PIL.Image.Image) -> WanRequest:
    """The clip ``settings`` ask Wan for: the image, the prompt and Wan's one guidance scale."""
    return WanRequest(
        **clip_fields(settings),
        image=image,
        prompt=settings.prompt,
        negative_prompt=settings.negative_prompt,
        guidance_scale=settings.guidance_scale,
    )


def request_for(family: VideoFamily, settings: RunSettings, image: PIL.Image.Image) -> ClipRequest:
    """``settings`` as ``family``'s request; ``SettingsError`` for a clip the family cannot make."""
    multiple = family.size_multiple
    sizes = [f"{name} must be a multiple of {multiple} for this {family.kind} model; got {value}; use "
             f"{max(value // multiple * multiple, multiple)} or {(value // multiple + 1) * multiple}"
             for name, value in (("height", settings.height), ("width", settings.width)) if value % multiple]
    if sizes:
        raise SettingsError(sizes)
    if not isinstance(family, WanFamily):
        return svd_request(settings, image)
    step = family.pipeline.vae_scale_factor_temporal
    if (settings.num_frames - 1) % step:
        below = (settings.num_frames - 1) // step * step + 1
        raise SettingsError([f"Wan makes {step}k+1 frames (e.g. 49, 81, 121); got {settings.num_frames}; "
                             f"use {below} or {below + step}"])
    problems = [f"{name} cuts SVD's UNet layers, which Wan's transformer does not have; set it to 0 (ff_chunk "
                "cuts Wan's feed-forward layers)" for name in ("spatial_chunk", "temporal_chunk") if getattr(settings, name)]
    if settings.prune_threshold > 0 and settings.prune_mode != PruneMode.STEPS:
        problems.append(f"prune_mode {settings.prune_mode.value} reuses frames, which Wan's transformer cannot (every "
                        "token attends across frames); set prune_mode to steps")
    problems += [f"extra {key} tunes SVD's UNet reuse hooks; Wan's step reuse (diffusers FirstBlockCache) takes only "
                 "prune_threshold: remove the key" for key in sorted(settings.extra) if key.startswith("prune_")]
    if problems:
        raise SettingsError(problems)
    return wan_request(settings, image)


def with_decode(settings: RunSettings, decode: DecodeConfig) -> RunSettings:
    return settings.replace(decode_frames=decode.chunk, vae_tile=decode.tile)


def decode_tightener(settings: RunSettings, tighten: DecodeTightener) -> DecodeTightener:
    """``tighten`` (on settings, e.g. ``plan.replan.decode_retry``) as the engine's tightener of a DecodeConfig."""

    def tighter(decode: DecodeConfig) -> tuple[DecodeConfig, list[str]] | None:
        found = tighten(with_decode(settings, decode))
        return None if found is None else (decode_config(found[0]), found[1])

    return tighter


def prepare_pipeline(pipeline: object, settings: RunSettings, device: torch.device) -> PrecisionPolicy:
    """Put ``settings``' precision, placement and chunking on an SVD pipeline before a run (or a measurement)."""
    return prepare(SvdFamily(pipeline), engine_config(settings), device)


def generate(
    pipeline: object,
    image: PIL.Image.Image,
    settings: RunSettings,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
    latents: torch.Tensor | None = None,
    decode_retry: DecodeTightener | None = None,
    text_encoder_source: ComponentSource | None = None,
) -> RunResult:
    """Run image-to-video once on an SVD or Wan pipeline as ``settings`` say (``engine.sampler.sample``).

    ``image`` should already be fitted to ``settings.width`` x ``settings.height`` (``media.fit_image``).
    ``decode_retry``: the tighter settings after a decode OOM (``plan.replan.decode_retry``). A prompt's
    embeddings are kept in the user's cache folder, so a re-run with the same prompt skips the text encoder;
    ``text_encoder_source``: a Wan text encoder the loader left on disk (``LoadedModel.text_encoder_source``)."""
    settings.validate()
    family = family_for(pipeline, prompt_cache=PromptCache(cache_dir() / PROMPT_CACHE_FOLDER),
                        text_encoder_source=text_encoder_source)
    result = sample(
        family,
        request_for(family, settings, image),
        engine_config(settings),
        on_event=on_event,
        cancel=cancel,
        latents=latents,
        decode_retry=None if decode_retry is None else decode_tightener(settings, decode_retry),
    )
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(EngineResult)}
    return RunResult(**fields, settings=with_decode(settings, result.config.decode))

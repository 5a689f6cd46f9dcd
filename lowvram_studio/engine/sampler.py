"""One run: encode image -> denoise -> decode, on a plain diffusers StableVideoDiffusionPipeline.

The recipe mirrors ``StableVideoDiffusionPipeline.__call__`` step for step (with every technique off
the frames equal the pipeline's own), but owns the denoise loop so that the engine's memory
techniques, phase/step events and cancellation fit between the steps. Stage names are the
progress labels the user sees (``Phase``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableVideoDiffusionPipeline

from ..settings import DeviceChoice, RunSettings
from .chunking import ChunkingConfig, apply_chunking, chunk_hook_counts, chunking_applied, split_cfg_call
from .events import CancelToken, EventCallback, Phase, RunEvent
from .geglu import apply_geglu_halves, remove_geglu_halves
from .oom import DecodeTightener, OomRetry, decode_with_fallback
from .placement import PlacementConfig, apply_placement, clear_placement, make_room, placement_hooks, release_memory
from .precision import PrecisionPolicy, apply_precision, check_finite, compute_dtype, detect_gpu, precision_applied
from .preview import PREVIEW_KEY, LivePreview
from .pruning import PruningConfig, apply_pruning
from .vae import DecodeConfig, decode_latents
from .windows import WindowConfig, describe_windows, seam_ratio, window_boundaries, windowed_noise_prediction

logger = logging.getLogger(__name__)

@dataclass
class RunResult:
    """What a run produced and what it took. ``frames``: float32 (F, H, W, 3) in [0, 1]."""

    frames: np.ndarray
    settings: RunSettings
    events: list[RunEvent]
    seconds_total: float
    seconds_per_step: float | None
    phase_seconds: dict[str, float]
    device: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Conditioning:
    """Everything the UNet sees besides the noisy latents, per CFG branch (uncond first, as diffusers)."""

    image_embeddings: torch.Tensor  # (B, 1, D)
    image_latents: torch.Tensor  # (B, F, 4, h, w)
    added_time_ids: torch.Tensor  # (B, 3)

    def frames(self, frames: slice) -> "Conditioning":
        """The conditioning of a temporal window: same image and time ids, that window's image latents."""
        return Conditioning(self.image_embeddings, self.image_latents[:, frames], self.added_time_ids)


class _EventLog:
    """Collects events and forwards them to the caller's callback."""

    def __init__(self, callback: EventCallback | None):
        self.callback = callback
        self.events: list[RunEvent] = []

    def emit(self, phase: Phase, live: dict[str, Any] | None = None, **kwargs: Any) -> RunEvent:
        """``live``: data only the callback sees (preview frames), never kept in the run's events."""
        event = RunEvent(phase, **kwargs)
        self.events.append(event)
        if self.callback is not None:
            self.callback(dataclasses.replace(event, data={**event.data, **live}) if live else event)
        return event


def resolve_device(choice: DeviceChoice) -> torch.device:
    """``auto`` picks CUDA when a CUDA GPU is usable, else the CPU."""
    if choice == DeviceChoice.CUDA or (choice == DeviceChoice.AUTO and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device is set to cuda but PyTorch sees no CUDA GPU; set device to auto or cpu, "
                "or install a CUDA build of PyTorch (see `lowvram-studio info`)"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def prepare_pipeline(pipeline: StableVideoDiffusionPipeline, settings: RunSettings, device: torch.device) -> PrecisionPolicy:
    """Apply the run's precision, weight placement and chunking (each a no-op when already in place)."""
    policy = PrecisionPolicy.from_settings(settings, detect_gpu(device))
    chunking = ChunkingConfig.from_settings(settings)
    if not precision_applied(pipeline, policy) or chunking_applied(pipeline.unet) != chunking:
        clear_placement(pipeline)  # casts and chunk hooks go in under the placement hooks, never over them
        apply_precision(pipeline, policy)
        apply_chunking(pipeline.unet, chunking)
    if device.type == "cuda":  # a GPU kernel fix; on the CPU the run stays bit-equal to the diffusers pipeline
        apply_geglu_halves(pipeline.unet)
    else:
        remove_geglu_halves(pipeline.unet)
    apply_placement(pipeline, PlacementConfig.from_settings(settings, device))
    return policy


def encode_conditioning(
    pipeline: StableVideoDiffusionPipeline,
    image: PIL.Image.Image,
    settings: RunSettings,
    device: torch.device,
    generator: torch.Generator,
) -> Conditioning:
    """Steps 3-5 of the diffusers recipe: CLIP embedding, VAE latent of the noised image, time ids."""
    guidance = settings.guidance_enabled
    make_room(pipeline, "image_encoder")
    image_embeddings = pipeline._encode_image(image, device, 1, guidance)

    pixels = pipeline.video_processor.preprocess(image, height=settings.height, width=settings.width).to(device)
    noise = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype).to(device)
    pixels = (pixels + settings.noise_aug_strength * noise).to(compute_dtype(pipeline.vae))
    make_room(pipeline, "vae")
    image_latents = pipeline._encode_vae_image(
        pixels, device=device, num_videos_per_prompt=1, do_classifier_free_guidance=guidance
    )
    image_latents = image_latents.unsqueeze(1).repeat(1, settings.num_frames, 1, 1, 1)

    added_time_ids = pipeline._get_add_time_ids(
        settings.fps - 1,  # SVD was conditioned on fps - 1, as diffusers passes it
        settings.motion_bucket_id,
        settings.noise_aug_strength,
        image_embeddings.dtype,
        1,
        1,
        guidance,
    ).to(device)
    return Conditioning(image_embeddings, image_latents, added_time_ids)


def initial_latents(
    pipeline: StableVideoDiffusionPipeline, settings: RunSettings, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """Gaussian latents (1, F, 4, h, w) scaled by the scheduler's initial sigma; float32 on ``device``."""
    scale = pipeline.vae_scale_factor
    shape = (1, settings.num_frames, pipeline.unet.config.out_channels, settings.height // scale, settings.width // scale)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    return latents * pipeline.scheduler.init_noise_sigma


def guidance_scales(settings: RunSettings, device: torch.device) -> torch.Tensor:
    """Per-frame guidance rising linearly from min to max, shaped to broadcast over (1, F, C, h, w)."""
    scale = torch.linspace(settings.min_guidance_scale, settings.max_guidance_scale, settings.num_frames)
    return scale.to(device).reshape(1, -1, 1, 1, 1)


def predict_noise(
    pipeline: StableVideoDiffusionPipeline,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: Conditioning,
    settings: RunSettings,
    guidance: torch.Tensor,
) -> torch.Tensor:
    """The UNet's guided prediction for one step, computed in the UNet's dtype, returned in float32.

    With ``cfg_split`` the two guidance branches run one after the other (lossless, half the activations).
    """
    unet = pipeline.unet
    dtype = compute_dtype(unet)
    branches = 2 if settings.guidance_enabled else 1
    model_input = pipeline.scheduler.scale_model_input(torch.cat([latents] * branches), timestep)
    model_input = torch.cat([model_input, cond.image_latents.to(model_input.dtype)], dim=2)

    def call(sample: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return unet(sample, timestep, **kwargs, return_dict=False)[0]

    run = (lambda sample, **kw: split_cfg_call(call, sample, **kw)) if settings.cfg_split else call
    noise_pred = run(
        model_input.to(dtype),
        encoder_hidden_states=cond.image_embeddings.to(dtype),
        added_time_ids=cond.added_time_ids.to(dtype),
    ).float()
    if branches == 1:
        return noise_pred
    uncond, text = noise_pred.chunk(2)
    return uncond + guidance * (text - uncond)


def decode_frames(
    pipeline: StableVideoDiffusionPipeline,
    latents: torch.Tensor,
    settings: RunSettings,
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """Latents (1, F, 4, h, w) -> float32 video (1, 3, F, H, W) in [-1, 1], chunked/tiled as settings say;
    ``cancel`` is checked before each chunk and tile."""
    make_room(pipeline, "vae")
    pixels = decode_latents(pipeline.vae, latents[0], DecodeConfig.from_settings(settings), cancel=cancel)
    return pixels.permute(1, 0, 2, 3)[None]


def to_frames(pipeline: StableVideoDiffusionPipeline, video: torch.Tensor) -> np.ndarray:
    """Video (1, 3, F, H, W) in [-1, 1] -> float32 frames (F, H, W, 3) in [0, 1], as diffusers postprocesses."""
    frames = pipeline.video_processor.postprocess_video(video=video, output_type="np")
    return np.asarray(frames[0], dtype=np.float32)


def generate(
    pipeline: StableVideoDiffusionPipeline,
    image: PIL.Image.Image,
    settings: RunSettings,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
    latents: torch.Tensor | None = None,
    decode_retry: DecodeTightener | None = None,
) -> RunResult:
    """Run image-to-video once; raise ``RunCancelled`` between steps when ``cancel`` is set.

    ``image`` should already be fitted to ``settings.width`` x ``settings.height`` (``media.fit_image``).
    ``latents`` (1, F, 4, h, w) replaces the seeded starting noise, as diffusers' ``latents`` argument does.
    ``decode_retry``: after an out-of-memory error while decoding, the tighter decode settings to decode
    the kept latents again with (``plan.replan.decode_retry``); without it that error ends the run.
    """
    settings.validate()
    cancel = cancel or CancelToken()
    log = _EventLog(on_event)
    device = resolve_device(settings.device)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    started = time.perf_counter()
    phase_seconds: dict[str, float] = {}
    info: dict[str, Any] = {}
    windows = WindowConfig.from_settings(settings)
    pruning = None

    def report_retry(retry: OomRetry) -> None:
        info.setdefault("oom_retries", []).append(retry.to_dict())
        log.emit(Phase(retry.phase), message=retry.message, data={"oom_retry": retry.to_dict()})

    try:
        with torch.inference_mode():
            # 1. Load: precision, weight placement and chunking for this run
            mark = log.emit(Phase.LOAD).time
            policy = prepare_pipeline(pipeline, settings, device)
            phase_seconds[Phase.LOAD.value] = time.perf_counter() - mark
            cancel.raise_if_cancelled()

            # 2. Encode image
            mark = log.emit(Phase.ENCODE).time
            cond = encode_conditioning(pipeline, image, settings, device, generator)
            phase_seconds[Phase.ENCODE.value] = time.perf_counter() - mark

            # 3. Denoise
            scheduler = pipeline.scheduler
            scheduler.set_timesteps(settings.num_inference_steps, device=device)
            if latents is None:
                latents = initial_latents(pipeline, settings, device, generator)
            else:
                latents = latents.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
            guidance = guidance_scales(settings, device)
            total = len(scheduler.timesteps)
            make_room(pipeline, "unet")
            pruning = apply_pruning(pipeline.unet, PruningConfig.from_settings(settings))
            preview = LivePreview.for_run(pipeline, settings.preview_every)
            mark = log.emit(Phase.DENOISE, step=0, total=total).time
            for index, timestep in enumerate(scheduler.timesteps):
                cancel.raise_if_cancelled()
                if pruning is not None:
                    pruning.begin_step(index, total)
                noise_pred = windowed_noise_prediction(
                    lambda part, frames: predict_noise(
                        pipeline, part, timestep, cond.frames(frames), settings, guidance[:, frames]
                    ),
                    latents,
                    index,
                    windows,
                )
                check_finite(noise_pred, "unet", policy, f"at step {index + 1}")
                step = scheduler.step(noise_pred, timestep, latents)
                latents = step.prev_sample
                reuse = pruning.end_step(step.pred_original_sample) if pruning is not None else {}
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                live = None
                if preview.due(index + 1, total):
                    live = {PREVIEW_KEY: preview.capture(step.pred_original_sample, index + 1, total)}
                log.emit(Phase.DENOISE, step=index + 1, total=total, data=reuse, live=live)
            denoise_seconds = time.perf_counter() - mark
            info["preview"] = preview.summary()
            if pruning is not None:
                info["pruning"] = pruning.summary().to_dict()
            phase_seconds[Phase.DENOISE.value] = denoise_seconds
            del cond
            cancel.raise_if_cancelled()

            # 4. Decode
            mark = log.emit(Phase.DECODE).time
            video, settings = decode_with_fallback(  # the settings the frames were decoded with
                lambda s: decode_frames(pipeline, latents, s, cancel), settings, decode_retry, report_retry
            )
            check_finite(video, "vae", policy, "while decoding")
            frames = to_frames(pipeline, video)
            del video, latents
            phase_seconds[Phase.DECODE.value] = time.perf_counter() - mark
            info.update(
                precision=policy.describe(),
                execution_path=policy.path.describe(),
                placement=placement_hooks(pipeline),
                chunk_hooks=chunk_hook_counts(pipeline.unet),
            )
            if windows.active(settings.num_frames):
                info["windows"] = describe_windows(settings.num_frames, windows)
                info["seam_ratio"] = seam_ratio(frames, window_boundaries(settings.num_frames, total - 1, windows))
    finally:
        if pruning is not None:
            pruning.remove()
        release_memory(pipeline)
    return RunResult(
        frames=frames,
        settings=settings,
        events=log.events,
        seconds_total=time.perf_counter() - started,
        seconds_per_step=denoise_seconds / max(total, 1),
        phase_seconds=phase_seconds,
        device=str(device),
        info=info,
    )

"""One run of any model family: encode -> denoise -> decode, with the engine's techniques between the steps.

The family (``engine/family.py``; SVD: ``engine/svd.py``) says what its model computes; this module owns
the loop, so that the memory techniques (precision, placement, chunking, temporal windows, step reuse),
phase/step events, the live preview, the NaN guard and cancellation fit between the steps for every
family alike. Stage names are the progress labels the user sees (``Phase``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .chunking import apply_chunking, chunk_hook_counts, chunking_applied
from .components import DENOISER, by_role
from .config import EngineConfig
from .events import CancelToken, EventCallback, Phase, RunEvent
from .family import ClipRequest, VideoFamily, module_of
from .geglu import apply_geglu_halves, remove_geglu_halves
from .oom import DecodeTightener, OomRetry, decode_with_fallback
from .options import DeviceChoice
from .placement import PlacementConfig, apply_placement, clear_placement, make_room, placement_hooks, release_memory
from .precision import PrecisionPolicy, apply_precision, check_finite, detect_gpu, precision_applied
from .preview import PREVIEW_KEY, LivePreview
from .windows import describe_windows, seam_ratio, window_boundaries, windowed_noise_prediction

logger = logging.getLogger(__name__)


@dataclass
class EngineResult:
    """What a run produced and what it took. ``frames``: float32 (F, H, W, 3) in [0, 1]. ``config``: the
    configuration that made the frames (after any decode retry), not the one asked for."""

    frames: np.ndarray
    config: EngineConfig
    events: list[RunEvent]
    seconds_total: float
    seconds_per_step: float | None
    phase_seconds: dict[str, float]
    device: str
    info: dict[str, Any] = field(default_factory=dict)


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


def prepare(family: VideoFamily, config: EngineConfig, device: torch.device) -> PrecisionPolicy:
    """Apply the run's precision, weight placement and chunking (each a no-op when already in place)."""
    pipeline, denoiser = family.pipeline, module_of(family, DENOISER)
    policy = PrecisionPolicy.resolve(config.precision, detect_gpu(device), family.components)
    if not precision_applied(pipeline, policy) or chunking_applied(denoiser) != config.chunking:
        clear_placement(pipeline)  # casts and chunk hooks go in under the placement hooks, never over them
        apply_precision(pipeline, policy)
        apply_chunking(denoiser, config.chunking)
    if device.type == "cuda":  # a GPU kernel fix; on the CPU the run stays bit-equal to the diffusers pipeline
        apply_geglu_halves(denoiser)
    else:
        remove_geglu_halves(denoiser)
    apply_placement(pipeline, PlacementConfig(config.offload, str(device), family.components))
    return policy


def sample(
    family: VideoFamily,
    request: ClipRequest,
    config: EngineConfig,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
    latents: torch.Tensor | None = None,
    decode_retry: DecodeTightener | None = None,
) -> EngineResult:
    """Make ``request``'s clip with ``family``'s model as ``config`` says; raise ``RunCancelled`` between
    steps when ``cancel`` is set.

    ``latents`` (1, F, C, h, w) replaces the seeded starting noise, as diffusers' ``latents`` argument does.
    ``decode_retry``: after an out-of-memory error while decoding, the tighter ``DecodeConfig`` to decode
    the kept latents again with (``plan.replan.decode_retry``); without it that error ends the run.
    """
    cancel = cancel or CancelToken()
    log = _EventLog(on_event)
    device = resolve_device(config.device)
    pipeline, denoiser = family.pipeline, module_of(family, DENOISER)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    started = time.perf_counter()
    phase_seconds: dict[str, float] = {}
    info: dict[str, Any] = {}
    windows = config.windows
    pruning = None

    def report_retry(retry: OomRetry) -> None:
        info.setdefault("oom_retries", []).append(retry.to_dict())
        log.emit(Phase(retry.phase), message=retry.message, data={"oom_retry": retry.to_dict()})

    try:
        with torch.inference_mode():
            # 1. Load: precision, weight placement and chunking for this run
            mark = log.emit(Phase.LOAD).time
            family.load_for(request, device, PrecisionPolicy.resolve(config.precision, detect_gpu(device),
                                                                     family.components))
            policy = prepare(family, config, device)
            phase_seconds[Phase.LOAD.value] = time.perf_counter() - mark
            cancel.raise_if_cancelled()

            # 2. Encode the conditioning
            mark = log.emit(Phase.ENCODE).time
            cond = family.encode(request, device, generator)
            info.update(cond.describe())
            phase_seconds[Phase.ENCODE.value] = time.perf_counter() - mark

            # 3. Denoise
            scheduler = family.scheduler
            scheduler.set_timesteps(request.num_inference_steps, device=device)
            if latents is None:
                latents = family.initial_noise(request, generator)
            latents = latents.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
            total = len(scheduler.timesteps)
            make_room(pipeline, by_role(family.components, DENOISER).attribute)
            pruning = family.apply_reuse(config.reuse)
            preview = LivePreview.for_run(pipeline, config.preview_every)
            mark = log.emit(Phase.DENOISE, step=0, total=total).time
            for index, timestep in enumerate(scheduler.timesteps):
                cancel.raise_if_cancelled()
                if pruning is not None:
                    pruning.begin_step(index, total)
                noise_pred = windowed_noise_prediction(
                    lambda part, frames: family.predict(part, timestep, cond.frames(frames), frames, config.cfg_split),
                    latents,
                    index,
                    windows,
                )
                check_finite(noise_pred, DENOISER, policy, f"at step {index + 1}")
                step = scheduler.step(noise_pred, timestep, latents)
                latents = step.prev_sample
                x0 = getattr(step, "pred_original_sample", None)  # multistep schedulers (UniPC) give none
                reuse = pruning.end_step(x0) if pruning is not None else {}
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                live = None
                if x0 is not None and preview.due(index + 1, total):
                    live = {PREVIEW_KEY: preview.capture(x0, index + 1, total)}
                log.emit(Phase.DENOISE, step=index + 1, total=total, data=reuse, live=live)
            denoise_seconds = time.perf_counter() - mark
            info["preview"] = preview.summary()
            if pruning is not None:
                info["pruning"] = pruning.summary().to_dict()
            phase_seconds[Phase.DENOISE.value] = denoise_seconds
            latents = family.final_latents(latents, cond)
            del cond
            cancel.raise_if_cancelled()

            # 4. Decode
            mark = log.emit(Phase.DECODE).time
            video, decoded_with = decode_with_fallback(  # the decode settings the frames were made with
                lambda decode: family.decode(latents, decode, cancel), config.decode, decode_retry, report_retry
            )
            config = config.replace(decode=decoded_with)
            check_finite(video, "vae", policy, "while decoding")
            frames = family.to_frames(video)
            del video, latents
            phase_seconds[Phase.DECODE.value] = time.perf_counter() - mark
            info.update(
                precision=policy.describe(),
                execution_path=policy.path.describe(),
                placement=placement_hooks(pipeline),
                chunk_hooks=chunk_hook_counts(denoiser),
            )
            if windows.active(request.num_frames):
                info["windows"] = describe_windows(request.num_frames, windows)
                info["seam_ratio"] = seam_ratio(frames, window_boundaries(request.num_frames, total - 1, windows))
    finally:
        if pruning is not None:
            pruning.remove()
        release_memory(pipeline)
    return EngineResult(
        frames=frames,
        config=config,
        events=log.events,
        seconds_total=time.perf_counter() - started,
        seconds_per_step=denoise_seconds / max(total, 1),
        phase_seconds=phase_seconds,
        device=str(device),
        info=info,
    )

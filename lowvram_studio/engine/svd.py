"""Stable Video Diffusion (SVD / SVD-XT) as a model family: a plain diffusers StableVideoDiffusionPipeline.

The recipe mirrors ``StableVideoDiffusionPipeline.__call__`` step for step (with every technique off the
frames equal the pipeline's own): CLIP image embedding, the VAE latent of the noised image repeated per
frame, the micro-conditioning time ids, per-frame guidance rising linearly from min to max, and the
temporal VAE's decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableVideoDiffusionPipeline

from .chunking import split_cfg_call
from .components import SVD_COMPONENTS
from .dims import ModelDims
from .events import CancelToken
from .family import ClipRequest
from .placement import make_room
from .precision import PrecisionPolicy, compute_dtype
from .pruning import PruningState, apply_pruning
from .pruning_config import PruningConfig
from .vae import DecodeConfig, decode_latents


@dataclass(frozen=True)
class SvdRequest(ClipRequest):
    """An SVD clip: ``image`` fitted to width x height (``media.fit_image``) and SVD's micro-conditioning."""

    image: PIL.Image.Image | None = None
    fps: int = 7  # SVD was conditioned on fps - 1, as diffusers passes it
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0

    @property
    def guidance_enabled(self) -> bool:
        """SVD runs classifier-free guidance when the maximum scale exceeds 1 (as diffusers does)."""
        return self.max_guidance_scale > 1.0


@dataclass
class SvdConditioning:
    """Everything the UNet sees besides the noisy latents, per CFG branch (uncond first, as diffusers)."""

    image_embeddings: torch.Tensor  # (B, 1, D)
    image_latents: torch.Tensor  # (B, F, 4, h, w)
    added_time_ids: torch.Tensor  # (B, 3)
    guidance: torch.Tensor | None  # (1, F, 1, 1, 1) per-frame scale; None without guidance

    def frames(self, frames: slice) -> "SvdConditioning":
        """The conditioning of a temporal window: same image and time ids, that window's image latents."""
        guidance = None if self.guidance is None else self.guidance[:, frames]
        return SvdConditioning(self.image_embeddings, self.image_latents[:, frames], self.added_time_ids, guidance)

    def describe(self) -> dict[str, Any]:
        return {}  # made the same way every run: nothing to record


class SvdFamily:
    """SVD behind the family interface (``engine/family.py``)."""

    kind = "svd"
    components = SVD_COMPONENTS

    def __init__(self, pipeline: StableVideoDiffusionPipeline, name: str = "svd"):
        self.pipeline = pipeline
        self.name = name

    @property
    def scheduler(self) -> Any:
        return self.pipeline.scheduler

    def load_for(self, request: SvdRequest, device: torch.device, policy: PrecisionPolicy) -> None:
        """The pipeline holds every component: nothing to read."""

    def encode(self, request: SvdRequest, device: torch.device, generator: torch.Generator) -> SvdConditioning:
        """Steps 3-5 of the diffusers recipe: CLIP embedding, VAE latent of the noised image, time ids."""
        pipeline, guidance = self.pipeline, request.guidance_enabled
        make_room(pipeline, "image_encoder")
        image_embeddings = pipeline._encode_image(request.image, device, 1, guidance)

        pixels = pipeline.video_processor.preprocess(request.image, height=request.height, width=request.width)
        pixels = pixels.to(device)
        noise = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype).to(device)
        pixels = (pixels + request.noise_aug_strength * noise).to(compute_dtype(pipeline.vae))
        make_room(pipeline, "vae")
        image_latents = pipeline._encode_vae_image(
            pixels, device=device, num_videos_per_prompt=1, do_classifier_free_guidance=guidance
        )
        image_latents = image_latents.unsqueeze(1).repeat(1, request.num_frames, 1, 1, 1)

        added_time_ids = pipeline._get_add_time_ids(
            request.fps - 1,
            request.motion_bucket_id,
            request.noise_aug_strength,
            image_embeddings.dtype,
            1,
            1,
            guidance,
        ).to(device)
        scales = None
        if guidance:
            scales = torch.linspace(request.min_guidance_scale, request.max_guidance_scale, request.num_frames)
            scales = scales.to(device).reshape(1, -1, 1, 1, 1)
        return SvdConditioning(image_embeddings, image_latents, added_time_ids, scales)

    def initial_noise(self, request: SvdRequest, generator: torch.Generator) -> torch.Tensor:
        scale = self.pipeline.vae_scale_factor
        channels = self.pipeline.unet.config.out_channels
        shape = (1, request.num_frames, channels, request.height // scale, request.width // scale)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    @property
    def size_multiple(self) -> int:
        """The VAE's 8x and the UNet's three 2x downsamplings: 64 (so every skip connection lines up)."""
        return 64

    def apply_reuse(self, config: PruningConfig) -> PruningState | None:
        """Static-frame pruning and deep-feature step reuse on the UNet (engine/pruning.py)."""
        return apply_pruning(self.pipeline.unet, config)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, cond: SvdConditioning, frames: slice,
                cfg_split: bool) -> torch.Tensor:
        """The UNet's guided prediction for one step, computed in the UNet's dtype, returned in float32."""
        unet = self.pipeline.unet
        dtype = compute_dtype(unet)
        branches = 1 if cond.guidance is None else 2
        model_input = self.scheduler.scale_model_input(torch.cat([latents] * branches), timestep)
        model_input = torch.cat([model_input, cond.image_latents.to(model_input.dtype)], dim=2)

        def call(sample: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return unet(sample, timestep, **kwargs, return_dict=False)[0]

        run = (lambda sample, **kw: split_cfg_call(call, sample, **kw)) if cfg_split else call
        noise_pred = run(
            model_input.to(dtype),
            encoder_hidden_states=cond.image_embeddings.to(dtype),
            added_time_ids=cond.added_time_ids.to(dtype),
        ).float()
        if cond.guidance is None:
            return noise_pred
        uncond, text = noise_pred.chunk(2)
        return uncond + cond.guidance * (text - uncond)

    def final_latents(self, latents: torch.Tensor, cond: SvdConditioning) -> torch.Tensor:
        return latents

    def decode(self, latents: torch.Tensor, config: DecodeConfig, cancel: CancelToken) -> torch.Tensor:
        make_room(self.pipeline, "vae")
        pixels = decode_latents(self.pipeline.vae, latents[0], config, cancel=cancel)
        return pixels.permute(1, 0, 2, 3)[None]

    def to_frames(self, video: torch.Tensor) -> np.ndarray:
        """As diffusers postprocesses (``video_processor.postprocess_video``)."""
        frames = self.pipeline.video_processor.postprocess_video(video=video, output_type="np")
        return np.asarray(frames[0], dtype=np.float32)

    def dims(self) -> ModelDims:
        return ModelDims.from_pipeline(self.pipeline, self.name)

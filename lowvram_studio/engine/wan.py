"""Wan 2.x image-to-video as a model family: a plain diffusers ``WanImageToVideoPipeline``.

The recipe is ``WanImageToVideoPipeline.__call__``'s, step for step, so that with every technique off the
frames equal the pipeline's own: the UMT5 prompt and negative-prompt embeddings, the image's latent
condition from the pipeline's own ``prepare_latents`` (Wan2.2 TI2V: the first latent frame pinned, with a
per-token timestep mask, ``expand_timesteps``; Wan2.1 I2V: a frame mask and the condition concatenated on
channels, plus the CLIP image embedding), two transformer calls per step for guidance (or one batched
call), and the 3D causal VAE's decode with its own tiling. Latents are (1, C, F, h, w) inside this module
and frame-major (1, F, C, h, w) at the interface. Text embeddings come from a ``PromptCache`` when it holds
them (``engine/prompt_cache.py``), so the text encoder runs only for texts it has not seen; a text encoder
the loader left on disk (``text_encoder_source``) is read only then, and released after encoding. Step
reuse is diffusers' FirstBlockCache (``engine/step_cache.py``), one cache state per guidance branch and window.

Not yet here (issue #19): the two-expert Wan2.2 A14B (``transformer_2`` / ``boundary_ratio``) is refused
with a message, and a memory model calibrated for Wan
(``dims`` gives true parameter counts; the planner's activation coefficients are SVD's).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from .components import DENOISER, ENCODER, VAE, Component, ComponentSource
from .dims import WAN_TRANSFORMER_WIDTH, WAN_VAE_WIDTH, ModelDims
from .events import CancelToken
from .family import ClipRequest
from .placement import drop_component, largest_streamed_parameter, make_room, release_memory
from .precision import ComponentPrecision, PrecisionPolicy, compute_dtype
from .prompt_cache import EncoderIdentity, PromptCache
from .pruning_config import PruningConfig
from .step_cache import FirstBlockCacheState, apply_first_block_cache
from .vae import DecodeConfig

WAN_COMPONENTS = (
    Component("transformer", DENOISER, "transformer", "unet_dtype"),
    Component("vae", VAE, "VAE", "vae_dtype", moves_in_halves=True),
    Component("text_encoder", ENCODER, "text encoder", "encoder_dtype", auto_bf16=True),
)


# the cache key's identity (None without a cache) and the embeddings found, by role
CacheLookup = tuple[EncoderIdentity | None, dict[str, torch.Tensor]]


def frame_major(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) <-> (B, F, C, h, w): the same swap both ways."""
    return latents.transpose(1, 2)


@dataclass(frozen=True)
class WanRequest(ClipRequest):
    """A Wan clip: ``image`` fitted to width x height, a prompt and what to steer away from."""

    image: PIL.Image.Image | None = None
    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float = 5.0
    max_sequence_length: int = 512

    @property
    def guidance_enabled(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass
class WanConditioning:
    """The prompt embeddings, the image's latent condition and (TI2V) the pinned-frame mask, native layout."""

    prompt_embeds: torch.Tensor  # (1, L, D)
    negative_embeds: torch.Tensor | None  # (1, L, D); None without guidance
    condition: torch.Tensor  # (1, C', F or 1, h, w)
    mask: torch.Tensor | None  # (1, 1, F, h, w): 0 on the pinned first latent frame (TI2V), else None
    image_embeds: torch.Tensor | None  # Wan2.1 I2V's CLIP embedding
    guidance_scale: float
    prompt_sources: dict[str, str] = field(default_factory=dict)  # per text: "cache" or "encoder"
    encoder_read: bool | None = None  # whether a text encoder left on disk was read for this run (None: no source)

    def frames(self, frames: slice) -> "WanConditioning":
        """The conditioning of a window of latent frames (a one-frame condition applies to every window)."""
        condition = self.condition if self.condition.shape[2] == 1 else self.condition[:, :, frames]
        mask = None if self.mask is None else self.mask[:, :, frames]
        return dataclasses.replace(self, condition=condition, mask=mask)

    def describe(self) -> dict[str, Any]:
        """Where each text's embedding came from (and whether a deferred encoder was read), for the record."""
        described: dict[str, Any] = {"prompt_embeddings": dict(self.prompt_sources)}
        if self.encoder_read is not None:
            described["text_encoder"] = ("read from disk for this run, released after encoding" if self.encoder_read
                                         else "not read: every text came from the prompt cache")
        return described


class WanFamily:
    """Wan 2.x behind the family interface (``engine/family.py``)."""

    kind = "wan"
    components = WAN_COMPONENTS

    def __init__(self, pipeline: Any, name: str = "wan", prompt_cache: PromptCache | None = None,
                 text_encoder_source: ComponentSource | None = None):
        """``prompt_cache``: where text embeddings are kept between runs (``engine/prompt_cache.py``);
        None encodes every prompt afresh, as the diffusers pipeline does. ``text_encoder_source``: where the
        text encoder waits on disk when the pipeline was loaded without it (``pipeline.text_encoder`` None);
        it is read only for a run whose texts are not all in the cache, and released after encoding."""
        if getattr(pipeline, "transformer_2", None) is not None:
            raise ValueError("two-expert Wan2.2 models (A14B: transformer_2) are not supported yet; "
                             "use Wan2.2 TI2V-5B or a Wan2.1 I2V model")
        self.pipeline = pipeline
        self.name = name
        self.prompt_cache = prompt_cache
        self.text_encoder_source = text_encoder_source
        self._encoder_precision: ComponentPrecision | None = None  # the run's, set by load_for
        self._encoder_read = False
        self._looked_up: CacheLookup | None = None  # what load_for found, kept for encode
        self._step_cache: FirstBlockCacheState | None = None  # this run's, set by apply_reuse

    @property
    def scheduler(self) -> Any:
        return self.pipeline.scheduler

    @property
    def pins_first_frame(self) -> bool:
        return bool(self.pipeline.config.expand_timesteps)

    def latent_frames(self, request: WanRequest) -> int:
        return (request.num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1

    def _native_shape(self, request: WanRequest) -> tuple[int, ...]:
        scale = self.pipeline.vae_scale_factor_spatial
        return (1, self.pipeline.vae.config.z_dim, self.latent_frames(request),
                request.height // scale, request.width // scale)

    def _texts(self, request: WanRequest) -> dict[str, str]:
        texts = {"prompt": request.prompt}
        if request.guidance_enabled:
            texts["negative_prompt"] = request.negative_prompt
        return texts

    def _identity(self, request: WanRequest, device: torch.device) -> EncoderIdentity:
        """A deferred encoder is known by its files and the run's precision; a loaded one by its weights."""
        pipeline, precision = self.pipeline, self._encoder_precision
        if self.text_encoder_source is not None and precision is not None:
            return EncoderIdentity.of(self.text_encoder_source.fingerprint(), precision.storage, precision.compute,
                                      device, pipeline.tokenizer, request.max_sequence_length)
        return EncoderIdentity.of_module(pipeline.text_encoder, pipeline.tokenizer, device, request.max_sequence_length)

    def _lookup(self, request: WanRequest, device: torch.device) -> CacheLookup:
        """The cache key's identity and the embeddings the cache holds for the request's texts, by role.
        Read, not just looked up: a damaged entry is deleted here and counts as missing."""
        if self.prompt_cache is None:
            return None, {}
        identity = self._identity(request, device)
        found = {role: self.prompt_cache.load(identity, text) for role, text in self._texts(request).items()}
        return identity, {role: embedding for role, embedding in found.items() if embedding is not None}

    def load_for(self, request: WanRequest, device: torch.device, policy: PrecisionPolicy) -> None:
        """Before precision and placement: read the deferred text encoder when a text is not in the cache
        (what the cache holds is kept for ``encode``, so no entry is read twice or lost meanwhile)."""
        self._encoder_precision = policy.encoder
        if self.text_encoder_source is None or self.pipeline.text_encoder is not None:
            return
        self._looked_up = self._lookup(request, device)
        if len(self._looked_up[1]) < len(self._texts(request)):
            self.pipeline.text_encoder = self.text_encoder_source.load(policy.encoder.compute)
            self._encoder_read = True

    def _prompt_embeddings(self, request: WanRequest,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, str]]:
        """The prompt's and (with guidance) the negative prompt's embeddings, each from the cache when it
        holds them; the text encoder is moved in and run only for the texts it does not hold."""
        pipeline, texts = self.pipeline, self._texts(request)
        identity, cached = self._looked_up or self._lookup(request, device)
        self._looked_up = None
        cached = {role: embedding.to(device) for role, embedding in cached.items()}
        embeddings = dict(cached)
        if len(cached) < len(texts):
            if pipeline.text_encoder is None:
                raise RuntimeError("the text encoder is not loaded and the prompt cache lacks these texts; "
                                   "run through engine.sampler.sample, which reads it first (load_for)")
            make_room(pipeline, "text_encoder")
            embeddings["prompt"], embeddings["negative_prompt"] = pipeline.encode_prompt(
                prompt=request.prompt, negative_prompt=request.negative_prompt,
                do_classifier_free_guidance=request.guidance_enabled, num_videos_per_prompt=1,
                prompt_embeds=cached.get("prompt"), negative_prompt_embeds=cached.get("negative_prompt"),
                max_sequence_length=request.max_sequence_length, device=device,
            )
            if identity is not None:
                for role in texts.keys() - cached.keys():
                    self.prompt_cache.save(identity, texts[role], embeddings[role])
        sources = {role: "cache" if role in cached else "encoder" for role in texts}
        return embeddings["prompt"], embeddings.get("negative_prompt"), sources

    def encode(self, request: WanRequest, device: torch.device, generator: torch.Generator) -> WanConditioning:
        pipeline = self.pipeline
        positive, negative, sources = self._prompt_embeddings(request, device)
        if self.text_encoder_source is not None:
            drop_component(pipeline, "text_encoder")  # back on disk: its RAM is free for the denoiser
        if "encoder" in sources.values():
            # Streamed, the encoder's weights came in on group offloading's transfer stream, whose allocator
            # pool the VAE's allocations (default stream) cannot reuse: hand it back to the driver before the
            # VAE moves in, so that the encode phase peaks at the larger of the two and not at their sum.
            release_memory()
        dtype = compute_dtype(pipeline.transformer)
        image_embeds = None
        if pipeline.transformer.config.image_dim is not None:
            image_embeds = pipeline.encode_image(request.image, device).to(dtype)
        pixels = pipeline.video_processor.preprocess(request.image, height=request.height, width=request.width)
        make_room(pipeline, "vae.encoder")
        placeholder = torch.zeros(self._native_shape(request), device=device)  # the noise is drawn in initial_noise
        prepared = pipeline.prepare_latents(
            pixels.to(device, dtype=torch.float32), 1, pipeline.vae.config.z_dim, request.height, request.width,
            request.num_frames, torch.float32, device, generator, placeholder,
        )
        condition, mask = (prepared[1], prepared[2]) if self.pins_first_frame else (prepared[1], None)
        return WanConditioning(positive.to(dtype), None if negative is None else negative.to(dtype), condition,
                               mask, image_embeds, request.guidance_scale, sources,
                               None if self.text_encoder_source is None else self._encoder_read)

    def initial_noise(self, request: WanRequest, generator: torch.Generator) -> torch.Tensor:
        """Drawn (1, C, F, h, w) as the pipeline's ``randn_tensor`` draws it, handed over frame-major."""
        noise = torch.randn(self._native_shape(request), generator=generator, dtype=torch.float32)
        return frame_major(noise).contiguous()

    def _model_input(self, latents: torch.Tensor, timestep: torch.Tensor,
                     cond: WanConditioning) -> tuple[torch.Tensor, torch.Tensor]:
        if cond.mask is None:
            return torch.cat([latents, cond.condition], dim=1), timestep.expand(latents.shape[0])
        model_input = (1 - cond.mask) * cond.condition + cond.mask * latents
        patch_h, patch_w = self.pipeline.transformer.config.patch_size[1:]
        per_token = (cond.mask[0][0][:, ::patch_h, ::patch_w] * timestep).flatten()  # pinned tokens sit at t=0
        return model_input, per_token.unsqueeze(0).expand(latents.shape[0], -1)

    @property
    def size_multiple(self) -> int:
        """One transformer token per patch of latent cells: 16 x 2 = 32 px for Wan2.2 TI2V, 8 x 2 for Wan2.1."""
        return self.pipeline.vae_scale_factor_spatial * self.pipeline.transformer.config.patch_size[1]

    def apply_reuse(self, config: PruningConfig) -> FirstBlockCacheState | None:
        """Step reuse by diffusers' FirstBlockCache on the transformer (engine/step_cache.py)."""
        self._step_cache = apply_first_block_cache(self.pipeline.transformer, config)
        return self._step_cache

    def _cache_context(self, branch: str, frames: slice) -> contextlib.AbstractContextManager:
        """A branch of a window keeps its own cached residuals; no context without a step cache."""
        cache = self._step_cache
        if cache is None or not self.pipeline.transformer.is_cache_enabled:  # removed after its run
            return contextlib.nullcontext()
        return cache.context(f"{branch}:{frames.start}-{frames.stop}")

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, cond: WanConditioning, frames: slice,
                cfg_split: bool) -> torch.Tensor:
        """Guided flow prediction (float32, frame-major) for a window of latent frames."""
        transformer = self.pipeline.transformer
        dtype = compute_dtype(transformer)
        model_input, timesteps = self._model_input(frame_major(latents), timestep, cond)
        model_input = model_input.to(dtype)

        def call(branch: str, sample: torch.Tensor, steps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            with self._cache_context(branch, frames):
                return transformer(hidden_states=sample, timestep=steps, encoder_hidden_states=text,
                                   encoder_hidden_states_image=cond.image_embeds, return_dict=False)[0].float()

        if cond.negative_embeds is None:
            return frame_major(call("cond", model_input, timesteps, cond.prompt_embeds))
        if cfg_split:  # the pipeline's own way: one call per branch
            positive = call("cond", model_input, timesteps, cond.prompt_embeds)
            negative = call("uncond", model_input, timesteps, cond.negative_embeds)
        else:
            both = call("cond_uncond", torch.cat([model_input] * 2), torch.cat([timesteps] * 2),
                        torch.cat([cond.prompt_embeds, cond.negative_embeds]))
            positive, negative = both.chunk(2)
        return frame_major(negative + cond.guidance_scale * (positive - negative))

    def final_latents(self, latents: torch.Tensor, cond: WanConditioning) -> torch.Tensor:
        """TI2V: the first latent frame is the image's, as the pipeline sets it after its loop."""
        if cond.mask is None:
            return latents
        native = frame_major(latents)
        return frame_major((1 - cond.mask) * cond.condition + cond.mask * native)

    def decode(self, latents: torch.Tensor, config: DecodeConfig, cancel: CancelToken) -> torch.Tensor:
        """The Wan VAE decodes its latent frames one after another with a feature cache, so it never holds
        all frames' activations (``config.chunk`` has nothing to cut); ``config.tile`` turns on its own
        spatial tiling with about a quarter-tile overlap (tile and stride rounded to whole latent cells)."""
        vae = self.pipeline.vae
        make_room(self.pipeline, "vae.decoder")
        cancel.raise_if_cancelled()
        if config.tile:
            factor = self.pipeline.vae_scale_factor_spatial  # tiles and strides are whole latent cells
            tile = max(config.tile // factor, 1) * factor
            stride = max(tile * 3 // 4 // factor, 1) * factor
            vae.enable_tiling(tile, tile, stride, stride)
        else:
            vae.disable_tiling()
        native = frame_major(latents).to(compute_dtype(vae))
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(native.device, native.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(native.device, native.dtype)
        # Each latent frame's pixels leave the GPU as the decoder makes them: diffusers assembles the clip (a
        # torch.cat per frame, tiles blended) on whatever device they are on, so it does so on the CPU and the GPU
        # never holds the clip (720p x 121: 1.3 GB in fp32, twice that while concatenating). Exact: the assembly
        # only copies, blends and clamps. Hand-written: diffusers' Wan VAE has no output-device option.
        to_host = vae.decoder.register_forward_hook(lambda module, args, pixels: pixels.to("cpu"))
        try:
            return vae.decode(native / inverse_std + mean, return_dict=False)[0].float()
        finally:
            to_host.remove()

    def to_frames(self, video: torch.Tensor) -> np.ndarray:
        frames = self.pipeline.video_processor.postprocess_video(video, output_type="np")
        return np.asarray(frames[0], dtype=np.float32)

    def dims(self) -> ModelDims:
        def count(module: torch.nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        transformer, vae, encoder = self.pipeline.transformer, self.pipeline.vae, self.pipeline.text_encoder
        blocks = sorted(count(block) for block in transformer.blocks)
        hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        return ModelDims(
            name=self.name,
            unet_params=count(transformer),
            vae_params=count(vae),
            vae_encode_params=count(vae.encoder) + count(vae.quant_conv),
            encoder_params=self.text_encoder_source.parameters() if encoder is None else count(encoder),
            unet_stream_params=sum(blocks[-2:]) + count(transformer) - sum(blocks),
            native_frames=self.latent_frames(WanRequest(0, 0, 121, 1)),  # TI2V-5B's clip: 121 frames
            latent_scale=self.pipeline.vae_scale_factor_spatial,
            unet_width=hidden / WAN_TRANSFORMER_WIDTH,
            vae_width=(getattr(vae.config, "decoder_base_dim", None) or vae.config.base_dim) / WAN_VAE_WIDTH,
            kind=self.kind,
            temporal_scale=self.pipeline.vae_scale_factor_temporal,
            patch=transformer.config.patch_size[1],
            encoder_stream_params=(self.text_encoder_source.largest_streamed_parameter() if encoder is None
                                   else largest_streamed_parameter(encoder)),
            encoder_dropped=self.text_encoder_source is not None,
            decode_to_host=True,
        )

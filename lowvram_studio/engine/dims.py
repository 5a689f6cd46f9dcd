"""ModelDims: the sizes of a model the planner's memory model and the speed model need.

A family computes them from its loaded pipeline (``VideoFamily.dims``) so that the planner never looks
inside a model; SVD's come from the UNet's streaming groups and its first-level channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .speed_model import streaming_groups

SVD_UNET_WIDTH, SVD_VAE_WIDTH = 320, 128  # first-level channels of SVD / SVD-XT (models/svd_configs.py)
WAN_TRANSFORMER_WIDTH, WAN_VAE_WIDTH = 3072, 256  # Wan2.2 TI2V-5B's hidden size and VAE decoder channels


@dataclass(frozen=True)
class ModelDims:
    """What the memory model needs to know about a pipeline: parameter counts and native frames.

    ``unet_stream_params``: UNet weights resident while streaming (engine/placement.py groups each
    resnet / attention / sampler of the blocks): the two largest groups (the one computing and the one
    prefetched) plus the modules outside the blocks.

    ``unet_width`` / ``vae_width``: first-level channels relative to the model the family's memory model
    was fitted on (SVD-XT: UNet 320, VAE 128; Wan: TI2V-5B's transformer 3072, VAE decoder 256). Activations
    scale with the channels of the full-resolution level that sets the peak, so a narrower model (the
    built-in demo: 0.1 and 0.25) is predicted by scaling them.

    ``kind``: the family, which picks its memory model (plan/memory_model.py). ``native_frames`` counts latent
    frames, which are ``temporal_scale`` pixel frames each after the first (Wan's VAE: 4; SVD's: 1); one
    denoiser token covers ``patch`` x ``patch`` latent cells. ``encoder_stream_params``: the largest single
    weight of the conditioning encoder, which leaf-level streaming moves in whole (but its input embedding: UMT5's
    2 GB token table is looked up on the CPU, engine/placement.py).
    ``encoder_dropped``: the encoder leaves the GPU after the encode phase (a text encoder read from disk
    for one encode is dropped before the denoiser runs), even when every weight stays on the GPU.
    ``vae_encode_params``: the VAE weights its encode needs, for a VAE that an offload mode moves in halves
    (engine/placement.py; Wan's encoder and quantisation convolution); 0: the whole VAE moves at once.
    ``decode_to_host``: decoded pixels move to the CPU as the VAE makes them (Wan, engine/wan.py), so the GPU
    holds one latent frame's pixel frames, not the clip.
    """

    name: str
    unet_params: int
    vae_params: int
    encoder_params: int
    unet_stream_params: int
    native_frames: int
    latent_scale: int = 8
    unet_width: float = 1.0
    vae_width: float = 1.0
    kind: str = "svd"
    temporal_scale: int = 1
    patch: int = 1
    encoder_stream_params: int = 0
    encoder_dropped: bool = False
    vae_encode_params: int = 0
    decode_to_host: bool = False

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames`` pixel frames."""
        return (frames - 1) // self.temporal_scale + 1

    def tokens_per_latent_frame(self, height: int, width: int) -> int:
        cell = self.latent_scale * self.patch
        return (height // cell) * (width // cell)

    @classmethod
    def from_pipeline(cls, pipeline: Any, name: str = "pipeline") -> "ModelDims":
        def count(module: torch.nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        unet = pipeline.unet
        groups = [count(module) for _, module in streaming_groups(unet)]
        outside = count(unet) - sum(groups)
        return cls(
            name=name,
            unet_params=count(unet),
            vae_params=count(pipeline.vae),
            encoder_params=count(pipeline.image_encoder),
            unet_stream_params=sum(sorted(groups)[-2:]) + outside,
            native_frames=int(unet.config.num_frames),
            latent_scale=int(pipeline.vae_scale_factor),
            unet_width=unet.config.block_out_channels[0] / SVD_UNET_WIDTH,
            vae_width=pipeline.vae.config.block_out_channels[0] / SVD_VAE_WIDTH,
        )

"""Full-size SVD / SVD-XT architecture configs, for benchmarks with random weights.

Random weights have exactly the memory and speed of the real model (DESIGN §5), so every GPU figure
is measured on these, built on the GPU itself (no 6 GB of CPU init, nothing downloaded).
The dicts are the published `config.json` files of stabilityai/stable-video-diffusion-img2vid-xt.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .demo import SVD_DOWN_BLOCK_TYPES, SVD_SCHEDULER_CONFIG, SVD_UP_BLOCK_TYPES, build_feature_extractor

SVD_XT_UNET_CONFIG: dict = {
    "sample_size": 96,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": SVD_DOWN_BLOCK_TYPES,
    "up_block_types": SVD_UP_BLOCK_TYPES,
    "block_out_channels": (320, 640, 1280, 1280),
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768,
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "num_attention_heads": (5, 10, 20, 20),
    "num_frames": 25,
}

# SVD (not XT) differs only in its native frame count.
SVD_UNET_CONFIG: dict = {**SVD_XT_UNET_CONFIG, "num_frames": 14}

SVD_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}

# OpenCLIP ViT-H/14 vision tower with projection, as SVD's image_encoder/config.json.
SVD_IMAGE_ENCODER_CONFIG: dict = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def build_svd_xt_pipeline(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cuda", seed: int = 0, num_frames: int = 25
) -> StableVideoDiffusionPipeline:
    """SVD-XT (or SVD with ``num_frames=14``) with random weights seeded ``seed``, built on ``device``."""
    unet_config = {**SVD_XT_UNET_CONFIG, "num_frames": num_frames}
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel(**unet_config)
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_IMAGE_ENCODER_CONFIG))
    # diffusers' AlphaBlender makes its mix factor with the legacy torch.Tensor([...]) constructor,
    # which ignores the device context: move every module explicitly.
    for module in (unet, vae, image_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipeline = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG),
        feature_extractor=build_feature_extractor(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline

"""The built-in demo model: the real SVD architecture at a size that runs on two CPU cores.

Every component is the class a real SVD / SVD-XT checkpoint uses, so every engine technique that
works here works on the full-size model. The weights come from ``assets/demo-model/`` (fp16
safetensors trained on procedural video by ``lowvram_studio.demo_training``); when they are missing the
model falls back to seeded random weights, identical on every start, and says so
(``DemoModelInfo.note``, ``DEMO_WEIGHTS_NOTE``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from ..engine.preview import attach_latent_rgb
from .latent_rgb import FILE_NAME as LATENT_RGB_FILE
from .latent_rgb import load_or_fit_latent_rgb

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo"
DEMO_WEIGHTS_NOTE = (
    "The built-in demo model has random weights (trained weights not found in assets/demo-model): it "
    "shows what every memory setting costs, but its video is noise. Restore assets/demo-model/*.safetensors "
    "(git checkout assets) or load an SVD / SVD-XT model (a diffusers folder with model_index.json, "
    "e.g. --model /path/to/stable-video-diffusion-img2vid-xt)."
)
TRAINED_WEIGHTS_NOTE = (
    "The built-in demo model is trained on procedural clips (moving arrows, spinning pinwheels, pans, "
    "zooms) at 128x128: it moves simple shapes, not real footage. For real videos load an SVD / SVD-XT model."
)
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo-model"
# Component name -> file name in the weights folder (fp16 safetensors, diffusers state-dict keys).
WEIGHT_FILES: dict[str, str] = {
    "vae": "vae.safetensors",
    "unet": "unet.safetensors",
    "image_encoder": "image_encoder.safetensors",
}

# The scheduler configuration that ships with stabilityai/stable-video-diffusion-img2vid(-xt).
SVD_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}

# SVD's UNet block layout: the demo keeps it, only the widths shrink.
SVD_DOWN_BLOCK_TYPES = (
    "CrossAttnDownBlockSpatioTemporal",
    "CrossAttnDownBlockSpatioTemporal",
    "CrossAttnDownBlockSpatioTemporal",
    "DownBlockSpatioTemporal",
)
SVD_UP_BLOCK_TYPES = (
    "UpBlockSpatioTemporal",
    "CrossAttnUpBlockSpatioTemporal",
    "CrossAttnUpBlockSpatioTemporal",
    "CrossAttnUpBlockSpatioTemporal",
)

# Small versions of the SVD configs: same block types and depth, narrow channels. GroupNorm in
# these classes uses 32 groups, so every width is a multiple of 32.
DEMO_UNET_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": SVD_DOWN_BLOCK_TYPES,
    "up_block_types": SVD_UP_BLOCK_TYPES,
    "block_out_channels": (32, 64, 64, 64),
    "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": 48,
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "transformer_layers_per_block": 1,
    "num_attention_heads": (2, 4, 4, 4),
    "num_frames": 14,
}

DEMO_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "block_out_channels": (32, 64, 128, 128),
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 128,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}

DEMO_IMAGE_ENCODER_CONFIG: dict = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 224,
    "patch_size": 32,
    "projection_dim": 64,
}

# CLIP's normalisation constants, as in SVD's feature_extractor/preprocessor_config.json.
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class DemoModelInfo:
    """Which weights the demo model runs on, and the line the UI / CLI shows about it."""

    trained: bool
    weights_dir: Path | None
    note: str


def demo_model_info(weights: Path | None = None) -> DemoModelInfo:
    """Trained when every weight file exists in ``weights`` (default: assets/demo-model)."""
    folder = Path(weights) if weights is not None else DEFAULT_WEIGHTS_DIR
    if all((folder / name).is_file() for name in WEIGHT_FILES.values()):
        return DemoModelInfo(trained=True, weights_dir=folder, note=TRAINED_WEIGHTS_NOTE)
    return DemoModelInfo(trained=False, weights_dir=None, note=DEMO_WEIGHTS_NOTE)


def build_feature_extractor() -> CLIPImageProcessor:
    """SVD's CLIP preprocessing (224 px, CLIP mean/std), as in its feature_extractor/preprocessor_config.json."""
    return CLIPImageProcessor(
        crop_size={"height": 224, "width": 224},
        size={"shortest_edge": 224},
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
    )


def _seeded(seed: int, build):
    """Build a module under a fixed CPU RNG state so its random init is the same on every start."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_demo_pipeline(
    weights: Path | None = None, random_init: bool = False, with_preview: bool = True
) -> StableVideoDiffusionPipeline:
    """Return the demo pipeline in fp32 on the CPU; deterministic, nothing downloaded.

    Loads the trained weights from ``weights`` (default: assets/demo-model) when they are there,
    else (or with ``random_init``) keeps the seeded random init; ``demo_model_info`` says which.
    ``with_preview`` attaches the live-preview projection shipped beside the weights
    (``latent_rgb.json``), refitted in memory when it was fitted on other VAE weights.
    """
    unet = _seeded(1, lambda: UNetSpatioTemporalConditionModel(**DEMO_UNET_CONFIG))
    vae = _seeded(2, lambda: AutoencoderKLTemporalDecoder(**DEMO_VAE_CONFIG))
    image_encoder = _seeded(
        3, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**DEMO_IMAGE_ENCODER_CONFIG))
    )
    feature_extractor = build_feature_extractor()
    info = DemoModelInfo(False, None, DEMO_WEIGHTS_NOTE) if random_init else demo_model_info(weights)
    if weights is not None and not random_init and not info.trained:
        raise FileNotFoundError(
            f"demo weights not found in {weights}: it needs {', '.join(WEIGHT_FILES.values())}; "
            "export them with python -m lowvram_studio.demo_training.train --export DIR, or omit weights"
        )
    if info.trained:
        components = {"vae": vae, "unet": unet, "image_encoder": image_encoder}
        for name, filename in WEIGHT_FILES.items():
            state = load_file(str(info.weights_dir / filename))
            components[name].load_state_dict({k: v.float() for k, v in state.items()})
    else:
        logger.info(info.note)
    scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    pipeline = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )
    pipeline.set_progress_bar_config(disable=True)
    for module in (unet, vae, image_encoder):
        module.eval().requires_grad_(False)
    if with_preview:
        shipped = (info.weights_dir or DEFAULT_WEIGHTS_DIR) / LATENT_RGB_FILE
        attach_latent_rgb(pipeline, load_or_fit_latent_rgb(vae, shipped, save=False))
    return pipeline

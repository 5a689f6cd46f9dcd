"""Wan2.2 TI2V-5B at full size, built from its published configs with random weights: the memory and speed
of the real model without its files (no hub access here), for the GPU benchmarks.

The configs are those of Wan-AI/Wan2.2-TI2V-5B-Diffusers (transformer/, vae/, text_encoder/config.json; the
reference repository's ``wan_ti2v_5B``: dim 3072, ffn 14336, 24 heads, 30 layers, VAE stride 4x16x16). The
tokenizer is the toy one (models/wan_toy): a prompt's token count, not its vocabulary, sets the cost.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from ..engine.dims import ModelDims
from ..engine.wan import WanFamily
from .wan_toy import toy_tokenizer

TI2V_5B_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                           out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30,
                           cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
                 in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
# The latent statistics of Wan2.2's VAE (Wan2.2_VAE.pth / ComfyUI's wan2.2_vae.safetensors, whose file holds no
# config): the values of Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json. WAN22_VAE above keeps 0 / 1 for the
# random-weight benchmarks.
WAN22_LATENTS_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                      0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                      -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                      -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                      0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                     0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                     0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]
# The scheduler Wan2.2 TI2V-5B's diffusers folder configures (scheduler/scheduler_config.json: UniPC on flow sigmas,
# shift 5; the remaining fields are UniPC's defaults)
TI2V_5B_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                         num_train_timesteps=1000)
# google/umt5-xxl's encoder as Wan ships it
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                is_gated_act=True, tie_word_embeddings=False)


def tied(encoder: UMT5EncoderModel) -> UMT5EncoderModel:
    """The encoder's input embedding as one tensor with ``shared``, as Wan ships it (one ``shared.weight``) and
    as transformers >= 5.1 builds it; 5.0 builds two, which would count 1.05 B parameters twice."""
    encoder.encoder.embed_tokens.weight = encoder.shared.weight
    return encoder


def build_ti2v_5b_pipeline(device: str | torch.device = "cuda", seed: int = 0) -> WanImageToVideoPipeline:
    """Random weights seeded ``seed``, initialised on ``device`` (minutes on a CPU, seconds on a GPU), stored
    as Wan-AI ships them: transformer and text encoder bf16, VAE fp32."""
    torch.manual_seed(seed)
    with torch.device(device):  # one component at a time: fp32 init, then cast, keeps the peak at one fp32 copy
        transformer = WanTransformer3DModel(**TI2V_5B_TRANSFORMER).to(torch.bfloat16)
        text_encoder = tied(UMT5EncoderModel(UMT5Config(**UMT5_XXL))).to(torch.bfloat16)
        vae = AutoencoderKLWan(**WAN22_VAE)
    scheduler = UniPCMultistepScheduler(**TI2V_5B_SCHEDULER)
    pipeline = WanImageToVideoPipeline(tokenizer=toy_tokenizer(), text_encoder=text_encoder, vae=vae,
                                       scheduler=scheduler, transformer=transformer, expand_timesteps=True)
    pipeline.set_progress_bar_config(disable=True)
    for module in (vae, text_encoder, transformer):
        module.eval().requires_grad_(False)
    return pipeline


@functools.cache
def ti2v_5b_dims() -> ModelDims:
    """The planner's dimensions of the full-size TI2V-5B, counted on the meta device (no memory, a second):
    what the Wan memory model was fitted on (bench/wan_memory_model.py) and what a budget is planned with
    before the model is loaded, loaded from a folder as in the benchmark's runs."""
    return _as_loaded_from_a_folder(build_ti2v_5b_pipeline("meta"), "wan2.2-ti2v-5b")


@functools.lru_cache(maxsize=8)
def folder_dims(folder: Path) -> ModelDims:
    """The planner's dimensions of a diffusers Wan folder not loaded yet, counted from its config files on the
    meta device (no weights read): a Wan2.1 14B folder is planned with its own sizes, not TI2V-5B's. Raises
    OSError / ValueError / KeyError when the folder lacks a config."""
    def config(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text(encoding="utf-8"))

    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(config("transformer"))
        vae = AutoencoderKLWan.from_config(config("vae"))
        text_encoder = tied(UMT5EncoderModel(UMT5Config(**config("text_encoder"))))
    pipeline = WanImageToVideoPipeline(tokenizer=toy_tokenizer(), text_encoder=text_encoder, vae=vae,
                                       scheduler=UniPCMultistepScheduler(**TI2V_5B_SCHEDULER), transformer=transformer)
    return _as_loaded_from_a_folder(pipeline, folder.name)


def _as_loaded_from_a_folder(pipeline: WanImageToVideoPipeline, name: str) -> ModelDims:
    """The dims of ``pipeline``'s family as the loader hands it over: the text encoder left on disk, dropped
    after each encode (models/deferred.py)."""
    return replace(WanFamily(pipeline, name).dims(), encoder_dropped=True)

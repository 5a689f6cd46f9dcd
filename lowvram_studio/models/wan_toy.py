"""A toy Wan2.2 TI2V pipeline: the real diffusers Wan classes at a few hundred thousand parameters, random
weights, and a word-level tokenizer built here (no download), so the Wan family runs on any CPU in seconds.

It proves the recipe and the techniques, not quality: its output is noise-like (issue #19 asks for a
trained Wan demo model). The sizes follow diffusers' own Wan2.2 5B image-to-video test components:
z_dim 48, 16x spatial and 4x temporal compression, patch (1, 2, 2), pinned first frame (expand_timesteps).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

WORDS = ("a red green blue yellow ball box disc moves spins grows shrinks left right up down slowly fast "
         "still scene the background is and of").split()
TEXT_DIM = 32


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: the pad token first (id 0, as UMT5 pads), an end-of-text token after each prompt."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: index + 3 for index, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_toy_wan_pipeline(seed: int = 0, text_dim: int = TEXT_DIM) -> WanImageToVideoPipeline:
    """``text_dim``: the text encoder's width (4096 fits the full-size UMT5-XXL encoder in its place)."""
    tokenizer = toy_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                           latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=37,
                                               num_layers=2, num_heads=4, relative_attention_num_buckets=8))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=48, out_channels=48, text_dim=text_dim, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipeline = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                       transformer=transformer, expand_timesteps=True)
    pipeline.set_progress_bar_config(disable=True)
    for module in (vae, text_encoder, transformer):
        module.eval()  # built from a config they start in training mode: the encoder's dropout would draw noise
    return pipeline.to(torch.float32)

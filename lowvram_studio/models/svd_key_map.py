"""Name mapping between diffusers' SVD components and Stability's original single-file layout.

One job: for every diffusers tensor name, where it lives in the original file (key, and how its tensor is
transformed), so that loading (``single_file.py``) and writing the original layout share one table.

The original layout is Stability's generative-models code ("sgm"):
- UNet ``model.diffusion_model.*``: ``VideoUNet`` (sgm/modules/diffusionmodules/video_model.py) with
  ``VideoResBlock`` (spatial ResBlock + ``time_stack`` ResBlock3D + ``time_mixer``) and
  ``SpatialVideoTransformer`` (sgm/modules/video_attention.py; ``time_stack`` blocks, ``time_pos_embed``).
- VAE ``first_stage_model.*``: ``AutoencodingEngine`` (no quant convs) with the LDM ``Encoder`` and the
  temporal ``VideoDecoder`` (sgm/modules/autoencoding/temporal_ae.py, time_mode "conv-only").
- Image encoder ``conditioner.embedders.0.open_clip.model.visual.*``: OpenCLIP ViT-H/14 inside
  ``FrozenOpenCLIPImagePredictionEmbedder`` (sgm/modules/encoders/modules.py).
The file also carries parts the diffusers pipeline does not use (the OpenCLIP text-tower leftovers
that ``FrozenOpenCLIPImageEmbedder`` keeps after ``del model.transformer``, and the duplicate image VAE
of the cond-frame embedder ``conditioner.embedders.3``); they are skipped without being read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
IMAGE_ENCODER_PREFIX = "conditioner.embedders.0.open_clip.model.visual."
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "image_encoder": IMAGE_ENCODER_PREFIX}
# Present in Stability's files, unused by the diffusers pipeline (see the module docstring).
IGNORED_PREFIXES = (
    "conditioner.embedders.0.open_clip.model.token_embedding.",
    "conditioner.embedders.0.open_clip.model.positional_embedding",
    "conditioner.embedders.0.open_clip.model.ln_final.",
    "conditioner.embedders.0.open_clip.model.text_projection",
    "conditioner.embedders.0.open_clip.model.logit_scale",
    "conditioner.embedders.3.",
)


class Transform(str, Enum):
    """How an original tensor becomes a diffusers tensor."""

    COPY = "copy"
    CONV_TO_LINEAR = "conv-to-linear"  # VAE mid attention: 1x1 conv [C, C, 1, 1] -> linear [C, C]
    TRANSPOSE = "transpose"  # OpenCLIP ``proj`` [hidden, proj] -> ``visual_projection.weight``
    QKV_SPLIT = "qkv-split"  # OpenCLIP ``in_proj_*`` holds q, k, v stacked on dim 0


@dataclass(frozen=True)
class Source:
    """Where a diffusers tensor lives in the original file (key without the component prefix)."""

    key: str
    transform: Transform = Transform.COPY
    part: int = 0


# ---------------------------------------------------------------------------------------------
# Name mapping: diffusers name -> original name, per component. One direction only; loading
# inverts it over the names of the (meta-device) diffusers module.
# ---------------------------------------------------------------------------------------------

_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _rename_leaf(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    if head not in table:
        raise KeyError(rest)
    return f"{table[head]}.{tail}"


def _unet_resnet(rest: str) -> str:
    """SpatioTemporalResBlock -> sgm VideoResBlock (spatial ResBlock + ``time_stack``)."""
    if rest.startswith("spatial_res_block."):
        return _rename_leaf(rest[len("spatial_res_block.") :], _RESNET_NAMES)
    if rest.startswith("temporal_res_block."):
        return "time_stack." + _rename_leaf(rest[len("temporal_res_block.") :], _RESNET_NAMES)
    if rest == "time_mixer.mix_factor":
        return rest
    raise KeyError(rest)


def _unet_attention(rest: str) -> str:
    """TransformerSpatioTemporalModel -> sgm SpatialVideoTransformer."""
    if rest.startswith("temporal_transformer_blocks."):
        return "time_stack." + rest[len("temporal_transformer_blocks.") :]
    if rest.startswith("time_pos_embed."):
        return "time_pos_embed." + _rename_leaf(rest[len("time_pos_embed.") :], {"linear_1": "0", "linear_2": "2"})
    return rest  # norm, proj_in, proj_out, transformer_blocks.*, time_mixer.mix_factor keep their names


_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_source(name: str, config: Mapping) -> Source:
    """Original name of a UNetSpatioTemporalConditionModel tensor (sgm VideoUNet numbering)."""
    per_level = config["layers_per_block"] + 1  # input blocks per level: resnets + downsampler
    module, _, param = name.rpartition(".")
    if module in _UNET_TOP:
        return Source(f"{_UNET_TOP[module]}.{param}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_level + layer
        inner = f"0.{_unet_resnet(rest)}" if kind == "resnets" else f"1.{_unet_attention(rest)}"
        return Source(f"input_blocks.{index}.{inner}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", name):
        return Source(f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}")
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        kind, layer, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return Source(f"middle_block.{2 * layer}.{_unet_resnet(rest)}")
        return Source(f"middle_block.1.{_unet_attention(rest)}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_level + layer
        inner = f"0.{_unet_resnet(rest)}" if kind == "resnets" else f"1.{_unet_attention(rest)}"
        return Source(f"output_blocks.{index}.{inner}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", name):
        block = int(m[1])
        # sgm appends the Upsample after the attention when the level has one.
        slot = 2 if config["up_block_types"][block].startswith("CrossAttn") else 1
        return Source(f"output_blocks.{block * per_level + per_level - 1}.{slot}.conv.{m[2]}")
    raise KeyError(name)


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_resnet(rest: str) -> str:
    """ResnetBlock2D -> LDM ResnetBlock (only the shortcut is renamed)."""
    head, _, tail = rest.partition(".")
    return f"{_VAE_RESNET.get(head, head)}.{tail}"


def _vae_video_resnet(rest: str) -> str:
    """SpatioTemporalResBlock (decoder) -> sgm temporal_ae.VideoResBlock."""
    if rest.startswith("spatial_res_block."):
        return _vae_resnet(rest[len("spatial_res_block.") :])
    if rest.startswith("temporal_res_block."):
        return "time_stack." + _rename_leaf(rest[len("temporal_res_block.") :], _RESNET_NAMES)
    if rest == "time_mixer.mix_factor":
        return "mix_factor"
    raise KeyError(rest)


def _vae_attention(rest: str) -> Source:
    """diffusers Attention -> LDM AttnBlock, whose projections are 1x1 convs."""
    head, _, tail = rest.partition(".")
    if head == "to_out":
        tail = tail.removeprefix("0.")
    key = f"mid.attn_1.{_VAE_ATTENTION[head]}.{tail}"
    is_conv_weight = head != "group_norm" and tail == "weight"
    return Source(key, Transform.CONV_TO_LINEAR if is_conv_weight else Transform.COPY)


_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.time_conv_out": "decoder.conv_out.time_mix_conv",
    # Not in Stability's files (AutoencodingEngine has no quant conv); identity when absent.
    "quant_conv": "quant_conv",
}
VAE_OPTIONAL = ("quant_conv.weight", "quant_conv.bias")


def vae_source(name: str, config: Mapping) -> Source:
    """Original name of an AutoencoderKLTemporalDecoder tensor (LDM Encoder + sgm VideoDecoder)."""
    levels = len(config["block_out_channels"])
    module, _, param = name.rpartition(".")
    if module in _VAE_TOP:
        return Source(f"{_VAE_TOP[module]}.{param}")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return Source(f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", name):
        return Source(f"encoder.down.{m[1]}.downsample.conv.{m[2]}")
    if m := re.fullmatch(r"encoder\.mid_block\.resnets\.(\d+)\.(.+)", name):
        return Source(f"encoder.mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
        source = _vae_attention(m[2])
        return Source(f"{m[1]}.{source.key}", source.transform)
    if m := re.fullmatch(r"decoder\.mid_block\.resnets\.(\d+)\.(.+)", name):
        return Source(f"decoder.mid.block_{int(m[1]) + 1}.{_vae_video_resnet(m[2])}")
    # diffusers counts decoder levels from the bottom (lowest resolution) up, sgm from the top down.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return Source(f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_vae_video_resnet(m[3])}")
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", name):
        return Source(f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}")
    raise KeyError(name)


_CLIP_TOP = {
    "vision_model.embeddings.class_embedding": Source("class_embedding"),
    "vision_model.embeddings.patch_embedding.weight": Source("conv1.weight"),
    "vision_model.embeddings.position_embedding.weight": Source("positional_embedding"),
    "visual_projection.weight": Source("proj", Transform.TRANSPOSE),
}
_CLIP_MODULES = {
    "vision_model.pre_layrnorm": "ln_pre",
    "vision_model.post_layernorm": "ln_post",
}
_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV_PART = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def image_encoder_source(name: str, config: Mapping) -> Source:
    """Original name of a CLIPVisionModelWithProjection tensor (OpenCLIP VisionTransformer)."""
    if name in _CLIP_TOP:
        return _CLIP_TOP[name]
    module, _, param = name.rpartition(".")
    if module in _CLIP_MODULES:
        return Source(f"{_CLIP_MODULES[module]}.{param}")
    if m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)", name):
        return Source(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", Transform.QKV_SPLIT, _QKV_PART[m[2]])
    if m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
        return Source(f"transformer.resblocks.{m[1]}.{_CLIP_LAYER[m[2]]}.{m[3]}")
    raise KeyError(name)


_SOURCE_FUNCTIONS = {"unet": unet_source, "vae": vae_source, "image_encoder": image_encoder_source}


def component_sources(component: str, names: Iterable[str], config: Mapping) -> dict[str, Source]:
    """Map every diffusers tensor name of ``component`` to its place in the original file."""
    function = _SOURCE_FUNCTIONS[component]
    sources = {}
    for name in names:
        try:
            sources[name] = function(name, config)
        except KeyError as exc:
            raise NotImplementedError(f"no original-layout name for {component} tensor {name!r}") from exc
    return sources


"""What an SVD single-file checkpoint holds, from its header alone (no tensor data is read).

One job: check that a file is SVD, name its variant and native frame count, and derive each component's diffusers
config from the tensor shapes (plus the few hyperparameters no shape reveals), so the studio can describe a file
before loading it and the loader (``single_file.py``) knows which modules to build.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .safetensors_file import SafetensorsHeader, SingleFileError, check_checkpoint_path, read_header, recorded_configs
from .svd_key_map import COMPONENT_PREFIXES, IGNORED_PREFIXES, UNET_PREFIX, VAE_PREFIX

logger = logging.getLogger(__name__)

# Hyperparameters no tensor shape reveals, with the values of Stability's SVD / SVD-XT:
# sgm config num_head_channels 64; OpenCLIP ViT-H-14 head_width 80 and nn.GELU; diffusers' SVD configs.
UNET_HEAD_DIM = 64
CLIP_HEAD_DIM = 80
NON_SHAPE_KEYS = {
    "unet": ("num_attention_heads", "num_frames", "sample_size"),
    "vae": ("scaling_factor", "force_upcast", "sample_size"),
    "image_encoder": ("num_attention_heads", "hidden_act", "layer_norm_eps"),
}


# ---------------------------------------------------------------------------------------------
# Configs from tensor shapes
# ---------------------------------------------------------------------------------------------


def _indices(shapes: Iterable[str], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in shapes if (m := re.match(pattern, k))})


def derive_unet_config(shapes: Mapping[str, tuple[int, ...]], extra: Mapping | None = None) -> dict:
    """UNetSpatioTemporalConditionModel config from original-layout shapes (keys without prefix)."""
    input_blocks = _indices(shapes, r"input_blocks\.(\d+)\.")
    channels, has_attention, depths = [], [], []
    level_channels, level_attention, level_depth = [], False, 0
    for index in input_blocks[1:]:
        if f"input_blocks.{index}.0.op.weight" in shapes:  # downsampler closes a level
            channels.append(level_channels[-1])
            has_attention.append(level_attention)
            depths.append(level_depth)
            level_channels, level_attention, level_depth = [], False, 0
            continue
        level_channels.append(shapes[f"input_blocks.{index}.0.out_layers.3.weight"][0])
        if f"input_blocks.{index}.1.norm.weight" in shapes:
            level_attention = True
            level_depth = len(_indices(shapes, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\."))
    channels.append(level_channels[-1])
    has_attention.append(level_attention)
    depths.append(level_depth)
    layers = len(level_channels)
    attention_depths = [d for d, a in zip(depths, has_attention) if a]
    cross_key = next(k for k in shapes if k.endswith("transformer_blocks.0.attn2.to_k.weight"))
    config = {
        "sample_size": 96,
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "out_channels": shapes["out.2.weight"][0],
        "down_block_types": tuple(
            "CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in has_attention
        ),
        "up_block_types": tuple(
            "CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in reversed(has_attention)
        ),
        "block_out_channels": tuple(channels),
        # SVD's added time ids are (fps, motion bucket, noise augmentation), each embedded alike.
        "addition_time_embed_dim": shapes["label_emb.0.0.weight"][1] // 3,
        "projection_class_embeddings_input_dim": shapes["label_emb.0.0.weight"][1],
        "layers_per_block": layers,
        "cross_attention_dim": shapes[cross_key][1],
        "transformer_layers_per_block": attention_depths[0] if len(set(attention_depths)) == 1 else tuple(depths),
        "num_attention_heads": tuple(max(c // UNET_HEAD_DIM, 1) for c in channels),
        "num_frames": 25,
    }
    return _with_extra(config, "unet", extra)


def derive_vae_config(shapes: Mapping[str, tuple[int, ...]], extra: Mapping | None = None) -> dict:
    """AutoencoderKLTemporalDecoder config from original-layout shapes (keys without prefix)."""
    levels = _indices(shapes, r"encoder\.down\.(\d+)\.")
    channels = []
    for level in levels:
        last = _indices(shapes, rf"encoder\.down\.{level}\.block\.(\d+)\.")[-1]
        channels.append(shapes[f"encoder.down.{level}.block.{last}.conv2.weight"][0])
    config = {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ("DownEncoderBlock2D",) * len(levels),
        "block_out_channels": tuple(channels),
        "layers_per_block": len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "sample_size": 768,
        "scaling_factor": 0.18215,
        "force_upcast": True,
    }
    return _with_extra(config, "vae", extra)


def derive_image_encoder_config(shapes: Mapping[str, tuple[int, ...]], extra: Mapping | None = None) -> dict:
    """CLIPVisionConfig kwargs from OpenCLIP visual shapes (keys without prefix)."""
    hidden, _, patch, _ = shapes["conv1.weight"]
    positions = shapes["positional_embedding"][0]
    config = {
        "hidden_size": hidden,
        "intermediate_size": shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
        "num_attention_heads": max(hidden // CLIP_HEAD_DIM, 1),
        "num_hidden_layers": len(_indices(shapes, r"transformer\.resblocks\.(\d+)\.")),
        "patch_size": patch,
        "image_size": patch * math.isqrt(positions - 1),
        "projection_dim": shapes["proj"][1],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
    return _with_extra(config, "image_encoder", extra)


def _with_extra(config: dict, component: str, extra: Mapping | None) -> dict:
    """Apply recorded non-shape hyperparameters (never sizes: those come from the tensors)."""
    for key in NON_SHAPE_KEYS[component]:
        if extra and key in extra:
            value = extra[key]
            config[key] = tuple(value) if isinstance(value, list) else value
    return config


_DERIVE = {"unet": derive_unet_config, "vae": derive_vae_config, "image_encoder": derive_image_encoder_config}


# ---------------------------------------------------------------------------------------------
# What a file holds
# ---------------------------------------------------------------------------------------------


@dataclass
class SingleFileInfo:
    """What :func:`inspect_single_file` learned from a header, without reading tensor data."""

    path: Path
    variant: str  # "svd" | "svd_xt" | "svd_xt_1_1" | "svd-like"
    num_frames: int
    has_vae: bool
    has_image_encoder: bool
    dtype: torch.dtype  # the dtype holding most bytes
    size_bytes: int
    configs: dict[str, dict] = field(default_factory=dict)  # diffusers configs of the components present
    ignored_keys: int = 0


def _variant_from(path: Path, metadata: Mapping[str, str]) -> tuple[str, int] | None:
    """Name the variant from modelspec metadata or the file name; None when neither tells."""
    texts = [v.lower() for k, v in metadata.items() if k.startswith("modelspec.")] + [path.stem.lower()]
    for text in texts:
        if re.search(r"xt[_\-. ]?1[_\-.]?1", text):
            return "svd_xt_1_1", 25
        if re.search(r"(^|[^a-z])xt([^a-z]|$)|img2vid-xt|svd[_\-]?xt", text):
            return "svd_xt", 25
        if re.search(r"svd|stable[_\- ]video", text):
            return "svd", 14
    return None


def _check_is_svd(header: SafetensorsHeader) -> None:
    unet_keys = [k for k in header.entries if k.startswith(UNET_PREFIX)]
    if not unet_keys:
        sample = ", ".join(list(header.entries)[:3])
        raise SingleFileError(
            f"{header.path} holds neither SVD (no '{UNET_PREFIX}' keys) nor a Wan transformer (first keys: "
            f"{sample}); use svd.safetensors / svd_xt.safetensors, ComfyUI's wan2.2_ti2v_5B_fp16.safetensors, or a "
            "diffusers folder with model_index.json"
        )
    if not any(".time_stack." in k for k in unet_keys):
        raise SingleFileError(
            f"{header.path} is an image model (a Stable Diffusion checkpoint: its UNet has no temporal "
            "'time_stack' layers), not Stable Video Diffusion; pick an SVD / SVD-XT checkpoint"
        )
    if f"{VAE_PREFIX}decoder.conv_in.weight" in header.entries and not any(
        k.startswith(f"{VAE_PREFIX}decoder.") and ".time_stack." in k for k in header.entries
    ):
        raise SingleFileError(
            f"{header.path} holds SVD with the per-frame image decoder (svd_image_decoder), which the "
            "diffusers temporal VAE cannot express; use the standard svd.safetensors / svd_xt.safetensors"
        )


def inspect_single_file(path: str | Path, num_frames: int | None = None) -> SingleFileInfo:
    """Validate a single-file checkpoint and describe it (variant, components, configs) from its header."""
    return describe_header(read_header(check_checkpoint_path(path)), num_frames)


def describe_header(header: SafetensorsHeader, num_frames: int | None) -> SingleFileInfo:
    path = header.path
    _check_is_svd(header)
    recorded = recorded_configs(header)
    variant = _variant_from(path, header.metadata)
    if variant is None:
        variant = ("svd-like", 25)
        logger.info("%s: file name and metadata do not name the variant; assuming 25 native frames", path)
    frames = num_frames or recorded.get("unet", {}).get("num_frames") or variant[1]
    configs = {}
    for component, prefix in COMPONENT_PREFIXES.items():
        shapes = header.shapes(prefix)
        if not shapes:
            continue
        try:
            configs[component] = _DERIVE[component](shapes, recorded.get(component))
        except (KeyError, StopIteration, IndexError, ValueError) as exc:
            raise SingleFileError(
                f"{path}: the {component} tensors under '{prefix}' do not form an SVD {component} "
                f"(cannot read its size: missing {exc}): a damaged file or a different model; use Stability's "
                "svd / svd_xt / svd_xt_1_1 .safetensors"
            ) from exc
    configs["unet"]["num_frames"] = frames
    bytes_by_dtype: dict[torch.dtype, int] = {}
    for entry in header.entries.values():
        bytes_by_dtype[entry.dtype] = bytes_by_dtype.get(entry.dtype, 0) + entry.end - entry.begin
    return SingleFileInfo(
        path=path,
        variant=variant[0],
        num_frames=frames,
        has_vae="vae" in configs,
        has_image_encoder="image_encoder" in configs,
        dtype=max(bytes_by_dtype, key=bytes_by_dtype.get),
        size_bytes=header.file_size,
        configs=configs,
        ignored_keys=sum(k.startswith(IGNORED_PREFIXES) for k in header.entries),
    )


"""Load Wan2.2 TI2V-5B from ComfyUI's split files (``models/wan_split_set.py`` finds the three) into a diffusers
``WanImageToVideoPipeline``, offline, with the text encoder left on disk until a prompt misses the prompt cache.

What diffusers and transformers do not do, written here:
- one reader for the three files: each tensor is read at its offset into its final tensor
  (``safetensors_file.TensorReader``) of modules built on the meta device. Measured (ru_maxrss of a child process, a
  0.77 B-parameter Wan transformer in fp16, 1,473 MiB of weights): 1,489 MiB above the imports, 1.01x.
  diffusers' ``from_single_file`` memory-maps the file instead (48 MiB after loading, 1.02x once every weight is
  touched), but it needs a hub config, and it cannot read Wan2.2's VAE or ComfyUI's scaled fp8 (below);
- the transformer's names come from diffusers' own converter (``convert_wan_transformer_to_diffusers``), run over
  the header's key names only; its config is derived from the shapes (diffusers would fetch one from the hub,
  and for TI2V-5B its model-type guess picks Wan2.1 I2V-14B's);
- the Wan2.2 VAE's names (``wan22_vae_source``): diffusers' single-file converter knows only Wan2.1's VAE layout
  (``convert_wan_vae_to_diffusers``); Wan2.2's nested ``downsamples.N.downsamples.M`` layout is converted only by
  its script ``scripts/convert_wan_to_diffusers.py`` (``convert_vae_22``), whose facts this follows;
- ComfyUI's text encoder file (transformers' key names without a config.json) and its ``scaled_fp8`` variant:
  float8_e4m3fn weights, each with a float32 ``<layer>.scale_weight`` (ComfyUI's ``comfy/ops.py``
  ``scaled_fp8_ops``: the weight is ``weight * scale_weight``; ``scale_input`` only serves fp8 matmuls and the
  ``scaled_fp8`` marker only names the fp8 dtype), dequantized tensor by tensor into the run's encoder dtype;
- the tokenizer comes from the Hugging Face cache (google/umt5-xxl, or the tokenizer of a cached Wan-AI diffusers
  snapshot); never downloaded. The sentencepiece model some ComfyUI text encoder files embed (``spiece_model``) is
  skipped: turning it into a tokenizer needs the sentencepiece package, which is not installed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from ..engine.components import INPUT_EMBEDDING_NAMES
from .deferred import files_fingerprint
from .discovery import hf_cache_dir, hf_snapshot
from .errors import ModelError
from .safetensors_file import (SafetensorsHeader, SingleFileError, TensorReader, narrowest_stored, read_header,
                               recorded_configs)
from .wan_configs import TI2V_5B_SCHEDULER, UMT5_XXL, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, tied
from .wan_split_set import TEXT_ENCODER, TRANSFORMER, VAE, WanSplitSet, transformer_prefix

ProgressCallback = Callable[[int, int], None]
# Not weights: ComfyUI's fp8 marker, its per-layer scales (applied while reading), a tokenizer some files embed
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
NOT_WEIGHTS = ("scaled_fp8", "spiece_model")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
WAN_HEAD_DIM = 128  # every Wan 2.x transformer: 1.3B 12 x 128, TI2V-5B 24 x 128, 14B 40 x 128
UMT5_TOKENIZER_REPO = "google/umt5-xxl"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def _weight_keys(header: SafetensorsHeader) -> list[str]:
    return [k for k in header.entries if k not in NOT_WEIGHTS and not k.endswith(SCALE_SUFFIXES)]


# ---------------------------------------------------------------------------------------------
# Names and configs: diffusers name -> file key, per component
# ---------------------------------------------------------------------------------------------


def transformer_sources(header: SafetensorsHeader) -> dict[str, str]:
    """diffusers' converter run over the key names alone (each value is its own key, so nothing is read)."""
    return convert_wan_transformer_to_diffusers({key: key for key in _weight_keys(header)})


def transformer_config(header: SafetensorsHeader) -> dict:
    shapes = header.shapes(transformer_prefix(header))
    dim, in_channels, *patch = shapes["patch_embedding.weight"]
    layers = {int(m[1]) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    config = dict(
        patch_size=tuple(patch), num_attention_heads=dim // WAN_HEAD_DIM, attention_head_dim=WAN_HEAD_DIM,
        in_channels=in_channels, out_channels=shapes["head.head.weight"][0] // math.prod(patch),
        text_dim=shapes["text_embedding.0.weight"][1], freq_dim=shapes["time_embedding.0.weight"][1],
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0], num_layers=len(layers),
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
        eps=1e-6, rope_max_seq_len=1024)
    return {**config, **recorded_configs(header).get("transformer", {})}


_VAE_RESIDUAL = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6.",
                 "conv_shortcut.": "shortcut."}
_VAE_TOP = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
            "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
            "encoder.conv_out.": "encoder.head.2.", "decoder.norm_out.": "decoder.head.0.",
            "decoder.conv_out.": "decoder.head.2."}


def _residual(rest: str) -> str:
    for ours, theirs in _VAE_RESIDUAL.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def wan22_vae_source(name: str, config: Mapping) -> str:
    """Original Wan2.2 VAE key (Wan2.2's vae2_2.py) of an ``AutoencoderKLWan(is_residual=True)`` tensor."""
    for ours, theirs in _VAE_TOP.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    blocks = config["num_res_blocks"]
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_residual(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{_residual(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsampler\.(.+)", name):
        return f"encoder.downsamples.{m[1]}.downsamples.{blocks}.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.upsamples.{m[1]}.upsamples.{m[2]}.{_residual(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsampler\.(.+)", name):  # after the decoder's blocks + 1
        return f"decoder.upsamples.{m[1]}.upsamples.{blocks + 1}.{m[2]}"
    raise KeyError(name)


def vae_config(header: SafetensorsHeader) -> dict:
    shapes = header.shapes()
    base_dim, in_channels = shapes["encoder.conv1.weight"][:2]
    levels = sorted({int(m[1]) for k in shapes if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    dim_mult = [shapes[f"encoder.downsamples.{i}.downsamples.0.residual.2.weight"][0] // base_dim for i in levels]
    blocks = len({m[1] for k in shapes if (m := re.match(r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual", k))})
    temporal = [f"encoder.downsamples.{i}.downsamples.{blocks}.time_conv.weight" in shapes for i in levels[:-1]]
    patch_size = math.isqrt(in_channels // 3)
    config = dict(
        base_dim=base_dim, decoder_base_dim=shapes["decoder.conv1.weight"][0] // dim_mult[-1],
        z_dim=shapes["conv2.weight"][0], dim_mult=dim_mult, num_res_blocks=blocks, attn_scales=[],
        temperal_downsample=temporal, dropout=0.0, is_residual=True, in_channels=in_channels,
        out_channels=shapes["decoder.head.2.weight"][0], patch_size=patch_size,
        scale_factor_spatial=patch_size * 2 ** (len(levels) - 1), scale_factor_temporal=2 ** sum(temporal),
        latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)
    return {**config, **recorded_configs(header).get("vae", {})}


def text_encoder_config(header: SafetensorsHeader) -> dict:
    shapes = header.shapes()
    vocab, width = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    layers = {int(m[1]) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    config = {**UMT5_XXL, "vocab_size": vocab, "d_model": width, "num_heads": heads,
              "d_kv": shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
              "d_ff": shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
              "num_layers": len(layers), "relative_attention_num_buckets": buckets}
    return {**config, **recorded_configs(header).get("text_encoder", {})}


def text_encoder_sources(names: list[str], header: SafetensorsHeader) -> dict[str, str]:
    """ComfyUI keeps transformers' names; the tied input embedding is stored once, as ``shared.weight``."""
    tied = "encoder.embed_tokens.weight"
    return {n: "shared.weight" if n == tied and tied not in header.entries else n for n in names}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_weight(reader: TensorReader, key: str, dtype: torch.dtype) -> torch.Tensor:
    """The tensor in ``dtype``; a ComfyUI scaled-fp8 weight times its ``scale_weight`` (one rounding)."""
    tensor = reader.read(key, dtype)
    scale_key = key.removesuffix(".weight") + ".scale_weight"
    if reader.header.entries[key].dtype in FP8_DTYPES and scale_key in reader.header.entries:
        tensor.mul_(reader.read(scale_key, torch.float32))
    return tensor


def _bytes_of(header: SafetensorsHeader, keys: set[str]) -> int:
    scales = {k.removesuffix(".weight") + ".scale_weight" for k in keys} & set(header.entries)
    return sum(header.entries[k].end - header.entries[k].begin for k in keys | scales)


def _fill(module: torch.nn.Module, sources: Mapping[str, str], header: SafetensorsHeader, part: str,
          dtype_of: Callable[[str], torch.dtype], on_progress: ProgressCallback | None) -> torch.nn.Module:
    """Check the file's keys and shapes against the empty module's, then read every tensor into it."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    prefix = transformer_prefix(header) if part == TRANSFORMER else ""
    missing = sorted(n for n in expected if sources.get(n) not in header.entries)
    unexpected = sorted({k for n, k in sources.items() if n not in expected} | (
        set(_weight_keys(header)) - set(sources.values())))
    wrong = [f"{sources[n]} {header.entries[sources[n]].shape} (not {shape})" for n, shape in expected.items()
             if n not in missing and header.entries[sources[n]].shape != shape]
    if missing or unexpected or wrong:
        problems = [f"{label} {len(keys)}: {', '.join(keys[:4])}" for label, keys in
                    (("missing", [prefix + n for n in missing]), ("unexpected", unexpected), ("wrong shape", wrong))
                    if keys]
        raise SingleFileError(f"{header.path} does not match Wan2.2 TI2V-5B's {part} ({'; '.join(problems)}): a "
                              "different or damaged model; use ComfyUI's Wan2.2 TI2V-5B files")
    reader = TensorReader(header, _bytes_of(header, set(sources.values())), on_progress)
    state, read = {}, {}
    try:
        for name in expected:
            key = sources[name]
            if key not in read:
                read[key] = _read_weight(reader, key, dtype_of(name))
            state[name] = read[key]
    finally:
        reader.close()
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _keep_fp32(module: torch.nn.Module, wanted: torch.dtype, stored: torch.dtype) -> Callable[[str], torch.dtype]:
    """The dtype each tensor loads in: ``stored``, except in the modules diffusers keeps in fp32 when loading a
    narrower checkpoint (``_keep_in_fp32_modules``), which get ``wanted`` (as ``from_pretrained`` does)."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    return lambda name: wanted if any(part in keep for part in name.split(".")) else stored


def load_transformer(header: SafetensorsHeader, dtype: torch.dtype,
                     on_progress: ProgressCallback | None = None) -> WanTransformer3DModel:
    with init_empty_weights():
        module = WanTransformer3DModel.from_config(transformer_config(header))
    stored = narrowest_stored([header], dtype)
    return _fill(module, transformer_sources(header), header, TRANSFORMER, _keep_fp32(module, dtype, stored),
                 on_progress)


def load_vae(header: SafetensorsHeader, dtype: torch.dtype,
             on_progress: ProgressCallback | None = None) -> AutoencoderKLWan:
    config = vae_config(header)
    with init_empty_weights():
        module = AutoencoderKLWan.from_config(config)
    sources = {name: wan22_vae_source(name, config) for name in module.state_dict()}
    stored = narrowest_stored([header], dtype)
    return _fill(module, sources, header, VAE, lambda name: stored, on_progress)


@dataclass
class SplitTextEncoder:
    """ComfyUI's UMT5-XXL file as a ``ComponentSource`` (engine/components.py): identified by its file like
    ``DeferredTextEncoder``, read only when a prompt is not in the prompt cache."""

    path: Path

    @functools.cached_property
    def header(self) -> SafetensorsHeader:
        """The file's header, read once."""
        try:
            return read_header(self.path)
        except SingleFileError as exc:
            raise ModelError(f"the text encoder {self.path} cannot be read: {exc}") from exc

    @functools.cached_property
    def config(self) -> dict:
        return text_encoder_config(self.header)

    @functools.cached_property
    def _files_fingerprint(self) -> str:
        config = json.dumps(self.config, sort_keys=True).encode()
        return files_fingerprint(UMT5EncoderModel.__name__, config, [self.header])

    def fingerprint(self) -> str:
        return self._files_fingerprint

    def parameters(self) -> int:
        return sum(math.prod(self.header.entries[key].shape) for key in _weight_keys(self.header))

    def largest_streamed_parameter(self) -> int:
        return max(math.prod(self.header.entries[key].shape) for key in _weight_keys(self.header)
                   if not key.endswith(INPUT_EMBEDDING_NAMES))

    def load(self, dtype: torch.dtype) -> torch.nn.Module:
        header = self.header
        with init_empty_weights():
            model = UMT5EncoderModel(UMT5Config(**self.config))
        sources = text_encoder_sources(list(model.state_dict()), header)
        try:
            model = _fill(model, sources, header, TEXT_ENCODER, lambda name: dtype, None)
        except SingleFileError as exc:
            raise ModelError(str(exc)) from exc
        return tied(model)


# ---------------------------------------------------------------------------------------------
# The tokenizer and the pipeline
# ---------------------------------------------------------------------------------------------


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def find_tokenizer(environ: Mapping[str, str] | None = None) -> Path:
    """google/umt5-xxl's snapshot in the HF cache, else the ``tokenizer/`` of a cached Wan-AI diffusers snapshot."""
    cache = hf_cache_dir(os.environ if environ is None else environ)
    repos = [cache / f"models--{UMT5_TOKENIZER_REPO.replace('/', '--')}", *sorted(cache.glob("models--Wan-AI--*"))]
    for repo in repos:
        snapshot = hf_snapshot(repo) if repo.is_dir() else None
        for folder in (snapshot, snapshot / "tokenizer") if snapshot else ():
            if _has_tokenizer(folder):
                return folder
    raise ModelError(
        f"no UMT5 tokenizer in the Hugging Face cache {cache}: Wan's prompt needs google/umt5-xxl's, read from "
        f"that cache, and LowVRAM Studio never downloads; on a machine with internet run `huggingface-cli "
        f"download {UMT5_TOKENIZER_REPO} tokenizer.json tokenizer_config.json special_tokens_map.json spiece.model` "
        f"and copy its cache folder models--google--umt5-xxl into {cache} (or point HF_HUB_CACHE at the cache "
        "that holds it); a cached Wan-AI ...-Diffusers snapshot's tokenizer/ works too")


def load_tokenizer() -> PreTrainedTokenizerBase:
    folder = find_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"the tokenizer in {folder} could not be loaded ({exc}); download it again") from exc


def _shifted(on_progress: ProgressCallback | None, offset: int, total: int) -> ProgressCallback | None:
    """One file's progress as part of the whole set's (one progress bar for the set)."""
    return None if on_progress is None else (lambda done, _: on_progress(offset + done, total))


def load_split_set(files: WanSplitSet, dtype: torch.dtype = torch.float32,
                   on_progress: ProgressCallback | None = None) -> tuple[WanImageToVideoPipeline, SplitTextEncoder]:
    """The pipeline without its text encoder (``pipeline.text_encoder`` None), and where that waits on disk."""
    tokenizer = load_tokenizer()  # first: a missing tokenizer is found before GBs are read
    headers = {part: read_header(path) for part, path in ((TRANSFORMER, files.transformer), (VAE, files.vae))}
    text_encoder = SplitTextEncoder(files.text_encoder)
    _ = text_encoder.header  # read and validated now (truncated, damaged), kept for the load
    transformer_bytes, vae_bytes = (_bytes_of(h, set(_weight_keys(h))) for h in headers.values())
    total = transformer_bytes + vae_bytes
    transformer = load_transformer(headers[TRANSFORMER], dtype, _shifted(on_progress, 0, total))
    vae = load_vae(headers[VAE], dtype, _shifted(on_progress, transformer_bytes, total))
    pipeline = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=None, vae=vae, transformer=transformer,
                                       scheduler=UniPCMultistepScheduler(**TI2V_5B_SCHEDULER), expand_timesteps=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, text_encoder

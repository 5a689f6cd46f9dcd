"""Load Stability's original single-file SVD / SVD-XT checkpoints (as ComfyUI users keep them).

diffusers cannot load ``svd.safetensors`` / ``svd_xt.safetensors`` / ``svd_xt_1_1.safetensors``
(diffusers #6839); this module maps their keys onto the diffusers components by name.

Reading the file is ``safetensors_file.py``, the name mapping ``svd_key_map.py``, what the file holds (variant,
configs from shapes) ``svd_file_info.py``; this module builds the components and fills them, and writes the
original layout back.

Loading is lean and safe: safetensors only (pickle can run code); tensors are read one by one at
their offsets straight into their final tensors of the target dtype (casts go through one small
reused buffer), and the modules are built on the meta device and filled with
``load_state_dict(assign=True)``: no second copy of the model, and no memory-mapped file pages in the
process's resident memory (measured: reading through ``safe_open``'s memory map keeps every touched
page of the file resident, 3x the fp16 model; this reader peaks at 1.03x).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .demo import SVD_SCHEDULER_CONFIG, build_feature_extractor
from .safetensors_file import (METADATA_KEY, ProgressCallback, SafetensorsHeader, SingleFileError, TensorReader,
                               check_checkpoint_path, read_header)
from .svd_file_info import NON_SHAPE_KEYS, describe_header
from .svd_key_map import COMPONENT_PREFIXES, IGNORED_PREFIXES, VAE_OPTIONAL, Source, Transform, component_sources

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _build_empty(component: str, config: Mapping) -> torch.nn.Module:
    """The diffusers/transformers module with its parameters on the meta device (no memory)."""
    with init_empty_weights():
        if component == "unet":
            return UNetSpatioTemporalConditionModel.from_config(dict(config))
        if component == "vae":
            return AutoencoderKLTemporalDecoder.from_config(dict(config))
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


def _module_config(component: str, module: torch.nn.Module) -> dict:
    if component == "image_encoder":
        return module.config.to_dict()
    return dict(module.config)


def _apply(tensor: torch.Tensor, source: Source) -> torch.Tensor:
    if source.transform is Transform.CONV_TO_LINEAR:
        return tensor.reshape(tensor.shape[:2])
    if source.transform is Transform.TRANSPOSE:
        return tensor.t().contiguous()
    if source.transform is Transform.QKV_SPLIT:
        return tensor.chunk(3, dim=0)[source.part]
    return tensor


def _first(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _plan_component(header: SafetensorsHeader, component: str, config: Mapping):
    """Build the empty module, map its names and check the file's keys and shapes against them."""
    prefix = COMPONENT_PREFIXES[component]
    module = _build_empty(component, config)
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    sources = component_sources(component, expected, config)
    present = {k[len(prefix) :] for k in header.entries if k.startswith(prefix)}
    needed = {s.key for s in sources.values()}
    optional = {sources[n].key for n in VAE_OPTIONAL} if component == "vae" else set()
    missing = needed - present - optional
    unexpected = present - needed
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} {component} keys: {_first(prefix + k for k in missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} {component} keys: {_first(prefix + k for k in unexpected)}")
        raise SingleFileError(
            f"{header.path} does not match the SVD architecture ({'; '.join(parts)}): a different or "
            "damaged model; use Stability's svd / svd_xt / svd_xt_1_1 .safetensors"
        )
    return module, expected, sources


def _load_component(
    reader: TensorReader,
    component: str,
    module: torch.nn.Module,
    expected: Mapping[str, tuple[int, ...]],
    sources: Mapping[str, Source],
    dtype: torch.dtype,
) -> torch.nn.Module:
    prefix = COMPONENT_PREFIXES[component]
    by_key: dict[str, list[str]] = {}
    for name, source in sources.items():
        by_key.setdefault(source.key, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for key, names in by_key.items():
        if prefix + key not in reader.header.entries:  # optional (quant_conv): identity
            for name in names:
                state[name] = _identity_quant_conv(name, expected[name], dtype)
            continue
        tensor = reader.read(prefix + key, dtype)
        for name in names:
            value = _apply(tensor, sources[name])
            if tuple(value.shape) != expected[name]:
                raise SingleFileError(
                    f"{reader.header.path}: {prefix + key} has shape {tuple(tensor.shape)}, which does not fit "
                    f"{component} {name} {expected[name]}: a damaged file or a different model; use Stability's "
                    "svd / svd_xt / svd_xt_1_1 .safetensors"
                )
            state[name] = value
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _identity_quant_conv(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("weight"):
        return torch.eye(shape[0], dtype=dtype).reshape(shape)
    return torch.zeros(shape, dtype=dtype)


def _component_dtype(dtype: torch.dtype | Mapping[str, torch.dtype], component: str) -> torch.dtype:
    return dtype.get(component, torch.float32) if isinstance(dtype, Mapping) else dtype


def load_single_file(
    path: str | Path,
    dtype: torch.dtype | Mapping[str, torch.dtype] = torch.float32,
    *,
    num_frames: int | None = None,
    vae: AutoencoderKLTemporalDecoder | None = None,
    image_encoder: CLIPVisionModelWithProjection | None = None,
    on_progress: ProgressCallback | None = None,
) -> StableVideoDiffusionPipeline:
    """Load an original-layout SVD checkpoint into a diffusers ``StableVideoDiffusionPipeline`` on the CPU.

    ``dtype`` is one dtype or one per component (``{"unet": torch.float16, ...}``). ``num_frames`` overrides
    the native frame count read from metadata / the file name. ``vae`` / ``image_encoder`` supply the
    components a UNet-only file lacks. Raises :class:`SingleFileError` with the cause and the fix.
    """
    header = read_header(check_checkpoint_path(path))
    info = describe_header(header, num_frames)
    given = {"vae": vae, "image_encoder": image_encoder}
    for component, module in given.items():
        if component not in info.configs and module is None:
            raise SingleFileError(
                f"{info.path} holds no {component.replace('_', ' ')} (only {', '.join(info.configs)}); use "
                "the full svd_xt.safetensors or a diffusers SVD folder (or pass the component when loading)"
            )
    plans = {c: _plan_component(header, c, cfg) for c, cfg in info.configs.items() if given.get(c) is None}
    needed_bytes = {}
    for component, (_, _, sources) in plans.items():
        prefix = COMPONENT_PREFIXES[component]
        for source in sources.values():
            entry = header.entries.get(prefix + source.key)
            if entry is not None:
                needed_bytes[prefix + source.key] = entry.end - entry.begin
    skipped = [k for k in header.entries if not k.startswith(tuple(COMPONENT_PREFIXES.values()))]
    unknown = [k for k in skipped if not k.startswith(IGNORED_PREFIXES)]
    if unknown:
        logger.warning("%s: skipping %d keys outside the SVD components: %s", info.path, len(unknown), _first(unknown))
    logger.info(
        "%s: %s, %d native frames, reading %.2f GiB (%s), skipping %d unused keys",
        info.path, info.variant, info.num_frames, sum(needed_bytes.values()) / 2**30, info.dtype, len(skipped),
    )
    reader = TensorReader(header, sum(needed_bytes.values()), on_progress)
    try:
        modules = {
            c: _load_component(reader, c, module, expected, sources, _component_dtype(dtype, c))
            for c, (module, expected, sources) in plans.items()
        }
    finally:
        reader.close()
    modules.update({c: m for c, m in given.items() if m is not None})
    pipeline = StableVideoDiffusionPipeline(
        vae=modules["vae"],
        image_encoder=modules["image_encoder"],
        unet=modules["unet"],
        scheduler=EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG),
        feature_extractor=build_feature_extractor(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---------------------------------------------------------------------------------------------
# Writing the original layout (tests, benchmarks, and converting a diffusers folder for ComfyUI)
# ---------------------------------------------------------------------------------------------


def _is_identity_quant_conv(vae: torch.nn.Module) -> bool:
    weight, bias = vae.quant_conv.weight, vae.quant_conv.bias
    eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device).reshape(weight.shape)
    return bool(torch.equal(weight, eye) and not bias.any())


def to_original_state_dict(
    pipeline: StableVideoDiffusionPipeline, *, keep_quant_conv: bool | None = None
) -> dict[str, torch.Tensor]:
    """The pipeline's weights under Stability's original key names and shapes (inverse of loading).

    ``keep_quant_conv``: None writes the VAE's quant conv only when it is not the identity (Stability's
    files have none); works on meta-device modules too (with ``keep_quant_conv=False``).
    """
    modules = {"unet": pipeline.unet, "vae": pipeline.vae, "image_encoder": pipeline.image_encoder}
    if keep_quant_conv is None:
        keep_quant_conv = not _is_identity_quant_conv(pipeline.vae)
    out: dict[str, torch.Tensor] = {}
    for component, module in modules.items():
        prefix = COMPONENT_PREFIXES[component]
        state = module.state_dict()
        sources = component_sources(component, state, _module_config(component, module))
        grouped: dict[str, list[tuple[Source, torch.Tensor]]] = {}
        for name, source in sources.items():
            if component == "vae" and name in VAE_OPTIONAL and not keep_quant_conv:
                continue
            grouped.setdefault(source.key, []).append((source, state[name]))
        for key, items in grouped.items():
            source, tensor = items[0]
            if source.transform is Transform.QKV_SPLIT:
                tensor = torch.cat([t for _, t in sorted(items, key=lambda item: item[0].part)], dim=0)
            elif source.transform is Transform.CONV_TO_LINEAR:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            elif source.transform is Transform.TRANSPOSE:
                tensor = tensor.t()
            out[prefix + key] = tensor.contiguous()
    return out


def original_metadata(pipeline: StableVideoDiffusionPipeline) -> dict[str, str]:
    """safetensors metadata recording the hyperparameters shapes cannot tell (read back by the loader)."""
    configs = {
        "unet": dict(pipeline.unet.config),
        "vae": dict(pipeline.vae.config),
        "image_encoder": pipeline.image_encoder.config.to_dict(),
    }
    recorded = {c: {k: configs[c][k] for k in keys if k in configs[c]} for c, keys in NON_SHAPE_KEYS.items()}
    return {METADATA_KEY: json.dumps(recorded)}


def save_original_checkpoint(
    pipeline: StableVideoDiffusionPipeline,
    path: str | Path,
    dtype: torch.dtype | None = None,
    *,
    keep_quant_conv: bool | None = None,
) -> Path:
    """Write the pipeline as one original-layout safetensors file (``dtype``: cast floats, None keeps them)."""
    from safetensors.torch import save_file  # writing is rare; keep the import with it

    state = to_original_state_dict(pipeline, keep_quant_conv=keep_quant_conv)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=original_metadata(pipeline))
    return path

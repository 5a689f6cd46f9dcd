"""Weight placement: where each component's weights live while it is not computing.

Modes (``OffloadMode``), all through maintained hooks, no home-made mover:

* ``none``   every component stays on the device.
* ``model``  each component lives on the CPU and moves whole to the device when it runs (accelerate's
             ``cpu_offload_with_hook``, the mechanism behind diffusers' ``enable_model_cpu_offload``);
             ``make_room`` sends the others back first, so the image encoder and the VAE are off the
             GPU while the UNet works.
* ``stream`` the UNet streams with the next piece prefetched on a CUDA stream (diffusers group
             offloading, block level, descending into the down/mid/up blocks so that each resnet,
             transformer and resampler is one group: ~150 MB at most instead of up_blocks[1]'s 1 GB, and
             the mid block no longer rides in the synchronously copied top-level group); the image encoder
             streams layer by layer
             (its blocks sit deeper than group offloading's block search reaches), a text encoder's input
             token table left on the CPU and looked up there; the VAE moves whole
             as in ``model`` (its ``decode`` is not ``forward``, which group offloading hooks, while
             accelerate's hook fires on ``decode`` through diffusers' ``apply_forward_hook``).

A VAE that moves in halves (``Component.moves_in_halves``: Wan's) has, in ``model`` and ``stream``, one hook on
its encoder and one on its decoder, so the encode phase holds only the encoder and the decode only the decoder;
its few other weights (the quantisation convolutions) stay on the device.

On the CPU every mode runs (streams are off, moves are no-ops) so tests can prove frames are equal.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import cpu_offload_with_hook
from accelerate.hooks import remove_hook_from_module
from diffusers.hooks import HookRegistry, apply_group_offloading

from .components import DENOISER, ENCODER, SVD_COMPONENTS, Component
from .options import OffloadMode

logger = logging.getLogger(__name__)

# Hook names diffusers' group offloading registers (diffusers/hooks/group_offloading.py).
GROUP_OFFLOAD_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker")


@dataclass(frozen=True)
class PlacementConfig:
    """``components``: the family's components (which attribute is the denoiser, which the encoder)."""

    mode: OffloadMode = OffloadMode.NONE
    device: str = "cpu"
    components: tuple[Component, ...] = SVD_COMPONENTS


def _modules(pipeline: Any, components: tuple[Component, ...] | None = None) -> dict[str, torch.nn.Module]:
    """The pipeline's component modules by attribute; by default those its last placement covered."""
    placed = getattr(pipeline, "_lowvram_placement", None)
    components = components or (placed.components if placed is not None else SVD_COMPONENTS)
    return {c.attribute: getattr(pipeline, c.attribute) for c in components
            if getattr(pipeline, c.attribute, None) is not None}


def _offload_hooks(pipeline: Any) -> dict[str, Any]:
    """Accelerate offload hooks this module attached, by component (kept on the pipeline object)."""
    if not hasattr(pipeline, "_lowvram_offload_hooks"):
        pipeline._lowvram_offload_hooks = {}
    return pipeline._lowvram_offload_hooks


def stream_blocks(denoiser: torch.nn.Module) -> list[str] | None:
    """Names group offloading descends into (it matches them at every level). A UNet: its block lists,
    the mid block and the blocks' indices, so groups form at the resnets/attentions/samplers lists. A
    transformer (None): group offloading's own block search, one group per block of its block list."""
    if not hasattr(denoiser, "down_blocks"):
        return None
    count = max(len(denoiser.down_blocks), len(denoiser.up_blocks))
    return ["down_blocks", "mid_block", "up_blocks", *(str(i) for i in range(count))]


def _stream_options(device: torch.device) -> dict[str, Any]:
    on_cuda = device.type == "cuda"
    return {
        "onload_device": device,
        "offload_device": torch.device("cpu"),
        "use_stream": on_cuda,
        "non_blocking": on_cuda,
    }


def _input_embedding(module: torch.nn.Module) -> torch.nn.Embedding | None:
    """A transformers model's token table (None for other modules, and for models without one: CLIP's vision
    tower answers with a convolution)."""
    try:
        table = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    except NotImplementedError:
        return None
    return table if isinstance(table, torch.nn.Embedding) else None


def _stream_with_table_on_cpu(encoder: torch.nn.Module, device: torch.device) -> None:
    """Leaf-level streaming for a text encoder whose token table stays on the CPU and is looked up there: only the
    rows a prompt reads (512 x 4096 for UMT5-XXL) cross to ``device``, not the table (256 k x 4096: 1.05 B
    parameters, 2 GB in bf16, the largest weight streaming would move in whole). Exact: a lookup copies rows.

    Hand-written: group offloading has no way to leave one leaf out, so the table is out of the encoder (a plain
    Embedding, through transformers' ``set_input_embeddings``, which keeps UMT5's ``embed_tokens`` tied) while
    group offloading is applied, then back, with two forward hooks moving the ids to it and the rows to ``device``.
    Its weights, names and state dict stay the encoder's; ``_unplace`` removes the hooks."""
    table = _input_embedding(encoder)
    if table is not None:
        encoder.set_input_embeddings(torch.nn.Identity())  # no weights: group offloading makes no group of it
    apply_group_offloading(encoder, offload_type="leaf_level", **_stream_options(device))
    if table is None:
        return
    encoder.set_input_embeddings(table.to("cpu"))
    table._lowvram_lookup = (
        table.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.device), *args[1:])),
        table.register_forward_hook(lambda module, args, rows: rows.to(device)),
    )


def largest_streamed_parameter(encoder: torch.nn.Module) -> int:
    """Elements of the largest weight leaf-level streaming moves in whole: any but the token table."""
    table = _input_embedding(encoder)
    return max(p.numel() for p in encoder.parameters() if table is None or p is not table.weight)


def _unplace(module: torch.nn.Module) -> None:
    """Remove the placement hooks of one module; its weights end on the CPU."""
    table = _input_embedding(module)
    for handle in getattr(table, "_lowvram_lookup", ()):
        handle.remove()
    if hasattr(table, "_lowvram_lookup"):
        del table._lowvram_lookup
    remove_hook_from_module(module, recurse=True)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in GROUP_OFFLOAD_HOOKS:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    module.to("cpu")


def clear_placement(pipeline: Any) -> None:
    """Remove every placement hook; weights end on the CPU."""
    for module in _modules(pipeline).values():
        _unplace(module)
    _offload_hooks(pipeline).clear()
    pipeline._lowvram_placement = None


def drop_component(pipeline: Any, attribute: str) -> None:
    """Take a component out of the pipeline, hooks and all, so that nothing keeps its weights alive (a text
    encoder read from disk for one encode frees its RAM before the denoiser runs)."""
    module = getattr(pipeline, attribute, None)
    if module is None:
        return
    _unplace(module)
    _offload_hooks(pipeline).pop(attribute, None)
    setattr(pipeline, attribute, None)


def apply_placement(pipeline: Any, config: PlacementConfig) -> None:
    """Place the pipeline's weights as ``config`` says; a no-op when it is already placed that way."""
    if getattr(pipeline, "_lowvram_placement", None) == config:
        return
    clear_placement(pipeline)
    device = torch.device(config.device)
    modules = _modules(pipeline, config.components)
    role_of = {c.attribute: c.role for c in config.components}
    hooks = _offload_hooks(pipeline)
    if config.mode == OffloadMode.NONE:
        for module in modules.values():
            module.to(device)
    else:
        halves = {c.attribute for c in config.components if c.moves_in_halves}
        for name, module in modules.items():
            if config.mode == OffloadMode.STREAM and role_of[name] == DENOISER:
                apply_group_offloading(module, offload_type="block_level", num_blocks_per_group=1,
                                       block_modules=stream_blocks(module), **_stream_options(device))
            elif config.mode == OffloadMode.STREAM and role_of[name] == ENCODER:
                _stream_with_table_on_cpu(module, device)
            elif name in halves:
                _offload_in_halves(name, module, device, hooks)
            else:
                _, hooks[name] = cpu_offload_with_hook(module, device)
    pipeline._lowvram_placement = config
    logger.info("placement: %s on %s", config.mode.value, device)


def _offload_in_halves(name: str, module: torch.nn.Module, device: torch.device, hooks: dict[str, Any]) -> None:
    """One accelerate hook on each of ``module``'s encoder and decoder (keyed ``vae.encoder``, ``vae.decoder``);
    every other child on ``device`` for good. The halves' ``forward`` is what the VAE's encode and decode call."""
    for child_name, child in module.named_children():
        if child_name in ("encoder", "decoder"):
            _, hooks[f"{name}.{child_name}"] = cpu_offload_with_hook(child, device)
        else:
            child.to(device)


def make_room(pipeline: Any, component: str) -> None:
    """Send every other whole-moving component (or half: ``vae.decoder``) back to the CPU before ``component``
    (``vae.encoder`` for a VAE moving in halves) runs, and move ``component`` in now.

    Moving it in here, not in its hook, matters for a half: accelerate's hook, when it moves a module, also copies
    the call's arguments to the device, and a copied list is a new list, so the Wan VAE's causal feature cache
    (a list its encoder and decoder fill in place) would lose what the first call wrote. Once the module is on its
    device the hook passes the arguments through as they are.
    """
    hooks = _offload_hooks(pipeline)
    for name, hook in hooks.items():
        if name != component:
            hook.offload()
    if component in hooks:
        hooks[component].model.to(hooks[component].hook.execution_device)


def release_memory(pipeline: Any | None = None) -> None:
    """After a run: offload whole-moving components and hand cached blocks back to the driver.

    Without this the caching allocator keeps the run's peak reserved and the process never returns to
    its idle footprint (issue 4, item 5).
    """
    if pipeline is not None:
        make_room(pipeline, component="")
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def placement_hooks(pipeline: Any) -> dict[str, list[str]]:
    """Which placement hooks each component carries (for the run record and tests)."""
    found: dict[str, list[str]] = {}
    for name, module in _modules(pipeline).items():
        kinds: set[str] = set()
        for sub in module.modules():
            if hasattr(sub, "_hf_hook"):
                kinds.add(type(sub._hf_hook).__name__)
            registry = getattr(sub, "_diffusers_hook", None)
            if registry is not None and registry.get_hook("group_offloading") is not None:
                kinds.add("GroupOffloadingHook")
        found[name] = sorted(kinds)
    return found

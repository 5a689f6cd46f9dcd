"""GEGLU on contiguous halves: the same arithmetic as diffusers' GEGLU, without its slow strided kernels.

diffusers' ``GEGLU`` projects to ``2 * inner`` features and splits the result with ``chunk(2, dim=-1)``:
both halves are strided views, so the ``gelu`` and the product run in PyTorch's non-vectorised strided
elementwise kernel. On an H100 at SVD-XT 576x1024x25 that kernel is the largest single item of a
denoise step (192 of 655 ms; GroupNorm's apply step runs in it too), and routing GEGLU around it took
the step from 0.661 to 0.629 s (bench/results/engine_profile_20261126.md). Here the projection is done as
two GEMMs over the two row blocks of the same weight (views, no copy), so each half comes out
contiguous, and the product is taken in place when no gradient is needed (one activation-sized
buffer fewer). Every output element is the same dot product as before; only the GEMM's blocking may
change the fp32 accumulation order. No library patches this: diffusers' only alternative path is the
NPU kernel.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.activations import GEGLU

logger = logging.getLogger(__name__)

GEGLU_HOOK = "lowvram_geglu_halves"


class _GegluHalvesHook(ModelHook):
    def new_forward(self, module: GEGLU, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        proj = module.proj
        weight = proj.weight
        if weight.dtype != hidden_states.dtype or weight.device != hidden_states.device:
            # stored in another dtype (fp8 layerwise casting) or elsewhere (leaf-level offloading): the
            # projection's own hooks cast or move its weight, so it must run as a module
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        inner = proj.out_features // 2
        bias = proj.bias
        value = F.linear(hidden_states, proj.weight[:inner], None if bias is None else bias[:inner])
        gate = F.gelu(F.linear(hidden_states, proj.weight[inner:], None if bias is None else bias[inner:]))
        if torch.is_grad_enabled():
            return value * gate
        return value.mul_(gate)


def apply_geglu_halves(model: torch.nn.Module) -> int:
    """Route every diffusers GEGLU of ``model`` through contiguous halves; returns how many (idempotent)."""
    layers = [m for m in model.modules() if isinstance(m, GEGLU)]
    for layer in layers:
        registry = HookRegistry.check_if_exists_or_initialize(layer)
        if registry.get_hook(GEGLU_HOOK) is None:
            registry.register_hook(_GegluHalvesHook(), GEGLU_HOOK)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    logger.debug("GEGLU halves on %d layers", len(layers))
    return len(layers)


def remove_geglu_halves(model: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(GEGLU_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()

"""Where pruning attaches to diffusers' SVD UNet (``UNetSpatioTemporalConditionModel``), and the hooks it attaches.

Kept apart from ``pruning.py`` (the decisions, the caches, the cost count) so that the part that knows
the UNet's layout is in one place. Every hook only reads the run's ``PruningState`` and acts on it:

* ``UNetHook`` on the UNet itself: tells the state a call starts (frame plan, step decision) and ends (cost, map).
* ``ShallowHook`` on the branch's signal module (the first down block, one of its layers, or conv_in):
  hands its output, the shallow feature, to the step decision.
* ``SkipHook`` on every module of the deep path (``deep_branch``): not run on a reused step, hands on its input.
* ``CachePointHook`` on the deep path's last module: caches its output on computed steps, replays it on reused ones.
* ``SpatialFramesHook`` on every spatial layer (``spatial_units``: spatial resnets and spatial transformer
  blocks): runs the kept frames only and copies the rows to their group's other frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModelOutput,
)

if TYPE_CHECKING:
    from .pruning import PruningState

_HOOK_PREFIX = "lowvram_pruning"


class StateHook(ModelHook):
    """A pruning hook: it reads and updates the run's one ``PruningState``."""

    def __init__(self, state: PruningState):
        super().__init__()
        self.state = state


class UNetHook(StateHook):
    """On the UNet: each call's input and output, for the step and frame decisions."""

    def pre_forward(self, module, *args, **kwargs):
        self.state.on_unet_call(args[0] if args else kwargs["sample"])
        return args, kwargs

    def post_forward(self, module, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        self.state.on_unet_done(sample)
        return output


class ShallowHook(StateHook):
    """On the branch's signal module (the first down block, one of its layers, or conv_in)."""

    def post_forward(self, module, output):
        self.state.on_shallow_output(output[0] if isinstance(output, tuple) else output)
        return output


def _passthrough(module: torch.nn.Module, hidden: torch.Tensor, return_dict: bool) -> Any:
    """What a skipped module hands on: its input, in the shape of result its caller unpacks.

    Nothing downstream reads these values (the cache point replaces them before they matter); they
    only keep the UNet's forward bookkeeping (skip-connection counts, tuple unpacking) intact.
    """
    if isinstance(module, TransformerSpatioTemporalModel):
        return TransformerTemporalModelOutput(sample=hidden) if return_dict else (hidden,)
    if hasattr(module, "downsamplers"):  # a down block: its output plus one skip feature per layer (and downsampler)
        skip_outputs = len(module.resnets) + (1 if module.downsamplers is not None else 0)
        return hidden, (hidden,) * skip_outputs
    return hidden


class SkipHook(StateHook):
    """On every module of the deep path: not run on a reused step."""

    def new_forward(self, module, *args, **kwargs):
        if not self.state.deep_reused:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        return _passthrough(module, hidden, kwargs.get("return_dict", True))


class CachePointHook(StateHook):
    """On the deep path's last module: caches its output on computed steps and replays it on reused ones."""

    def __init__(self, state: PruningState):
        super().__init__(state)
        self.as_tuple = False  # the module's output form, seen on the (always computed) first step

    def new_forward(self, module, *args, **kwargs):
        if self.state.deep_reused:
            cached = self.state.reused_deep_feature()
            return (cached,) if self.as_tuple else cached
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.as_tuple = isinstance(output, tuple)
        self.state.store_deep_feature(output[0] if self.as_tuple else output)
        return output


class SpatialFramesHook(StateHook):
    """On every spatial layer: compute the kept frames only, then copy rows to their group's frames."""

    def new_forward(self, module, *args, **kwargs):
        plan = self.state.plan
        hidden = args[0] if args else next(iter(kwargs.values()))
        if plan is None or hidden.shape[0] != plan.items:  # off, or another hook already split the frames
            return self.fn_ref.original_forward(*args, **kwargs)

        def select(value):
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == plan.items:
                return value.index_select(0, plan.keep)
            return value

        output = self.fn_ref.original_forward(
            *(select(a) for a in args), **{k: select(v) for k, v in kwargs.items()}
        )
        return output.index_select(0, plan.scatter)


HOOK_NAMES = (
    f"{_HOOK_PREFIX}_unet",
    f"{_HOOK_PREFIX}_shallow",
    f"{_HOOK_PREFIX}_deep",
    f"{_HOOK_PREFIX}_cache_point",
    f"{_HOOK_PREFIX}_frames",
)


@dataclass
class DeepBranch:
    """Where a reused step leaves the UNet and where it comes back (DeepCache's branch choice).

    ``signal``'s output is the shallow feature the step decision looks at; ``skipped`` run only on
    computed steps; ``cache_point``'s output is cached then and replayed on reused steps.
    """

    signal: tuple[str, torch.nn.Module]
    skipped: list[tuple[str, torch.nn.Module]]
    cache_point: tuple[str, torch.nn.Module]


def deep_branch(unet: torch.nn.Module, branch_layers: int | None = None) -> DeepBranch:
    """The branch that keeps the first ``branch_layers`` layers of the first down block (None: all).

    With k of the first block's n layers kept, the skip connections still fresh are conv_in's and
    those k layers', which feed the last k+1 layers of the last up block: those layers are computed,
    the output of the layer before them is the cached feature. k = n is the whole-block branch
    (cache at the last up block's input); smaller k skips more of the full-resolution work.
    """
    first = unet.down_blocks[0]
    layers = len(first.resnets)
    k = layers if branch_layers is None else min(branch_layers, layers)
    deep = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks) if i > 0]
    deep.append(("mid_block", unet.mid_block))
    last = len(unet.up_blocks) - 1
    deep += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks) if i < last]
    if k == layers:  # the whole first block stays (its downsampler runs before the decision)
        return DeepBranch(signal=("down_blocks.0", first), skipped=deep[:-1], cache_point=deep[-1])

    def layer(prefix: str, block: torch.nn.Module, i: int) -> list[tuple[str, torch.nn.Module]]:
        parts = [(f"{prefix}.resnets.{i}", block.resnets[i])]
        if getattr(block, "attentions", None) is not None:
            parts.append((f"{prefix}.attentions.{i}", block.attentions[i]))
        return parts

    signal = layer("down_blocks.0", first, k - 1)[-1] if k > 0 else ("conv_in", unet.conv_in)
    skipped = [part for i in range(k, layers) for part in layer("down_blocks.0", first, i)]
    if first.downsamplers is not None:
        skipped += [(f"down_blocks.0.downsamplers.{i}", d) for i, d in enumerate(first.downsamplers)]
    skipped += deep
    up_name, up = f"up_blocks.{last}", unet.up_blocks[last]
    cut = len(up.resnets) - k - 2  # the layer whose output is cached; the ones after it are computed
    for i in range(cut):
        skipped += layer(up_name, up, i)
    *inside, cache_point = layer(up_name, up, cut)
    return DeepBranch(signal=signal, skipped=skipped + inside, cache_point=cache_point)


def spatial_units(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The per-frame layers: spatial resnets and spatial transformer blocks (not their temporal twins)."""
    units = []
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D) and name.endswith("spatial_res_block"):
            units.append((name, module))
        elif isinstance(module, BasicTransformerBlock) and ".transformer_blocks." in f".{name}":
            units.append((name, module))
    return units


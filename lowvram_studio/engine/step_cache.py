"""Step reuse on DiT denoisers (Wan's transformer) through diffusers' maintained FirstBlockCache hook.

FirstBlockCache (ParaAttention; diffusers ``hooks.first_block_cache``) runs the first transformer block at
every call and, when that block's residual changed by less than ``threshold`` (mean absolute change
relative to the cached one) since the last fully computed call, adds the cached residual of the other
blocks instead of running them. It is the DiT counterpart of engine/pruning.py's DeepCache/TeaCache-style
step reuse on SVD's UNet, with the same knob (``PruningConfig.threshold``) and the same record
(``PruningSummary``, engine/pruning_record.py); frame reuse has no counterpart here (every token attends
across frames).

What diffusers does not report is which calls it skipped: a forward pre-hook on a layer inside the last
block counts the calls that ran it. The cache keeps one state per context; ``context`` names one per
guidance branch and temporal window, so a branch or window never reuses another's residuals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.hooks import FirstBlockCacheConfig

from .options import PruneMode
from .pruning_config import PruningConfig
from .pruning_record import MapCode, PruningSummary

STEP_DECISION = ("diffusers FirstBlockCache: the other blocks are skipped while the first block's residual "
                 "changes by less than the threshold (mean absolute change, relative)")


class FirstBlockCacheState:
    """One run's FirstBlockCache on ``transformer`` (a diffusers ``CacheMixin`` with a ``blocks`` list); the
    sampler drives ``begin_step`` / ``end_step`` and calls ``remove`` at the end, as for SVD's pruning."""

    def __init__(self, transformer: torch.nn.Module, config: PruningConfig):
        if config.mode != PruneMode.STEPS:
            raise ValueError(f"prune_mode {config.mode.value} reuses frames, which a transformer cannot (every "
                             "token attends across frames); set prune_mode to steps")
        self.transformer, self.config = transformer, config
        self.total = 0
        self.calls: list[int] = []  # per step: transformer calls, and the calls that ran the last block
        self.computed: list[int] = []
        self.cache_bytes = 0
        self._contexts: set[str] = set()
        blocks = transformer.blocks
        transformer.enable_cache(FirstBlockCacheConfig(threshold=config.threshold))
        self._handles = [blocks[0].register_forward_pre_hook(self._count_call),
                         next(blocks[-1].children()).register_forward_pre_hook(self._count_computed)]
        self.blocks = len(blocks)

    def _count_call(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.calls[-1] += 1
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor):  # the cache holds the first block's output and residual, the tail's residual
            self.cache_bytes = max(self.cache_bytes, 3 * hidden.numel() * hidden.element_size() * len(self._contexts))

    def _count_computed(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.computed[-1] += 1

    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """The cache state for one guidance branch of one window (diffusers' ``cache_context``)."""
        self._contexts.add(name)
        with self.transformer.cache_context(name):
            yield

    def begin_step(self, index: int, total: int) -> None:
        self.total = total
        self.calls.append(0)
        self.computed.append(0)

    def end_step(self, x0: torch.Tensor | None) -> dict[str, Any]:
        reused = self.calls[-1] - self.computed[-1]
        return {"reused_calls": reused, "calls": self.calls[-1]}

    def summary(self) -> PruningSummary:
        calls, computed = sum(self.calls), sum(self.computed)
        reused = calls - computed
        # a reused call still runs the first block (and the embeddings and head, which are small)
        executed = computed + reused / self.blocks
        codes = [int(MapCode.PREVIOUS_STEP) if c and not done else int(MapCode.COMPUTED)
                 for c, done in zip(self.calls, self.computed)]
        return PruningSummary(
            threshold=self.config.threshold, mode=self.config.mode.value, step_signal="first_block_residual",
            frame_signal="none", map=[codes], pruned_fraction=reused / calls if calls else 0.0,
            neighbour_fraction=0.0, previous_step_fraction=reused / calls if calls else 0.0,
            reused_steps=sum(code == MapCode.PREVIOUS_STEP for code in codes),
            speedup_estimate=calls / executed if executed else None, full_tflop=None, executed_tflop=None,
            cache_mib=self.cache_bytes / 2**20, step_decision=STEP_DECISION)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.transformer.disable_cache()


def apply_first_block_cache(transformer: torch.nn.Module, config: PruningConfig) -> FirstBlockCacheState | None:
    """FirstBlockCache on a DiT ``transformer`` for one run; None when the threshold is 0 (off)."""
    config.validate()
    return FirstBlockCacheState(transformer, config) if config.enabled else None

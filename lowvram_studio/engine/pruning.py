"""Static-frame pruning and feature reuse (lossy, for speed), as hooks on diffusers' SVD UNet.

The write-up skips "static" frames whose latents differ from the previous frame by less than an L1
threshold (its code calls APIs that exist nowhere). Here the idea is built on two reuse modes:

* across frames: at each UNet call the frames are grouped greedily, in order, with the last kept
  frame ("anchor") while their relative L1 distance ``mean|x_f - x_a| / mean|x_a|`` stays under the
  threshold. Only the kept frames run the spatial layers (``ResnetBlock2D`` and the spatial
  ``BasicTransformerBlock`` of every block); the others get a copy of their anchor's output. The
  temporal layers still see every frame. Exact when the grouped inputs are equal, since spatial
  layers act per frame (GroupNorm, LayerNorm and attention never cross the batch axis).
* across steps: DeepCache (Ma et al. 2023, arXiv:2312.00858) reuses the UNet's deep features between
  steps and recomputes only the shallowest branch; TeaCache (Liu et al. 2024, arXiv:2411.19108)
  decides when to reuse by accumulating a relative L1 change of the model input. Here the deep
  path (every block between the first down block and the last up block) is skipped on a reused step
  and the last up block receives the cached feature it got at the last computed step (DeepCache
  caches the feature itself: shapes differ between the deep path's input and output, so there is
  no residual to cache). The decision is per step for all frames: the deep path holds temporal
  layers that mix frames, so one frame cannot skip it while its neighbours compute. First and last
  steps always compute; consecutive reuses are capped.

diffusers' own cache hooks (FirstBlockCache, MagCache, TaylorSeer, FasterCache) look for DiT block
lists (``transformer_blocks``) at the model's top level and do not apply to this UNet; the hooks
here are built on the same ``diffusers.hooks`` registry.

Every run records a pruning map (frames x steps: 0 computed, 1 copied from a neighbour frame,
2 deep features reused from a previous step), the pruned fraction and a FLOP-based speedup estimate.

The settings are ``pruning_config.py``; what a run reused (the map, the summary) is ``pruning_record.py``;
where the hooks sit on the UNet and what each does is ``pruning_hooks.py``. This module holds the
measures, the run's state machine and ``apply_pruning``, which attaches the hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry
from diffusers.models.attention_processor import Attention

from .options import PruneMode
from .pruning_config import LARGE_MOTION_THRESHOLD, FrameSignal, PruningConfig, StepSignal
from .pruning_hooks import (
    HOOK_NAMES,
    CachePointHook,
    ShallowHook,
    SkipHook,
    SpatialFramesHook,
    UNetHook,
    deep_branch,
    spatial_units,
)
from .pruning_record import MapCode, PruningSummary


_EPS = 1e-8


# ---- measures -------------------------------------------------------------------------------------


def relative_l1(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per item of the first axis: mean|current - reference| / mean|reference|, in float32."""
    current, reference = current.float().flatten(1), reference.float().flatten(1)
    return (current - reference).abs().mean(1) / reference.abs().mean(1).clamp_min(_EPS)


def neighbour_distances(frames: torch.Tensor) -> torch.Tensor:
    """(F, ...) -> (F, F) matrix D[f, a] = mean|x_f - x_a| / mean|x_a| (float32, on the CPU)."""
    flat = frames.float().flatten(1)
    distance = torch.cdist(flat, flat, p=1) / flat.shape[1]
    return (distance / flat.abs().mean(1).clamp_min(_EPS)[None, :]).cpu()


def group_frames(distances: torch.Tensor, threshold: float) -> list[int]:
    """Greedy in frame order: each frame joins the last kept frame while under the threshold.

    Returns ``source`` with ``source[f] == f`` for kept frames and the anchor's index otherwise.
    Comparing with the anchor, not the previous frame, stops small changes from piling up along a chain.
    """
    source = [0]
    anchor = 0
    for f in range(1, distances.shape[0]):
        if float(distances[f, anchor]) < threshold:
            source.append(anchor)
        else:
            anchor = f
            source.append(f)
    return source


# ---- FLOP accounting (why: torch's FlopCounterMode costs seconds per call of the full UNet) ----------


def _leaf_flops(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> float:
    """Multiply-adds x2 of one convolution, linear or attention-score call; other ops are ignored."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        out_features = module.weight.shape[0]
        return 2.0 * module.weight.numel() * output.numel() / out_features
    if isinstance(module, Attention):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        keys = context.shape[1] if context is not None else hidden.shape[1]
        return 4.0 * hidden.shape[0] * hidden.shape[1] * keys * module.inner_dim  # QK^T and AV
    return 0.0


@dataclass
class _CallCost:
    """FLOPs of one full UNet call and of its parts, measured once on the first call."""

    full: float = 0.0
    deep: float = 0.0
    spatial_per_item: float = 0.0  # all spatial units, per (branch, frame) item
    shallow_spatial_per_item: float = 0.0  # the spatial units outside the deep path

    def executed(self, deep_reused: bool, skipped_items: int) -> float:
        per_item = self.shallow_spatial_per_item if deep_reused else self.spatial_per_item
        return self.full - (self.deep if deep_reused else 0.0) - skipped_items * per_item


# ---- run state ------------------------------------------------------------------------------------


@dataclass
class _FramePlan:
    source: list[int]
    keep: torch.Tensor  # indices into the (branch * frame) axis to compute
    scatter: torch.Tensor  # for every (branch, frame) item, its row among the computed ones
    items: int  # branch * frames

    @property
    def pruned(self) -> int:
        return sum(1 for f, s in enumerate(self.source) if s != f)


@dataclass
class _Slot:
    """Per UNet call within a step (one per CFG branch when the engine splits CFG)."""

    deep_cache: torch.Tensor | None = None
    shallow_anchor: torch.Tensor | None = None
    last_output: torch.Tensor | None = None


class PruningState:
    """Decisions, caches and the map of one run. Made by ``apply_pruning``; the sampler drives the steps."""

    def __init__(self, unet: torch.nn.Module, config: PruningConfig):
        self.unet = unet
        self.config = config
        self.step = -1
        self.total = 0
        self.slot_index = -1
        self.slots: list[_Slot] = []
        self.deep_reused = False
        self.consecutive_reuse = 0
        self.accumulated: torch.Tensor | None = None  # per-frame input change since the last computed step
        self.previous_input: torch.Tensor | None = None
        self.denoised: torch.Tensor | None = None
        self.plan: _FramePlan | None = None
        self._threshold = config.threshold  # this step's, after motion adaptation
        self.columns: list[np.ndarray] = []
        self.signals: list[dict[str, float | None]] = []
        self.cost: _CallCost | None = None
        self.executed = 0.0
        self.full = 0.0
        self.num_frames: int | None = None
        self._counting: dict[str, float] | None = None
        self._count_handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- driven by the sampler --------------------------------------------------------------------
    def begin_step(self, index: int, total: int) -> None:
        """Call before the UNet call(s) of step ``index`` (0-based) of ``total``."""
        self.step, self.total, self.slot_index = index, total, -1
        self.signals.append({"input": None, "shallow": None, "deep": None, "output": None, "motion": None})

    def end_step(self, denoised: torch.Tensor | None = None) -> dict[str, int]:
        """Call after the scheduler step with its denoised estimate; returns this step's counts for events."""
        self.denoised = denoised
        column = self.columns[-1] if len(self.columns) == self.step + 1 else None
        if column is None:
            return {}
        return {
            "computed": int((column == MapCode.COMPUTED).sum()),
            "from_neighbour": int((column == MapCode.NEIGHBOUR).sum()),
            "from_previous_step": int((column == MapCode.PREVIOUS_STEP).sum()),
        }

    def remove(self) -> None:
        """Take every pruning hook off the UNet and drop the caches."""
        for handle in self._count_handles:
            handle.remove()
        registry = HookRegistry.check_if_exists_or_initialize(self.unet)
        for name in HOOK_NAMES:
            registry.remove_hook(name, recurse=True)
        self.slots.clear()
        self.plan = None

    # -- called from the hooks --------------------------------------------------------------------
    def on_unet_call(self, sample: torch.Tensor) -> None:
        """Start of one UNet call: pick the frame plan and (for the input signal) the step decision."""
        if self.step < 0:
            raise RuntimeError("pruning hooks ran outside a sampler step; call begin_step() before the UNet")
        self.slot_index += 1
        if self.slot_index >= len(self.slots):
            self.slots.append(_Slot())
        batch, frames = sample.shape[:2]
        if self.num_frames is None:
            self.num_frames = frames
        elif frames != self.num_frames:
            raise ValueError(
                f"pruning expects every UNet call to see all {self.num_frames} frames, got {frames}; "
                "turn temporal windows off (window_frames 0) or pruning off (prune_threshold 0)"
            )
        if self.slot_index > 0:  # later calls of this step (CFG split) follow the first call's decisions
            self.plan = self._plan_for_batch(self.plan.source, batch, sample.device) if self.plan else None
            return
        latents = sample[0, :, : sample.shape[2] // 2]  # the noisy half; the other half is the image latent
        threshold = self._threshold = self._effective_threshold()
        self.deep_reused = False
        if self.config.reuse_steps or self.config.record_signals:
            input_change = self._accumulate_input_change(latents)
            if self.config.reuse_steps and self.config.step_signal == StepSignal.INPUT:
                self.deep_reused = input_change is not None and self._may_reuse() and input_change < threshold
        self.plan = self._frame_plan(latents, batch, threshold) if self.config.reuse_frames else None
        if self.cost is None:
            self._start_counting(batch * frames)

    def on_shallow_output(self, shallow: torch.Tensor) -> None:
        """The first down block's output (the deep path's input) is known: decide on the shallow signal."""
        slot = self.slots[self.slot_index]
        if self.slot_index == 0 and slot.shallow_anchor is not None:
            change = float(relative_l1(shallow, slot.shallow_anchor).mean())
            self.signals[-1]["shallow"] = change
            if self.config.reuse_steps and self.config.step_signal == StepSignal.SHALLOW:
                self.deep_reused = self._may_reuse() and change < self._threshold
        if not self.deep_reused:
            slot.shallow_anchor = shallow

    def reused_deep_feature(self) -> torch.Tensor:
        """The deep path's output cached at the last computed step (for this CFG branch)."""
        return self.slots[self.slot_index].deep_cache

    def store_deep_feature(self, hidden: torch.Tensor) -> None:
        """A computed step's deep-path output: remember it for the next reused step."""
        slot = self.slots[self.slot_index]
        if self.config.record_signals and self.slot_index == 0 and slot.deep_cache is not None:
            self.signals[-1]["deep"] = float(relative_l1(hidden, slot.deep_cache).mean())
        if self.config.reuse_steps or self.config.record_signals:
            slot.deep_cache = hidden

    def on_unet_done(self, output: torch.Tensor) -> None:
        """End of one UNet call: account its cost and, for the first call of a step, its map column."""
        if self._counting is not None:
            self._finish_counting()
        skipped = self.plan.items - len(self.plan.keep) if self.plan else 0
        self.full += self.cost.full
        self.executed += self.cost.executed(self.deep_reused, skipped)
        slot = self.slots[self.slot_index]
        if self.config.record_signals and self.slot_index == 0 and slot.last_output is not None:
            self.signals[-1]["output"] = float(relative_l1(output, slot.last_output).mean())
        if self.config.record_signals:
            slot.last_output = output
        if self.slot_index > 0:
            return
        column = np.full(self.num_frames, MapCode.COMPUTED, dtype=np.int8)
        if self.deep_reused:
            column[:] = MapCode.PREVIOUS_STEP
            self.consecutive_reuse += 1
        else:
            self.consecutive_reuse = 0
            self.accumulated = None
        if self.plan is not None:
            for f, source in enumerate(self.plan.source):
                if source != f:
                    column[f] = MapCode.NEIGHBOUR
        self.columns.append(column)

    # -- decisions --------------------------------------------------------------------------------
    def _may_reuse(self) -> bool:
        """First and last steps always compute; so does a step after too many reuses in a row."""
        return (
            0 < self.step < self.total - 1
            and self.consecutive_reuse < self.config.max_consecutive_reuse
            and self.slots[0].deep_cache is not None
        )

    def _effective_threshold(self) -> float:
        threshold = self.config.threshold
        if self.config.motion_adaptive and self.denoised is not None:
            frames = self.denoised[0]
            motion = float(relative_l1(frames[1:], frames[:-1]).median())
            self.signals[-1]["motion"] = motion
            if motion >= self.config.large_motion:
                threshold = max(threshold, LARGE_MOTION_THRESHOLD)
        return threshold

    def _accumulate_input_change(self, latents: torch.Tensor) -> float | None:
        """Mean over frames of the input's relative L1 change summed since the last computed step."""
        if self.previous_input is not None:
            change = relative_l1(latents, self.previous_input)
            self.accumulated = change if self.accumulated is None else self.accumulated + change
        self.previous_input = latents
        if self.accumulated is None:
            return None
        mean_change = float(self.accumulated.mean())
        self.signals[-1]["input"] = mean_change
        return mean_change

    def _frame_plan(self, latents: torch.Tensor, batch: int, threshold: float) -> _FramePlan | None:
        if self.config.frame_signal == FrameSignal.DENOISED:
            if self.denoised is None:
                return None
            latents = self.denoised[0]
        source = group_frames(neighbour_distances(latents), threshold)
        if all(s == f for f, s in enumerate(source)):
            return None
        return self._plan_for_batch(source, batch, latents.device)

    @staticmethod
    def _plan_for_batch(source: list[int], batch: int, device: torch.device) -> _FramePlan:
        frames = len(source)
        kept = [f for f, s in enumerate(source) if s == f]
        row_of = {f: i for i, f in enumerate(kept)}
        keep = [b * frames + f for b in range(batch) for f in kept]
        scatter = [b * len(kept) + row_of[source[f]] for b in range(batch) for f in range(frames)]
        return _FramePlan(
            source=source,
            keep=torch.tensor(keep, device=device),
            scatter=torch.tensor(scatter, device=device),
            items=batch * frames,
        )

    # -- FLOP counting on the first call --------------------------------------------------------------
    def _start_counting(self, items: int) -> None:
        self._counting = {"full": 0.0, "deep": 0.0, "spatial": 0.0, "shallow_spatial": 0.0, "items": items}
        branch = deep_branch(self.unet, self.config.branch_layers)
        deep_prefixes = tuple(f"{name}." for name, _ in (*branch.skipped, branch.cache_point))
        spatial_prefixes = tuple(f"{name}." for name, _ in spatial_units(self.unet))
        scale = items / len(self.plan.keep) if self.plan else 1.0  # spatial layers ran on the kept frames only
        handles = []
        for name, module in self.unet.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Attention)):
                continue
            deep = name.startswith(deep_prefixes)
            spatial = name.startswith(spatial_prefixes)

            def hook(mod, args, kwargs, output, deep=deep, spatial=spatial):
                flops = _leaf_flops(mod, args, kwargs, output) * (scale if spatial else 1.0)
                counting = self._counting
                counting["full"] += flops
                counting["deep"] += flops if deep else 0.0
                counting["spatial"] += flops if spatial else 0.0
                counting["shallow_spatial"] += flops if spatial and not deep else 0.0

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        self._count_handles = handles

    def _finish_counting(self) -> None:
        for handle in self._count_handles:
            handle.remove()
        counting, self._counting = self._counting, None
        items = counting["items"]
        self.cost = _CallCost(
            full=counting["full"],
            deep=counting["deep"],
            spatial_per_item=counting["spatial"] / items,
            shallow_spatial_per_item=counting["shallow_spatial"] / items,
        )

    # -- results ------------------------------------------------------------------------------------
    def pruning_map(self) -> np.ndarray:
        """(frames, steps) int8 array of ``MapCode`` values."""
        if not self.columns:
            return np.zeros((self.num_frames or 0, 0), dtype=np.int8)
        return np.stack(self.columns, axis=1)

    def cache_bytes(self) -> int:
        tensors = [t for s in self.slots for t in (s.deep_cache, s.shallow_anchor, s.last_output) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def summary(self) -> PruningSummary:
        grid = self.pruning_map()
        cells = max(grid.size, 1)
        speedup = self.full / self.executed if self.executed > 0 else None
        return PruningSummary(
            threshold=self.config.threshold,
            mode=PruneMode(self.config.mode).value,
            step_signal=self.config.step_signal.value,
            frame_signal=self.config.frame_signal.value,
            map=grid.tolist(),
            pruned_fraction=float((grid != MapCode.COMPUTED).sum() / cells),
            neighbour_fraction=float((grid == MapCode.NEIGHBOUR).sum() / cells),
            previous_step_fraction=float((grid == MapCode.PREVIOUS_STEP).sum() / cells),
            reused_steps=int((grid == MapCode.PREVIOUS_STEP).any(axis=0).sum()) if grid.size else 0,
            speedup_estimate=speedup,
            full_tflop=self.full / 1e12 if self.full else None,
            executed_tflop=self.executed / 1e12 if self.executed else None,
            cache_mib=self.cache_bytes() / 2**20,
            step_decision="per step for all frames (the deep path's temporal layers mix frames)",
            signals=self.signals,
        )


def apply_pruning(unet: torch.nn.Module, config: PruningConfig) -> PruningState | None:
    """Hook pruning into a ``UNetSpatioTemporalConditionModel``; None when the threshold is 0 (off).

    The caller drives ``begin_step`` / ``end_step`` around each sampler step and calls ``remove()``
    at the end (also on errors), as ``engine.sampler.sample`` does.
    """
    config.validate()
    if not config.enabled:
        return None
    state = PruningState(unet, config)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(UNetHook(state), HOOK_NAMES[0])
    if config.reuse_steps or config.record_signals:
        register = HookRegistry.check_if_exists_or_initialize
        branch = deep_branch(unet, config.branch_layers)
        register(branch.signal[1]).register_hook(ShallowHook(state), HOOK_NAMES[1])
        for _, module in branch.skipped:
            register(module).register_hook(SkipHook(state), HOOK_NAMES[2])
        register(branch.cache_point[1]).register_hook(CachePointHook(state), HOOK_NAMES[3])
    if config.reuse_frames:
        for _, unit in spatial_units(unet):
            HookRegistry.check_if_exists_or_initialize(unit).register_hook(SpatialFramesHook(state), HOOK_NAMES[4])
    return state

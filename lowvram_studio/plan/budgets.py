"""VRAM budgets: what a run may use as a process peak on a card, the presets of the write-up's cards, and
'auto' (what this process may grow to now)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..settings import BUDGET_PRESETS, budget_gib
from .memory_model import MIB, MemoryModel

@dataclass(frozen=True)
class Budget:
    """VRAM the run may use as a process peak: ``total_mib - reserve_mib``; ``context_mib`` is that card's CUDA context."""

    label: str
    total_mib: float
    context_mib: float
    reserve_mib: float = 0.0
    note: str = ""

    @property
    def available_mib(self) -> float:
        return self.total_mib - self.reserve_mib

    @property
    def plan_to_mib(self) -> float:
        """The predicted peak a plan may reach: ``available_mib`` less the memory model's error margin."""
        return self.available_mib * (1.0 - PLAN_MARGIN)


# The CUDA context (with cuBLAS/cuDNN workspaces) as NVML counts it: 0.60-0.77 GiB on the H100 in this
# project's benches (#21: 400 MiB was assumed and the 6 GB plan peaked at 7.9 GiB). A budget is a promise,
# so the plan assumes the large end; consumer cards with lazy module loading need less.
SMALL_CARD_CONTEXT_MIB = 800.0
# The memory model's leave-one-out error is within +/-15 %: plan to this share of the budget so that an
# under-prediction of that size still fits the card.
PLAN_MARGIN = 0.12
# With no budget, decode chunks stay at least this long: the chunk diffusers' SVD guide decodes with
NO_BUDGET_MIN_DECODE_CHUNK = 8
# ... and act only when the all-frames decode is this far above the other phases (a few % is not worth a seam)
NO_BUDGET_DECODE_SLACK = 1.25
DESKTOP_RESERVE_MIB = 256.0  # the desktop and other programs keep some VRAM on a consumer card
# Weight streaming this much slower per step than resident weights (speed_model) counts as free: on such a
# card (a GTX 1060 computes a step ~60x longer than an H100) the plan streams before any other move.
FREE_STREAMING_OVERHEAD = 0.05

# The cards each preset stands for, after the write-up's table (reference/gtx1060-video-writeup.zh.txt): card and
# frames it ran. The presets themselves are settings.BUDGET_PRESETS (the CLI's, the studio's and the planner's).
CARDS = {
    "4GB": "e.g. GTX 1050 Ti 4 GB",
    "6GB": "GTX 1060 6 GB: the write-up ran 24 frames",
    "8GB": "e.g. RTX 3070 8 GB",
    "12GB": "RTX 2060 / 3060 12 GB: the write-up ran 32 / 48 frames",
    "24GB": "RTX 4090 24 GB: the write-up ran 64 frames at once",
}
PRESETS: dict[str, Budget] = {
    label: Budget(label, budget_gib(label) * 1024, SMALL_CARD_CONTEXT_MIB, DESKTOP_RESERVE_MIB, CARDS[label])
    for label in BUDGET_PRESETS
}


def free_vram_mib(device: int = 0) -> float:
    """Driver free memory plus what our allocator holds but does not use (FramePack's policy)."""
    free, _ = torch.cuda.mem_get_info(device)
    return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) / MIB


def auto_budget(model: MemoryModel, reserve_mib: float = 512.0, device: int = 0) -> Budget:
    """'auto': what this process may grow to now. The memory model predicts the whole process peak, so
    the memory this process already holds (its context and live tensors) is added back to the free VRAM."""
    held = torch.cuda.memory_allocated(device) / MIB
    context = model.context_mib.get("cuda", 0.0)
    total = free_vram_mib(device) + held + context
    return Budget("auto", total, context, reserve_mib, f"{free_vram_mib(device):.0f} MiB free now")


def budget_for(vram_budget: str, model: MemoryModel) -> Budget | None:
    """The Budget a settings string names; None for 'off' or when 'auto' has no CUDA GPU."""
    if vram_budget == "off":
        return None
    if vram_budget == "auto":
        return auto_budget(model) if torch.cuda.is_available() else None
    if vram_budget in PRESETS:
        return PRESETS[vram_budget]
    gib = budget_gib(vram_budget)
    return Budget(vram_budget, gib * 1024, SMALL_CARD_CONTEXT_MIB, DESKTOP_RESERVE_MIB) if gib else None


@contextlib.contextmanager
def simulated_budget(budget: Budget, device: int = 0) -> Iterator[float]:
    """Make a big GPU behave like ``budget``'s card: cap the caching allocator at the budget minus the
    card's context (the context lives outside the allocator). Yields the cap in MiB."""
    total = torch.cuda.get_device_properties(device).total_memory
    cap_mib = budget.available_mib - budget.context_mib
    torch.cuda.set_per_process_memory_fraction(min(cap_mib * MIB / total, 1.0), device)
    try:
        yield cap_mib
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)



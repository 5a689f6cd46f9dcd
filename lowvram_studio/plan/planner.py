"""Fit a run into a VRAM budget: a planner that tightens settings until the memory model's predicted peak fits.

The planner walks a ladder of moves (plan/moves.py), lossless ones first, then lossy ones in order of
fidelity cost (DESIGN §3), always taking the first move in that order that lowers the predicted peak
(plan/memory_model.py), and stops at the first rung that fits the budget (plan/budgets.py): so a smaller
budget never reaches a looser rung. The ladder serves the phase that sets the peak at each rung, so an
early move can turn out unneeded once later ones lowered the other phases (SVD-XT at 8 GB: 128 px VAE
tiles taken before weight streaming); a relax pass then loosens such moves again, lossy ones first,
while the plan still fits. Each move carries the one-line reason the UI shows. The same moves,
restricted to the phase that failed, are the next tighter plan after a real out-of-memory error
(plan/replan.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.dims import ModelDims
from ..engine.events import Phase
from ..engine.options import OffloadMode
from ..engine.precision import GpuInfo, execution_path
from ..engine.speed_model import CardSpeed
from ..settings import RunSettings
from ..settings_adapter import step_config
from .budgets import FREE_STREAMING_OVERHEAD, NO_BUDGET_DECODE_SLACK, NO_BUDGET_MIN_DECODE_CHUNK, PLAN_MARGIN, Budget, budget_for
from .memory_model import PHASES, MemoryModel, Prediction
from .moves import FAMILY_MOVES, MOVES, Move

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """Settings chosen for a budget, with the reason for every change and the predicted peak."""

    settings: RunSettings
    prediction: Prediction
    reasons: list[str]
    budget: Budget | None
    fits: bool
    rung: int = 0

    def summary(self) -> list[str]:
        head = f"predicted peak {self.prediction.peak_mib / 1024:.2f} GiB ({self.prediction.peak_phase})"
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            head += f" {verdict} {self.budget.label} ({self.budget.available_mib / 1024:.2f} GiB usable)"
        return [head, *self.reasons]

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "predicted_peak_mib": round(self.prediction.peak_mib, 1),
            "predicted_phases_mib": {k: round(v, 1) for k, v in self.prediction.phases.items()},
            "reasons": self.reasons,
            "budget": None if self.budget is None else self.budget.label,
            "fits": self.fits,
            "rung": self.rung,
        }


@dataclass
class Rung:
    """One step of the ladder: settings, their prediction, and the reasons that led there."""

    settings: RunSettings
    prediction: Prediction
    reasons: list[str] = field(default_factory=list)


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB"


@dataclass
class Planner:
    """Plans for one model on one kind of device; ``context_mib`` overrides the model's CUDA context.

    ``speed``: the user's card (engine/speed_model.py); where it makes streaming nearly free, streaming is
    the first move of every ladder, ahead of slower chunking and of lossy moves. ``auto_fp32_compute``:
    the card's execution path computes fp16 weights in fp32 (``for_gpu`` sets it), which doubles the
    activations the plan must fit. ``moves``: the moves this model can take (default: its family's,
    ``FAMILY_MOVES``); ``bf16``: the card computes bf16 (a bf16 VAE is a move only there).
    """

    dims: ModelDims
    model: MemoryModel = None  # type: ignore[assignment]  # None: the memory model of the dims' family
    device_type: str = "cuda"
    min_gain: float = 0.01  # a move must lower the predicted peak by 1 % to count as helping
    speed: CardSpeed | None = None
    auto_fp32_compute: bool = False
    moves: tuple[str, ...] | None = None
    bf16: bool = True

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = MemoryModel.for_kind(self.dims.kind)
        if self.moves is None:
            self.moves = FAMILY_MOVES[self.dims.kind]
        if not self.bf16:
            self.moves = tuple(name for name in self.moves if name != "vae_bf16")

    @classmethod
    def for_gpu(cls, dims: ModelDims, gpu: GpuInfo | None, unet_config: dict[str, Any] | None = None,
                **kwargs: Any) -> "Planner":
        """A planner for this card (None: the CPU): its execution path decides what fp16 weights compute in,
        and with the UNet's config the speed model of the card (``CardSpeed``) decides whether streaming is
        nearly free on it."""
        if gpu is None:
            return cls(dims, device_type="cpu", **kwargs)
        speed = CardSpeed.for_gpu(unet_config, gpu.name)[0] if unet_config is not None else None
        path = execution_path(gpu)
        return cls(dims, device_type="cuda", auto_fp32_compute=path.half_compute == torch.float32, speed=speed,
                   bf16=path.bf16, **kwargs)

    def predict(self, settings: RunSettings, context_mib: float | None = None) -> Prediction:
        return self.model.predict(self.dims, settings, context_mib, self.device_type, self.auto_fp32_compute)

    def base(self, settings: RunSettings) -> tuple[RunSettings, list[str]]:
        """The request, plus windows of the model's native length for clips longer than it was trained on."""
        if self.dims.latent_frames(settings.num_frames) > self.dims.native_frames and not settings.window_frames:
            native = self.dims.native_frames
            windowed = settings.replace(window_frames=native, overlap=min(settings.overlap, 4) or 4)
            latent = "" if self.dims.temporal_scale == 1 else " latent"
            reason = (
                f"temporal windows of {native}{latent} frames: {self.dims.name} was trained on {native}; "
                "longer clips run window by window at one window's peak (lossy)"
            )
            return windowed, [reason]
        return settings, []

    def ladder(self, settings: RunSettings, context_mib: float | None = None,
               allowed: tuple[str, ...] | None = None) -> list[Rung]:
        """Rungs from the request to the tightest settings; each adds the first move (in priority order,
        among ``allowed`` by name when given) that lowers the phase setting the predicted peak without
        raising the peak. The path does not depend on the budget."""
        current, reasons = self.base(settings)
        rungs = [Rung(current, self.predict(current, context_mib), list(reasons))]
        free = self._free_streaming(current, rungs[0].prediction, context_mib)
        if free is not None:
            current, reason, prediction = free
            rungs.append(Rung(current, prediction, [*reasons, reason]))
        while True:
            step = self._first_helping_move(current, rungs[-1].prediction, None, context_mib, allowed)
            if step is None:
                return rungs
            current, reason, prediction, _ = step
            rungs.append(Rung(current, prediction, [*rungs[-1].reasons, reason]))

    def _free_streaming(
        self, settings: RunSettings, before: Prediction, context_mib: float | None
    ) -> tuple[RunSettings, str, Prediction] | None:
        """Streaming as the first move, where the card hides the transfers behind compute: it lowers the
        denoise and encode phases at no speed cost, so later moves (lossy ones included) are needed less."""
        if self.speed is None or settings.offload == OffloadMode.STREAM:
            return None
        overhead = self.speed.streaming_overhead(step_config(settings, self.speed.gpu.info))
        if overhead > FREE_STREAMING_OVERHEAD:
            return None
        streamed = settings.replace(offload=OffloadMode.STREAM)
        after = self.predict(streamed, context_mib)
        if after.peak_mib > before.peak_mib + 1e-6:
            return None
        reason = (f"weight streaming first: on a {self.speed.gpu.name} a step computes far longer than the UNet's "
                  f"weights take to cross PCIe, so streaming costs about {max(overhead, 0.0):.0%} per step (lossless); "
                  f"predicted peak {_gib(before.peak_mib)} -> {_gib(after.peak_mib)}")
        return streamed, reason, after

    def _first_helping_move(
        self,
        settings: RunSettings,
        before: Prediction,
        phase: Phase | None,
        context_mib: float | None,
        allowed: tuple[str, ...] | None = None,
    ) -> tuple[RunSettings, str, Prediction, Move] | None:
        """First move in priority order that lowers ``phase`` (default: the peak phase) by ``min_gain`` of
        its weights and activations, and does not raise the peak."""
        target = phase.value if phase is not None else before.peak_phase
        variable = before.phases[target] - self._fixed_mib(before)
        for move in self._moves(allowed):
            if Phase(target) not in move.phases:
                continue
            tighter = move.apply(settings, self.dims)
            if tighter is None:
                continue
            after = self.predict(tighter, context_mib)
            lowers = after.phases[target] <= before.phases[target] - self.min_gain * variable
            if lowers and after.peak_mib <= before.peak_mib + 1e-6:
                change = f"{_gib(before.peak_mib)} -> {_gib(after.peak_mib)}"
                return tighter, f"{move.reason(tighter, self.dims)}; predicted peak {change}", after, move
        return None

    def plan(self, settings: RunSettings, budget: Budget, allowed: tuple[str, ...] | None = None) -> Plan:
        """The loosest (fastest) rung whose predicted peak fits ``budget``, or the tightest one, marked unfit;
        ``allowed``: only these moves (by name)."""
        rungs = self.ladder(settings, budget.context_mib, allowed)
        for index, rung in enumerate(rungs):
            if rung.prediction.peak_mib <= budget.plan_to_mib:
                relaxed, prediction, loosened = self._relax(rung, rungs[0].settings, budget, allowed)
                return Plan(relaxed, prediction, [*rung.reasons, *loosened], budget, True, index)
        last = rungs[-1]
        reasons = [
            *last.reasons,
            f"even these settings are predicted at {_gib(last.prediction.peak_mib)}, over {_gib(budget.plan_to_mib)} "
            f"({_gib(budget.available_mib)} less a {PLAN_MARGIN:.0%} safety margin); "
            "lower the size or frame count, or close other programs using the GPU",
        ]
        return Plan(last.settings, last.prediction, reasons, budget, False, len(rungs) - 1)

    def _relax(
        self, rung: Rung, request: RunSettings, budget: Budget, allowed: tuple[str, ...] | None
    ) -> tuple[RunSettings, Prediction, list[str]]:
        """Loosen the fitting rung's moves back towards the request while the plan still fits: lossy moves
        first (most lossy first: fidelity before speed), then lossless ones (slowest first). Each move takes
        its loosest setting that fits. Loosening only raises the peak, so one pass in this order is enough."""
        moves = self._moves(allowed)
        order = [m for m in reversed(moves) if m.lossy] + [m for m in reversed(moves) if not m.lossy]
        # an offload mode between the request's and the plan's is a setting only its own move may choose
        offload_modes = {request.offload} | {OffloadMode(m.name.removeprefix("offload_")) for m in moves
                                             if m.name.startswith("offload_")}
        current, prediction, reasons = rung.settings, rung.prediction, []
        for move in order:
            for looser in move.loosen(current, request):
                after = self.predict(looser, budget.context_mib)
                if after.peak_mib > budget.plan_to_mib or looser.offload not in offload_modes:
                    continue
                change = f"predicted peak {_gib(prediction.peak_mib)} -> {_gib(after.peak_mib)}"
                if move.loosen(looser, request):  # still tighter than the request: a looser level of the move
                    reasons.append(f"loosened again: {move.reason(looser, self.dims)} is enough once later moves lowered "
                                   f"the other phases; {change}")
                else:
                    reasons.append(f"undone: {move.reason(current, self.dims)} -- not needed once later moves lowered "
                                   f"the other phases; {change}")
                current, prediction = looser, after
                break
        return current, prediction, reasons

    def no_budget(self, settings: RunSettings) -> Plan | None:
        """Without a budget the user's settings run as they are, with one exception on a GPU: when decoding
        every frame at once (``decode_frames`` 0) alone would set the run's peak (by more than
        ``NO_BUDGET_DECODE_SLACK``), the frames are decoded in
        the fewest equal chunks that keep the decode at or under the other phases' peak, but never fewer
        than ``NO_BUDGET_MIN_DECODE_CHUNK`` frames (or half the clip) a chunk: with no budget, temporal coherence outranks
        memory. The VAE's fp32 decode of 25 frames at 576x1024 otherwise peaks far above the denoise loop
        (76.9 GiB measured on the H100, diffusers fp16 60). ``decode_frames`` = the frame count asks for all
        frames at once."""
        frames = settings.num_frames
        smallest = min(NO_BUDGET_MIN_DECODE_CHUNK, math.ceil(frames / 2))
        if self.device_type != "cuda" or settings.decode_frames or settings.vae_tile or not self._moves(("decode_frames",)):
            return None  # (a model whose VAE decodes frame by frame has no decode chunk: Wan)
        prediction = self.predict(settings)
        decode = prediction.phases[Phase.DECODE.value]
        others = max(mib for phase, mib in prediction.phases.items() if phase != Phase.DECODE.value)
        if decode <= others * NO_BUDGET_DECODE_SLACK:
            return None
        chunked, chunked_prediction = settings, prediction
        for count in range(2, frames + 1):
            chunk = math.ceil(frames / count)
            if chunk < smallest:
                break
            chunked = settings.replace(decode_frames=chunk)
            chunked_prediction = self.predict(chunked)
            if chunked_prediction.phases[Phase.DECODE.value] <= others:
                break
        floor = "" if chunked_prediction.phases[Phase.DECODE.value] <= others else (
            f" (still above them: no budget never cuts below {smallest} frame(s) a chunk; a VRAM budget goes further)")
        reason = (
            f"decode {chunked.decode_frames} frame(s) at a time (lossy: the temporal decoder sees fewer frames): all "
            f"{frames} at once would alone set the peak at {_gib(decode)}, above the other phases' {_gib(others)}; "
            f"now {_gib(chunked_prediction.phases[Phase.DECODE.value])}{floor}; "
            f"set decode_frames to {frames} to decode all frames at once anyway"
        )
        return Plan(chunked, chunked_prediction, [reason], None, True)

    def tighten(
        self, settings: RunSettings, phase: Phase, target: float = 0.7, allowed: tuple[str, ...] | None = None
    ) -> tuple[RunSettings, list[str]] | None:
        """The next tighter settings after an out-of-memory error in ``phase``: moves for that phase (and in
        ``allowed``, by name, when given) in priority order until the phase's predicted weights and
        activations fall to ``target`` of what failed; at least one move. None when none is left."""
        phase = Phase.ENCODE if phase == Phase.LOAD else phase  # loading fails on weights: the encode-phase moves
        if phase not in PHASES:  # interpolate / export: the model has no such phase; tighten the denoise loop
            phase = Phase.DENOISE
        prediction = self.predict(settings)
        fixed = self._fixed_mib(prediction)
        goal = fixed + (prediction.phases[phase.value] - fixed) * target
        current, reasons = settings, []
        while prediction.phases[phase.value] > goal:
            step = self._first_helping_move(current, prediction, phase, None, allowed)
            if step is None and not reasons:
                step = self._first_applicable_move(current, phase, allowed)
            if step is None or (reasons and step[3].lossy):
                break  # a lossy change comes alone, once the changes before it have been tried for real
            current, reason, prediction, move = step
            reasons.append(reason)
            if move.lossy:
                break
        return (current, reasons) if reasons else None

    def _moves(self, allowed: tuple[str, ...] | None) -> list[Move]:
        """MOVES in priority order, among ``allowed`` (when given) and the model's own (``moves``)."""
        return [move for move in MOVES if (allowed is None or move.name in allowed) and move.name in self.moves]

    def _fixed_mib(self, prediction: Prediction) -> float:
        """The part of every phase's peak no setting changes: context and allocator overhead."""
        return prediction.context_mib + self.model.coefficients.get("overhead_mib", 0.0)

    def _first_applicable_move(
        self, settings: RunSettings, phase: Phase, allowed: tuple[str, ...] | None
    ) -> tuple[RunSettings, str, Prediction, Move] | None:
        """Any move for the phase, even one the model thinks does not help: the model just proved wrong."""
        for move in self._moves(allowed):
            if phase not in move.phases:
                continue
            tighter = move.apply(settings, self.dims)
            if tighter is not None:
                return tighter, move.reason(tighter, self.dims), self.predict(tighter), move
        return None


def plan_for_settings(planner: Planner, settings: RunSettings) -> Plan | None:
    """Apply ``settings.vram_budget``; with no budget, only the decode rule of ``Planner.no_budget``
    (None when that changes nothing)."""
    budget = budget_for(settings.vram_budget, planner.model)
    return planner.no_budget(settings) if budget is None else planner.plan(settings, budget)

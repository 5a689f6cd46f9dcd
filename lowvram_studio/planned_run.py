"""One run, decided once and executed one way: Generate (jobs.run_job), Compare (compare.run_compare), the
studio's queue, the CLI and the benchmarks all go through ``plan_run`` then ``execute`` (issue #18 item 4).

``plan_run`` decides, before any weight moves: the planner for this model on this device, the settings that
will run (the VRAM budget's plan, or the no-budget decode rule), the RAM the run needs (refused when the
machine cannot hold it) and the time estimate for the card. ``execute`` runs that plan through the sampler,
tightening the decode inside the run and, with ``replan``, re-planning the whole run after an out-of-memory
error; the result keeps the plan, the RAM plan and the estimate judged against the measured s/step, and its
``settings`` are the ones that finally ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import PIL.Image

from .engine.events import CancelToken, EventCallback, Phase, RunEvent
from .engine.precision import GpuInfo, PrecisionPolicy, detect_gpu
from .engine.sampler import resolve_device
from .engine.speed_model import SpeedEstimate, steady_seconds_per_step
from .models.load import LoadedModel
from .plan.planner import Plan, Planner, plan_for_settings
from .plan.ram import MachineRam, RamPlan, decoded_clip_bytes, plan_ram
from .plan.replan import decode_retry, run_with_replan
from .settings import RunSettings, SettingsError
from .settings_adapter import RunResult, generate, precision_request
from .speed import estimate_for_card, estimate_record, remember_speed


@dataclass
class PlannedRun:
    """What one run will execute, and why: ``settings`` are the plan's when a plan chose them."""

    settings: RunSettings
    planner: Planner
    plan: Plan | None
    ram: RamPlan
    gpu: GpuInfo | None
    unet_config: dict[str, Any] | None  # the speed model counts UNets; None for other families
    estimate: SpeedEstimate | None

    def announce(self, on_event: EventCallback | None) -> None:
        """The plan's reasons, the RAM warning and the estimate, as the run's first events."""
        if on_event is None:
            return
        if self.plan is not None:
            on_event(RunEvent(Phase.LOAD, message="plan: " + "; ".join(self.plan.summary()),
                              data={"plan": self.plan.to_dict()}))
        if self.ram.warning():
            on_event(RunEvent(Phase.LOAD, message=f"warning: {self.ram.warning()}"))
        if self.estimate is not None:
            on_event(RunEvent(Phase.LOAD, message=f"estimate: {self.estimate.text}"))


def plan_run(model: LoadedModel, settings: RunSettings, *, planner: Planner | None = None,
             apply_plan: bool = True, machine: MachineRam | None = None) -> PlannedRun:
    """Decide the run for ``settings`` on ``model`` (``SettingsError`` when the machine's RAM cannot hold it).

    ``apply_plan`` False runs the settings exactly as given, neither budget nor decode rule (compare's references).
    ``planner``: one made for this model and device already (compare's runs share the first run's).
    """
    settings.validate()
    family = model.family
    gpu = detect_gpu(resolve_device(settings.device))
    unet_config = dict(model.pipeline.unet.config) if family.kind == "svd" else None
    planner = planner or Planner.for_gpu(family.dims(), gpu, unet_config)
    plan = plan_for_settings(planner, settings) if apply_plan else None
    chosen = plan.settings if plan is not None else settings
    policy = PrecisionPolicy.resolve(precision_request(chosen), gpu, family.components)
    ram = plan_ram(planner.dims, policy, chosen.offload, gpu is not None, machine or MachineRam.now(),
                   decoded_clip_bytes(chosen.num_frames, chosen.height, chosen.width))
    if ram.refusal():
        raise SettingsError([ram.refusal()])
    estimate = estimate_for_card(unet_config, planner.dims, chosen, gpu)
    return PlannedRun(chosen, planner, plan, ram, gpu, unet_config, estimate)


def execute(model: LoadedModel, image: PIL.Image.Image, planned: PlannedRun, *, on_event: EventCallback | None = None,
            cancel: CancelToken | None = None, replan: bool = True) -> RunResult:
    """Run ``planned`` on ``image`` (already fitted to its size). ``replan``: after an out-of-memory error, run
    again with the planner's next tighter settings (Generate); without it the error propagates (compare's
    references, whose settings must not change)."""
    planner = planned.planner

    def once(current: RunSettings, callback: EventCallback | None) -> RunResult:
        return generate(model.pipeline, image, current, on_event=callback, cancel=cancel,
                        decode_retry=decode_retry(planner), text_encoder_source=model.text_encoder_source)

    result = run_with_replan(once, planned.settings, planner, on_event=on_event) if replan \
        else once(planned.settings, on_event)
    if planned.plan is not None:
        result.info["plan"] = planned.plan.to_dict()
    result.info["ram_plan"] = {**planned.ram.to_dict(), "warning": planned.ram.warning()}
    estimate = planned.estimate
    if estimate is not None and result.settings != planned.settings:  # a re-plan ran other settings: judge those
        estimate = estimate_for_card(planned.unet_config, planner.dims, result.settings, planned.gpu)
    steady = steady_seconds_per_step(result.events)  # the estimate predicts steps after CUDA's warm-up
    if estimate is not None:
        result.info["speed_estimate"] = estimate_record(estimate, steady)
    remember_speed(planner.dims, result.settings, planned.gpu, steady, estimate)
    return result

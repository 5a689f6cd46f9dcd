"""The VRAM budget panel: the planner's plan for the form's request, as control values and a note.

Picking a budget runs the same ``plan_for_settings`` that ``jobs.run_job`` applies when the job starts,
for the chosen model's dimensions, size, frames and device, so the controls show what will run and
Generate's own planning finds nothing left to change. Planning is arithmetic (about a millisecond);
only a model's dimensions can cost something, and they are looked up without loading weights.
"""

from __future__ import annotations

import functools
import html
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..engine.dims import ModelDims
from ..engine.precision import GpuInfo, detect_gpu
from ..engine.sampler import resolve_device
from ..models.demo import DEMO_MODEL_NAME, DEMO_UNET_CONFIG, build_demo_pipeline
from ..models.load import LoadedModel
from ..models.source_family import WAN, local_folder, source_family
from ..models.svd_configs import SVD_XT_UNET_CONFIG
from ..models.svd_file_info import inspect_single_file
from ..models.wan_configs import folder_dims, ti2v_5b_dims
from ..plan.memory_model import SVD_DIMS, SVD_XT_DIMS
from ..plan.planner import Plan, Planner, plan_for_settings
from ..settings import Precision, RunSettings, SettingsError
from ..speed import estimate_for_card
from .form import BUDGET_CHOICES, MODEL, form_to_settings, settings_to_form

logger = logging.getLogger(__name__)

# The controls a plan may set (plan/planner.py: Planner.base; plan/moves.py: MOVES): the memory savers, plus frames and
# interpolation (the last rung generates half the frames and interpolates), the UNet precision (fp8) and, for
# Wan, the VAE's (bf16). Size, steps, guidance, the other FP16 choices and pruning stay the user's.
PLANNED_FIELDS = ("num_frames", "unet_dtype", "vae_dtype", "cfg_split", "spatial_chunk", "temporal_chunk", "ff_chunk",
                  "offload", "decode_frames", "vae_tile", "window_frames", "overlap", "interpolate")
# What the plan starts from: these at their defaults, so a larger budget loosens what a smaller one tightened.
_RESET_FIELDS = ("cfg_split", "spatial_chunk", "temporal_chunk", "ff_chunk", "offload", "decode_frames", "vae_tile",
                 "window_frames", "overlap", "interpolate")

# Controls whose change alters the plan: with a budget picked, changing one plans again.
REPLAN_INPUTS = (MODEL, "width", "height", "num_frames", "device", "max_guidance_scale", "unet_dtype", "vae_dtype",
                 "encoder_dtype")


@dataclass
class BudgetAnswer:
    """What picking a budget does: control values to set (None: leave every control as it is), the note, and
    the plan's bar chart (empty when there is no plan to draw)."""

    changes: dict[str, Any] | None
    note: str
    chart: str = ""


@functools.cache
def _demo_dims() -> ModelDims:
    """The built-in model's dimensions: built once (about a second), only the counts are kept."""
    return ModelDims.from_pipeline(build_demo_pipeline(), DEMO_MODEL_NAME)


def _native_frames(path: Path) -> int:
    """Native frame count from a diffusers folder's UNet config or a single file's header (no weights read)."""
    if path.is_dir():
        return int(json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))["num_frames"])
    return inspect_single_file(path).num_frames


def model_dims(source: str, loaded: LoadedModel | None) -> tuple[ModelDims, str]:
    """Dimensions of ``source`` for the planner, and a note when they are assumed rather than counted.

    The loaded model counts its own (as ``run_job`` does); the demo is counted once; another model is not
    loaded for a dropdown: an SVD model gets the standard SVD / SVD-XT counts for the native frames its config
    names, a Wan folder the counts of its config files (ComfyUI's split files: TI2V-5B's, the model the Wan
    memory model was fitted on).
    """
    source = (source or DEMO_MODEL_NAME).strip()
    if loaded is not None and loaded.source == source:
        return loaded.family.dims(), ""
    if source == DEMO_MODEL_NAME:
        return _demo_dims(), ""
    if source_family(source) == WAN:
        try:
            return folder_dims(local_folder(source)), ""
        except (OSError, ValueError, KeyError, TypeError) as exc:  # e.g. ComfyUI's split files: no config files
            logger.info("planning %s with TI2V-5B's dimensions: %s", source, exc)
            return ti2v_5b_dims(), (f"{Path(source).name} is not loaded yet: planned with Wan2.2 TI2V-5B's sizes; "
                                    "press the budget again after a Generate has loaded it")
    try:
        frames = _native_frames(Path(source).expanduser())
    except (OSError, ValueError, KeyError) as exc:  # not found / not SVD: Generate reports it with the fix
        logger.info("planning %s with SVD-XT dimensions: %s", source, exc)
        return SVD_XT_DIMS, (f"{source} could not be inspected, so the plan assumes SVD-XT's size; "
                             "press the budget again after a Generate has loaded it")
    dims = replace(SVD_XT_DIMS if frames == SVD_XT_DIMS.native_frames else SVD_DIMS, native_frames=frames)
    return dims, f"{Path(source).name} is not loaded yet: planned with standard SVD sizes ({frames} native frames)"


def unet_config(source: str, loaded: LoadedModel | None, dims: ModelDims) -> dict[str, Any] | None:
    """The UNet config the speed model counts for ``source``: the loaded model's own, the demo's, or the
    standard SVD / SVD-XT one for a model not loaded yet (as ``model_dims`` assumes its sizes); None for a
    family the speed model does not count (it counts UNet layers: Wan has none)."""
    source = (source or DEMO_MODEL_NAME).strip()
    if dims.kind != "svd":
        return None
    if loaded is not None and loaded.source == source:
        return dict(loaded.pipeline.unet.config)
    if source == DEMO_MODEL_NAME:
        return DEMO_UNET_CONFIG
    return {**SVD_XT_UNET_CONFIG, "num_frames": dims.native_frames}  # SVD differs from SVD-XT only there


def speed_line(form: dict[str, Any], settings: RunSettings, loaded: LoadedModel | None) -> str:
    """The time estimate for the form's run (``settings``, read from it) on the GPU it goes to, as
    ``jobs.run_job`` will announce it ('' on the CPU, when no device can be resolved, or for a family the
    speed model does not count: ``run_job`` estimates nothing for it either)."""
    try:
        gpu = detect_gpu(resolve_device(settings.device))
    except RuntimeError:  # e.g. CUDA asked for without a GPU: the settings note says so
        return ""
    return card_speed_line(form, loaded, settings, gpu)


def card_speed_line(form: dict[str, Any], loaded: LoadedModel | None, settings: RunSettings,
                    gpu: GpuInfo | None) -> str:
    """``speed_line`` for a given card (None: the CPU, no estimate)."""
    source = form.get(MODEL) or DEMO_MODEL_NAME
    dims, _ = model_dims(source, loaded)
    estimate = estimate_for_card(unet_config(source, loaded, dims), dims, settings, gpu)
    return f"⏱ Time: {estimate.text}" if estimate is not None else ""


def budget_request(settings: RunSettings) -> RunSettings:
    """What a budget plans from: the request with every planned setting back at its default. The delivered clip
    keeps its length: frames a former plan left to interpolation are asked for again ((F-1)*k+1 frames)."""
    defaults = RunSettings()
    delivered = (settings.num_frames - 1) * settings.interpolate + 1
    return settings.replace(num_frames=delivered, **{name: getattr(defaults, name) for name in _RESET_FIELDS})


def plan_budget(form: dict[str, Any], loaded: LoadedModel | None) -> BudgetAnswer:
    """Plan the form's request for its budget; the changes are the planned controls that differ from ``form``."""
    if BUDGET_CHOICES.get(form.get("vram_budget")) == "off" and source_family(form.get(MODEL)) == WAN:
        return BudgetAnswer(None, "Manual: the settings below are yours; Generate applies no budget.")
    if BUDGET_CHOICES.get(form.get("vram_budget")) == "off":
        return BudgetAnswer(None, "Manual: the settings below are yours; Generate applies no budget. One exception "
                                  "on a GPU: with “Decode frames at once” 0, if decoding all frames at once would alone set the "
                                  "peak, Generate decodes in the fewest chunks that keep it under the denoise peak "
                                  "(set it to the frame count to decode all at once).")
    try:
        request = budget_request(form_to_settings(form)).validate()
        device = resolve_device(request.device)
        device_type = device.type
    except (SettingsError, RuntimeError) as exc:
        return BudgetAnswer(None, f"⚠ {exc}")
    source = form.get(MODEL) or DEMO_MODEL_NAME
    dims, dims_note = model_dims(source, loaded)
    planner = Planner.for_gpu(dims, detect_gpu(device), unet_config(source, loaded, dims))
    plan = plan_for_settings(planner, request)
    if plan is None:  # 'auto' without a CUDA GPU
        return BudgetAnswer(None, "No CUDA GPU here, so Auto has no GPU memory to plan for; the settings were left "
                                  "as they are. Pick a size (e.g. 6 GB) to plan for such a card.")
    notes = [dims_note] if dims_note else []
    if device_type == "cpu":
        notes.append("this run goes to the CPU: Generate applies the same plan; the figures are GPU memory")
    elif request.unet_dtype == Precision.FP32:  # the planner's only precision move is fp8 storage, as a last resort
        notes.append("the plan keeps your precision choices; UNet precision FP16 (lossy, small) halves the UNet's memory")
    if not plan.fits:
        return BudgetAnswer(None, plan_markdown(plan, dims, notes), plan_chart(plan))
    problems = plan.settings.problems()
    if problems:  # e.g. the plan's temporal windows with pruning on
        return BudgetAnswer(None, f"⚠ The plan for {plan.budget.label} conflicts with your settings: "
                                  f"{'; '.join(problems)}. The settings were left as they are.")
    planned = settings_to_form(plan.settings, list(PLANNED_FIELDS))
    changes = {name: value for name, value in planned.items() if value != form.get(name)}
    shown, wanted = form_to_settings({**form, **changes}).to_dict(), plan.settings.to_dict()
    hidden = [f"{name}={wanted[name]}" for name in PLANNED_FIELDS if shown[name] != wanted[name]]
    if hidden:  # a planned value no control can show
        notes.append(f"the form cannot show {', '.join(hidden)}; Generate plans again and applies it")
    return BudgetAnswer(changes, plan_markdown(plan, dims, notes), plan_chart(plan))


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB"


def plan_markdown(plan: Plan, dims: ModelDims, notes: list[str]) -> str:
    """The plan for the page: verdict, each move with its reason, predicted peak per phase against the budget."""
    budget, settings, prediction = plan.budget, plan.settings, plan.prediction
    about = f" ({budget.note})" if budget.note else ""
    head = (f"**VRAM budget {budget.label}**{about}: {_gib(budget.available_mib)} usable of {_gib(budget.total_mib)} "
            f"for {dims.name} at {settings.width}x{settings.height}, {settings.num_frames} frames")
    phases = " · ".join(f"{phase} {_gib(mib)}" for phase, mib in prediction.phases.items())
    if plan.fits:
        moves, which = plan.reasons, "planned"
        verdict = (f"✔ Fits: predicted process peak {_gib(prediction.peak_mib)} ({prediction.peak_phase}); "
                   + (f"{len(moves)} move(s):" if moves else "your settings need no change."))
    else:
        moves, which = plan.reasons[:-1], "tightest"
        message = plan.reasons[-1]
        verdict = (f"✖ Does not fit: {message[0].upper()}{message[1:]}. The settings were left as they are; "
                   "moves tried:")
    lines = [head, "", verdict, *(f"{i}. {reason}" for i, reason in enumerate(moves, 1)),
             "", f"Predicted peak per phase ({which} settings): {phases}."]
    for note in notes:
        lines += ["", f"ℹ {note[0].upper()}{note[1:]}."]
    return "\n".join(lines)


def plan_chart(plan: Plan) -> str:
    """The plan as a bar chart (HTML): each phase's predicted process peak against the budget's usable memory.

    One bar per phase, to scale; a dashed line marks the usable memory (the budget less the desktop's
    share), a solid one the card. A bar is green under the usable line, red over it.
    """
    budget, phases = plan.budget, plan.prediction.phases
    scale = max(budget.total_mib, *phases.values()) * 1.05
    usable = 100 * budget.available_mib / scale
    card = 100 * budget.total_mib / scale
    rows = []
    for phase, mib in phases.items():
        over = mib > budget.available_mib
        rows.append(
            f'<div class="plan-bar" data-phase="{html.escape(phase)}" data-mib="{mib:.0f}" data-over="{str(over).lower()}"'
            ' style="display:flex;align-items:center;gap:6px;margin:2px 0">'
            f'<span style="width:8em;font-size:0.8em">{html.escape(phase)}</span>'
            '<span style="position:relative;flex:1;height:14px;background:#eee">'
            f'<span style="position:absolute;left:0;top:0;bottom:0;width:{100 * mib / scale:.1f}%;'
            f'background:{"#d62728" if over else "#2ca02c"}"></span>'
            f'<span style="position:absolute;left:{usable:.1f}%;top:-2px;bottom:-2px;border-left:2px dashed #333"></span>'
            f'<span style="position:absolute;left:{card:.1f}%;top:-2px;bottom:-2px;border-left:2px solid #333"></span>'
            f'</span><span style="width:6em;font-size:0.8em;text-align:right">{_gib(mib)}</span></div>')
    legend = (f'<div style="font-size:0.75em">bars: predicted process peak per phase · dashed: usable '
              f'{_gib(budget.available_mib)} · solid: budget {_gib(budget.total_mib)}</div>')
    return f'<div id="plan-chart-bars">{"".join(rows)}{legend}</div>'

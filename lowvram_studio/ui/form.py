"""The studio's form: control values <-> RunSettings, the VRAM budget choices, and what each setting trades.

Every Optimizations control is one RunSettings field (same name), so an engine technique takes
effect in the studio the moment the engine honours its field. The UNet's precision is a dropdown of
the engine's choices (fp32, fp16, bf16, fp8 storage); the VAE and image-encoder FP16 toggles are the
only translation: a checkbox standing for ``fp16`` (on) or ``fp32`` (off).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine.components import SVD_COMPONENTS
from ..engine.precision import DTYPE_NAMES, detect_gpu
from ..engine.sampler import resolve_device
from ..models.source_family import WAN, source_family
from ..settings import BUDGET_PRESETS, Precision, RunSettings, SettingsError, budget_gib
from ..settings_table import RENAMED, TABLE, renamed
from ..settings_adapter import precision_policy

# Controls that are not RunSettings fields but belong to the saved form.
MODEL = "model"
BUDGET_GIB = "budget_gib"
GIF = "gif"

PRECISION_FIELDS = ("unet_dtype", "vae_dtype", "encoder_dtype")
FP16_TOGGLES = ("vae_dtype", "encoder_dtype")  # checkboxes: fp16 on, fp32 off
# Wan's encoder checkbox: on is the engine's auto (bf16 where the card computes it, else fp32) — UMT5-XXL does not
# run in fp16, and in fp32 it takes 22.7 GB of RAM
WAN_ENCODER_ON = Precision.AUTO
# The UNet's dropdown: (label, RunSettings value); every precision the engine can run the UNet in.
UNET_PRECISION_CHOICES = [("FP32", Precision.FP32.value), ("FP16 ⚠ lossy (small)", Precision.FP16.value),
                          ("BF16 ⚠ lossy", Precision.BF16.value), ("FP8 storage ⚠ lossy", Precision.FP8.value)]

# Every control of the saved form: RunSettings fields by their own names, plus the three above.
FORM_NAMES = [
    MODEL, "num_frames", "num_inference_steps", "width", "height", "seed", "fps", "motion_bucket_id",
    "noise_aug_strength", "min_guidance_scale", "max_guidance_scale", "prompt", "negative_prompt", "guidance_scale",
    "device", "preview_every", "vram_budget", BUDGET_GIB,
    *PRECISION_FIELDS, "half_compute", "cfg_split", "spatial_chunk", "temporal_chunk", "ff_chunk", "offload", "decode_frames",
    "vae_tile", "window_frames", "overlap", "prune_threshold", "interpolate", GIF,
]

# What the user picks -> RunSettings.vram_budget. "Manual" leaves every slider to the user.
BUDGET_CHOICES = {"Manual": "off", "Auto": "auto",
                  **{size.replace("GB", " GB"): size for size in BUDGET_PRESETS},
                  "Custom": None}

# What each control trades, shown as its info text: the settings table's help as a sentence (DESIGN §3: lossy ones
# say so), and the GIF toggle's.
INFO = {
    **{name: row.help[0].upper() + row.help[1:] + "." for name, row in TABLE.items()},
    GIF: "Also write an animated GIF beside the mp4.",
}

# The write-up (reference/gtx1060-video-writeup) saw ghosting below this pruning threshold.
PRUNE_GHOSTING_BELOW = 0.008


def budget_choice(vram_budget: str) -> tuple[str, float]:
    """RunSettings.vram_budget -> (dropdown choice, custom GiB)."""
    for choice, value in BUDGET_CHOICES.items():
        if value == vram_budget:
            return choice, 6.0
    return "Custom", budget_gib(vram_budget) or 6.0


def budget_value(choice: str, custom_gib: float | None) -> str:
    """(dropdown choice, custom GiB) -> RunSettings.vram_budget."""
    if choice not in BUDGET_CHOICES:
        raise SettingsError([f"VRAM budget must be one of {', '.join(BUDGET_CHOICES)}; got {choice!r}"])
    value = BUDGET_CHOICES[choice]
    if value is None:
        return f"{float(custom_gib or 0):g}GB"
    return value


def form_to_settings(form: dict[str, Any]) -> RunSettings:
    """The settings a form describes; ``SettingsError`` lists every problem with its fix."""
    fields = {f.name for f in dataclasses.fields(RunSettings)}
    data = {name: value for name, value in form.items() if name in fields}
    on = {"encoder_dtype": WAN_ENCODER_ON.value} if source_family(form.get(MODEL)) == WAN else {}
    for name in PRECISION_FIELDS:  # the UNet's too: forms saved before it became a dropdown hold a bool
        if name in data and isinstance(data[name], bool):
            data[name] = on.get(name, Precision.FP16.value) if data[name] else Precision.FP32.value
    if "vram_budget" in form:
        data["vram_budget"] = budget_value(form["vram_budget"], form.get(BUDGET_GIB))
    for name, value in list(data.items()):
        if isinstance(value, float) and value.is_integer() and isinstance(getattr(RunSettings, name, None), int):
            data[name] = int(value)  # sliders and number boxes hand back floats
    if "interpolate" in data:
        data["interpolate"] = int(data["interpolate"])
    return RunSettings.from_dict(data).validate()


def resolve_auto_precision(settings: RunSettings, keep: tuple[str, ...] = ()) -> tuple[RunSettings, dict[str, str]]:
    """The precision controls have no 'auto': it becomes what the engine picks on this machine (fp16 storage
    on CUDA GPUs, fp32 on the CPU; engine/precision.py), except in ``keep`` (Wan's encoder checkbox is auto).
    Returns the settings and the fields it set."""
    auto = [name for name in PRECISION_FIELDS if getattr(settings, name) == Precision.AUTO and name not in keep]
    if not auto:
        return settings, {}
    component_of = {component.setting: component.role for component in SVD_COMPONENTS}
    policy = precision_policy(settings, detect_gpu(resolve_device(settings.device)))
    changes = {name: DTYPE_NAMES[policy.component(component_of[name]).storage] for name in auto}
    return settings.replace(**changes), changes


def upgrade_stored_form(values: dict[str, Any]) -> dict[str, Any]:
    """A saved form (last used, preset) as today's controls take it: the UNet's precision was a checkbox, and
    0.1.0 named two settings differently (settings_table.RENAMED); a form holding both keeps today's."""
    values = renamed({key: value for key, value in values.items()
                      if not (key in RENAMED and RENAMED[key] in values)}, "the saved form")
    unet = values.get("unet_dtype")
    if isinstance(unet, bool):
        return {**values, "unet_dtype": Precision.FP16.value if unet else Precision.FP32.value}
    return values


def settings_to_form(settings: RunSettings, names: list[str]) -> dict[str, Any]:
    """Control values for ``settings``, for the controls named ``names`` (others are left out)."""
    data = settings.to_dict()
    form: dict[str, Any] = {}
    for name in names:
        if name in FP16_TOGGLES:
            form[name] = data[name] in (Precision.FP16.value, WAN_ENCODER_ON.value)
        elif name == "vram_budget":
            form[name], form[BUDGET_GIB] = budget_choice(data[name])
        elif name == "interpolate":
            form[name] = str(data[name])
        elif name in data:
            form[name] = data[name]
    return form


def lossy_summary(settings: RunSettings) -> str:
    """One line naming the lossy settings in use (or saying the run is lossless)."""
    lossy = settings.lossy_settings()
    if not lossy:
        return "Lossless: the output equals the FP32 reference up to float rounding."
    return ("⚠ Lossy settings on: " + ", ".join(lossy) + " (on SVD models Compare FP32 vs FP16 shows their price in "
            "PSNR/SSIM).")


def prune_warning(threshold: float) -> str:
    if 0 < threshold < PRUNE_GHOSTING_BELOW:
        return (f"⚠ Pruning threshold below {PRUNE_GHOSTING_BELOW}: the write-up saw ghosting there; "
                "use 0 (off) or at least 0.008, and 0.02 or more for big motion.")
    return ""

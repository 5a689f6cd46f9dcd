"""Which controls the picked model's family takes, and what a switch of family changes in the form.

SVD is steered by its image and per-frame guidance (motion bucket, noise augmentation, min / max guidance);
Wan by a prompt, a negative prompt and one guidance scale. Wan's request refuses SVD's UNet-layer chunks and
step reuse (``settings_adapter.request_for``) and takes 4k+1 frames; its VAE decodes frame by frame, so the
decode chunk has nothing to cut.
The page hides what the family does not take and, on a switch, moves each value the new family cannot take
to one it can, saying so in a note: a hidden control never holds a value that would fail the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models.source_family import SVD, WAN, native_fps, source_family
from .form import MODEL
from .labels import LABELS, short_label
from .sliders import SLIDERS, SliderSpec, snap_note

FAMILY_NAMES = {SVD: "SVD", WAN: "Wan"}  # as the user knows them
WAN_ONLY = ("prompt", "negative_prompt", "guidance_scale")
SVD_ONLY = ("motion_bucket_id", "noise_aug_strength", "min_guidance_scale", "max_guidance_scale", "spatial_chunk",
            "temporal_chunk", "decode_frames")
# The SVD-only knobs Wan refuses when on (decode_frames: ignores), at the value Wan runs.
WAN_OFF = {"spatial_chunk": 0, "temporal_chunk": 0, "decode_frames": 0}
# Wan2.1's and Wan2.2's VAEs compress time 4x, so a clip is 4k+1 frames (request_for checks the loaded model's).
# Sizes: one Wan2.2 TI2V token per 32 px (16 px latent cells, 2x2 patches), up to its 1280x704.
# Step reuse: diffusers' FirstBlockCache threshold (engine/step_cache.py), useful from about 0.05 to 0.2.
FAMILY_SLIDERS = {WAN: {"num_frames": SliderSpec(5, 125, 4), "width": SliderSpec(64, 1280, 32),
                        "height": SliderSpec(64, 1280, 32), "prune_threshold": SliderSpec(0, 0.3, 0.005)}}
SNAPPED = ("num_frames", "width", "height", "prune_threshold")  # the sliders whose steps depend on the family
# Every control whose properties depend on the family, in the order the page's model update lists them.
FAMILY_CONTROLS = (*WAN_ONLY, *SVD_ONLY, *SNAPPED, "encoder_dtype", "fps")
# the encoder checkbox's label: SVD's CLIP image encoder in fp16, Wan's UMT5 text encoder in 16 bit (form.WAN_ENCODER_ON)
ENCODER_LABELS = {SVD: LABELS["encoder_dtype"], WAN: "Text encoder 16-bit ⚠ lossy"}
FITTED = (*SNAPPED, *WAN_OFF, "encoder_dtype")  # the controls ``fit_to_family`` may move


def sliders_for(family: str) -> dict[str, SliderSpec]:
    """Every slider's range and step for ``family`` (Wan's frames slider moves 4 at a time, its sizes 32 px)."""
    return {**SLIDERS, **FAMILY_SLIDERS.get(family, {})}


@dataclass(frozen=True)
class FamilyFit:
    """Control values the form's family cannot take, moved to ones it can, and what to tell the user."""

    changes: dict[str, Any]
    notes: list[str]

    @property
    def note(self) -> str:
        return "".join(f"ℹ {note}\n\n" for note in self.notes).strip()


def fit_to_family(form: dict[str, Any]) -> FamilyFit:
    """What must change for ``form``'s model: frames onto the family's steps and Wan's refused SVD knobs off."""
    family = source_family(form.get(MODEL))
    changes: dict[str, Any] = {}
    notes: list[str] = []
    for name in SNAPPED:
        snapped = snap_note(name, form.get(name), sliders_for(family))
        if snapped is not None:
            changes[name] = snapped[0]
            notes.append(f"{FAMILY_NAMES[family]} models: {snapped[1]}")
    if family == WAN and form.get("encoder_dtype") is False:
        changes["encoder_dtype"] = True
        notes.append(f"“{ENCODER_LABELS[WAN].replace(' ⚠ lossy', '')}” on: UMT5-XXL in FP32 takes 22.7 GB of RAM; 16-bit is BF16 where the "
                     "card computes it (else FP32)")
    if family == WAN:
        on = [name for name in WAN_OFF if form.get(name)]
        changes.update({name: WAN_OFF[name] for name in on})
        if on:
            labels = ", ".join(f"“{short_label(name)}”" for name in on)
            notes.append(f"{labels} cut SVD's UNet or its decoder, which Wan models do not have: set to off.")
    return FamilyFit(changes, notes)


def picked(form: dict[str, Any]) -> FamilyFit:
    """What picking ``form``'s model changes: ``fit_to_family``'s moves, and a Wan model's own frame rate (its
    video plays at the speed it was made for; the user may change it after the pick)."""
    fit = fit_to_family(form)
    fps = native_fps(form.get(MODEL))
    if fps is None or form.get("fps") == fps:
        return fit
    note = f"“{short_label('fps')}” set to {fps}, the frame rate this Wan model was made for."
    return FamilyFit({**fit.changes, "fps": fps}, [*fit.notes, note])


def family_props(form: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The page properties of each of FAMILY_CONTROLS for ``form``'s model: shown or hidden, the frames slider's
    and size sliders' ranges and steps."""
    family = source_family(form.get(MODEL))
    props: dict[str, dict[str, Any]] = {name: {"visible": family == WAN} for name in WAN_ONLY}
    props.update({name: {"visible": family == SVD} for name in SVD_ONLY})
    specs = sliders_for(family)
    props.update({name: {"minimum": specs[name].minimum, "maximum": specs[name].maximum, "step": specs[name].step}
                  for name in SNAPPED})
    props["encoder_dtype"] = {"label": ENCODER_LABELS[family]}
    props["fps"] = {}  # its value moves on a pick (``picked``); its range is every family's
    return props


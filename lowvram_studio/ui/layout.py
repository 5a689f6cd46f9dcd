"""The studio form's controls, created in their groups: each named after its RunSettings field, with its
label, info text and slider range from the one table that holds each (labels, form, sliders).

``app.build_app`` places the groups on the page and wires them; nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from .form import BUDGET_CHOICES, BUDGET_GIB, INFO, UNET_PRECISION_CHOICES
from .labels import LABELS
from .sliders import SLIDERS


class FormControls:
    """Creates the form's controls: each named after its RunSettings field, with its saved value, its label
    (labels.LABELS), its info text and, for a slider, its range and step (sliders.SLIDERS)."""

    def __init__(self, init: dict[str, Any], props: dict[str, dict[str, Any]] | None = None):
        """``props``: properties that depend on the model's family (``family_form.family_props``), over the rest."""
        self.init = init
        self.props = props or {}
        self.controls: dict[str, gr.components.Component] = {}

    def add(self, name: str, factory: Callable[..., gr.components.Component], *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("info", INFO.get(name))
        kwargs.setdefault("label", LABELS[name])
        if name in SLIDERS:
            spec = SLIDERS[name]
            kwargs.update(minimum=spec.minimum, maximum=spec.maximum, step=spec.step)
        kwargs.update(self.props.get(name, {}))
        self.controls[name] = factory(*args, value=self.init[name], elem_id=f"ctl-{name}", **kwargs)


def main_controls(form: FormControls) -> None:
    """What every run sets, beside the image: length, steps, size, seed, frame rate (no info lines: room)."""
    for pair in (("num_frames", "num_inference_steps"), ("width", "height"), ("seed", "fps")):
        with gr.Row():
            for name in pair:
                if name == "seed":
                    form.add(name, gr.Number, precision=0, minimum=0, info=None)
                else:
                    form.add(name, gr.Slider, info="the video's frame rate" if name == "fps" else None)


def prompt_controls(form: FormControls) -> None:
    """The text a Wan model is steered by (hidden for SVD, which takes the image alone: family_form)."""
    form.add("prompt", gr.Textbox, lines=2, max_lines=4, info=None, placeholder="e.g. a red kite climbs over the dunes")
    form.add("negative_prompt", gr.Textbox, lines=1, max_lines=2, info=None,
             placeholder="e.g. blurry, still scene (empty: nothing to avoid)")


def generation_controls(form: FormControls) -> None:
    """SVD's conditioning and per-frame guidance, Wan's one guidance scale (each shown for its family), the device
    and the live preview."""
    form.add("motion_bucket_id", gr.Slider, info="more = more motion")
    form.add("noise_aug_strength", gr.Slider)
    with gr.Row():
        form.add("min_guidance_scale", gr.Slider)
        form.add("max_guidance_scale", gr.Slider)
    form.add("guidance_scale", gr.Slider)
    form.add("device", gr.Radio, ["auto", "cpu", "cuda"])
    form.add("preview_every", gr.Slider)


def optimization_controls(form: FormControls) -> tuple[gr.Markdown, gr.Markdown, gr.HTML]:
    """Every control here is one RunSettings field; lossy ones carry ⚠ in their label, and the lossless
    accordion holds only lossless ones. Returns the pruning warning, the budget's plan note and its chart."""
    with gr.Row():
        form.add("vram_budget", gr.Dropdown, list(BUDGET_CHOICES))
        form.add(BUDGET_GIB, gr.Number, minimum=0.5, maximum=1024, info="used when the VRAM budget is Custom")
    budget_chart = gr.HTML(elem_id="budget-chart")
    budget_note = gr.Markdown(elem_id="budget-note")
    with gr.Row():
        form.add("unet_dtype", gr.Dropdown, UNET_PRECISION_CHOICES)
        form.add("vae_dtype", gr.Checkbox)
        form.add("encoder_dtype", gr.Checkbox)
        form.add("half_compute", gr.Dropdown, ["auto", "fp16", "fp32"])
    with gr.Row():
        form.add("window_frames", gr.Slider)
        form.add("overlap", gr.Slider)
    form.add("prune_threshold", gr.Slider)
    warning = gr.Markdown(elem_id="prune-warning")
    with gr.Row():
        form.add("offload", gr.Radio, ["none", "model", "stream"])
        form.add("decode_frames", gr.Slider)
        form.add("vae_tile", gr.Slider)
    form.add("interpolate", gr.Radio, ["1", "2", "4"])
    with gr.Accordion("Lossless memory savers", open=False):
        form.add("cfg_split", gr.Checkbox)
        with gr.Row():
            form.add("spatial_chunk", gr.Slider)
            form.add("temporal_chunk", gr.Slider)
            form.add("ff_chunk", gr.Slider)
    return warning, budget_note, budget_chart

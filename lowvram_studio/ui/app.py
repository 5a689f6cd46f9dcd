"""The studio: a Gradio Blocks app over the same engine the CLI uses.

The page (``build_app``: layout, then the wiring of each control to a ``Studio`` method in ui/studio.py);
serving it is ui/serve.py's; nothing runs at import. GPU work never runs in a Gradio handler: handlers submit
a job to the background ``Worker`` and stream its progress to the page once a second and its memory curve
every few seconds: each update costs the browser a redraw, and on a CPU run that competes with the run itself
(#21: a page redrawing 2.5x a second made a CPU run 4x slower). The module is over 400 lines because Gradio
builds a page inside one ``with gr.Blocks()`` context: its components and their wiring cannot be split apart.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from ..models.discovery import DiscoveryConfig, discover_models
from ..models.source_family import source_family
from ..monitor.reuse import ReuseError
from ..settings import SettingsError
from .badge import device_badge
from .budget import PLANNED_FIELDS, REPLAN_INPUTS, plan_budget, speed_line
from .config_store import PresetError
from .family_form import (
    FAMILY_CONTROLS,
    FITTED,
    SNAPPED,
    family_props,
    fit_to_family,
    picked,
    sliders_for,
)
from .form import (
    BUDGET_GIB,
    FORM_NAMES,
    GIF,
    MODEL,
    form_to_settings,
    lossy_summary,
    prune_warning,
    upgrade_stored_form,
)
from .labels import in_user_words, suggest_fix
from .layout import (
    FormControls,
    generation_controls,
    main_controls,
    optimization_controls,
    prompt_controls,
)
from .progress import progress_html
from .queue_entry import QueueError
from .queue_runner import QUEUE_COLUMNS
from .reuse import restore_form
from .runs_view import (
    STATS_MAX_CHARS,
    STATS_WIDTHS,
    TabHistory,
    stats_headers,
)
from .sliders import SLIDERS, snap_note
from .starters import STARTERS, starter_form
from .studio import (
    ASSETS,
    DEMO,
    Studio,
    check_image_upload,
)
from .worker import JobState

logger = logging.getLogger(__name__)

QUEUE_REFRESH_S = 1.0  # the queue table is checked once a second and redrawn only when it changed


# ---- helpers ------------------------------------------------------------------------------------
def discovered_models() -> list[str]:
    """SVD and Wan models found on disk for the picker (ComfyUI folders, the HF cache, COMFYUI_ROOT)."""
    return [str(c.path) for c in discover_models(DiscoveryConfig.from_env())]

def with_named_values(fn: Callable, names: list[str]) -> Callable:
    """Give ``fn(..., *values)`` one named parameter per control, so API callers (gradio_client) pass keywords."""
    signature = inspect.signature(fn)
    fixed = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_POSITIONAL]
    named = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
    fn.__signature__ = signature.replace(parameters=fixed + named)
    return fn


# ---- layout -------------------------------------------------------------------------------------


def build_app(studio: Studio) -> gr.Blocks:
    """The page. First screen: the image | main settings, Generate and progress | live curve and video.
    Below: the other settings in tabs, the runs table, Compare's side-by-side video, downloads, the queue."""
    examples = sorted(str(p) for p in ASSETS.glob("*.png"))
    init = studio.default_form(FORM_NAMES)
    form = FormControls(init, family_props(init))
    controls = form.controls
    with gr.Blocks(title="LowVRAM Studio") as app:
        with gr.Row(equal_height=True):
            gr.Markdown("## LowVRAM Studio\nImage to video (SVD, Wan 2.x) on small GPUs; every memory trick "
                        "measured live.", elem_id="title")
            gr.HTML(device_badge(studio.env, studio.torch_problem), elem_id="device-badge")
        history = gr.State(TabHistory())
        with gr.Row():
            with gr.Column(scale=4, min_width=300):
                image = gr.Image(type="filepath", label="Input image", height=220, elem_id="input-image")
                gr.Examples(examples, inputs=image, examples_per_page=6)
                banner = gr.Markdown(elem_id="banner")  # warnings and notes, still on the first screen
            with gr.Column(scale=4, min_width=320):
                starter = gr.Dropdown(list(STARTERS), value=None, label="Starter preset for your GPU",
                                      elem_id="starter", info="sets the VRAM budget and settings for that card")
                prompt_controls(form)
                main_controls(form)
                lossy_note = gr.Markdown(in_user_words(lossy_summary(form_to_settings(form.init))), elem_id="lossy-note")
                fix = gr.Button("Fix", visible=False, elem_id="fix", size="sm")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate", scale=2)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                compare = gr.Button("Compare FP32 vs FP16", elem_id="compare", size="sm")
                progress = gr.HTML(progress_html(None, "ready"), elem_id="progress")
                status = gr.Markdown("Ready.", elem_id="status")
            with gr.Column(scale=5, min_width=360):
                curve = gr.LinePlot(x="t_s", y="mib", color="series", x_title="seconds since the run started",
                                    y_title="memory (MiB)", label="Memory curve (this tab's runs overlaid)",
                                    color_title="run", elem_id="curve")  # a fixed height clips the legend
                preview = gr.HTML(elem_id="live-preview", min_width=160)
                video = gr.Video(label="Video", elem_id="video", autoplay=True, loop=True, height=300)
        with gr.Row():
            with gr.Column(scale=5):
                form.add(MODEL, gr.Dropdown, [DEMO, *discovered_models()], allow_custom_value=True,
                         info="demo (built in), a diffusers SVD or Wan folder (with model_index.json) "
                              "or an svd_xt.safetensors file")
                family_note = gr.Markdown(elem_id="family-note")  # what a switch of model family changed
                with gr.Tab("Optimizations"):
                    prune_note, budget_note, budget_chart = optimization_controls(form)
                with gr.Tab("Generation"):
                    generation_controls(form)
                with gr.Tab("Presets"):
                    preset_name = gr.Dropdown([], allow_custom_value=True, label="Preset",
                                              info="type a name to save the current settings, or pick one")
                    with gr.Row():
                        save_preset = gr.Button("Save preset")
                        load_preset = gr.Button("Load")
                        delete_preset = gr.Button("Delete")
                        reset = gr.Button("Reset to defaults")
                    form.add(GIF, gr.Checkbox)
                reuse_file = gr.File(label="Use these settings again: drop an output mp4 or its .json record",
                                     type="filepath", height=120, elem_id="reuse-drop")
                reuse_note = gr.Markdown(elem_id="reuse-note")
                with gr.Row():
                    seeds = gr.Textbox(label="Seeds for the queue", placeholder="e.g. 1..8 or 3, 7, 11 (empty: the seed)",
                                       elem_id="queue-seeds", scale=3)
                    add_queue = gr.Button("Add to queue", elem_id="queue-add", scale=1)
            with gr.Column(scale=6):
                stats = gr.Dataframe(headers=stats_headers("memory"), label="Runs in this tab", interactive=False,
                                     elem_id="stats", wrap=True, column_widths=STATS_WIDTHS,
                                     max_chars=STATS_MAX_CHARS)
                compare_video = gr.Video(label="Compared runs side by side: FP32 | FP16 only | FP16 + optimizations",
                                         elem_id="compare-video", autoplay=True, loop=True, height=240)
                with gr.Row():
                    downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")
                    pruning_map = gr.Image(label="Pruning map (when pruning is on)", interactive=False)
                with gr.Accordion("Job queue (saved; survives a restart)", open=True):
                    queue_table = gr.Dataframe(headers=QUEUE_COLUMNS, interactive=False, elem_id="queue", wrap=True,
                                               column_widths=["5%", "14%", "29%", "14%", "18%", "20%"],
                                               label="Click a row to select a job; a done one shows its video")
                    with gr.Row():
                        job_id = gr.Textbox(label="Selected job", elem_id="queue-job", scale=2)
                        move_up = gr.Button("Up", elem_id="queue-up", scale=1)
                        move_down = gr.Button("Down", elem_id="queue-down", scale=1)
                        remove_job = gr.Button("Remove / stop", elem_id="queue-remove", scale=1)
                        clear_done = gr.Button("Clear finished", elem_id="queue-clear", scale=1)
                    queue_note = gr.Markdown(elem_id="queue-note")
                queue_timer = gr.Timer(QUEUE_REFRESH_S)
                queue_shown = gr.State(None)  # the rows this tab shows: a tick with the same rows redraws nothing

        names = list(FORM_NAMES)  # the API's parameter order
        components = [controls[name] for name in names]
        planned = [controls[name] for name in PLANNED_FIELDS]
        lockable = [image, *components, generate, compare, save_preset, load_preset, delete_preset, reset, reuse_file]
        results = [status, progress, curve, video, stats, downloads, pruning_map, history, preview, compare_video]

        # ---- wiring -----------------------------------------------------------------------------
        def form_of(values: tuple) -> dict[str, Any]:
            return dict(zip(names, values, strict=True))

        def values_of(form: dict[str, Any]) -> list[Any]:
            return [form.get(name) for name in names]

        def restore() -> list[Any]:
            form, note = studio.restored_form(names)
            return [*values_of(form), "\n\n".join(n for n in (studio.banner(), note) if n),
                    gr.update(choices=studio.store.preset_names())]

        def run_generate(tab: TabHistory, request: gr.Request, image_path: str | None, *values: Any):
            form = form_of(values)
            picture, settings = studio.prepare(image_path, form)
            job = studio.submit_generate(request.session_hash or "anonymous", picture, settings, form, image_path)
            yield from studio.follow(job, tab, studio.finish_generate)

        def run_compare(tab: TabHistory, request: gr.Request, image_path: str | None, *values: Any):
            form = form_of(values)
            picture, settings = studio.prepare(image_path, form)
            job = studio.submit_compare(request.session_hash or "anonymous", picture, settings, form)
            yield from studio.follow(job, tab, studio.finish_compare)

        def check_request(image_path: str | None, *values: Any) -> None:
            studio.check_request(image_path, form_of(values))

        def check_upload(upload: dict | None) -> None:
            if upload and upload.get("path"):
                check_image_upload(Path(upload["path"]), upload.get("orig_name"))

        def stop_run(request: gr.Request) -> str:
            return studio.stop_owner(request.session_hash or "anonymous")

        def tab_closed(request: gr.Request) -> None:
            if studio.worker.cancel_owner(request.session_hash or "anonymous"):
                logger.info("a browser tab closed during its run; the run was stopped")

        def set_locked(locked: bool) -> list[dict]:
            """Lock (or unlock) the form; the queue's timer pauses while the tab's run streams: each tick is a
            round of Gradio's loading-status updates over every component the page has, which a CPU run pays."""
            return [*(gr.update(interactive=not locked) for _ in lockable), gr.Timer(active=not locked)]

        def unlock() -> list[dict]:
            return set_locked(False)

        def starting() -> list[Any]:
            """Lock the form and clear the last run's status and bar: nothing stale while the new run starts."""
            return [*set_locked(True), "⏳ Starting ...", progress_html(None, "starting")]

        def pick_model(*values: Any) -> list[Any]:
            """The picked model's family: its controls shown, the others hidden, what it cannot take moved (with
            the note), the budget locked where none can be planned, and the budget's note for this model."""
            form = form_of(values)
            fit = picked(form)
            props = family_props(form)
            answer = plan_budget({**form, **fit.changes}, studio.loaded_model)
            updates = [gr.update(**props[name], **({"value": fit.changes[name]} if name in fit.changes else {}))
                       for name in FAMILY_CONTROLS]
            return [*updates, fit.note, answer.note, answer.chart]

        def fit_family(*values: Any) -> list[Any]:
            """A value the model's family cannot take, set by a preset, a starter or a re-used record, moved."""
            fit = fit_to_family(form_of(values))
            return [*(fit.changes.get(name, gr.skip()) for name in FITTED), fit.note or gr.skip()]

        def apply_budget(*values: Any) -> list[Any]:
            """The budget's plan into the planned controls (only those it changes), its note and its chart."""
            answer = plan_budget(form_of(values), studio.loaded_model)
            changes = answer.changes or {}
            return [*(changes[name] if name in changes else gr.skip() for name in PLANNED_FIELDS), answer.note,
                    answer.chart]

        def apply_starter(name: str | None, *values: Any) -> list[Any]:
            """A starter's budget and settings, then that budget's plan, into the whole form."""
            if not name:
                return [*(gr.skip() for _ in names), gr.skip(), gr.skip()]
            try:
                form = starter_form(name, form_of(values))
            except ValueError as exc:
                raise gr.Error(str(exc)) from exc
            answer = plan_budget(form, studio.loaded_model)
            return [*values_of({**form, **(answer.changes or {})}), answer.note, answer.chart]

        def describe(*values: Any) -> tuple[str, dict]:
            """The lossy note and, on a GPU, the time estimate; or the conflict in the page's words with its
            one-click fix when there is one."""
            form = form_of(values)
            try:
                settings = form_to_settings(form)
                note = in_user_words(lossy_summary(settings))
                estimate = speed_line(form, settings, studio.loaded_model)
                return "\n\n".join(part for part in (note, estimate) if part), gr.update(visible=False)
            except SettingsError as exc:
                remedy = suggest_fix(form)
                button = gr.update(visible=True, value=remedy.label) if remedy else gr.update(visible=False)
                return f"⚠ {in_user_words(str(exc))}", button

        def apply_fix(*values: Any) -> list[Any]:
            remedy = suggest_fix(form_of(values))
            changes = remedy.changes if remedy else {}
            return [changes[name] if name in changes else gr.skip() for name in names]

        def snap(source: str | None, *values: Any) -> list[Any]:
            """A value typed between a slider's steps (the model family's) moves to the nearest step, and the user
            is told."""
            out, specs = [], sliders_for(source_family(source))
            for name, value in zip(SLIDERS, values, strict=True):
                snapped = snap_note(name, value, specs)
                if snapped is not None:
                    gr.Warning(snapped[1])
                out.append(gr.skip() if snapped is None else snapped[0])
            return out

        def save_named(name: str | None, *values: Any) -> dict:
            try:
                saved = studio.store.save_preset(name or "", form_of(values))
            except PresetError as exc:
                raise gr.Error(str(exc)) from exc
            gr.Info(f"Saved preset {saved!r}.")
            return gr.update(choices=studio.store.preset_names(), value=saved)

        def load_named(name: str | None) -> list[Any]:
            try:
                stored = studio.store.preset(name or "")
            except PresetError as exc:
                raise gr.Error(str(exc)) from exc
            form = {**studio.default_form(names), **{k: v for k, v in upgrade_stored_form(stored).items() if k in names}}
            return values_of(form)

        def delete_named(name: str | None) -> dict:
            try:
                studio.store.delete_preset(name or "")
            except PresetError as exc:
                raise gr.Error(str(exc)) from exc
            return gr.update(choices=studio.store.preset_names(), value=None)

        def reset_defaults() -> list[Any]:
            form = studio.default_form(names)
            studio.store.save_last(form)
            return values_of(form)

        def queue_view() -> dict:
            return gr.update(value=studio.runner.rows(), headers=QUEUE_COLUMNS)

        def queue_tick(shown: Any) -> tuple[Any, Any]:
            """The timer's redraw, only when the rows differ from what this tab shows."""
            rows = studio.runner.rows()
            if rows == shown:
                return gr.skip(), gr.skip()
            return gr.update(value=rows, headers=QUEUE_COLUMNS), rows

        def queue_add(image_path: str | None, seed_list: str | None, *values: Any) -> tuple[dict, str]:
            message = studio.queue_jobs(image_path, seed_list, form_of(values))
            return queue_view(), message

        def queue_change(action: Callable[[], str]) -> tuple[dict, str]:
            try:
                message = action()
            except QueueError as exc:
                raise gr.Error(str(exc)) from exc
            return queue_view(), message

        def queue_move(selected: str, delta: float) -> tuple[dict, str]:
            return queue_change(lambda: studio.runner.move((selected or "").strip(), int(delta)))

        def queue_remove(selected: str) -> tuple[dict, str]:
            return queue_change(lambda: studio.runner.remove((selected or "").strip()))

        def queue_clear() -> tuple[dict, str]:
            return queue_change(lambda: f"Cleared {studio.queue.clear_finished()} finished job(s).")

        def queue_select(event: gr.SelectData) -> tuple[str, Any]:
            selected = str(event.row_value[1])
            try:
                entry = studio.queue.get(selected)
            except QueueError:
                return selected, gr.skip()
            done = entry.state == JobState.DONE and entry.video and Path(entry.video).is_file()
            return selected, entry.video if done else gr.skip()

        def reuse_drop(path: str | None) -> list[Any]:
            try:
                restored = restore_form(path, names, served=[studio.output_dir, ASSETS, studio.queue.inputs])
            except ReuseError as exc:
                raise gr.Error(str(exc)) from exc
            values = [restored.values[name] if name in restored.values else gr.skip() for name in names]
            return [*values, restored.image if restored.image is not None else gr.skip(), restored.message]

        app.load(restore, outputs=[*components, banner, preset_name], api_name="restore")
        app.unload(tab_closed)
        # Generate and Compare check the request first, so a fixable problem locks nothing; the form is locked
        # while the run goes and unlocked however it ends. Gradio 6.31's page fires a `.then()` step only when
        # the step before it succeeded (an error fires just the `.failure()` steps), so the unlock hangs on both.
        # The check is queued: the page shows no toast for a gr.Error of a queue=False step.
        for button, check, handler, api_name in ((generate, check_request, run_generate, "generate"),
                                                 (compare, check_request, run_compare, "compare")):
            run = button.click(check, [image, *components], api_name=False, concurrency_limit=None,
                               show_progress="hidden").success(
                starting, outputs=[*lockable, queue_timer, status, progress], queue=False, api_name=False,
                show_progress="hidden").then(
                with_named_values(handler, names), inputs=[history, image, *components], outputs=results,
                api_name=api_name,
                concurrency_limit=None, show_progress="hidden",
            )
            run.then(unlock, None, [*lockable, queue_timer], queue=False, api_name=False)
            run.failure(unlock, None, [*lockable, queue_timer], queue=False, api_name=False)
        # An upload PIL cannot read is named with the fix at once and the box emptied for the next file; the
        # check reads the upload itself (preprocess=False): Gradio's own decoding would fail with a bare "Error".
        image.upload(check_upload, image, preprocess=False, api_name=False, concurrency_limit=None,
                     show_progress="hidden").failure(lambda: None, outputs=image, queue=False, api_name=False)
        stop.click(stop_run, outputs=status, api_name="stop", concurrency_limit=None)
        # A budget plans when picked and again when the model, size, frames, device or precision change.
        budget_triggers = [controls[name].input for name in ("vram_budget", BUDGET_GIB, *REPLAN_INPUTS)]
        gr.on(budget_triggers, with_named_values(apply_budget, names), components, [*planned, budget_note, budget_chart],
              queue=False, api_name="plan_budget", show_progress="hidden")
        starter.input(with_named_values(apply_starter, names), [starter, *components],
                      [*components, budget_note, budget_chart], queue=False, api_name="starter", show_progress="hidden")
        gr.on([c.change for c in components], describe, components, [lossy_note, fix], queue=False, api_name=False,
              show_progress="hidden")
        fix.click(apply_fix, components, components, queue=False, api_name=False, show_progress="hidden")
        # Typed values snap to the step: a slider's number box takes any number and sends no input event. Queued:
        # the page shows no toast from a queue=False step.
        sliders = [controls[name] for name in SLIDERS]
        gr.on([c.change for c in sliders], snap, [controls[MODEL], *sliders], sliders, api_name=False,
              concurrency_limit=None, show_progress="hidden")
        # The model's family decides which controls show; whatever sets the model (a pick, a preset, a re-used
        # record) fits the form to it, and a preset or starter that sets what the family cannot take is fitted too.
        controls[MODEL].change(with_named_values(pick_model, names), components, [*(controls[name] for name in FAMILY_CONTROLS), family_note,
                                                        budget_note, budget_chart], queue=False, api_name="pick_model",
                               show_progress="hidden")
        gr.on([controls[name].change for name in FITTED if name not in SNAPPED], fit_family, components,
              [*(controls[name] for name in FITTED), family_note], queue=False, api_name=False, show_progress="hidden")
        controls["prune_threshold"].change(prune_warning, controls["prune_threshold"], prune_note, queue=False,
                                           api_name=False)
        save_preset.click(with_named_values(save_named, names), [preset_name, *components], preset_name,
                          api_name="save_preset")
        load_preset.click(load_named, preset_name, components, api_name="load_preset")
        delete_preset.click(delete_named, preset_name, preset_name, api_name="delete_preset")
        reset.click(reset_defaults, outputs=components, api_name="reset")
        add_queue.click(with_named_values(queue_add, names), [image, seeds, *components], [queue_table, queue_note],
                        api_name="queue_add", concurrency_limit=None)
        queue_timer.tick(queue_tick, queue_shown, [queue_table, queue_shown], api_name=False, queue=False,
                         show_progress="hidden")
        app.load(queue_view, outputs=queue_table, api_name="queue_view", queue=False, show_progress="hidden")
        move_up.click(lambda selected: queue_move(selected, -1), job_id, [queue_table, queue_note], api_name=False)
        move_down.click(lambda selected: queue_move(selected, 1), job_id, [queue_table, queue_note], api_name=False)
        gr.api(queue_move, api_name="queue_move")
        remove_job.click(queue_remove, job_id, [queue_table, queue_note], api_name="queue_remove")
        clear_done.click(queue_clear, outputs=[queue_table, queue_note], api_name="queue_clear")
        queue_table.select(queue_select, outputs=[job_id, video], api_name=False)
        # Empty the drop box afterwards (also after an error) so the next file can be dropped straight away;
        # the note names the file that was restored.
        reuse_file.upload(reuse_drop, reuse_file, [*components, image, reuse_note], api_name="reuse")
        reuse_file.upload(lambda: None, outputs=reuse_file, queue=False, api_name=False)
    return app

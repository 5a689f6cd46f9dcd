"""The studio page's first ten minutes, below the browser: labels and conflicts in the page's words with a
one-click fix, sliders that snap, starter presets that plan, the device badge, the lossless savers holding
only lossless controls, and the live view paced so watching a run costs it little (real demo runs)."""

from __future__ import annotations

import time

import gradio as gr
import pytest

from lowvram_studio.settings import RunSettings, SettingsError
from lowvram_studio.sysinfo import collect_env
from lowvram_studio.ui.app import build_app
from lowvram_studio.ui.runs_view import TabHistory
from lowvram_studio.ui.studio import CURVE_REFRESH_S, STATUS_REFRESH_S, Studio
from lowvram_studio.ui.badge import device_badge
from lowvram_studio.ui.budget import plan_budget
from lowvram_studio.ui.config_store import ConfigStore
from lowvram_studio.ui.form import FORM_NAMES, form_to_settings
from lowvram_studio.ui.labels import LABELS, in_user_words, suggest_fix
from lowvram_studio.ui.sliders import SLIDERS, off_step_problems, snap_note
from lowvram_studio.ui.starters import STARTERS, starter_form


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    studio = Studio("demo", tmp_path_factory.mktemp("outputs"), ConfigStore(tmp_path_factory.mktemp("config")))
    yield studio
    studio.close()


def test_every_control_has_its_own_label_and_the_two_temporal_chunks_say_what_they_cut():
    assert set(FORM_NAMES) <= set(LABELS)
    assert len(set(LABELS.values())) == len(LABELS)
    assert not [label for label in LABELS.values() if label.startswith("Temporal chunk")]
    assert "frames" in LABELS["window_frames"] and "positions" in LABELS["temporal_chunk"]


def test_a_conflict_reads_in_the_page_labels_and_its_fix_resolves_it(studio):
    form = {**studio.default_form(FORM_NAMES), "window_frames": 4, "overlap": 6}
    with pytest.raises(SettingsError) as raised:
        form_to_settings(form)
    message = in_user_words(str(raised.value))
    assert "“Window overlap (frames)” must be at least 0 and smaller than “Frame window (frames)” (4)" in message
    assert "window_frames" not in message and "overlap must" not in message
    fix = suggest_fix(form)
    assert fix.label == "Fix: set Window overlap (frames) to 3"
    form_to_settings({**form, **fix.changes})  # one click and it runs


@pytest.mark.parametrize("conflict", [{"window_frames": 4, "prune_threshold": 0.02, "num_frames": 14},
                                      {"min_guidance_scale": 5.0, "max_guidance_scale": 2.0}])
def test_each_conflict_with_an_obvious_remedy_gets_a_fix_that_resolves_it(studio, conflict):
    form = {**studio.default_form(FORM_NAMES), **conflict}
    with pytest.raises(SettingsError):
        form_to_settings(form)
    form_to_settings({**form, **suggest_fix(form).changes})
    assert suggest_fix(studio.default_form(FORM_NAMES)) is None  # nothing to fix, no button


def test_a_value_typed_between_steps_snaps_to_the_nearest_one_and_says_so():
    assert snap_note("width", 127) == (128, "Width moves in steps of 64 from 64: 127 became 128.")
    assert snap_note("temporal_chunk", 300)[0] == 256
    assert snap_note("noise_aug_strength", 0.015)[0] in (0.01, 0.02)
    assert snap_note("width", 128) is None and snap_note("noise_aug_strength", 0.02) is None
    assert snap_note("num_frames", 500) is None  # beyond the slider but on its steps: the API may ask for it
    assert off_step_problems({"ff_chunk": 1000, "width": 512}) == [
        "“Feed-forward chunk (tokens)” moves in steps of 256 from 0; 1000 is not one of them: use 1024"]
    assert all(spec.snap(spec.minimum) == spec.minimum for spec in SLIDERS.values())


@pytest.mark.parametrize("name", list(STARTERS))
def test_each_starter_preset_sets_a_budget_and_settings_whose_plan_fits(studio, name):
    form = starter_form(name, studio.default_form(FORM_NAMES))
    settings = form_to_settings(form)
    answer = plan_budget(form, None)
    if settings.vram_budget == "off":  # the CPU starter: no GPU budget, a run small enough for a CPU
        assert settings.device == "cpu" and settings.width * settings.height <= 128 * 128
        return
    assert "✔ Fits" in answer.note and 'data-phase="denoise"' in answer.chart
    form_to_settings({**form, **(answer.changes or {})})
    with pytest.raises(ValueError, match="pick one of: 4 GB laptop"):
        starter_form("RTX 9090", form)


def test_the_badge_names_the_gpu_and_its_vram_or_says_cpu():
    here = device_badge(collect_env())
    assert ("GPU: " in here) if collect_env()["gpu"] else ("CPU (no CUDA GPU)" in here)
    # What collect_env reports on a GTX 1060 (the hardware this machine lacks):
    gpu = device_badge({"gpu": "NVIDIA GeForce GTX 1060 6GB", "vram_total_mib": 6144.0})
    assert "GPU: NVIDIA GeForce GTX 1060 6GB · 6.0 GB VRAM" in gpu
    assert "CPU (CUDA GPU unusable" in device_badge({"gpu": "GTX 1060", "vram_total_mib": 6144.0}, "torch lacks sm_61")


def _descendants(block) -> list:
    children = getattr(block, "children", []) or []
    return [item for child in children for item in (child, *_descendants(child))]


def test_the_lossless_memory_savers_hold_only_controls_that_leave_the_output_unchanged(studio):
    app = build_app(studio)
    accordion = next(b for b in app.blocks.values() if isinstance(b, gr.Accordion) and b.label == "Lossless memory savers")
    inside = {b.elem_id.removeprefix("ctl-") for b in _descendants(accordion) if (b.elem_id or "").startswith("ctl-")}
    assert inside == {"cfg_split", "spatial_chunk", "temporal_chunk", "ff_chunk"}  # VAE tile (lossy) is outside
    on = {"cfg_split": True, "spatial_chunk": 2, "temporal_chunk": 256, "ff_chunk": 256}
    assert RunSettings(unet_dtype="fp32", vae_dtype="fp32", encoder_dtype="fp32", **on).lossy_settings() == []
    assert not [LABELS[name] for name in inside if "lossy" in LABELS[name]]


def test_watching_a_run_redraws_the_curve_a_few_times_and_the_status_once_a_second(studio, test_image):
    """The page's cost is per update, so the updates per run are what is measured (not wall time): the
    curve, a chart redraw, at most once per CURVE_REFRESH_S; status and bar at most once per STATUS_REFRESH_S."""
    settings = RunSettings(width=128, height=128, num_frames=8, num_inference_steps=120, preview_every=1)
    form = studio.default_form(FORM_NAMES)
    job = studio.submit_generate("pacing-test", test_image, settings, form)
    started = time.perf_counter()
    updates = list(studio.follow(job, TabHistory(), studio.finish_generate))
    seconds = time.perf_counter() - started
    live = updates[:-1]  # the last one is the finished run's
    curves = sum(1 for update in live if not _is_skip(update[2]))
    steps = settings.num_inference_steps
    assert seconds > 2 * CURVE_REFRESH_S, seconds  # long enough to pace
    assert curves <= seconds / CURVE_REFRESH_S + 1
    assert len(live) <= seconds / STATUS_REFRESH_S + 2
    assert len(live) < steps and curves < steps / 4  # far fewer redraws than steps (the old page: 2.5 a second)
    assert job.state.value == "done"


def _is_skip(update) -> bool:
    return isinstance(update, dict) and update.get("__type__") == "update" and len(update) == 1

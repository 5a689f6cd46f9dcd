"""The budget panel's planning on the demo model: what a budget starts from, re-planning, model dimensions."""

from __future__ import annotations

import json
import shutil

from lowvram_studio.plan.memory_model import SVD_XT_DIMS
from lowvram_studio.settings import RunSettings
from lowvram_studio.ui.budget import budget_request, model_dims, plan_budget
from lowvram_studio.ui.form import FORM_NAMES, form_to_settings, settings_to_form

SVD_SIZE = {"width": 1024, "height": 576, "num_frames": 25}


def _form(**changes) -> dict:
    return {**settings_to_form(RunSettings(), FORM_NAMES), "model": "demo", "gif": False, **changes}


def test_a_larger_budget_loosens_what_a_smaller_one_tightened():
    small = _form(**SVD_SIZE, vram_budget="Custom", budget_gib=2.25)  # the demo UNet needs CFG split only this low
    tightened = {**small, **plan_budget(small, None).changes}
    assert form_to_settings(tightened).cfg_split
    after_small = plan_budget({**tightened, "vram_budget": "24 GB"}, None)
    fresh = plan_budget({**small, "vram_budget": "24 GB"}, None)
    assert form_to_settings({**tightened, **after_small.changes}) == form_to_settings({**small, **fresh.changes})
    assert not form_to_settings({**tightened, **after_small.changes}).cfg_split


def test_changing_the_frames_with_a_budget_picked_plans_again():
    long = _form(**SVD_SIZE, vram_budget="4 GB")
    planned = {**long, **plan_budget(long, None).changes}
    assert planned["window_frames"] == 14  # the demo was trained on 14 frames: 25 run in windows
    replanned = plan_budget({**planned, "num_frames": 8}, None)
    assert replanned.changes["window_frames"] == 0 and "8 frames" in replanned.note


def test_a_budget_plans_for_the_delivered_clip_not_the_frames_left_to_interpolation():
    request = budget_request(RunSettings(num_frames=13, interpolate=2, cfg_split=True, offload="stream"))
    assert (request.num_frames, request.interpolate, request.cfg_split, request.offload.value) == (25, 1, False, "none")


def test_a_model_not_loaded_is_planned_from_its_config_without_loading_weights(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"num_frames": 14}), encoding="utf-8")
    dims, note = model_dims(str(tmp_path), None)
    assert dims.native_frames == 14 and dims.unet_params == SVD_XT_DIMS.unet_params and "not loaded yet" in note
    dims, note = model_dims(str(tmp_path / "missing.safetensors"), None)
    assert dims == SVD_XT_DIMS and "could not be inspected" in note
    dims, note = model_dims("demo", None)
    assert dims.native_frames == 14 and dims.unet_params < 10_000_000 and note == ""


def test_a_plan_that_stores_the_unet_in_fp8_shows_it_and_generate_arrives_at_it(tmp_path):
    from lowvram_studio.plan.planner import Planner, plan_for_settings
    from lowvram_studio.engine.sampler import resolve_device

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"num_frames": 25}), encoding="utf-8")
    form = _form(model=str(tmp_path), width=64, height=64, num_frames=4, unet_dtype="fp32", vram_budget="Custom",
                 budget_gib=2.25)  # SVD-XT in FP32 on a 2.25 GB card: streaming is not enough, the UNet goes fp8
    answer = plan_budget(form, None)
    assert answer.changes["unet_dtype"] == "fp8" and "cannot show" not in answer.note
    shown = form_to_settings({**form, **answer.changes})
    again = plan_for_settings(Planner(model_dims(str(tmp_path), None)[0], device_type=resolve_device("auto").type), shown)
    assert again.settings.unet_dtype.value == "fp8" and again.fits


def test_a_wan_folder_not_loaded_yet_is_planned_with_its_own_sizes_and_split_files_with_ti2v_5bs(tmp_path):
    from dataclasses import replace

    from lowvram_studio.engine.wan import WanFamily
    from lowvram_studio.models.wan_configs import ti2v_5b_dims
    from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

    pipeline = build_toy_wan_pipeline()
    pipeline.save_pretrained(tmp_path / "toy-wan")
    dims, note = model_dims(str(tmp_path / "toy-wan"), None)  # counted from its config files, no weights read
    assert dims == replace(WanFamily(pipeline, "toy-wan").dims(), encoder_dropped=True) and note == ""
    answer = plan_budget(_form(model=str(tmp_path / "toy-wan"), width=64, height=64, num_frames=9, vram_budget="6 GB",
                               prompt="a red ball", guidance_scale=4.0), None)
    assert "for toy-wan at 64x64" in answer.note and "Fits" in answer.note
    shutil.copytree(tmp_path / "toy-wan", tmp_path / "no-config")
    (tmp_path / "no-config" / "transformer" / "config.json").unlink()  # nothing to count from
    dims, note = model_dims(str(tmp_path / "no-config"), None)
    assert dims == ti2v_5b_dims() and "planned with Wan2.2 TI2V-5B's sizes" in note

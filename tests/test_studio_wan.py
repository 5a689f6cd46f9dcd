"""The studio on a Wan model, through gradio_client against the real app: picking the toy Wan folder shows the
prompt boxes and Wan's guidance and hides SVD's controls, snaps what Wan cannot take with a note, plans the VRAM
budget with Wan's memory model; Generate writes a Wan clip and its record; bad requests say what to do; Compare runs;
re-using the clip restores its prompts. Real runs on the toy Wan (64x64, 9 frames, 2 steps on the CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from lowvram_studio.media import read_video
from lowvram_studio.models.wan_toy import build_toy_wan_pipeline
from lowvram_studio.ui.serve import serve_studio
from lowvram_studio.ui.studio import ASSETS, Studio
from lowvram_studio.ui.config_store import ConfigStore
from lowvram_studio.ui.family_form import FAMILY_CONTROLS
from lowvram_studio.ui.form import FORM_NAMES

ASSET = ASSETS / "ball_and_box.png"
WAN_CLIP = {"width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 2, "device": "cpu",
            "prompt": "a red ball moves left", "negative_prompt": "still scene", "guidance_scale": 4.0,
            "encoder_dtype": True}


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "toy-wan2.2-ti2v"
    build_toy_wan_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    studio = Studio("demo", tmp_path_factory.mktemp("outputs"), ConfigStore(tmp_path_factory.mktemp("config")))
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def client(studio):
    app, url, _ = serve_studio(studio, server_name="127.0.0.1", quiet=True)
    yield Client(url, verbose=False)
    app.close()


@pytest.fixture(scope="module")
def wan_run(client, wan_folder) -> tuple[Path, dict]:
    """One Wan Generate through the page's API: the mp4 as the page shows it, and its run record."""
    status, _, _, video, stats, downloads, *_ = client.predict(
        image_path=handle_file(str(ASSET)), model=str(wan_folder), **WAN_CLIP, seed=3, api_name="/generate")
    assert status.startswith("✔ 9 frames at 64x64"), status
    assert sorted(Path(f).suffix for f in downloads) == [".gif", ".json", ".mp4", ".png"]
    assert stats["value"]["data"]  # a row in the runs table, as for SVD
    record = next(Path(f) for f in downloads if f.endswith(".json"))
    return Path(video["video"] if isinstance(video, dict) else video), json.loads(record.read_text())


def _picked(client: Client, **form) -> tuple[dict[str, dict], str, str]:
    """Pick a model through the page's API: (each family control's update, the family note, the budget note)."""
    *updates, note, budget_note, _chart = client.predict(**form, api_name="/pick_model")
    return dict(zip(FAMILY_CONTROLS, updates, strict=True)), note, budget_note


def test_a_cached_wan_hub_id_is_told_apart_from_svd_before_loading(wan_folder, tmp_path, monkeypatch):
    from lowvram_studio.models.source_family import native_fps, source_family

    snapshot = tmp_path / "hub" / "models--Wan-AI--Toy-TI2V-Diffusers" / "snapshots" / "abc123"
    shutil.copytree(wan_folder, snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert source_family("Wan-AI/Toy-TI2V-Diffusers") == "wan" and native_fps("Wan-AI/Toy-TI2V-Diffusers") == 24
    assert source_family("Wan-AI/Not-Cached") == "svd"  # loading it says it is not in the cache


def test_picking_a_wan_model_shows_its_prompt_controls_hides_svds_and_snaps_what_wan_cannot_take(
        client, studio, wan_folder):
    svd_form = {**studio.default_form(FORM_NAMES), "num_frames": 14, "prune_threshold": 0.02, "spatial_chunk": 2,
                "vram_budget": "6 GB"}
    updates, note, budget_note = _picked(client, **{**svd_form, "model": str(wan_folder)})
    assert all(updates[name]["visible"] for name in ("prompt", "negative_prompt", "guidance_scale"))
    assert not any(updates[name]["visible"] for name in ("motion_bucket_id", "noise_aug_strength",
                                                          "min_guidance_scale", "max_guidance_scale", "temporal_chunk",
                                                          "spatial_chunk"))
    frames = updates["num_frames"]
    assert (frames["value"], frames["step"], frames["minimum"]) == (13, 4, 5)  # 14 is no 4k+1 clip
    assert updates["spatial_chunk"]["value"] == 0 and "value" not in updates["prune_threshold"]  # Wan reuses steps too
    assert updates["prune_threshold"].get("visible", True) and updates["prune_threshold"]["maximum"] == 0.3
    assert "14 became 13" in note and "“Spatial-layer chunk" in note and "set to off" in note
    assert "vram_budget" not in updates  # Wan has its own memory model: the budget stays and is planned for Wan
    assert "**VRAM budget 6GB**" in budget_note and "VRAM budget" not in note
    assert updates["encoder_dtype"]["label"].startswith("Text encoder 16-bit") and updates["encoder_dtype"]["value"]
    assert "UMT5-XXL in FP32 takes 22.7 GB of RAM" in note
    assert updates["fps"]["value"] == 24 and "the frame rate this Wan model was made for" in note  # TI2V's, not SVD's 7

    updates, note, budget_note = _picked(client, **{**svd_form, "num_frames": 13, "vram_budget": "Manual"})
    assert not any(updates[name]["visible"] for name in ("prompt", "negative_prompt", "guidance_scale"))
    assert all(updates[name]["visible"] for name in ("motion_bucket_id", "min_guidance_scale"))
    assert updates["num_frames"]["step"] == 1 and "value" not in updates["num_frames"]  # SVD takes 13 as it is
    assert note == "" and budget_note.startswith("Manual")

    wan_sizes, _, _ = _picked(client, **{**svd_form, "model": str(wan_folder)})
    assert (wan_sizes["height"]["step"], wan_sizes["width"]["maximum"]) == (32, 1280)  # 480x832, 1280x704 reachable
    updates, note, _ = _picked(client, **{**svd_form, "height": 480, "num_frames": 13, "vram_budget": "Manual"})
    assert updates["height"]["value"] in (448, 512) and updates["height"]["step"] == 64 and "480 became" in note


def test_generate_on_a_wan_model_writes_its_clip_and_the_record_holds_the_prompts(wan_run):
    video, record = wan_run
    frames, fps = read_video(video)
    assert frames.shape == (9, 64, 64, 3) and fps == 7  # the form's frame rate
    assert record["model"]["family"] == "wan"
    assert (record["settings"]["prompt"], record["settings"]["negative_prompt"], record["settings"]["guidance_scale"]) \
        == ("a red ball moves left", "still scene", 4.0)
    # the text encoder's checkbox is the engine's auto: bf16 on the CPU, never UMT5 in fp16 (nor 22.7 GB of fp32)
    assert record["settings"]["encoder_dtype"] == "auto" and record["info"]["precision"]["text_encoder"] == "bf16"


def test_reusing_a_wan_clip_restores_its_model_and_prompt_fields(client, wan_run, wan_folder):
    *values, image, note = client.predict(handle_file(str(wan_run[0])), api_name="/reuse")
    form = dict(zip(FORM_NAMES, values, strict=True))
    assert (form["model"], form["seed"], form["num_frames"], form["encoder_dtype"]) == (str(wan_folder), 3, 9, True)
    assert (form["prompt"], form["negative_prompt"], form["guidance_scale"]) == (
        "a red ball moves left", "still scene", 4.0)
    assert image and note.startswith("✔ Restored from")


def test_what_a_wan_model_cannot_take_is_refused_before_it_runs_with_the_fix(client, wan_folder):
    request = {"image_path": handle_file(str(ASSET)), "model": str(wan_folder), **WAN_CLIP}
    with pytest.raises(AppError, match="“Frames” moves in steps of 4 from 5; 10 is not one of them: use 9"):
        client.predict(**{**request, "num_frames": 10}, api_name="/generate")
    with pytest.raises(AppError, match="cuts SVD's UNet layers, which Wan's transformer does not have"):
        client.predict(**request, temporal_chunk=256, api_name="/generate")  # an API call the page never makes


def test_compare_runs_on_a_wan_model_as_on_svd(client, wan_folder):
    status, *_ = client.predict(image_path=handle_file(str(ASSET)), model=str(wan_folder), **WAN_CLIP,
                                api_name="/compare")
    assert status.startswith("✔ Compare finished")


def test_a_budget_picked_for_a_wan_model_is_planned_with_wans_memory_model(client, studio, wan_folder):
    *values, note, chart = client.predict(**{**studio.default_form(FORM_NAMES), "model": str(wan_folder),
                                             "vram_budget": "4 GB", **WAN_CLIP}, api_name="/plan_budget")
    assert "**VRAM budget 4GB**" in note and 'data-phase="denoise"' in chart and "fits" in note.lower()
    assert "spatial layers" not in note and "decode 8 frame" not in note  # SVD's moves: not Wan's


def test_a_studio_started_on_a_wan_model_opens_with_a_form_wan_can_run(wan_folder, tmp_path):
    studio = Studio(str(wan_folder), tmp_path / "outputs", ConfigStore(tmp_path / "config"), queue_dir=tmp_path / "q")
    try:
        form = studio.default_form(FORM_NAMES)
        assert (form["num_frames"] - 1) % 4 == 0 and form["vram_budget"] == "Manual"
        assert studio.model(str(wan_folder)).family.kind == "wan"  # picked, it loads (no refusal any more)
    finally:
        studio.close()

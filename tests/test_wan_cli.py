"""A Wan model folder end to end through the CLI: found and loaded offline, prompt in, mp4 + record out;
bad Wan folders and requests end in one ``error:`` line (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lowvram_studio.cli import EXIT_BAD_INPUT, main
from lowvram_studio.media import read_video
from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "ball_and_box.png"
CLIP = ["--frames", "9", "--width", "64", "--height", "64", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "toy-wan2.2-ti2v"
    build_toy_wan_pipeline().save_pretrained(folder)
    return folder


def test_a_wan_folder_makes_a_clip_from_an_image_and_a_prompt(wan_folder, tmp_path, capsys):
    out = tmp_path / "wan.mp4"
    code = main(["generate", "--image", str(ASSET), "--out", str(out), "--model", str(wan_folder),
                 "--prompt", "a red ball moves left", "--negative-prompt", "still scene", *CLIP])
    assert code == 0, capsys.readouterr().err
    frames, fps = read_video(out)
    assert frames.shape == (9, 64, 64, 3) and fps == 24  # TI2V's frame rate unless --fps says otherwise
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["settings"]["prompt"] == "a red ball moves left"
    assert record["settings"]["encoder_dtype"] == "auto" and record["info"]["precision"]["text_encoder"] == "bf16"
    assert record["model"]["family"] == "wan" and set(record["model"]["parameters"]) == {
        "transformer", "vae", "text_encoder"}


def test_a_second_run_with_the_same_prompts_skips_the_text_encoder(wan_folder, tmp_path, capsys):
    texts = ["--prompt", "a green disc spins", "--negative-prompt", "the background is blue"]  # new to the cache
    outputs = [tmp_path / "first.mp4", tmp_path / "second.mp4", tmp_path / "new-prompt.mp4"]
    for out, prompt in zip(outputs, ("a green disc spins", "a green disc spins", "a blue box grows")):
        code = main(["generate", "--image", str(ASSET), "--out", str(out), "--model", str(wan_folder), *CLIP,
                     *texts[:1], prompt, *texts[2:]])
        assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.splitlines()
    sources = [json.loads(out.with_suffix(".json").read_text())["info"]["prompt_embeddings"] for out in outputs]
    assert sources[0] == {"prompt": "encoder", "negative_prompt": "encoder"} and "cache" not in printed[0]
    assert sources[1] == {"prompt": "cache", "negative_prompt": "cache"}
    assert printed[1].endswith("; prompt embeddings from the cache (the text encoder did not run)")
    assert sources[2] == {"prompt": "encoder", "negative_prompt": "cache"}
    assert printed[2].endswith("; negative prompt embedding from the cache")
    assert np.array_equal(read_video(outputs[0])[0], read_video(outputs[1])[0])
    records = [json.loads(out.with_suffix(".json").read_text()) for out in outputs]
    assert [r["info"]["text_encoder"].split(":")[0] for r in records] == [
        "read from disk for this run, released after encoding", "not read", "read from disk for this run, released "
        "after encoding"]
    toy_encoder = build_toy_wan_pipeline().text_encoder
    assert records[1]["model"]["parameters"]["text_encoder"] == sum(p.numel() for p in toy_encoder.parameters())
    assert records[1]["model"]["dtypes"]["text_encoder"].startswith("on disk until")


def test_a_damaged_cache_entry_with_the_encoder_on_disk_reads_the_encoder_and_makes_the_same_clip(wan_folder, tmp_path,
                                                                                                 capsys):
    args = ["generate", "--image", str(ASSET), "--model", str(wan_folder), *CLIP, "--prompt", "a blue disc grows",
            "--negative-prompt", "the scene is still"]
    assert main([*args, "--out", str(tmp_path / "a.mp4")]) == 0
    sources = json.loads((tmp_path / "a.json").read_text())["info"]["prompt_embeddings"]
    assert sources == {"prompt": "encoder", "negative_prompt": "encoder"}
    from lowvram_studio.settings_adapter import PROMPT_CACHE_FOLDER
    from lowvram_studio.userdirs import cache_dir

    newest = max((cache_dir() / PROMPT_CACHE_FOLDER).glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"damaged")
    assert main([*args, "--out", str(tmp_path / "b.mp4")]) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "b.json").read_text())
    assert sorted(record["info"]["prompt_embeddings"].values()) == ["cache", "encoder"]
    assert record["info"]["text_encoder"].startswith("read from disk")
    assert np.array_equal(read_video(tmp_path / "a.mp4")[0], read_video(tmp_path / "b.mp4")[0])


def test_a_wan_folder_saved_as_an_fp16_variant_reads_its_variant_text_encoder(tmp_path, capsys):
    folder = tmp_path / "toy-wan-fp16-variant"
    build_toy_wan_pipeline().save_pretrained(folder, variant="fp16")  # text_encoder/model.fp16.safetensors only
    out = tmp_path / "variant.mp4"
    code = main(["generate", "--image", str(ASSET), "--out", str(out), "--model", str(folder), *CLIP,
                 "--prompt", "a yellow disc shrinks"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["info"]["text_encoder"].startswith("read from disk for this run")
    assert read_video(out)[0].shape == (9, 64, 64, 3)


def test_a_damaged_text_encoder_is_bad_input_with_what_to_do(wan_folder, tmp_path, capsys):
    damaged = tmp_path / "damaged-encoder"
    shutil.copytree(wan_folder, damaged)
    weights = damaged / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # cut short: other files, so another identity and a miss
    code = main(["generate", "--image", str(ASSET), "--out", str(tmp_path / "c.mp4"), "--model", str(damaged), *CLIP,
                 "--prompt", "a red ball moves left"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "error: " in err and "download it again" in err
    assert not (tmp_path / "c.mp4").exists()


def test_a_wan_clip_length_that_is_not_4k_plus_1_is_bad_input(wan_folder, tmp_path, capsys):
    code = main(["generate", "--image", str(ASSET), "--out", str(tmp_path / "x.mp4"), "--model", str(wan_folder),
                 *CLIP, "--frames", "10"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "error: Wan makes 4k+1 frames" in err and "use 9 or 13" in err


def test_svds_layer_chunks_on_a_wan_model_are_bad_input_that_names_the_one_that_works(wan_folder, tmp_path, capsys):
    code = main(["generate", "--image", str(ASSET), "--out", str(tmp_path / "x.mp4"), "--model", str(wan_folder),
                 *CLIP, "--temporal-chunk", "16"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "error: temporal_chunk cuts SVD's UNet layers" in err and "ff_chunk" in err
    assert not (tmp_path / "x.mp4").exists()


def test_a_wan_model_takes_its_own_size_multiple_not_svds(wan_folder, tmp_path, capsys):
    out = tmp_path / "wan.mp4"  # 96 px: a multiple of 32 (Wan2.2 TI2V's 16 px latent cells x 2 x 2 patches), not of 64
    code = main(["generate", "--image", str(ASSET), "--out", str(out), "--model", str(wan_folder), *CLIP,
                 "--height", "96"])
    assert code == 0, capsys.readouterr().err
    assert read_video(out)[0].shape == (9, 96, 64, 3)
    code = main(["generate", "--image", str(ASSET), "--out", str(tmp_path / "x.mp4"), "--model", str(wan_folder),
                 *CLIP, "--width", "80"])
    assert code == EXIT_BAD_INPUT and "width must be a multiple of 32 for this wan model; got 80; use 64 or 96" in (
        capsys.readouterr().err)


def test_compare_on_a_wan_model_runs_fp32_fp16_and_the_chosen_settings_with_the_prompt(wan_folder, tmp_path, capsys):
    code = main(["compare", "--image", str(ASSET), "--out", str(tmp_path / "cmp"), "--model", str(wan_folder),
                 *CLIP, "--prompt", "a red ball moves left", "--cfg-split"])
    assert code == 0, capsys.readouterr().err
    runs = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]
    assert [run["settings"]["unet_dtype"] for run in runs] == ["fp32", "fp16", "fp16"]
    assert all(run["settings"]["prompt"] == "a red ball moves left" for run in runs)
    assert [run["settings"]["cfg_split"] for run in runs] == [False, False, True]  # (c): the chosen settings
    assert runs[0]["info"]["precision"]["transformer"] == "fp32" and runs[1]["info"]["precision"]["transformer"] == "fp16"
    assert runs[1]["results"]["psnr_db"] > 20 and (tmp_path / "cmp" / "side_by_side.mp4").exists()


def test_step_reuse_on_a_wan_model_records_the_steps_it_reused(wan_folder, tmp_path, capsys):
    out = tmp_path / "reuse.mp4"
    code = main(["generate", "--image", str(ASSET), "--out", str(out), "--model", str(wan_folder), *CLIP,
                 "--steps", "4", "--prune-threshold", "0.5"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["info"]["pruning"]["step_decision"].startswith("diffusers FirstBlockCache")
    assert record["info"]["pruning"]["reused_steps"] >= 1
    assert read_video(out)[0].shape == (9, 64, 64, 3)


def test_frame_reuse_and_svds_reuse_knobs_on_a_wan_model_are_bad_input(wan_folder, tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"prune_threshold": 0.1, "prune_mode": "frames", "extra": {"prune_max_reuse": 2}}))
    code = main(["generate", "--image", str(ASSET), "--out", str(tmp_path / "x.mp4"), "--model", str(wan_folder),
                 *CLIP, "--settings", str(settings)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "set prune_mode to steps" in err and "extra prune_max_reuse" in err
    assert not (tmp_path / "x.mp4").exists()


def test_a_budget_for_wan_is_planned_with_wans_memory_model_and_recorded(wan_folder, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code = main(["generate", "--image", str(ASSET), "--out", str(out), "--model", str(wan_folder), *CLIP,
                 "--vram-budget", "6GB"])
    assert code == 0, capsys.readouterr().err
    plan = json.loads(out.with_suffix(".json").read_text())["info"]["plan"]
    assert plan["budget"] == "6GB" and plan["fits"] and set(plan["predicted_phases_mib"]) == {
        "encode image", "denoise", "decode"}
    assert read_video(out)[0].shape[0] == 9


def test_a_wan_folder_without_its_tokenizer_says_what_to_put_where(wan_folder, tmp_path, capsys):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(wan_folder, broken)
    shutil.rmtree(broken / "tokenizer")
    code = main(["generate", "--image", str(ASSET), "--out", str(tmp_path / "x.mp4"), "--model", str(broken), *CLIP])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "has no tokenizer" in err and str(broken / "tokenizer") in err


def test_wan_folders_are_found_in_a_models_folder_and_the_hf_cache(wan_folder, tmp_path):
    from lowvram_studio.models.discovery import DiscoveryConfig, discover_models

    snapshot = tmp_path / "hub" / "models--Wan-AI--Wan2.2-TI2V-5B-Diffusers" / "snapshots" / "abc"
    shutil.copytree(wan_folder, snapshot)
    found = discover_models(DiscoveryConfig(hf_cache=tmp_path / "hub", models_dirs=[wan_folder.parent]))
    assert {c.name for c in found} >= {"toy-wan2.2-ti2v", "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}

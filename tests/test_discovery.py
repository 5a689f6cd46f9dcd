"""Model discovery over a real on-disk layout: ComfyUI folders, the HF cache, extra folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowvram_studio.models import single_file as sf
from lowvram_studio.models.discovery import (
    CandidateKind,
    DiscoveryConfig,
    ModelCandidate,
    discover_models,
    format_candidates,
    hf_cache_dir,
)

SVD_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 8, 3, 3),
    "model.diffusion_model.input_blocks.1.0.time_stack.in_layers.0.weight": torch.zeros(4),
}
SD15_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
}


def _safetensors(path: Path, tensors: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _diffusers_folder(folder: Path, class_name: str) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
    return folder


def _hf_cache_repo(cache: Path, repo: str, class_name: str) -> Path:
    """The hub cache layout: blobs, a snapshot of symlinks, refs/main naming the snapshot."""
    repo_folder = cache / f"models--{repo.replace('/', '--')}"
    blob = repo_folder / "blobs" / "abc123"
    blob.parent.mkdir(parents=True)
    blob.write_text(json.dumps({"_class_name": class_name}))
    weights = repo_folder / "blobs" / "def456"
    weights.write_bytes(b"\0" * 5000)
    snapshot = repo_folder / "snapshots" / "0123abcd"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "model_index.json").symlink_to(blob)
    (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").symlink_to(weights)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text("0123abcd")
    return snapshot


@pytest.fixture()
def comfyui(tmp_path) -> Path:
    root = tmp_path / "ComfyUI"
    checkpoints = root / "models" / "checkpoints"
    _safetensors(checkpoints / "svd_xt.safetensors", SVD_KEYS)
    _safetensors(checkpoints / "video" / "svd.safetensors", SVD_KEYS)
    _safetensors(checkpoints / "v1-5-pruned.safetensors", SD15_KEYS)
    (checkpoints / "broken.safetensors").write_bytes(b"not safetensors at all")
    (checkpoints / "svd_old.ckpt").write_bytes(b"\x80\x02pickle")
    diffusers = root / "models" / "diffusers"
    _diffusers_folder(diffusers / "stable-video-diffusion-img2vid-xt", "StableVideoDiffusionPipeline")
    _diffusers_folder(diffusers / "sdxl-base", "StableDiffusionXLPipeline")
    return root


def test_comfyui_folders_list_only_svd_models(comfyui):
    found = discover_models(DiscoveryConfig(comfyui_root=comfyui))

    assert [(c.name, c.kind, c.source) for c in found] == [
        ("stable-video-diffusion-img2vid-xt", CandidateKind.DIFFUSERS_FOLDER, "comfyui"),
        ("svd", CandidateKind.SINGLE_FILE, "comfyui"),
        ("svd_xt", CandidateKind.SINGLE_FILE, "comfyui"),
    ]
    svd_xt = found[2]
    assert svd_xt.path == comfyui / "models" / "checkpoints" / "svd_xt.safetensors"
    assert json.loads(json.dumps(svd_xt.to_dict()))["kind"] == "single-file"
    assert svd_xt.size_bytes == svd_xt.path.stat().st_size
    assert found[0].size_bytes > 1000


def test_hf_cache_snapshot_is_found_with_its_repo_id(tmp_path):
    cache = tmp_path / "hub"
    snapshot = _hf_cache_repo(cache, "stabilityai/stable-video-diffusion-img2vid-xt", "StableVideoDiffusionPipeline")
    _hf_cache_repo(cache, "someone/stable-video-diffusion-lookalike", "StableDiffusionPipeline")
    _hf_cache_repo(cache, "runwayml/stable-diffusion-v1-5", "StableDiffusionPipeline")

    found = discover_models(DiscoveryConfig(hf_cache=cache))

    assert found == [
        ModelCandidate(
            "stabilityai/stable-video-diffusion-img2vid-xt", snapshot, CandidateKind.DIFFUSERS_FOLDER, 5000 + len(
                json.dumps({"_class_name": "StableVideoDiffusionPipeline"})
            ), "hf-cache"
        )
    ]


def test_environment_sets_comfyui_root_and_hf_cache(tmp_path, comfyui):
    config = DiscoveryConfig.from_env(environ={"COMFYUI_ROOT": str(comfyui), "HF_HOME": str(tmp_path / "hf")})
    assert config.comfyui_root == comfyui
    assert config.hf_cache == tmp_path / "hf" / "hub"

    assert hf_cache_dir({"HF_HUB_CACHE": "/x/hub", "HF_HOME": "/y"}) == Path("/x/hub")
    explicit = DiscoveryConfig.from_env(comfyui_root=tmp_path, environ={"COMFYUI_ROOT": "/elsewhere"})
    assert explicit.comfyui_root == tmp_path


def test_models_dirs_accept_folders_and_files_and_list_each_model_once(tmp_path, comfyui):
    extra = _safetensors(tmp_path / "downloads" / "svd_xt_1_1.safetensors", SVD_KEYS)
    diffusers_folder = comfyui / "models" / "diffusers" / "stable-video-diffusion-img2vid-xt"

    dirs = [extra, diffusers_folder, comfyui / "models", tmp_path / "missing"]
    found = discover_models(DiscoveryConfig(comfyui_root=comfyui, models_dirs=dirs))

    names = [c.name for c in found]
    assert names == ["stable-video-diffusion-img2vid-xt", "svd", "svd_xt", "svd_xt_1_1"]
    assert found[-1].source == "models-dir"


def test_discovered_single_file_loads(tmp_path, demo_pipeline):
    sf.save_original_checkpoint(demo_pipeline, tmp_path / "checkpoints" / "svd_xt.safetensors")

    (candidate,) = discover_models(DiscoveryConfig(models_dirs=[tmp_path]))
    pipeline = sf.load_single_file(candidate.path)

    assert torch.equal(pipeline.unet.conv_in.weight, demo_pipeline.unet.conv_in.weight)


def test_format_lists_candidates_and_explains_an_empty_result(comfyui, tmp_path):
    config = DiscoveryConfig(comfyui_root=comfyui)
    table = format_candidates(discover_models(config), config)

    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "FROM", "PATH"]
    assert "svd_xt" in lines[3] and "single-file" in lines[3] and "GiB" in lines[3]

    empty = DiscoveryConfig(models_dirs=[tmp_path / "nothing"])
    message = format_candidates([], empty)
    assert "No SVD models found" in message and str(tmp_path / "nothing") in message and "--models-dir" in message


def test_a_folder_with_only_pickle_weights_is_not_listed_and_a_warning_says_why(tmp_path, caplog):
    pickled = _diffusers_folder(tmp_path / "models" / "svd-pickled", "StableVideoDiffusionPipeline")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    fine = _diffusers_folder(tmp_path / "models" / "svd-fine", "StableVideoDiffusionPipeline")
    with caplog.at_level("WARNING"):
        found = discover_models(DiscoveryConfig(models_dirs=[tmp_path / "models"]))
    assert [c.path for c in found] == [fine]
    assert "svd-pickled" in caplog.text and "pickle weights only (unet/diffusion_pytorch_model.bin)" in caplog.text

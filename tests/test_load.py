"""Real-model loading from diffusers folders: round trip of a tiny folder, clear errors otherwise."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lowvram_studio.settings_adapter import generate
from lowvram_studio.models.load import ModelError, load_model, native_size


@pytest.fixture(scope="module")
def svd_folder(tmp_path_factory, demo_pipeline):
    folder = tmp_path_factory.mktemp("models") / "tiny-svd"
    demo_pipeline.save_pretrained(folder)
    return folder


def test_diffusers_folder_loads_identical_weights_and_frames(svd_folder, demo_pipeline, test_image, small_settings):
    loaded = load_model(svd_folder)
    assert loaded.kind == "diffusers-folder" and loaded.name == "tiny-svd"
    for component in ("unet", "vae", "image_encoder"):
        saved = getattr(demo_pipeline, component).state_dict()
        for key, tensor in getattr(loaded.pipeline, component).state_dict().items():
            assert torch.equal(tensor, saved[key]), f"{component}.{key}"
    ours = generate(loaded.pipeline, test_image, small_settings).frames
    reference = generate(demo_pipeline, test_image, small_settings).frames
    # Same weights; oneDNN picks other conv algorithms for freshly loaded tensors (1e-4 per UNet call),
    # which the random-weight model amplifies over the steps: float rounding, not a different model.
    assert np.abs(ours - reference).mean() < 1e-3
    assert native_size(loaded.pipeline) == (128, 128, 14)


def test_a_folder_saved_as_an_fp16_variant_loads_the_same_weights(tmp_path, demo_pipeline):
    folder = tmp_path / "svd-fp16-variant"  # every component as diffusion_pytorch_model.fp16.safetensors only
    demo_pipeline.save_pretrained(folder, variant="fp16")
    loaded = load_model(folder)
    for component in ("unet", "vae", "image_encoder"):
        saved, read = getattr(demo_pipeline, component).state_dict(), getattr(loaded.pipeline, component).state_dict()
        assert all(torch.equal(tensor, saved[key]) for key, tensor in read.items()), component


def test_missing_path_names_it():
    with pytest.raises(ModelError, match="'/nowhere/svd' was not found"):
        load_model("/nowhere/svd")


def test_folder_without_model_index_is_explained(tmp_path):
    with pytest.raises(ModelError, match="has no model_index.json"):
        load_model(tmp_path)


def test_non_svd_model_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelError, match="holds a StableDiffusionPipeline model, not Stable Video Diffusion"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("content", "kind"),
    [(b'["StableVideoDiffusionPipeline"]', "a JSON list"), (b'"StableVideoDiffusionPipeline"', "a JSON string"),
     (b"null", "JSON null"), (b"\xff\xfe not utf-8", None)],
)
def test_a_model_index_that_is_not_an_object_is_explained(tmp_path, content, kind):
    (tmp_path / "model_index.json").write_bytes(content)
    expected = (f"model_index.json holds {kind}, not the object of components a diffusers model index is"
                if kind else "model_index.json cannot be read")
    with pytest.raises(ModelError, match=expected + ".*re-download or repair the model folder"):
        load_model(tmp_path)


def test_incomplete_folder_lists_what_is_missing(tmp_path, svd_folder):
    broken = tmp_path / "broken"
    shutil.copytree(svd_folder, broken)
    shutil.rmtree(broken / "vae")
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match=r"incomplete: missing unet/ weights \(\*.safetensors\), vae/config.json"):
        load_model(broken)


def test_uncached_hub_id_is_not_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        load_model("stabilityai/stable-video-diffusion-img2vid-xt")


def test_a_folder_with_pickle_weights_is_refused_with_what_to_do(tmp_path, demo_pipeline):
    pickled = tmp_path / "pickled-svd"
    demo_pipeline.save_pretrained(pickled, safe_serialization=False)  # .bin files: torch.load, i.e. pickle
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ModelError, match=r"pickle weights only \(unet/diffusion_pytorch_model.bin, vae/.*\).*"
                                         r"refuses.*convert it to safetensors"):
        load_model(pickled)


@pytest.mark.parametrize(("component", "safetensors", "pickle"), [
    ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    ("image_encoder", "model.safetensors", "pytorch_model.bin"),
])
def test_pickle_weights_beside_an_unrelated_safetensors_file_are_not_loaded(tmp_path, svd_folder, component,
                                                                            safetensors, pickle):
    """diffusers / transformers themselves must be told safetensors only: they would fall back to the .bin."""
    folder = tmp_path / "decoy"
    shutil.copytree(svd_folder, folder)
    weights = folder / component / safetensors
    torch.save(load_file(weights), folder / component / pickle)
    weights.unlink()
    save_file({"x": torch.zeros(1)}, str(folder / component / "notes.safetensors"))
    with pytest.raises(ModelError, match="could not be loaded"):
        load_model(folder)

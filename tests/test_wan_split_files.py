"""Wan2.2 TI2V-5B from ComfyUI's split files (models/wan_split_files.py, models/wan_split_set.py): the toy Wan's
weights written as ComfyUI keeps them — transformer and VAE under Wan's original key names, the UMT5 text encoder
under transformers' names in fp16 and as ComfyUI's scaled fp8 — make the same clip as the diffusers folder of the
same weights, leave the text encoder unread while the prompt cache serves, are listed as one model, and every bad
or missing file is one ``error:`` line (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from lowvram_studio.cli import EXIT_BAD_INPUT, main
from lowvram_studio.media import read_video
from lowvram_studio.models.discovery import CandidateKind, DiscoveryConfig, discover_models, format_candidates
from lowvram_studio.models.load import load_model
from lowvram_studio.models.safetensors_file import METADATA_KEY
from lowvram_studio.models.wan_configs import TI2V_5B_SCHEDULER
from lowvram_studio.models.wan_split_files import SplitTextEncoder, find_tokenizer, wan22_vae_source
from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "ball_and_box.png"
CLIP = ["--frames", "9", "--width", "64", "--height", "64", "--steps", "2", "--device", "cpu"]
TRANSFORMER_FILE = "wan2.2_ti2v_5B_fp16.safetensors"
FP16_ENCODER, FP8_ENCODER = "umt5_xxl_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
FP8_MAX = 448.0  # float8_e4m3fn's largest value

# diffusers -> original Wan names: diffusers' converter (convert_wan_transformer_to_diffusers) read backwards
TO_ORIGINAL = (("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
               ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
               ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
               ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
               ("condition_embedder.time_proj", "time_projection.1"), ("attn1.", "self_attn."),
               ("attn2.", "cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."),
               (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"),
               (".norm2.", ".norm3."))  # the original calls the cross-attention norm norm3


def toy_ti2v():
    """The toy Wan with the scheduler of Wan2.2 TI2V-5B's folder, which the split files get."""
    pipeline = build_toy_wan_pipeline()
    pipeline.scheduler = UniPCMultistepScheduler(**TI2V_5B_SCHEDULER)
    return pipeline


def original_transformer_state(transformer) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in transformer.state_dict().items():
        key = "head.modulation" if name == "scale_shift_table" else name.replace("scale_shift_table", "modulation")
        for ours, theirs in TO_ORIGINAL:
            key = key.replace(ours, theirs)
        state[key] = tensor
    assert convert_wan_transformer_to_diffusers({k: k for k in state}) == {
        name: key for name, key in zip(transformer.state_dict(), state)}  # diffusers reads them back by name
    return state


def comfy_text_encoder_state(encoder, fp8: bool) -> dict[str, torch.Tensor]:
    """transformers' names without the tied copy; fp8: each linear weight as float8_e4m3fn with its float32
    ``scale_weight`` (absmax / 448) and the ``scaled_fp8`` marker, as ComfyUI's scaled files hold them."""
    state = {k: v.to(torch.float16) for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if not fp8:
        return state
    for key in [k for k in state if k.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight",
                                                  "wi_1.weight", "wo.weight"))]:
        weight = encoder.state_dict()[key].float()
        scale = weight.abs().max() / FP8_MAX
        state[key] = (weight / scale).to(torch.float8_e4m3fn)
        state[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
    state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return state


def write_comfy_models(pipeline, models: Path, encoder_file: str = FP16_ENCODER) -> Path:
    """ComfyUI's models/ folder with the pipeline's three files; the hyperparameters no shape tells (the toy's
    head count, rope length and latent statistics) in the metadata, as safetensors_file.METADATA_KEY records them."""
    recorded = {"transformer": {k: pipeline.transformer.config[k] for k in (
        "num_attention_heads", "attention_head_dim", "rope_max_seq_len")},
        "vae": {k: list(pipeline.vae.config[k]) for k in ("latents_mean", "latents_std")}}
    metadata = {METADATA_KEY: json.dumps(recorded)}
    vae_state = pipeline.vae.state_dict()
    files = {
        models / "diffusion_models" / TRANSFORMER_FILE: original_transformer_state(pipeline.transformer),
        models / "vae" / "wan2.2_vae.safetensors": {
            wan22_vae_source(name, pipeline.vae.config): tensor for name, tensor in vae_state.items()},
        models / "text_encoders" / encoder_file: comfy_text_encoder_state(pipeline.text_encoder,
                                                                          encoder_file == FP8_ENCODER),
    }
    for path, state in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return models / "diffusion_models" / TRANSFORMER_FILE


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache holding only google/umt5-xxl's tokenizer (here the toy's), as the hub lays it out."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / "models--google--umt5-xxl"
    build_toy_wan_pipeline().tokenizer.save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return cache


@pytest.fixture(autouse=True)
def tokenizer_in_cache(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))


@pytest.fixture(scope="module")
def comfy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ComfyUI")
    write_comfy_models(toy_ti2v(), root / "models")
    return root


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    """The same weights as a diffusers folder, its text encoder in fp16 as ComfyUI's file holds it."""
    pipeline = toy_ti2v()
    pipeline.text_encoder.to(torch.float16)
    folder = tmp_path_factory.mktemp("diffusers") / "toy-wan2.2-ti2v"
    pipeline.save_pretrained(folder)
    return folder


def generate(model: Path, out: Path, prompt: str, capsys) -> dict:
    code = main(["generate", "--image", str(ASSET), "--out", str(out), "--model", str(model), *CLIP,
                 "--prompt", prompt, "--negative-prompt", "still scene"])
    assert code == 0, capsys.readouterr().err
    return json.loads(out.with_suffix(".json").read_text())


def test_split_files_make_the_clip_of_the_diffusers_folder_and_reuse_the_prompt_cache(comfy_root, wan_folder,
                                                                                       tmp_path, capsys):
    transformer = comfy_root / "models" / "diffusion_models" / TRANSFORMER_FILE
    prompt = "a red ball moves left slowly"
    ours = generate(transformer, tmp_path / "split.mp4", prompt, capsys)
    generate(wan_folder, tmp_path / "folder.mp4", prompt, capsys)
    assert np.array_equal(read_video(tmp_path / "split.mp4")[0], read_video(tmp_path / "folder.mp4")[0])
    assert ours["model"]["kind"] == "comfyui-split-files" and ours["model"]["family"] == "wan"
    assert ours["info"]["text_encoder"].startswith("read from disk for this run")
    assert ours["model"]["dtypes"]["text_encoder"].startswith("on disk until")
    assert ours["model"]["parameters"]["text_encoder"] == sum(p.numel() for p in toy_ti2v().text_encoder.parameters())

    again = generate(comfy_root, tmp_path / "again.mp4", prompt, capsys)  # the ComfyUI root names the same model
    assert again["info"]["prompt_embeddings"] == {"prompt": "cache", "negative_prompt": "cache"}
    assert again["info"]["text_encoder"].startswith("not read")
    assert np.array_equal(read_video(tmp_path / "again.mp4")[0], read_video(tmp_path / "split.mp4")[0])


def test_scaled_fp8_text_encoder_is_dequantized_as_comfyui_does_and_makes_a_close_clip(tmp_path, comfy_root,
                                                                                        capsys):
    pipeline = toy_ti2v()
    transformer = write_comfy_models(pipeline, tmp_path / "models", FP8_ENCODER)
    source = SplitTextEncoder(tmp_path / "models" / "text_encoders" / FP8_ENCODER)
    encoder = source.load(torch.float32)
    stored = comfy_text_encoder_state(pipeline.text_encoder, fp8=True)
    for name, original in pipeline.text_encoder.state_dict().items():
        loaded = encoder.state_dict()[name]
        key = "shared.weight" if name == "encoder.embed_tokens.weight" else name
        if stored[key].dtype == torch.float8_e4m3fn:  # ComfyUI's weight * scale_weight, bit for bit
            scale = stored[key.removesuffix("weight") + "scale_weight"]
            assert torch.equal(loaded, stored[key].float() * scale), name
            # e4m3 keeps 3 mantissa bits: 2^-4 relative, and its subnormals' step 2^-9 times the scale
            assert (loaded - original).abs().le(original.abs() * 2**-4 + scale * 2**-9).all(), name
        else:
            assert torch.equal(loaded, original.half().float()), name
    assert source.parameters() == sum(p.numel() for p in pipeline.text_encoder.parameters())

    generate(transformer, tmp_path / "fp8.mp4", "a blue disc spins", capsys)
    generate(comfy_root, tmp_path / "fp16.mp4", "a blue disc spins", capsys)
    fp8, fp16 = (read_video(tmp_path / name)[0].astype(float) for name in ("fp8.mp4", "fp16.mp4"))
    assert np.abs(fp8 - fp16).mean() < 1.0  # of 255 (measured 0.27); fp8 rounds each weight by up to 2^-4


def test_fp16_files_load_as_the_diffusers_folder_loads_them(tmp_path):
    """Stored dtypes are kept (not widened), except in the modules diffusers keeps in fp32 (its norms, the
    time embedder, the modulation tables), as from_pretrained does for the same fp16 weights."""
    pipeline = toy_ti2v()
    pipeline.transformer.to(torch.float16)
    pipeline.vae.to(torch.float16)
    transformer = write_comfy_models(pipeline, tmp_path / "models")
    pipeline.save_pretrained(tmp_path / "folder")
    ours, theirs = load_model(transformer).pipeline, load_model(tmp_path / "folder").pipeline
    for component in ("transformer", "vae"):
        expected = getattr(theirs, component).state_dict()
        for name, tensor in getattr(ours, component).state_dict().items():
            assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), (component, name)
    assert ours.transformer.blocks[0].ffn.net[0].proj.weight.dtype == torch.float16
    assert ours.transformer.scale_shift_table.dtype == torch.float32


def test_the_tokenizer_of_a_cached_wan_diffusers_snapshot_serves_too(tmp_path, wan_folder):
    snapshot = tmp_path / "hub" / "models--Wan-AI--Wan2.2-TI2V-5B-Diffusers" / "snapshots" / "abc"
    shutil.copytree(wan_folder / "tokenizer", snapshot / "tokenizer")
    assert find_tokenizer({"HF_HUB_CACHE": str(tmp_path / "hub")}) == snapshot / "tokenizer"


def test_a_comfyui_wan_set_is_listed_once_with_its_three_files(comfy_root, tmp_path):
    config = DiscoveryConfig(comfyui_root=comfy_root, models_dirs=[comfy_root / "models"])
    found = [c for c in discover_models(config) if c.kind is CandidateKind.SPLIT_FILES]
    models = comfy_root / "models"
    assert len(found) == 1 and found[0].path == models / "diffusion_models" / TRANSFORMER_FILE
    assert found[0].files == (found[0].path, models / "vae" / "wan2.2_vae.safetensors",
                              models / "text_encoders" / FP16_ENCODER)
    assert found[0].size_bytes == sum(f.stat().st_size for f in found[0].files)
    table = format_candidates(found, config)
    assert "comfyui-split-files" in table and "wan2.2_vae.safetensors" in table and FP16_ENCODER in table
    assert json.loads(json.dumps(found[0].to_dict()))["files"][2].endswith(FP16_ENCODER)


def test_the_studio_shows_wans_controls_for_a_comfyui_set_named_by_file_or_folder(comfy_root):
    from lowvram_studio.models.source_family import source_family

    models = comfy_root / "models"
    assert source_family(str(models / "diffusion_models" / TRANSFORMER_FILE)) == "wan"
    assert source_family(str(comfy_root)) == source_family(str(models)) == "wan"
    assert source_family(str(models / "vae" / "wan2.2_vae.safetensors")) == "svd"  # not a model: Generate says so


def test_an_incomplete_comfyui_wan_set_is_not_listed(comfy_root, tmp_path):
    broken = tmp_path / "ComfyUI"
    shutil.copytree(comfy_root, broken)
    (broken / "models" / "vae" / "wan2.2_vae.safetensors").unlink()
    assert discover_models(DiscoveryConfig(comfyui_root=broken)) == []


def bad_input(model: Path, tmp_path: Path, capsys) -> str:
    code = main(["generate", "--image", str(ASSET), "--out", str(tmp_path / "x.mp4"), "--model", str(model), *CLIP,
                 "--prompt", "a red box"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.mp4").exists()
    return err


@pytest.fixture
def broken_root(comfy_root, tmp_path) -> Path:
    """A copy of the ComfyUI folder a test may damage."""
    shutil.copytree(comfy_root, tmp_path / "ComfyUI")
    return tmp_path / "ComfyUI" / "models"


@pytest.mark.parametrize("part, file, folder", [
    ("Wan2.2 VAE", "vae/wan2.2_vae.safetensors", "vae"),
    ("UMT5-XXL text encoder", f"text_encoders/{FP16_ENCODER}", "text_encoders")])
def test_a_missing_vae_or_text_encoder_names_the_file_and_where_comfyui_keeps_it(broken_root, tmp_path, capsys,
                                                                                 part, file, folder):
    (broken_root / file).unlink()
    err = bad_input(broken_root / "diffusion_models" / TRANSFORMER_FILE, tmp_path, capsys)
    assert f"no {part} for it was found" in err and Path(file).name in err
    assert f"into {broken_root / folder} (ComfyUI keeps it in models/{folder}/)" in err


def test_a_pickle_vae_is_refused_and_named(broken_root, tmp_path, capsys):
    vae = broken_root / "vae" / "wan2.2_vae.safetensors"
    vae.rename(vae.with_name("Wan2.2_VAE.pth"))
    err = bad_input(broken_root / "diffusion_models" / TRANSFORMER_FILE, tmp_path, capsys)
    assert "pickle files are refused" in err and "Wan2.2_VAE.pth" in err


def test_a_pickle_diffusion_model_is_refused(broken_root, tmp_path, capsys):
    pickled = broken_root / "diffusion_models" / "wan2.2_ti2v_5B_fp16.pt"
    pickled.write_bytes(b"\x80\x04not really")
    assert "is a pickle checkpoint" in bad_input(pickled, tmp_path, capsys)


def test_a_foreign_safetensors_is_named_as_neither_svd_nor_wan(broken_root, tmp_path, capsys):
    foreign = broken_root / "diffusion_models" / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, str(foreign))
    err = bad_input(foreign, tmp_path, capsys)
    assert "holds neither SVD" in err and "nor a Wan transformer" in err and "double_blocks.0" in err


def test_the_vae_given_as_the_model_says_to_give_the_diffusion_model(broken_root, tmp_path, capsys):
    err = bad_input(broken_root / "vae" / "wan2.2_vae.safetensors", tmp_path, capsys)
    assert "is Wan's VAE, one of ComfyUI's three Wan files" in err and "diffusion_models" in err


@pytest.mark.parametrize("file", [f"diffusion_models/{TRANSFORMER_FILE}", f"text_encoders/{FP16_ENCODER}"])
def test_a_truncated_file_says_download_it_again(broken_root, tmp_path, capsys, file):
    damaged = broken_root / file
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    err = bad_input(broken_root / "diffusion_models" / TRANSFORMER_FILE, tmp_path, capsys)
    assert str(damaged) in err and "truncated" in err and "download it again" in err


def test_a_vae_of_the_wrong_width_is_named_as_not_usable(broken_root, tmp_path, capsys):
    vae = broken_root / "vae" / "wan2.2_vae.safetensors"
    state = {k: (v[:16] if k == "conv2.weight" else v) for k, v in load_file(str(vae)).items()}
    vae.unlink()
    save_file(state, str(vae.with_name("wan_2.1_vae.safetensors")))
    err = bad_input(broken_root / "diffusion_models" / TRANSFORMER_FILE, tmp_path, capsys)
    assert "wan_2.1_vae.safetensors (a VAE with 16 latent channels" in err and "wan2.2_vae.safetensors" in err


def test_without_a_cached_tokenizer_the_error_says_what_to_put_where(comfy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    err = bad_input(comfy_root, tmp_path, capsys)
    assert f"no UMT5 tokenizer in the Hugging Face cache {tmp_path / 'empty-cache'}" in err
    assert "huggingface-cli download google/umt5-xxl" in err and "models--google--umt5-xxl" in err


def test_a_folder_with_two_wan_diffusion_models_asks_which(broken_root, tmp_path, capsys):
    shutil.copy(broken_root / "diffusion_models" / TRANSFORMER_FILE, broken_root / "diffusion_models" / "other.safetensors")
    err = bad_input(broken_root, tmp_path, capsys)
    assert "several Wan diffusion models" in err and "--model <its .safetensors file>" in err

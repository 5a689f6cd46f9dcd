"""Single-file (original Stability layout) checkpoints: round trip, key coverage, and every refusal."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from lowvram_studio.settings_adapter import generate
from lowvram_studio.models import single_file as sf
from lowvram_studio.models.safetensors_file import SafetensorsHeader, SingleFileError, TensorEntry, tqdm_progress
from lowvram_studio.models.svd_file_info import _DERIVE, inspect_single_file
from lowvram_studio.models.svd_key_map import COMPONENT_PREFIXES, UNET_PREFIX
from lowvram_studio.models.svd_configs import SVD_IMAGE_ENCODER_CONFIG, SVD_VAE_CONFIG, SVD_XT_UNET_CONFIG

KEY_DATA = Path(__file__).parent / "data" / "svd_xt_original_keys.json"
COMPONENTS = ("unet", "vae", "image_encoder")

# Names and shapes read off the generative-models source (video_model.VideoUNet, temporal_ae.VideoDecoder,
# encoders.modules.FrozenOpenCLIPImagePredictionEmbedder -> OpenCLIP ViT-H-14) for the SVD-XT config
# (model_channels 320, channel_mult [1, 2, 4, 4], num_res_blocks 2, attention_resolutions [4, 2, 1],
# adm_in_channels 768, context_dim 1024, video_kernel_size [3, 1, 1]; VAE ch 128, ch_mult [1, 2, 4, 4]).
SGM_ANCHORS = {
    "model.diffusion_model.input_blocks.0.0.weight": [320, 8, 3, 3],
    "model.diffusion_model.label_emb.0.0.weight": [1280, 768],
    "model.diffusion_model.input_blocks.1.0.time_stack.in_layers.2.weight": [320, 320, 3, 1, 1],
    "model.diffusion_model.input_blocks.1.0.time_mixer.mix_factor": [1],
    "model.diffusion_model.input_blocks.1.1.time_stack.0.ff_in.net.0.proj.weight": [2560, 320],
    "model.diffusion_model.input_blocks.1.1.time_pos_embed.0.weight": [1280, 320],
    "model.diffusion_model.input_blocks.3.0.op.weight": [320, 320, 3, 3],
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": [640, 320, 1, 1],
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": [1280, 1280, 3, 3],
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": [1280, 1024],
    "model.diffusion_model.middle_block.2.time_stack.emb_layers.1.weight": [1280, 1280],
    "model.diffusion_model.output_blocks.2.1.conv.weight": [1280, 1280, 3, 3],
    "model.diffusion_model.output_blocks.5.2.conv.weight": [1280, 1280, 3, 3],
    "model.diffusion_model.output_blocks.8.2.conv.weight": [640, 640, 3, 3],
    "model.diffusion_model.output_blocks.11.1.time_stack.0.attn2.to_k.weight": [320, 1024],
    "model.diffusion_model.out.2.weight": [4, 320, 3, 3],
    "first_stage_model.encoder.down.0.block.0.conv1.weight": [128, 128, 3, 3],
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": [256, 128, 1, 1],
    "first_stage_model.encoder.mid.attn_1.q.weight": [512, 512, 1, 1],
    "first_stage_model.encoder.conv_out.weight": [8, 512, 3, 3],
    "first_stage_model.decoder.mid.block_1.mix_factor": [1],
    "first_stage_model.decoder.mid.block_2.time_stack.in_layers.2.weight": [512, 512, 3, 1, 1],
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": [128, 256, 1, 1],
    "first_stage_model.decoder.up.3.upsample.conv.weight": [512, 512, 3, 3],
    "first_stage_model.decoder.conv_out.time_mix_conv.weight": [3, 3, 3, 1, 1],
    "conditioner.embedders.0.open_clip.model.visual.conv1.weight": [1280, 3, 14, 14],
    "conditioner.embedders.0.open_clip.model.visual.positional_embedding": [257, 1280],
    "conditioner.embedders.0.open_clip.model.visual.transformer.resblocks.31.attn.in_proj_weight": [3840, 1280],
    "conditioner.embedders.0.open_clip.model.visual.proj": [1280, 1024],
}


def _full_size_meta_pipeline() -> StableVideoDiffusionPipeline:
    """SVD-XT's published architecture on the meta device (no memory, no weights)."""
    with init_empty_weights():
        unet = UNetSpatioTemporalConditionModel(**SVD_XT_UNET_CONFIG)
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_IMAGE_ENCODER_CONFIG))
    return StableVideoDiffusionPipeline(vae, image_encoder, unet, scheduler=None, feature_extractor=None)


def _mapped_full_size_keys() -> dict[str, list[int]]:
    state = sf.to_original_state_dict(_full_size_meta_pipeline(), keep_quant_conv=False)
    return {k: list(v.shape) for k, v in sorted(state.items())}


def write_key_data() -> None:
    """Regenerate tests/data/svd_xt_original_keys.json (run this file as a script)."""
    keys = _mapped_full_size_keys()
    params = {
        c: sum(int(np.prod(s)) for k, s in keys.items() if k.startswith(p)) for c, p in COMPONENT_PREFIXES.items()
    }
    KEY_DATA.parent.mkdir(exist_ok=True)
    about = (
        "Every tensor of Stability's svd_xt.safetensors that the diffusers pipeline uses, with its shape: the "
        "published SVD-XT diffusers configs mapped through single_file.to_original_state_dict, cross-checked "
        "against the generative-models source (SGM_ANCHORS in tests/test_single_file.py). The real file also "
        "holds the OpenCLIP text-tower leftovers and conditioner.embedders.3 (skipped when loading)."
    )
    lines = [f"{json.dumps(k)}: {json.dumps(s)}" for k, s in keys.items()]
    KEY_DATA.write_text(
        f'{{"about": {json.dumps(about)},\n"parameters": {json.dumps(params)},\n"keys": {{\n'
        + ",\n".join(lines)
        + "\n}}\n"
    )


@pytest.fixture(scope="module")
def demo(demo_pipeline) -> StableVideoDiffusionPipeline:
    return demo_pipeline


@pytest.fixture(scope="module")
def demo_file(demo, tmp_path_factory) -> Path:
    return sf.save_original_checkpoint(demo, tmp_path_factory.mktemp("ckpt") / "demo_svd.safetensors")


def _assert_same_weights(a: StableVideoDiffusionPipeline, b: StableVideoDiffusionPipeline, dtype=None) -> None:
    for component in COMPONENTS:
        left, right = getattr(a, component).state_dict(), getattr(b, component).state_dict()
        assert left.keys() == right.keys(), component
        for name, tensor in left.items():
            expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            assert torch.equal(expected, right[name]), f"{component}.{name}"


def _public(config) -> dict:
    """A diffusers config without its bookkeeping keys (_class_name, _diffusers_version)."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def test_original_layout_file_loads_back_to_identical_weights_and_configs(demo, demo_file):
    loaded = sf.load_single_file(demo_file)

    _assert_same_weights(demo, loaded)
    assert _public(loaded.unet.config) == _public(demo.unet.config)
    assert _public(loaded.vae.config) == _public(demo.vae.config)
    assert loaded.image_encoder.config.hidden_act == demo.image_encoder.config.hidden_act
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert not any(p.is_meta for c in COMPONENTS for p in getattr(loaded, c).parameters())


def test_loaded_single_file_generates_identical_frames(demo, demo_file, test_image, small_settings):
    loaded = sf.load_single_file(demo_file)
    settings = small_settings.replace(num_frames=4, num_inference_steps=2)

    expected = generate(demo, test_image, settings).frames
    got = generate(loaded, test_image, settings).frames

    np.testing.assert_array_equal(got, expected)


def test_fp16_file_loads_into_fp16_and_fp32(demo, tmp_path):
    path = sf.save_original_checkpoint(demo, tmp_path / "svd_xt_fp16.safetensors", dtype=torch.float16)
    assert inspect_single_file(path).dtype == torch.float16

    half = sf.load_single_file(path, dtype=torch.float16)
    full = sf.load_single_file(path, dtype=torch.float32)

    _assert_same_weights(demo, half, dtype=torch.float16)
    assert {p.dtype for p in full.unet.parameters()} == {torch.float32}
    assert torch.equal(full.unet.conv_in.weight, demo.unet.conv_in.weight.half().float())


def test_fp32_file_casts_per_component(demo, demo_file):
    dtypes = {"unet": torch.float16, "vae": torch.float32, "image_encoder": torch.float16}
    loaded = sf.load_single_file(demo_file, dtype=dtypes)

    assert loaded.unet.dtype == torch.float16
    assert loaded.vae.dtype == torch.float32
    assert loaded.image_encoder.dtype == torch.float16


def test_progress_reports_every_byte_read(demo_file):
    calls: list[tuple[int, int]] = []
    sf.load_single_file(demo_file, on_progress=lambda done, total: calls.append((done, total)))

    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and dones[-1] == calls[-1][1]
    assert calls[-1][1] <= demo_file.stat().st_size


def test_cli_progress_bar_counts_bytes(demo_file, capsys):
    sf.load_single_file(demo_file, on_progress=tqdm_progress("svd_xt"))

    bar = capsys.readouterr().err
    assert "svd_xt" in bar and "100%" in bar


def test_mapping_covers_every_real_svd_xt_key_and_shape():
    data = json.loads(KEY_DATA.read_text())

    assert _mapped_full_size_keys() == data["keys"]
    for key, shape in SGM_ANCHORS.items():
        assert data["keys"][key] == shape, key
    # SVD-XT's published parameter counts (UNet 1.525 B, temporal VAE 97.7 M, ViT-H/14 vision 632 M).
    assert data["parameters"] == {"unet": 1_524_623_082, "vae": 97_742_775, "image_encoder": 632_076_800}
    assert not any("quant_conv" in k for k in data["keys"])  # AutoencodingEngine has none


def test_configs_derived_from_real_svd_xt_shapes_equal_the_published_configs():
    keys = json.loads(KEY_DATA.read_text())["keys"]
    header = SafetensorsHeader(
        Path("svd_xt.safetensors"),
        {k: TensorEntry(torch.float32, tuple(s), 0, 0) for k, s in keys.items()},
        {},
        0,
    )
    published = {"unet": SVD_XT_UNET_CONFIG, "vae": SVD_VAE_CONFIG, "image_encoder": SVD_IMAGE_ENCODER_CONFIG}

    for component, prefix in COMPONENT_PREFIXES.items():
        derived = _DERIVE[component](header.shapes(prefix))
        assert {k: derived[k] for k in published[component]} == published[component], component
        sf._plan_component(header, component, derived)  # raises on any missing / unexpected key


def test_variant_is_read_from_the_file_name(demo, tmp_path):
    state = sf.to_original_state_dict(demo)
    names = {
        "svd.safetensors": ("svd", 14),
        "svd_xt.safetensors": ("svd_xt", 25),
        "svd_xt_1_1.safetensors": ("svd_xt_1_1", 25),
    }
    for name, (variant, frames) in names.items():
        save_file(state, str(tmp_path / name))
        info = inspect_single_file(tmp_path / name)
        assert (info.variant, info.num_frames, info.has_vae, info.has_image_encoder) == (variant, frames, True, True)
    assert inspect_single_file(tmp_path / "svd.safetensors", num_frames=25).num_frames == 25


def test_unused_parts_of_stability_files_are_skipped(demo, tmp_path):
    state = sf.to_original_state_dict(demo)
    state["conditioner.embedders.0.open_clip.model.token_embedding.weight"] = torch.zeros(10, 4)
    state["conditioner.embedders.0.open_clip.model.logit_scale"] = torch.zeros(())
    state["conditioner.embedders.3.encoder.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
    path = tmp_path / "svd_xt.safetensors"
    save_file(state, str(path), metadata=sf.original_metadata(demo))

    _assert_same_weights(demo, sf.load_single_file(path))


def test_unknown_extra_parts_are_skipped_with_a_warning(demo, tmp_path, caplog):
    state = sf.to_original_state_dict(demo)
    state["model_ema.decay"] = torch.zeros(())
    path = tmp_path / "svd_xt.safetensors"
    save_file(state, str(path), metadata=sf.original_metadata(demo))

    with caplog.at_level("WARNING", logger=sf.__name__):
        loaded = sf.load_single_file(path)
    assert "skipping 1 keys outside the SVD components: model_ema.decay" in caplog.text
    assert torch.equal(loaded.unet.conv_out.bias, demo.unet.conv_out.bias)


def test_image_decoder_variant_is_rejected(demo, tmp_path):
    """svd_image_decoder.safetensors: the VAE decoder has no temporal layers."""
    state = {k: v for k, v in sf.to_original_state_dict(demo).items() if not (".time_stack." in k and "decoder" in k)}
    path = tmp_path / "svd_image_decoder.safetensors"
    save_file(state, str(path))

    with pytest.raises(SingleFileError, match="per-frame image decoder"):
        sf.load_single_file(path)


def test_unet_only_file_asks_for_the_missing_components(demo, tmp_path):
    state = {k: v for k, v in sf.to_original_state_dict(demo).items() if k.startswith(UNET_PREFIX)}
    path = tmp_path / "svd_xt_unet.safetensors"
    save_file(state, str(path), metadata=sf.original_metadata(demo))

    with pytest.raises(SingleFileError, match="holds no vae"):
        sf.load_single_file(path)
    loaded = sf.load_single_file(path, vae=demo.vae, image_encoder=demo.image_encoder)
    assert loaded.vae is demo.vae


def test_missing_and_unexpected_keys_are_named(demo, tmp_path):
    state = sf.to_original_state_dict(demo)
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(2)
    path = tmp_path / "svd_xt.safetensors"
    save_file(state, str(path), metadata=sf.original_metadata(demo))

    with pytest.raises(SingleFileError) as error:
        sf.load_single_file(path)
    message = str(error.value)
    assert str(path) in message
    assert "missing 1 unet keys: model.diffusion_model.out.2.bias" in message
    assert "unexpected 1 unet keys: model.diffusion_model.input_blocks.1.0.extra.weight" in message


def test_wrong_shape_is_named(demo, tmp_path):
    state = sf.to_original_state_dict(demo)
    state["model.diffusion_model.input_blocks.1.0.time_mixer.mix_factor"] = torch.zeros(2)
    path = tmp_path / "svd_xt.safetensors"
    save_file(state, str(path), metadata=sf.original_metadata(demo))

    with pytest.raises(SingleFileError, match=r"input_blocks\.1\.0\.time_mixer\.mix_factor has shape \(2,\)"):
        sf.load_single_file(path)


def test_image_model_checkpoint_is_rejected(tmp_path):
    """An SD 1.5-like key set: same UNet naming, but no temporal layers."""
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.zeros(320, 320),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 8),
    }
    path = tmp_path / "v1-5-pruned.safetensors"
    save_file(state, str(path))

    with pytest.raises(SingleFileError, match="image model .*not Stable Video Diffusion"):
        sf.load_single_file(path)


def test_file_of_another_kind_is_rejected(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(path))

    with pytest.raises(SingleFileError, match="no 'model.diffusion_model.' keys"):
        sf.load_single_file(path)


def test_truncated_file_is_rejected(demo_file, tmp_path):
    data = demo_file.read_bytes()
    for cut in (len(data) // 2, 100, 4):
        path = tmp_path / "svd_xt.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(SingleFileError, match="truncated|not a valid safetensors"):
            sf.load_single_file(path)


def test_corrupt_header_is_rejected(demo_file, tmp_path):
    data = bytearray(demo_file.read_bytes())
    data[8:40] = b"\xff" * 32
    path = tmp_path / "svd_xt.safetensors"
    path.write_bytes(bytes(data))

    with pytest.raises(SingleFileError, match="corrupt safetensors header"):
        sf.load_single_file(path)


class _RunsCode:
    """Unpickling this creates a marker file: what a malicious checkpoint could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoint_is_refused_without_running_it(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"svd_xt{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": _RunsCode(str(marker))}))

    with pytest.raises(SingleFileError, match="pickle .*runs whatever code"):
        sf.load_single_file(path)
    assert not marker.exists()


def test_pickle_renamed_to_safetensors_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "svd_xt.safetensors"
    path.write_bytes(pickle.dumps(_RunsCode(str(marker))))

    with pytest.raises(SingleFileError, match="not a valid safetensors"):
        sf.load_single_file(path)
    assert not marker.exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SingleFileError, match="does not exist"):
        sf.load_single_file(tmp_path / "nope.safetensors")


if __name__ == "__main__":  # PYTHONPATH=. python tests/test_single_file.py
    write_key_data()

"""Loading a Wan folder with as little RAM as its files allow: the text encoder stays on disk until a prompt
needs it (models/deferred.py: identified by its files without reading them whole, counted from its headers,
read whole only on demand), and each component loads in the dtype its files hold (models/load.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lowvram_studio.models.deferred import DeferredTextEncoder
from lowvram_studio.models.load import load_model
from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "toy-wan"
    build_toy_wan_pipeline().save_pretrained(folder)
    return folder


def test_loading_a_wan_folder_leaves_its_text_encoder_on_disk(wan_folder):
    model = load_model(wan_folder)
    assert model.pipeline.text_encoder is None
    source = model.text_encoder_source
    assert isinstance(source, DeferredTextEncoder) and source.class_name == "UMT5EncoderModel"
    encoder = source.load(torch.float32)
    expected = build_toy_wan_pipeline().text_encoder
    assert source.parameters() == sum(p.numel() for p in encoder.parameters()) == sum(
        p.numel() for p in expected.parameters())
    for name, tensor in expected.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name


def test_the_files_fingerprint_is_stable_and_follows_every_change(wan_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(wan_folder, copy)
    fingerprint = DeferredTextEncoder(wan_folder / "text_encoder", "UMT5EncoderModel").fingerprint()
    same = DeferredTextEncoder(copy / "text_encoder", "UMT5EncoderModel")
    assert same.fingerprint() == fingerprint and fingerprint.startswith("UMT5EncoderModel:files-sha256:")
    weights = copy / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # same size and header; the toy file is within the sampled blocks (a 11 GB one: 1 MiB of it)
    weights.write_bytes(bytes(data))
    assert DeferredTextEncoder(copy / "text_encoder", "UMT5EncoderModel").fingerprint() != fingerprint


def test_components_load_in_the_narrower_dtype_their_files_hold_and_run_the_same(tmp_path):
    from diffusers import WanImageToVideoPipeline

    from lowvram_studio.engine.config import EngineConfig
    from lowvram_studio.engine.options import DeviceChoice
    from lowvram_studio.engine.precision import PrecisionRequest
    from lowvram_studio.engine.sampler import sample
    from lowvram_studio.engine.wan import WanFamily, WanRequest
    from lowvram_studio.media import load_image

    folder = tmp_path / "bf16-wan"
    pipeline = build_toy_wan_pipeline()
    pipeline.transformer.to(torch.bfloat16)  # as Wan-AI ships it; the VAE stays fp32
    pipeline.text_encoder.to(torch.bfloat16)
    pipeline.save_pretrained(folder)

    model = load_model(folder)
    assert model.pipeline.transformer.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16  # 10, not 20 GB
    assert model.pipeline.vae.dtype == torch.float32
    widened = WanImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    assert widened.transformer.blocks[0].ffn.net[0].proj.weight.dtype == torch.float32  # the old way: 2x the RAM

    image = load_image(ROOT / "assets" / "ball_and_box.png").resize((32, 32))
    request = WanRequest(width=32, height=32, num_frames=5, num_inference_steps=2, image=image,
                         prompt="a red ball moves left", negative_prompt="still scene", max_sequence_length=16)
    fp32 = EngineConfig(device=DeviceChoice.CPU, precision=PrecisionRequest(denoiser="fp32"), preview_every=0)
    ours = sample(WanFamily(model.pipeline, text_encoder_source=model.text_encoder_source), request, fp32).frames
    theirs = sample(WanFamily(widened), request, fp32).frames
    assert np.array_equal(ours, theirs)  # widening on the CPU is exact: the same frames from half the RAM

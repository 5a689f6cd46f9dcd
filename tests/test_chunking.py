"""Lossless chunking: every chunk size gives the unchunked UNet output (fp32, CPU, demo model)."""

from __future__ import annotations

import pytest
import torch

from lowvram_studio.engine.chunking import (
    FEED_FORWARD_HOOK,
    SPATIAL_HOOK,
    TEMPORAL_HOOK,
    ChunkingConfig,
    apply_chunking,
    chunk_hook_counts,
    remove_chunking,
    split_cfg_call,
)
from lowvram_studio.engine.precision import NonFiniteError
from lowvram_studio.settings_adapter import generate
from lowvram_studio.models.demo import build_demo_pipeline
from lowvram_studio.settings import RunSettings

FRAMES = 6
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def unet():
    return build_demo_pipeline().unet


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, FRAMES, 8, 16, 16, generator=generator),
        "timestep": torch.tensor(0.7),
        "encoder_hidden_states": torch.randn(2, 1, 64, generator=generator),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02], [6.0, 127.0, 0.02]]),
    }


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def reference(unet, inputs):
    remove_chunking(unet)
    return run(unet, inputs)


@pytest.mark.parametrize(
    "config",
    [
        ChunkingConfig(spatial_chunk=1),
        ChunkingConfig(spatial_chunk=2),
        ChunkingConfig(spatial_chunk=5),
        ChunkingConfig(spatial_chunk=FRAMES),
        ChunkingConfig(temporal_chunk=3),
        ChunkingConfig(temporal_chunk=7),
        ChunkingConfig(temporal_chunk=64),
        ChunkingConfig(ff_chunk=50),
        ChunkingConfig(ff_chunk=100),
        ChunkingConfig(spatial_chunk=3, temporal_chunk=10, ff_chunk=33),
    ],
    ids=lambda c: f"s{c.spatial_chunk}-t{c.temporal_chunk}-ff{c.ff_chunk}",
)
def test_chunked_unet_matches_unchunked(unet, inputs, reference, config):
    apply_chunking(unet, config)
    try:
        out = run(unet, inputs)
    finally:
        remove_chunking(unet)
    assert (out - reference).abs().max().item() <= TOLERANCE


def test_cfg_split_matches_batched_call(unet, inputs, reference):
    def model(sample, **kwargs):
        return unet(sample, **kwargs, return_dict=False)[0]

    batched = {k: v for k, v in inputs.items() if k != "sample"}
    with torch.no_grad():
        out = split_cfg_call(model, inputs["sample"], **batched)
    assert (out - reference).abs().max().item() <= TOLERANCE


def test_cfg_split_with_chunking_matches_batched_call(unet, inputs, reference):
    def model(sample, **kwargs):
        return unet(sample, **kwargs, return_dict=False)[0]

    batched = {k: v for k, v in inputs.items() if k != "sample"}
    apply_chunking(unet, ChunkingConfig(spatial_chunk=2, temporal_chunk=16, ff_chunk=64))
    try:
        with torch.no_grad():
            out = split_cfg_call(model, inputs["sample"], **batched)
    finally:
        remove_chunking(unet)
    assert (out - reference).abs().max().item() <= TOLERANCE


def test_small_spatial_inputs_run_whole_and_still_match(unet, inputs, reference):
    calls = 0

    def count(_module, _inputs, _output):
        nonlocal calls
        calls += 1

    apply_chunking(unet, ChunkingConfig(spatial_chunk=1, spatial_min_bytes=10**12))
    handle = unet.down_blocks[0].resnets[0].spatial_res_block.conv1.register_forward_hook(count)
    try:
        out = run(unet, inputs)
    finally:
        handle.remove()
        remove_chunking(unet)
    assert calls == 1  # one whole call, not one per frame
    assert (out - reference).abs().max().item() <= TOLERANCE


def test_hooks_attach_to_every_layer_kind_and_detach(unet):
    apply_chunking(unet, ChunkingConfig(spatial_chunk=2, temporal_chunk=8, ff_chunk=16))
    counts = chunk_hook_counts(unet)
    assert counts[SPATIAL_HOOK] > 0 and counts[TEMPORAL_HOOK] > 0 and counts[FEED_FORWARD_HOOK] > 0
    apply_chunking(unet, ChunkingConfig(temporal_chunk=8))
    counts = chunk_hook_counts(unet)
    assert counts[SPATIAL_HOOK] == 0 and counts[FEED_FORWARD_HOOK] == 0 and counts[TEMPORAL_HOOK] > 0
    remove_chunking(unet)
    assert sum(chunk_hook_counts(unet).values()) == 0


def test_generate_with_every_lossless_setting_matches_the_plain_run(test_image):
    pipeline = build_demo_pipeline()
    plain = RunSettings(height=64, width=64, num_frames=5, num_inference_steps=2, device="cpu")
    lossless = plain.replace(cfg_split=True, spatial_chunk=2, temporal_chunk=7, ff_chunk=40)
    reference = generate(pipeline, test_image, plain).frames
    result = generate(pipeline, test_image, lossless)
    assert result.info["chunk_hooks"][SPATIAL_HOOK] > 0
    # The UNet itself agrees within 1e-5 (tests above); two sampler steps and the random-weight VAE
    # amplify float32 rounding to ~7e-5 in [0, 1] frames (PSNR > 100 dB).
    assert float(abs(result.frames - reference).max()) <= 2e-4


def test_nan_guard_stops_the_run_naming_unet_step_and_setting(test_image):
    pipeline = build_demo_pipeline()
    calls = 0

    def inject_inf(_module, _inputs, output):
        nonlocal calls
        calls += 1
        return output.clone().fill_(float("inf")) if calls == 2 else output

    pipeline.unet.conv_out.register_forward_hook(inject_inf)
    settings = RunSettings(height=64, width=64, num_frames=3, num_inference_steps=3, device="cpu", unet_dtype="bf16")
    with pytest.raises(NonFiniteError, match=r"^the UNet produced NaN at step 2 in bf16; set unet_dtype to fp32$"):
        generate(pipeline, test_image, settings)

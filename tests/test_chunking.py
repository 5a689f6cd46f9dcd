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
from lowvram_studio.models.demo import build_demo_pipeline

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
        ChunkingConfig(temporal_chunk=1),
        ChunkingConfig(temporal_chunk=7),
        ChunkingConfig(temporal_chunk=64),
        ChunkingConfig(ff_chunk=7),
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


def test_hooks_attach_to_every_layer_kind_and_detach(unet):
    apply_chunking(unet, ChunkingConfig(spatial_chunk=2, temporal_chunk=8, ff_chunk=16))
    counts = chunk_hook_counts(unet)
    assert counts[SPATIAL_HOOK] > 0 and counts[TEMPORAL_HOOK] > 0 and counts[FEED_FORWARD_HOOK] > 0
    apply_chunking(unet, ChunkingConfig(temporal_chunk=8))
    counts = chunk_hook_counts(unet)
    assert counts[SPATIAL_HOOK] == 0 and counts[FEED_FORWARD_HOOK] == 0 and counts[TEMPORAL_HOOK] > 0
    remove_chunking(unet)
    assert sum(chunk_hook_counts(unet).values()) == 0

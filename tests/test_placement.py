"""Placement modes attach the accelerate / diffusers hooks they promise and leave the frames unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lowvram_studio.engine.placement import (
    PlacementConfig,
    apply_placement,
    clear_placement,
    make_room,
    placement_hooks,
    release_memory,
)
from lowvram_studio.engine.sampler import generate
from lowvram_studio.models.demo import build_demo_pipeline
from lowvram_studio.settings import OffloadMode, RunSettings


@pytest.fixture(scope="module")
def pipeline():
    return build_demo_pipeline()


SETTINGS = RunSettings(height=64, width=64, num_frames=4, num_inference_steps=2, device="cpu")


def frames(pipeline, offload: OffloadMode) -> np.ndarray:
    image = Image.fromarray(np.full((64, 64, 3), 120, dtype=np.uint8))
    return generate(pipeline, image, SETTINGS.replace(offload=offload)).frames


@pytest.fixture(scope="module")
def reference(pipeline):
    clear_placement(pipeline)
    return frames(pipeline, OffloadMode.NONE)


@pytest.mark.parametrize(
    "mode, expected",
    [
        (OffloadMode.NONE, {"image_encoder": [], "unet": [], "vae": []}),
        (
            OffloadMode.MODEL,
            {"image_encoder": ["CpuOffload"], "unet": ["CpuOffload"], "vae": ["CpuOffload"]},
        ),
        (
            OffloadMode.STREAM,
            {"image_encoder": ["GroupOffloadingHook"], "unet": ["GroupOffloadingHook"], "vae": ["CpuOffload"]},
        ),
    ],
)
def test_placement_attaches_its_hooks_and_frames_stay_equal(pipeline, reference, mode, expected):
    try:
        out = frames(pipeline, mode)  # the sampler applies the placement itself
        assert placement_hooks(pipeline) == expected
        make_room(pipeline, "unet")
        release_memory(pipeline)
    finally:
        clear_placement(pipeline)
    np.testing.assert_array_equal(out, reference)


def test_stream_mode_groups_unet_blocks(pipeline):
    apply_placement(pipeline, PlacementConfig(OffloadMode.STREAM, "cpu"))
    try:
        unet = pipeline.unet
        block = unet.down_blocks[0]._diffusers_hook.get_hook("group_offloading")
        assert block is not None and block.group.onload_leader is unet.down_blocks[0]
        assert unet.up_blocks[-1]._diffusers_hook.get_hook("group_offloading") is not None
    finally:
        clear_placement(pipeline)
    assert placement_hooks(pipeline) == {"image_encoder": [], "unet": [], "vae": []}

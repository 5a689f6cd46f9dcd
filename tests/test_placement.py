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
from lowvram_studio.settings_adapter import generate
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


def test_stream_mode_groups_each_resnet_and_transformer(pipeline):
    apply_placement(pipeline, PlacementConfig(OffloadMode.STREAM, "cpu"))
    try:
        unet = pipeline.unet

        def group_hook(module):
            registry = getattr(module, "_diffusers_hook", None)
            return None if registry is None else registry.get_hook("group_offloading")

        down = unet.down_blocks[0]
        for module in (down.resnets[0], down.attentions[0], down.downsamplers[0], unet.mid_block.resnets[1]):
            assert group_hook(module) is not None and group_hook(module).group.onload_leader is module
        assert group_hook(unet.up_blocks[-1].attentions[-1]) is not None
        assert group_hook(down) is None  # the whole block is not one group
        assert group_hook(unet) is not None  # conv_in, embeddings, conv_out: the small top-level group
    finally:
        clear_placement(pipeline)
    assert placement_hooks(pipeline) == {"image_encoder": [], "unet": [], "vae": []}


def test_streaming_hooks_wrap_chunk_hooks_so_weights_load_once_per_call(pipeline, reference):
    settings = SETTINGS.replace(offload=OffloadMode.STREAM, cfg_split=True, spatial_chunk=2)
    image = Image.fromarray(np.full((64, 64, 3), 120, dtype=np.uint8))
    try:
        out = generate(pipeline, image, settings).frames
        order = pipeline.unet.down_blocks[0].downsamplers[0]._diffusers_hook._hook_order
        assert order.index("lowvram_spatial_chunk") < order.index("group_offloading")  # later = outer
    finally:
        clear_placement(pipeline)
    assert float(abs(out - reference).max()) <= 2e-4

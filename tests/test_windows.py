"""Temporal windows: weights, layout, exactness with one window, and a real windowed run of the demo model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowvram_studio.settings_adapter import generate
from lowvram_studio.engine.windows import (
    WindowConfig,
    frame_weights,
    seam_ratio,
    window_boundaries,
    window_starts,
    windowed_noise_prediction,
)
from lowvram_studio.settings import RunSettings, WindowBlend



@pytest.fixture(scope="module")
def tiny_settings() -> RunSettings:
    """The cheapest real run: 6 frames of 64x64, 2 steps (the machine's cores are shared)."""
    return RunSettings(height=64, width=64, num_frames=6, num_inference_steps=2, seed=0)


LAYOUTS = [(8, 4, 2), (25, 8, 3), (96, 25, 4), (14, 2, 0), (13, 5, 4), (7, 6, 1)]


@pytest.mark.parametrize("blend", list(WindowBlend))
@pytest.mark.parametrize("num_frames,size,overlap", LAYOUTS)
def test_window_weights_cover_every_frame_and_sum_to_one(num_frames, size, overlap, blend):
    config = WindowConfig(size, overlap, blend)
    for step in range(5):
        total = torch.zeros(num_frames, dtype=torch.float64)
        for frames, weight in frame_weights(num_frames, step, config):
            assert frames.stop - frames.start == size and 0 <= frames.start and frames.stop <= num_frames
            assert (weight > 0).all()
            total[frames] += weight
        assert torch.allclose(total, torch.ones(num_frames, dtype=torch.float64), atol=1e-12)


def test_window_offsets_shift_between_steps_but_stay_inside_the_clip():
    config = WindowConfig(8, 2, WindowBlend.PYRAMID)
    layouts = {tuple(window_starts(40, step, config)) for step in range(3)}
    assert len(layouts) == 3  # three phases of the shift
    assert all(starts[0] == 0 and starts[-1] == 40 - 8 for starts in layouts)
    assert window_starts(40, 3, config) == window_starts(40, 0, config)


def test_blended_windows_reproduce_a_frame_local_prediction():
    """With a prediction that depends on each frame alone, blending windows changes nothing: this pins
    the slicing of latents, frame indices and weights to the same frames."""
    latents = torch.randn(1, 19, 4, 3, 5, dtype=torch.float64)
    offsets = torch.arange(19, dtype=torch.float64).view(1, -1, 1, 1, 1)

    def predict(part, frames):
        return part * 2 + offsets[:, frames]

    whole = predict(latents, slice(0, 19))
    for blend in WindowBlend:
        for step in range(3):
            windowed = windowed_noise_prediction(predict, latents, step, WindowConfig(6, 2, blend))
            assert torch.allclose(windowed, whole, atol=1e-12)


def test_seam_ratio_sees_jumps_at_boundaries():
    smooth = np.linspace(0, 1, 12, dtype=np.float32)[:, None, None, None] * np.ones((12, 4, 4, 3), np.float32)
    assert seam_ratio(smooth, [4, 8]) == pytest.approx(1.0)
    jumpy = smooth.copy()
    jumpy[8:] += 0.5
    assert seam_ratio(jumpy, [4, 8]) > 2.0
    assert seam_ratio(smooth, []) is None
    assert window_boundaries(12, 0, WindowConfig(0)) == []


def test_one_window_spanning_the_clip_equals_the_plain_run(demo_pipeline, test_image, tiny_settings):
    plain = generate(demo_pipeline, test_image, tiny_settings)
    spanning = generate(demo_pipeline, test_image, tiny_settings.replace(window_frames=tiny_settings.num_frames))
    assert np.array_equal(plain.frames, spanning.frames)
    assert "seam_ratio" not in spanning.info


def test_windowed_run_feeds_the_unet_windows_and_records_the_seam_ratio(demo_pipeline, test_image, tiny_settings):
    seen = []
    handle = demo_pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[1], kwargs["added_time_ids"].clone())),
        with_kwargs=True,
    )
    try:
        result = generate(demo_pipeline, test_image, tiny_settings.replace(window_frames=4, overlap=2))
    finally:
        handle.remove()
    assert result.frames.shape == (tiny_settings.num_frames, 64, 64, 3)
    assert {frames for frames, _ in seen} == {4}
    assert all(torch.equal(ids, seen[0][1]) for _, ids in seen)  # every window: the same motion/fps ids
    assert len(seen) > tiny_settings.num_inference_steps  # several windows per step
    assert isinstance(result.info["seam_ratio"], float) and result.info["seam_ratio"] > 0
    assert result.info["windows"]["size"] == 4

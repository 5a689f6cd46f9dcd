"""The sampler on the real demo pipeline: determinism, fidelity to diffusers, events and cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowvram_studio.engine.events import CancelToken, Phase, RunCancelled
from lowvram_studio.engine.preview import split_preview
from lowvram_studio.settings_adapter import generate


def test_same_seed_gives_identical_frames(demo_pipeline, test_image, small_settings):
    first = generate(demo_pipeline, test_image, small_settings)
    second = generate(demo_pipeline, test_image, small_settings)
    assert np.array_equal(first.frames, second.frames)


def test_different_seed_gives_different_frames(demo_pipeline, test_image, small_settings):
    first = generate(demo_pipeline, test_image, small_settings)
    other = generate(demo_pipeline, test_image, small_settings.replace(seed=1))
    assert np.abs(first.frames - other.frames).mean() > 0.01


def test_frames_and_size_are_honoured(demo_pipeline, test_image, small_settings):
    settings = small_settings.replace(num_frames=5, height=64, width=128, num_inference_steps=2)
    result = generate(demo_pipeline, test_image.resize((128, 64)), settings)
    assert result.frames.shape == (5, 64, 128, 3)
    assert result.frames.dtype == np.float32
    assert 0.0 <= result.frames.min() and result.frames.max() <= 1.0


def test_output_equals_the_diffusers_pipeline(demo_pipeline, test_image, small_settings):
    s = small_settings
    reference = demo_pipeline(
        test_image,
        height=s.height,
        width=s.width,
        num_frames=s.num_frames,
        num_inference_steps=s.num_inference_steps,
        fps=s.fps,
        motion_bucket_id=s.motion_bucket_id,
        noise_aug_strength=s.noise_aug_strength,
        min_guidance_scale=s.min_guidance_scale,
        max_guidance_scale=s.max_guidance_scale,
        generator=torch.Generator().manual_seed(s.seed),
        output_type="np",
    ).frames[0]
    ours = generate(demo_pipeline, test_image, s).frames
    assert np.abs(ours - reference).max() <= 1e-6


def test_events_cover_every_phase_and_step(demo_pipeline, test_image, small_settings):
    seen = []
    result = generate(demo_pipeline, test_image, small_settings, on_event=seen.append)
    assert [split_preview(e)[0] for e in seen] == result.events  # the callback also gets preview frames
    phases = [e.phase for e in seen]
    assert phases[:2] == [Phase.LOAD, Phase.ENCODE] and phases[-1] == Phase.DECODE
    steps = [e.step for e in seen if e.phase == Phase.DENOISE]
    assert steps == list(range(small_settings.num_inference_steps + 1))
    times = [e.time for e in seen]
    assert times == sorted(times)
    assert result.seconds_per_step > 0


def test_cancel_stops_between_steps(demo_pipeline, test_image, small_settings):
    token = CancelToken()
    seen = []

    def on_event(event):
        seen.append(event)
        if event.phase == Phase.DENOISE and event.step == 1:
            token.cancel()

    with pytest.raises(RunCancelled):
        generate(demo_pipeline, test_image, small_settings, on_event=on_event, cancel=token)
    assert max(e.step for e in seen if e.phase == Phase.DENOISE) == 1
    assert Phase.DECODE not in [e.phase for e in seen]


def test_cancel_during_decode_stops_before_the_next_chunk(demo_pipeline, test_image, small_settings):
    """The token passed to generate reaches the decode (no thread-current token needed: the CLI's path)."""
    token = CancelToken()
    settings = small_settings.replace(decode_frames=1)
    seen = []

    def on_event(event):
        seen.append(event.phase)
        if event.phase == Phase.DECODE:
            token.cancel()

    with pytest.raises(RunCancelled):
        generate(demo_pipeline, test_image, settings, on_event=on_event, cancel=token)
    assert seen[-1] == Phase.DECODE

"""lowvram_studio.fit on a plain diffusers pipeline: pipe(...) runs with the plan's techniques inside the block
and the pipeline comes back exactly (weights, dtypes, devices, hooks, attributes) after it, errors included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowvram_studio
from lowvram_studio.fitting import FIT_HOOK
from lowvram_studio.models.demo import build_demo_pipeline
from lowvram_studio.settings import RunSettings, SettingsError

EVERY_TECHNIQUE = RunSettings(unet_dtype="bf16", cfg_split=True, spatial_chunk=1, temporal_chunk=16, ff_chunk=64,
                              offload="stream", vae_tile=64, decode_frames=2)
COMPONENTS = ("unet", "vae", "image_encoder")


def state_of(pipe) -> dict:
    """Everything fit could change: each tensor's values, dtype and device, each module's attributes and
    torch / diffusers / accelerate hooks, and the pipeline's attributes."""
    state = {"pipeline": sorted(pipe.__dict__)}
    for name in COMPONENTS:
        component = getattr(pipe, name)
        state[name] = {key: (t.dtype, t.device, t.detach().clone()) for key, t in component.state_dict().items()}
        state[name + " modules"] = [
            (path, sorted(module.__dict__), len(module._forward_hooks), len(module._forward_pre_hooks),
             hasattr(module, "_hf_hook"), hasattr(module, "_diffusers_hook"), "forward" in module.__dict__)
            for path, module in component.named_modules()
        ]
    return state


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if key in COMPONENTS:
            assert before[key].keys() == after[key].keys()
            for name, (dtype, device, value) in before[key].items():
                got = after[key][name]
                assert (got[0], got[1]) == (dtype, device), f"{key}.{name}"
                assert torch.equal(got[2], value), f"{key}.{name} changed"
        else:
            assert before[key] == after[key], key


def clip(pipe, image, **kwargs):
    generator = torch.Generator().manual_seed(0)
    out = pipe(image, height=64, width=64, num_frames=4, num_inference_steps=2, generator=generator,
               output_type="np", **kwargs)
    return np.asarray(out.frames[0], dtype=np.float32)


def test_leaving_fit_restores_the_pipeline_exactly_after_every_technique_ran(test_image):
    pipe = build_demo_pipeline()
    before = state_of(pipe)
    with lowvram_studio.fit(pipe, budget=None, height=64, width=64, num_frames=4, device="cpu",
                            settings=EVERY_TECHNIQUE) as plan:
        assert pipe.unet.dtype == torch.bfloat16 and plan.settings.cfg_split
        frames = clip(pipe, test_image)
    assert frames.shape == (4, 64, 64, 3) and np.isfinite(frames).all()
    assert_same(before, state_of(pipe))


def test_an_error_inside_the_block_still_restores_the_pipeline():
    pipe = build_demo_pipeline()
    before = state_of(pipe)
    with pytest.raises(RuntimeError, match="the user's own error"):
        with lowvram_studio.fit(pipe, budget=None, height=64, width=64, num_frames=4, device="cpu",
                                settings=EVERY_TECHNIQUE):
            raise RuntimeError("the user's own error")
    assert_same(before, state_of(pipe))


def test_lossless_techniques_leave_the_pipelines_own_frames_unchanged(test_image):
    pipe = build_demo_pipeline()
    plain = clip(pipe, test_image)
    lossless = RunSettings(unet_dtype="fp32", cfg_split=True, spatial_chunk=1, temporal_chunk=16, ff_chunk=64)
    with lowvram_studio.fit(pipe, budget=None, height=64, width=64, num_frames=4, device="cpu", settings=lossless):
        assert pipe.unet._diffusers_hook.get_hook("lowvram_fit_unet") is not None
        fitted = clip(pipe, test_image)
    # fp32 sums taken in other groupings: the bound tests/test_chunking.py holds the engine's frames to
    assert np.abs(fitted - plain).max() <= 2e-4


def test_a_clip_longer_than_the_model_was_trained_on_is_refused_with_the_way_out():
    pipe = build_demo_pipeline()
    native = int(pipe.unet.config.num_frames)
    with pytest.raises(SettingsError, match="cannot run temporal windows: ask for fewer frames or use generate"):
        with lowvram_studio.fit(pipe, budget="4GB", height=64, width=64, num_frames=native + 8, device="cpu"):
            pass


def test_fit_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(SettingsError, match="needs a CUDA GPU.*device='cpu'"):
        with lowvram_studio.fit(build_demo_pipeline(), budget="6GB"):
            pass


def test_the_fit_hook_keeps_running_when_the_placement_removes_one_of_its_own_hooks(test_image):
    """On a GPU, group offloading with streams removes its lazy-prefetch hook from the UNet after the first
    call; diffusers' remove_hook then skipped a fit hook registered above it, so every later step sent fp32
    inputs into the fp16 UNet ("mat1 and mat2 must have the same dtype", bench/results/fit_20261207.md).
    Here the placement's top-level hook is removed the same way, by diffusers' own call, after entry."""
    pipe = build_demo_pipeline()
    settings = RunSettings(unet_dtype="fp16", half_compute="fp16", offload="stream")
    with lowvram_studio.fit(pipe, budget=None, height=64, width=64, num_frames=4, device="cpu", settings=settings):
        registry = pipe.unet._diffusers_hook
        placed = [name for name in registry._hook_order if name != FIT_HOOK]
        assert placed, "streaming put no hook on the UNet's top level"
        for name in placed:
            registry.remove_hook(name, recurse=False)
        frames = clip(pipe, test_image)
    assert frames.shape == (4, 64, 64, 3) and np.isfinite(frames).all()

"""Pruning / feature reuse on the real demo pipeline: exactness when off, what each mode reuses, the map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lowvram_studio.engine.events import Phase
from lowvram_studio.engine.pruning import group_frames, neighbour_distances
from lowvram_studio.engine.pruning_config import GHOSTING_BELOW, PruningConfig, ghosting_warning
from lowvram_studio.engine.pruning_hooks import deep_branch
from lowvram_studio.engine.pruning_record import MapCode, draw_pruning_map
from lowvram_studio.settings_adapter import generate
from lowvram_studio.settings import RunSettings


@pytest.fixture(scope="module")
def settings() -> RunSettings:
    return RunSettings(height=64, width=64, num_frames=6, num_inference_steps=5, seed=0)


@pytest.fixture(scope="module")
def same_latent(settings) -> torch.Tensor:
    """One latent copied to every frame: the start a perfectly static clip gives."""
    one = torch.randn((1, 1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    return one.repeat(1, settings.num_frames, 1, 1, 1)


@pytest.fixture(scope="module")
def reference(demo_pipeline, test_image, settings):
    return generate(demo_pipeline, test_image, settings)


@pytest.fixture(scope="module")
def static_run(demo_pipeline, test_image, settings, same_latent):
    """Both modes, from the same latent in every frame: the map holds every kind of cell."""
    return generate(
        demo_pipeline, test_image, settings.replace(prune_threshold=0.05, prune_mode="both"), latents=same_latent
    )


def test_threshold_zero_gives_exactly_the_unpruned_output(demo_pipeline, test_image, settings, reference):
    off = generate(demo_pipeline, test_image, settings.replace(prune_threshold=0.0, prune_mode="both"))
    assert np.array_equal(off.frames, reference.frames)
    assert "pruning" not in off.info


def test_threshold_that_never_triggers_changes_nothing(demo_pipeline, test_image, settings, reference):
    hooked = generate(demo_pipeline, test_image, settings.replace(prune_threshold=1e-9, prune_mode="both"))
    assert np.array_equal(hooked.frames, reference.frames)
    assert hooked.info["pruning"]["pruned_fraction"] == 0.0


def test_hooks_are_removed_after_a_pruned_run(demo_pipeline, static_run):
    registries = [m._diffusers_hook for m in demo_pipeline.unet.modules() if hasattr(m, "_diffusers_hook")]
    assert all(not registry.hooks for registry in registries)


def test_same_latent_in_every_frame_prunes_far_more_across_frames(demo_pipeline, test_image, settings, same_latent):
    frames_mode = settings.replace(prune_threshold=0.012, prune_mode="frames")
    static = generate(demo_pipeline, test_image, frames_mode, latents=same_latent).info["pruning"]
    noisy = generate(demo_pipeline, test_image, frames_mode).info["pruning"]
    assert static["neighbour_fraction"] >= 0.3
    assert noisy["neighbour_fraction"] <= 0.05
    assert static["speedup_estimate"] > noisy["speedup_estimate"]


def test_pruned_fraction_grows_monotonically_with_threshold(demo_pipeline, test_image, settings):
    fractions = []
    for threshold in (0.001, 0.05, 1.0):
        run = generate(demo_pipeline, test_image, settings.replace(prune_threshold=threshold, prune_mode="steps"))
        fractions.append(run.info["pruning"]["pruned_fraction"])
    assert fractions == sorted(fractions)
    assert fractions[-1] > fractions[0]
    # First and last steps always compute, so even threshold 1 leaves them: at most (steps - 2) / steps.
    assert fractions[-1] <= (settings.num_inference_steps - 2) / settings.num_inference_steps


def test_map_shape_and_counts_match_the_run_events(static_run, settings):
    info = static_run.info["pruning"]
    grid = np.array(info["map"])
    assert grid.shape == (settings.num_frames, settings.num_inference_steps)
    steps = [e for e in static_run.events if e.phase == Phase.DENOISE and e.step]
    assert len(steps) == grid.shape[1]
    for event, column in zip(steps, grid.T):
        assert event.data == {
            "computed": int((column == MapCode.COMPUTED).sum()),
            "from_neighbour": int((column == MapCode.NEIGHBOUR).sum()),
            "from_previous_step": int((column == MapCode.PREVIOUS_STEP).sum()),
        }
    assert set(np.unique(grid)) == {MapCode.COMPUTED, MapCode.NEIGHBOUR, MapCode.PREVIOUS_STEP}
    assert info["pruned_fraction"] == pytest.approx((grid != 0).mean())
    assert info["neighbour_fraction"] + info["previous_step_fraction"] == pytest.approx(info["pruned_fraction"])
    assert (grid[:, 0] != MapCode.PREVIOUS_STEP).all() and (grid[:, -1] != MapCode.PREVIOUS_STEP).all()
    assert (grid[0] != MapCode.NEIGHBOUR).all()  # the first frame is always an anchor
    assert info["speedup_estimate"] > 1.0


def test_flop_estimate_matches_torch_flop_counter(demo_pipeline, reference, static_run, settings):
    """The hand FLOP count of a full UNet call equals torch's counter (within 2 %) on the same call.

    The math attention backend runs attention as matmuls, which the counter sees (the CPU flash kernel it misses).
    """
    unet = demo_pipeline.unet
    sample = torch.randn(2, settings.num_frames, 8, 8, 8)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(1.0), torch.randn(2, 1, 64), torch.randn(2, 3), return_dict=False)
    per_call = static_run.info["pruning"]["full_tflop"] * 1e12 / settings.num_inference_steps
    assert per_call == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_frames_group_with_their_anchor_not_a_chain():
    base = torch.ones(4, 3)
    frames = torch.stack([base, base * 1.006, base * 1.012, base * 1.018])
    source = group_frames(neighbour_distances(frames), threshold=0.01)
    assert source == [0, 0, 2, 2]  # frame 2 is 1.2 % from frame 0 although 0.6 % from frame 1


def test_map_is_drawn_as_an_image(static_run):
    image = draw_pruning_map(static_run.info["pruning"]["map"], title="demo")
    assert image.mode == "RGB" and image.width > 100 and image.height > 100
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 3


def test_ghosting_warning_below_the_write_ups_limit():
    assert ghosting_warning(GHOSTING_BELOW / 2) is not None
    assert ghosting_warning(0.0) is None and ghosting_warning(0.012) is None


def test_bad_pruning_knobs_name_the_fix():
    settings = RunSettings(prune_threshold=0.012, extra={"prune_max_reuse": -1})
    with pytest.raises(ValueError, match="prune_max_reuse"):
        PruningConfig.from_knobs(settings.prune_threshold, settings.prune_mode, settings.extra)


def test_finer_branch_keeps_only_conv_in_and_the_last_up_layer(demo_pipeline):
    unet = demo_pipeline.unet
    whole, finest = deep_branch(unet, None), deep_branch(unet, 0)
    assert whole.signal[0] == "down_blocks.0" and whole.cache_point[0] == f"up_blocks.{len(unet.up_blocks) - 2}"
    last_up = f"up_blocks.{len(unet.up_blocks) - 1}"
    assert finest.signal[0] == "conv_in"
    assert finest.cache_point[0] == f"{last_up}.attentions.{len(unet.up_blocks[-1].resnets) - 2}"
    skipped = {name for name, _ in finest.skipped}
    assert {"down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0", f"{last_up}.resnets.0"} <= skipped
    assert deep_branch(unet, 99).cache_point[0] == whole.cache_point[0]  # more layers than the block has: all


def test_finer_branch_reuses_and_costs_less_per_reused_step(demo_pipeline, test_image, settings, reference):
    """Uniform reuse (threshold 1) with the whole-block and the conv_in-only branch: same map, the finer
    branch skips more FLOPs; a threshold that never triggers leaves the frames exactly unchanged."""
    runs = {}
    for layers in (None, 0):
        extra = {"prune_branch_layers": layers, "prune_max_reuse": 3}
        runs[layers] = generate(
            demo_pipeline, test_image, settings.replace(prune_threshold=1.0, prune_mode="steps", extra=extra)
        )
    whole, finest = runs[None].info["pruning"], runs[0].info["pruning"]
    assert whole["map"] == finest["map"] and finest["previous_step_fraction"] > 0
    assert finest["speedup_estimate"] > whole["speedup_estimate"] > 1.0
    assert not np.array_equal(runs[0].frames, reference.frames)
    never = settings.replace(prune_threshold=1e-9, prune_mode="steps", extra={"prune_branch_layers": 0})
    assert np.array_equal(generate(demo_pipeline, test_image, never).frames, reference.frames)

"""RunSettings validation speaks to users; JSON round trips exactly."""

from __future__ import annotations

import pytest

from lowvram_studio.settings import OffloadMode, Precision, RunSettings, SettingsError, budget_gib


def test_defaults_are_valid():
    assert RunSettings().validate() == RunSettings()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"height": 500}, "height must be a multiple of 16 between 64 and 2048; got 500"),
        ({"width": 0}, "width must be a multiple of 16"),
        ({"num_frames": 1}, "num_frames must be between 2 and 256; got 1"),
        ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 200; got 0"),
        ({"seed": -1}, "seed must be a whole number"),
        ({"min_guidance_scale": 4.0, "max_guidance_scale": 2.0}, "must not exceed max_guidance_scale"),
        ({"window_frames": 1}, "window_frames must be 0 (whole clip) or at least 2 frames; got 1"),
        ({"window_frames": 4, "overlap": 4}, "overlap must be at least 0 and smaller than window_frames (4); got 4"),
        ({"vae_tile": 50}, "vae_tile must be 0 (off) or a multiple of 8 of at least 64 pixels; got 50"),
        ({"prune_threshold": 2.0}, "prune_threshold must be between 0 (off) and 1; got 2.0"),
        ({"vram_budget": "lots"}, "vram_budget must be one of off, auto, 4GB"),
        ({"interpolate": 3}, "interpolate must be 1, 2 or 4; got 3"),
        ({"prune_threshold": 0.02, "window_frames": 4}, "pruning (prune_threshold) and temporal windows (window_frames)"),
    ],
)
def test_bad_values_are_rejected_with_a_message(changes, message):
    with pytest.raises(SettingsError) as caught:
        RunSettings(**changes).validate()
    assert message in str(caught.value)


def test_every_problem_is_reported_at_once():
    problems = RunSettings(height=500, width=70, num_frames=0).problems()
    assert len(problems) == 3


def test_json_round_trip_keeps_every_field():
    settings = RunSettings(height=576, width=1024, num_frames=25, unet_dtype=Precision.FP16,
                           offload=OffloadMode.STREAM, prune_threshold=0.012, vram_budget="6GB", interpolate=2)
    again = RunSettings.from_json(settings.to_json())
    assert again == settings
    assert again.offload is OffloadMode.STREAM


def test_enum_strings_are_checked():
    with pytest.raises(SettingsError, match='offload must be one of none, model, stream; got "disk" \\(str\\)'):
        RunSettings.from_dict({"offload": "disk"})


def test_unknown_keys_are_named_or_skipped_leniently():
    with pytest.raises(SettingsError, match="unknown setting"):
        RunSettings.from_dict({"frobnicate": 1})
    settings, unknown = RunSettings.from_dict_lenient({"frobnicate": 1, "seed": 5})
    assert settings.seed == 5 and unknown == ["frobnicate"]


def test_lossy_settings_are_named():
    assert RunSettings(unet_dtype=Precision.FP32).lossy_settings() == []
    lossy = RunSettings(unet_dtype=Precision.FP16, prune_threshold=0.01, interpolate=2).lossy_settings()
    assert lossy == ["unet_dtype", "prune_threshold", "interpolate"]


def test_budget_strings_parse():
    assert budget_gib("6GB") == 6.0 and budget_gib("5.5gb") == 5.5
    assert budget_gib("auto") is None and budget_gib("off") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"noise_aug_strength": "abc"}, 'noise_aug_strength must be a number (float); got "abc" (str)'),
        ({"seed": True}, "seed must be a whole number (int); got true (bool)"),
        ({"seed": 1.5}, "seed must be a whole number (int); got 1.5 (float)"),
        ({"extra": "hello"}, 'extra must be an object of named values (dict); got "hello" (str)'),
        ({"cfg_split": "yes"}, 'cfg_split must be true or false (bool); got "yes" (str)'),
        ({"interpolate": True}, "interpolate must be a whole number (int); got true (bool)"),
        ({"prune_threshold": [1]}, "prune_threshold must be a number (float); got [1] (list)"),
        ({"vram_budget": 6}, "vram_budget must be text (str); got 6 (int)"),
        ({"offload": None}, "offload must be one of none, model, stream; got null"),
        ({"device": 5}, "device must be one of auto, cpu, cuda; got 5 (int)"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_field_the_type_and_the_value(data, message):
    with pytest.raises(SettingsError) as caught:
        RunSettings.from_dict(data)
    assert caught.value.problems == [message]
    with pytest.raises(SettingsError) as lenient:  # records and queue entries take this path
        RunSettings.from_dict_lenient(data)
    assert lenient.value.problems == [message]


def test_validate_checks_types_before_values_instead_of_failing_on_a_comparison():
    settings = RunSettings(seed=True, noise_aug_strength="abc", min_guidance_scale="x", height=500)  # type: ignore[arg-type]
    assert settings.problems() == [
        "seed must be a whole number (int); got true (bool)",
        'noise_aug_strength must be a number (float); got "abc" (str)',
        'min_guidance_scale must be a number (float); got "x" (str)',
    ]
    with pytest.raises(SettingsError, match="seed must be a whole number"):
        settings.validate()


def test_every_default_has_its_fields_type_and_whole_numbers_count_as_numbers():
    assert RunSettings().problems() == []
    settings = RunSettings.from_dict({"noise_aug_strength": 0, "max_guidance_scale": 3})
    assert settings.noise_aug_strength == 0.0 and isinstance(settings.noise_aug_strength, float)
    assert isinstance(settings.max_guidance_scale, float) and settings.validate() == settings
    assert RunSettings.from_dict({"offload": "STREAM"}).offload is OffloadMode.STREAM


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"prune_step_signal": "zzz"}, "extra prune_step_signal must be one of input, shallow; got 'zzz'"),
        ({"prune_frame_signal": 3}, "extra prune_frame_signal must be one of latents, denoised; got 3"),
        ({"prune_motion_adaptive": "no"}, "extra prune_motion_adaptive must be true or false; got 'no'"),
        ({"prune_large_motion": "abc"}, "extra prune_large_motion must be a number; got 'abc'"),
        ({"prune_max_reuse": -1}, "prune_max_reuse must be a whole number of steps, 0 or more; got -1"),
    ],
)
def test_bad_pruning_knobs_in_extra_are_settings_problems_not_run_failures(extra, message):
    settings = RunSettings(prune_threshold=0.02, extra=extra)
    with pytest.raises(SettingsError) as caught:
        settings.validate()
    assert message in str(caught.value) and "fix it in the settings' extra" in str(caught.value)


def test_good_pruning_knobs_in_extra_pass():
    RunSettings(prune_threshold=0.02, extra={"prune_step_signal": "input", "prune_motion_adaptive": True,
                                             "prune_large_motion": 1, "prune_branch_layers": None}).validate()

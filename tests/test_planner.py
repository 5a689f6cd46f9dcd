"""Planner: predictions, monotone tightening with reasons, calibration; OOM re-planning on the real demo run."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from lowvram_studio.engine.events import Phase
from lowvram_studio.engine.oom import OutOfMemoryAfterRetries
from lowvram_studio.settings_adapter import generate, step_config
from lowvram_studio.engine.speed_model import CardSpeed
from lowvram_studio.models.svd_configs import SVD_XT_UNET_CONFIG
from lowvram_studio.engine.dims import ModelDims
from lowvram_studio.plan.budgets import PRESETS, Budget, budget_for
from lowvram_studio.plan.memory_model import SVD_XT_DIMS, MemoryModel, calibrate, phase_features
from lowvram_studio.plan.planner import Planner, plan_for_settings
from lowvram_studio.plan.replan import decode_retry, run_with_replan
from lowvram_studio.settings import OffloadMode, Precision, RunSettings

CASES = {"A": (512, 512, 24), "B": (576, 1024, 25), "C": (512, 512, 96)}


def _case(name: str) -> RunSettings:
    height, width, frames = CASES[name]
    return RunSettings(height=height, width=width, num_frames=frames, unet_dtype="fp16", vae_dtype="fp16",
                       encoder_dtype="fp16")


def _looseness(settings: RunSettings) -> tuple:
    """Per knob, a number that only falls as settings tighten (0 = off counts as the loosest)."""
    def size(value: int) -> float:
        return math.inf if value == 0 else value

    return (
        not settings.cfg_split,
        size(settings.ff_chunk),
        size(settings.spatial_chunk),
        size(settings.temporal_chunk),
        -list(OffloadMode).index(settings.offload),
        size(settings.vae_tile),
        size(settings.decode_frames),
        size(settings.window_frames),
        settings.unet_dtype != Precision.FP8,
        -settings.interpolate,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_choices_tighten_monotonically_as_the_budget_shrinks_and_carry_reasons(case):
    planner = Planner(SVD_XT_DIMS)
    ladder = planner.ladder(_case(case), 400)
    previous = None
    for gib in np.arange(40, 0.5, -0.25):
        budget = Budget(f"{gib}GB", gib * 1024, 400)
        plan = planner.plan(_case(case), budget)
        assert plan.fits == (plan.prediction.peak_mib <= budget.plan_to_mib)
        assert len(plan.reasons) >= plan.rung and all(isinstance(r, str) and r for r in plan.reasons)
        # the relax pass only loosens the rung it starts from, knob by knob
        assert all(new >= old for new, old in zip(_looseness(plan.settings), _looseness(ladder[plan.rung].settings)))
        if previous is not None:
            assert plan.rung >= previous.rung
            rung, previous_rung = ladder[plan.rung].settings, ladder[previous.rung].settings
            assert all(new <= old for new, old in zip(_looseness(rung), _looseness(previous_rung)))
        previous = plan
    assert previous.rung > 5  # a 0.75 GiB budget forces many moves
    assert not previous.fits and "lower the size" in previous.reasons[-1]


def test_moves_a_later_move_made_unneeded_are_loosened_again_lossy_ones_first():
    """SVD-XT at 576x1024x25 in 8 GB (the fit() path: no model offload): the ladder serves the decode peak
    first, then needs weight streaming for the denoise loop; with the weights streamed, decoding 8 frames
    at a time and the chunked layers are no longer needed (bench/results/fit_20261207b.md ran them all)."""
    planner = Planner(SVD_XT_DIMS, auto_fp32_compute=False)
    request = RunSettings(height=576, width=1024, num_frames=25, device="cuda")
    moves = ("cfg_split", "ff_chunk", "spatial_chunk", "temporal_chunk", "offload_stream", "vae_tile", "decode_frames")
    plan = planner.plan(request, PRESETS["8GB"], allowed=moves)
    rung = planner.ladder(request, PRESETS["8GB"].context_mib, moves)[plan.rung].settings
    assert plan.fits and plan.prediction.peak_mib <= PRESETS["8GB"].plan_to_mib
    assert rung.decode_frames == 8 and rung.spatial_chunk and rung.offload == OffloadMode.STREAM
    assert plan.settings.decode_frames == 0 and plan.settings.spatial_chunk == 0  # undone
    assert plan.settings.offload == OffloadMode.STREAM  # still needed: the denoise loop does not fit without it
    assert plan.settings.offload != OffloadMode.MODEL  # never a mode the allowed moves cannot choose
    undone = [reason for reason in plan.reasons if reason.startswith(("undone", "loosened again"))]
    assert undone and "decode 8 frame(s)" in undone[0]  # the lossy one first
    assert len(plan.summary()) == len(plan.reasons) + 1


def test_lossless_moves_come_before_lossy_ones_when_they_suffice():
    planner = Planner(SVD_XT_DIMS)
    request = _case("A").replace(decode_frames=2)  # decode already small: the UNet sets the peak
    plan = planner.plan(request, Budget("tight", planner.predict(request).peak_mib * 0.8, 600))
    assert plan.fits
    assert plan.settings.lossy_settings() == request.lossy_settings()
    assert plan.settings.cfg_split and "lossless" in plan.reasons[0]


def test_every_preset_yields_a_plan_and_a_long_clip_costs_no_more_than_a_short_one():
    planner = Planner(SVD_XT_DIMS)
    for name, budget in PRESETS.items():
        short, long = planner.plan(_case("A"), budget), planner.plan(_case("C"), budget)
        assert short.summary()[0].startswith("predicted peak")
        if short.fits and long.fits:
            assert long.prediction.peak_mib <= 1.1 * short.prediction.peak_mib, name
    long = planner.plan(_case("C"), PRESETS["24GB"])
    assert long.settings.window_frames == SVD_XT_DIMS.native_frames and "trained on 25" in long.reasons[0]
    assert budget_for("6GB", planner.model) is PRESETS["6GB"]
    assert budget_for("5GB", planner.model).total_mib == 5 * 1024
    assert budget_for("off", planner.model) is None


def test_calibrate_recovers_a_known_memory_model():
    truth = MemoryModel.load()
    truth.coefficients = {k: v * (1.3 if i % 2 else 0.8) for i, (k, v) in enumerate(sorted(truth.coefficients.items()))}
    variants = [
        {}, {"cfg_split": True}, {"cfg_split": True, "ff_chunk": 4096}, {"decode_frames": 2},
        {"decode_frames": 1, "vae_tile": 256}, {"offload": "model", "decode_frames": 2},
        {"offload": "stream", "cfg_split": True, "decode_frames": 2}, {"spatial_chunk": 2, "temporal_chunk": 512},
        {"window_frames": 8, "decode_frames": 4}, {"unet_dtype": "fp8", "offload": "model", "decode_frames": 1},
    ]
    rows = []
    for case in CASES:
        for change in variants:
            settings = _case(case).replace(**change)
            rows.append({"dims": SVD_XT_DIMS, "settings": settings.to_dict(), "context_mib": 600,
                         "process_peak_mib": truth.predict(SVD_XT_DIMS, settings, 600).peak_mib})
    fitted = calibrate(rows)
    for row in rows:
        settings = RunSettings.from_dict(row["settings"])
        predicted = fitted.predict(SVD_XT_DIMS, settings, 600).peak_mib
        assert predicted == pytest.approx(row["process_peak_mib"], rel=0.02)


# ---- the user's card: streaming where it is nearly free ------------------------------------------------
def _card(name: str) -> CardSpeed:
    card, known = CardSpeed.for_gpu(SVD_XT_UNET_CONFIG, name)
    assert known, name
    return card


def _first_lossy(reasons: list[str]) -> int:
    return next(i for i, reason in enumerate(reasons) if "(lossy" in reason)


def test_on_a_gtx_1060_the_6gb_plan_streams_before_any_lossy_move_and_needs_fewer_chunks():
    today = Planner(SVD_XT_DIMS).plan(_case("B"), PRESETS["6GB"])
    slow_card = Planner(SVD_XT_DIMS, speed=_card("NVIDIA GeForce GTX 1060 6GB")).plan(_case("B"), PRESETS["6GB"])
    assert slow_card.fits and slow_card.settings.offload == OffloadMode.STREAM
    streaming = next(i for i, reason in enumerate(slow_card.reasons) if "streaming" in reason)
    assert streaming < _first_lossy(slow_card.reasons) and "GTX 1060" in slow_card.reasons[streaming]
    streamed_today = [i for i, reason in enumerate(today.reasons) if "streaming" in reason]
    assert not streamed_today or streamed_today[0] > _first_lossy(today.reasons)  # today: lossy first, if at all
    assert slow_card.settings.lossy_settings() == today.settings.lossy_settings()  # no lossier than today
    assert slow_card.rung < today.rung  # streamed weights leave room: fewer (slower) chunking moves


def test_where_streaming_costs_time_the_ladder_stays_as_without_a_card():
    card = _card("NVIDIA H100 80GB HBM3")  # transfer-bound streaming: the deep groups wait for PCIe
    for case in CASES:
        planned = Planner(SVD_XT_DIMS).base(_case(case))[0]  # case C runs in 25-frame windows
        assert card.streaming_overhead(step_config(planned, card.gpu.info)) > 0.05
        for budget in ("4GB", "6GB"):
            plain = Planner(SVD_XT_DIMS).plan(_case(case), PRESETS[budget])
            fast = Planner(SVD_XT_DIMS, speed=card).plan(_case(case), PRESETS[budget])
            assert (fast.settings, fast.reasons) == (plain.settings, plain.reasons)


def test_a_request_that_fits_is_not_streamed_even_where_streaming_is_free():
    planner = Planner(SVD_XT_DIMS, speed=_card("NVIDIA GeForce GTX 1060 6GB"))
    plan = planner.plan(_case("A"), PRESETS["24GB"].__class__("huge", 200 * 1024, 800))
    assert plan.rung == 0 and plan.settings.offload == OffloadMode.NONE


# ---- out-of-memory re-planning, on the real demo pipeline ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_settings() -> RunSettings:
    return RunSettings(height=64, width=64, num_frames=6, num_inference_steps=2, seed=0)


def _raise_oom(what: str):
    raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({what}, raised by the test)")


def test_out_of_memory_replans_records_and_keeps_the_denoised_result(demo_pipeline, test_image, tiny_settings):
    calls = []

    def unet_hook(module, args):
        calls.append("unet")
        if calls.count("unet") == 1:  # the first UNet call of the first attempt runs out of memory
            _raise_oom("denoise")

    def decoder_hook(module, args):
        calls.append("decode")
        if args[0].shape[0] > 2:  # the decoder only fits two frames at a time
            _raise_oom("decode")

    planner = Planner(ModelDims.from_pipeline(demo_pipeline), device_type="cpu")
    events = []
    handles = [demo_pipeline.unet.register_forward_pre_hook(unet_hook),
               demo_pipeline.vae.decoder.register_forward_pre_hook(decoder_hook)]
    try:
        result = run_with_replan(
            lambda settings, on_event: generate(demo_pipeline, test_image, settings, on_event=on_event,
                                                decode_retry=decode_retry(planner)),
            tiny_settings, planner, on_event=events.append,
        )
    finally:
        for handle in handles:
            handle.remove()
    assert result.frames.shape == (6, 64, 64, 3)
    retries = result.info["oom_retries"]
    assert [r["phase"] for r in retries][0] == Phase.DENOISE.value
    assert retries[0]["changed_settings"]["cfg_split"] == [False, True]
    assert {r["phase"] for r in retries[1:]} == {Phase.DECODE.value}
    ran_chunk = retries[-1]["changed_settings"]["decode_frames"][1]
    assert ran_chunk <= 2 and result.settings.decode_frames == ran_chunk  # the result names what ran (#18.3)
    assert result.settings.cfg_split  # and the denoise re-plan too
    messages = [e.message for e in events if e.message]
    assert messages == [r["message"] for r in retries] and "Out of GPU memory during denoise" in messages[0]
    first_decode = calls.index("decode")
    assert "unet" not in calls[first_decode:]  # decode retries did not re-run the denoise loop


def test_retries_are_bounded_and_end_in_a_clear_error(demo_pipeline, test_image, tiny_settings):
    planner = Planner(ModelDims.from_pipeline(demo_pipeline), device_type="cpu")
    attempts = []

    def always_out_of_memory(settings, on_event):
        attempts.append(settings)
        _raise_oom("always")

    with pytest.raises(OutOfMemoryAfterRetries, match="lower the size"):
        run_with_replan(always_out_of_memory, tiny_settings, planner, max_retries=2)
    assert len(attempts) == 3
    for tighter, looser in zip(attempts[1:], attempts):
        assert all(new <= old for new, old in zip(_looseness(tighter), _looseness(looser)))
        assert _looseness(tighter) != _looseness(looser)


def test_a_narrower_model_is_predicted_with_proportionally_smaller_activations():
    """The coefficients are SVD-XT's; the demo model (first-level channels 32 of 320, VAE 32 of 128) scales them."""
    from lowvram_studio.models.demo import build_demo_pipeline

    demo = ModelDims.from_pipeline(build_demo_pipeline(), "demo")
    assert (demo.unet_width, demo.vae_width) == (0.1, 0.25)
    settings = RunSettings(height=512, width=512, num_frames=14)
    wide = replace(demo, unet_width=1.0, vae_width=1.0)
    for phase, name, width in ((Phase.DENOISE, "unet_spatial", 0.1), (Phase.DECODE, "vae_decode", 0.25)):
        narrow, full = phase_features(demo, settings, phase)[name], phase_features(wide, settings, phase)[name]
        assert narrow == pytest.approx(full * width)
    assert SVD_XT_DIMS.unet_width == SVD_XT_DIMS.vae_width == 1.0  # what the coefficients were fitted on


def test_a_pascal_card_plans_for_fp32_activations_of_fp16_weights():
    """GTX 1060: fp16 weights compute in fp32 there, so the same request needs more denoise memory."""
    from lowvram_studio.engine.precision import GpuInfo

    request = RunSettings(height=576, width=1024, num_frames=25, device="cuda", unet_dtype="fp16", cfg_split=True)
    pascal = Planner.for_gpu(SVD_XT_DIMS, GpuInfo("NVIDIA GeForce GTX 1060 6GB", (6, 1)))
    turing = Planner.for_gpu(SVD_XT_DIMS, GpuInfo("NVIDIA GeForce RTX 2060", (7, 5)))
    assert pascal.auto_fp32_compute and not turing.auto_fp32_compute
    assert pascal.predict(request).phases["denoise"] > turing.predict(request).phases["denoise"] + 1024
    forced = turing.predict(request.replace(half_compute="fp32")).phases["denoise"]
    assert forced == pascal.predict(request).phases["denoise"]


def test_no_budget_never_decodes_all_frames_at_once_when_that_alone_sets_the_peak():
    """Default precision (VAE fp32) at case B: an all-frames decode is predicted far above the denoise loop,
    so without a budget the decode runs in the fewest equal chunks, of at least 8 frames (issue 21, item 11)."""
    settings = _case("B").replace(vae_dtype="fp32")
    planner = Planner(SVD_XT_DIMS)
    before = planner.predict(settings)
    assert before.peak_phase == "decode"  # the premise: decode alone sets this run's peak
    plan = plan_for_settings(planner, settings)
    assert plan is not None and plan.budget is None and plan.fits
    assert plan.settings.decode_frames == 9  # 9 + 9 + 7: the fewest equal chunks of at least 8 frames
    assert plan.prediction.phases["decode"] < before.phases["decode"] / 2
    assert "set decode_frames to 25" in plan.reasons[0] and "never cuts below 8" in plan.reasons[0]
    assert plan.settings.replace(decode_frames=0) == settings  # nothing else changed


def test_no_budget_stops_at_the_first_chunk_that_brings_decode_under_the_other_phases():
    """A VAE a fifth as hungry (a model with a lighter decoder): the decode then fits under the denoise
    peak above the 8-frame floor, and the rule picks the fewest chunks that do, no more."""
    model = MemoryModel.load()
    light = MemoryModel({**model.coefficients, "vae_decode": model.coefficients["vae_decode"] / 5}, model.context_mib)
    planner = Planner(SVD_XT_DIMS, model=light)
    settings = _case("B").replace(vae_dtype="fp32", num_frames=48, window_frames=24)
    plan = planner.no_budget(settings)
    assert plan is not None and "still above" not in plan.reasons[0]
    chunk, phases = plan.settings.decode_frames, plan.prediction.phases
    assert chunk >= 8 and phases["decode"] <= phases["denoise"]
    fewer = settings.replace(decode_frames=math.ceil(48 / (math.ceil(48 / chunk) - 1)))
    assert planner.predict(fewer).phases["decode"] > phases["denoise"]


@pytest.mark.parametrize("change", [
    {"decode_frames": 25},  # the user asked for all frames at once by naming the frame count
    {"vae_tile": 256},  # the user already chose how to decode
    {"vae_dtype": "fp16", "height": 256, "width": 256, "num_frames": 4},  # decode sets the peak by only 10 %
])
def test_no_budget_keeps_the_users_decode(change):
    settings = _case("B").replace(vae_dtype="fp32").replace(**change)
    assert plan_for_settings(Planner(SVD_XT_DIMS), settings) is None


def test_no_budget_on_the_cpu_changes_nothing():
    assert plan_for_settings(Planner(SVD_XT_DIMS, device_type="cpu"), _case("B").replace(vae_dtype="fp32")) is None


# ---- Wan: its own memory model and moves ----------------------------------------------------------------
def _wan_request(height: int, width: int, frames: int) -> RunSettings:
    return RunSettings(height=height, width=width, num_frames=frames, device="cuda", prompt="a red ball",
                       guidance_scale=5.0, vae_dtype="fp32", encoder_dtype="auto", unet_dtype="auto")


def test_wan_budgets_are_planned_with_wans_memory_model_and_only_its_moves():
    from lowvram_studio.models.wan_configs import ti2v_5b_dims

    dims = ti2v_5b_dims()
    assert dims.kind == "wan" and dims.latent_frames(81) == 21 and dims.tokens_per_latent_frame(480, 832) == 15 * 26
    planner = Planner(dims)  # Wan's moves: its family's
    assert planner.model.source.startswith("calibrated on") and "dit_tokens" in planner.model.coefficients
    for frames, budget in ((81, "8GB"), (121, "12GB"), (85, "4GB")):
        request = _wan_request(480, 832, frames)
        plan = planner.plan(request, PRESETS[budget])
        settings = plan.settings
        assert (settings.spatial_chunk, settings.temporal_chunk, settings.decode_frames) == (0, 0, 0)  # SVD's knobs
        assert (settings.num_frames - 1) % 4 == 0  # interpolation leaves a clip Wan can make
        assert (settings.num_frames - 1) * settings.interpolate + 1 == frames
        if settings.window_frames:
            assert settings.window_frames < dims.latent_frames(settings.num_frames) and settings.overlap < settings.window_frames
        if plan.fits:
            assert plan.prediction.peak_mib <= PRESETS[budget].plan_to_mib and settings.offload == OffloadMode.STREAM
    plan = planner.plan(_wan_request(480, 832, 81), PRESETS["8GB"])
    assert plan.fits and plan.settings.cfg_split and plan.settings.vae_tile  # the measured lean recipe, planned
    # 121 frames are TI2V-5B's own 31 latent frames: no windows for that length
    assert not planner.base(_wan_request(704, 1280, 121))[1] and planner.base(_wan_request(704, 1280, 161))[1]


def test_calibrate_fits_each_measured_phase_and_holds_fixed_coefficients():
    from lowvram_studio.models.wan_configs import ti2v_5b_dims

    dims = ti2v_5b_dims()
    truth = MemoryModel.for_kind("wan")
    truth.coefficients = {k: v * (1.25 if i % 2 else 0.85) for i, (k, v) in enumerate(sorted(truth.coefficients.items()))}
    truth.coefficients["weights"] = 1.0
    rows = []
    for height, width, frames in ((480, 832, 81), (704, 1280, 121), (480, 480, 41)):
        for change in ({"offload": "stream", "cfg_split": True}, {"offload": "stream", "ff_chunk": 4096, "vae_tile": 256},
                       {"offload": "model"}, {"offload": "stream", "cfg_split": True, "unet_dtype": "fp8"}):
            settings = _wan_request(height, width, frames).replace(**change)
            phases = truth.predict(dims, settings, 600).phases
            rows.append({"dims": dims, "settings": settings, "context_mib": 600, "process_peak_mib": max(phases.values()),
                         "phase_peaks_mib": phases})
    prior = MemoryModel({k: v * 1.5 for k, v in truth.coefficients.items()} | {"weights": 1.0}, truth.context_mib)
    fitted = calibrate(rows, prior, fixed=("weights",))
    assert fitted.coefficients["weights"] == 1.0
    for row in rows:
        for phase, mib in fitted.predict(dims, row["settings"], 600).phases.items():
            assert mib == pytest.approx(row["phase_peaks_mib"][phase], rel=0.02)


def test_only_wan_on_a_bf16_card_may_halve_the_vae_and_only_when_the_budget_needs_it():
    from lowvram_studio.engine.precision import GpuInfo
    from lowvram_studio.models.wan_configs import ti2v_5b_dims

    ampere, turing = GpuInfo("NVIDIA GeForce RTX 3060", (8, 6)), GpuInfo("NVIDIA GeForce RTX 2060", (7, 5))
    request = _wan_request(480, 832, 81)
    # the VAE's decoder half alone on the GPU while decoding (engine/placement.py) and the decoded frames on the CPU
    # (engine/wan.py) leave 720p x 121 at 6 GB in fp32; 4 GB still needs it
    roomy = Planner.for_gpu(ti2v_5b_dims(), ampere).plan(_wan_request(704, 1280, 121), PRESETS["6GB"])
    tight = Planner.for_gpu(ti2v_5b_dims(), ampere).plan(request, PRESETS["4GB"])
    assert roomy.fits and roomy.settings.vae_dtype == Precision.FP32  # not needed there
    assert tight.fits and tight.settings.vae_dtype == Precision.BF16 and any("VAE in bf16" in r for r in tight.reasons)
    no_bf16 = Planner.for_gpu(ti2v_5b_dims(), turing).plan(request, PRESETS["4GB"])
    assert no_bf16.settings.vae_dtype == Precision.FP32
    svd = Planner.for_gpu(SVD_XT_DIMS, ampere).plan(_case("B").replace(vae_dtype="fp32"), PRESETS["4GB"])
    assert svd.settings.vae_dtype == Precision.FP32  # SVD's VAE stays fp32 unless the user asks


def test_the_shipped_wan_memory_model_is_the_one_its_script_fits_from_the_committed_rows(tmp_path, monkeypatch):
    """plan/memory_model_wan.json is bench/wan_memory_model.py's fit of the results its source names."""
    import json
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))
    from bench import wan_memory_model

    shipped = MemoryModel.for_kind("wan")
    inputs = [root / "bench" / "results" / name for name in re.findall(r"wan_\d+\w*\.json", shipped.source)]
    assert inputs, shipped.source
    out, model_out = tmp_path / "fit.json", tmp_path / "model.json"
    monkeypatch.setattr(sys, "argv", ["wan_memory_model.py", *map(str, inputs), "--out", str(out),
                                      "--model-out", str(model_out)])
    assert wan_memory_model.main() == 0
    refitted = MemoryModel.load(model_out)
    assert refitted.coefficients == pytest.approx(shipped.coefficients, rel=1e-6)
    report = json.loads(out.read_text())
    assert all(abs(row["peak_error"]) <= 0.15 for row in report["rows"] if row["fitted"])  # the promise
    assert out.with_suffix(".md").read_text().count("| 480p |") == len(wan_memory_model.PLAN_BUDGETS)

"""Speed model: FLOPs counted on the meta device, per-card predictions, the estimate line and its calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lowvram_studio.engine.events import Phase, RunEvent
from lowvram_studio.engine.precision import GpuInfo
from lowvram_studio.engine.speed_model import (
    CALIBRATION_FILE,
    CardSpeed,
    GpuTable,
    SpeedCalibration,
    count_step_flops,
    count_unet_cost,
    estimate_speed,
    steady_seconds_per_step,
)
from lowvram_studio.media import write_atomically
from lowvram_studio.models.svd_configs import SVD_XT_UNET_CONFIG
from lowvram_studio.plan.budgets import PRESETS
from lowvram_studio.plan.memory_model import SVD_XT_DIMS
from lowvram_studio.plan.planner import Planner
from lowvram_studio.settings import RunSettings
from lowvram_studio.settings_adapter import step_config
from lowvram_studio.speed import estimate_for_card, estimate_record, remember_speed, speed_key
from lowvram_studio.ui.budget import card_speed_line
from lowvram_studio.ui.form import MODEL
from lowvram_studio.userdirs import DATA_ENV

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
GTX_1060, H100 = "NVIDIA GeForce GTX 1060 6GB", "NVIDIA H100 80GB HBM3"


def _estimate(settings: RunSettings, gpu_name: str, model: str = "model", **kwargs):
    """The estimate for ``settings`` on the card the table matches ``gpu_name`` to."""
    card, _ = CardSpeed.for_gpu(SVD_XT_UNET_CONFIG, gpu_name)
    return estimate_speed(SVD_XT_UNET_CONFIG, step_config(settings, card.gpu.info), settings.num_inference_steps,
                          gpu_name, key=speed_key(model, gpu_name, settings), **kwargs)


def _case(name: str, **changes) -> RunSettings:
    height, width, frames = {"A": (512, 512, 24), "B": (576, 1024, 25)}[name]
    return RunSettings(height=height, width=width, num_frames=frames, num_inference_steps=25,
                       **{"unet_dtype": "fp16", **changes})


def test_meta_count_equals_flop_counter_on_the_real_demo_unet(demo_pipeline):
    unet = demo_pipeline.unet
    sample = torch.randn(2, 6, 8, 8, 8)
    # The CPU's fused attention kernel is not in FlopCounterMode's table (CUDA's are): count its math form.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(1.0), encoder_hidden_states=torch.randn(2, 1, unet.config.cross_attention_dim),
             added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2), return_dict=False)
    assert count_step_flops(unet.config, 64, 64, 6) == counter.get_total_flops()
    cost = count_unet_cost(unet.config, 64, 64, 6)
    assert cost.params == sum(p.numel() for p in unet.parameters())  # the groups cover every weight
    assert all(g.conv_flops >= 0 and g.matmul_flops >= 0 and g.moved_elements >= 0 for g in cost.groups)
    assert sum(g.moved_elements for g in cost.groups) > 0


def test_svd_xt_counts_match_the_h100_bench_figures():
    rows = json.loads((RESULTS / "engine_20261126b.json").read_text())["rows"]
    measured = {r["case"]: r["flops_per_step"] for r in rows if r.get("flops_per_step")}
    assert count_step_flops(SVD_XT_UNET_CONFIG, 512, 512, 24) == measured["A"]
    assert count_step_flops(SVD_XT_UNET_CONFIG, 576, 1024, 25) == measured["B"]


def test_the_table_reproduces_the_h100_rows_it_was_fitted_on():
    """diffusers fp16 / fp32 (all weights on the GPU, CFG batched) at cases A and B, within +/-25 %."""
    card, known = CardSpeed.for_gpu(SVD_XT_UNET_CONFIG, H100)
    assert known
    rows = json.loads((RESULTS / "engine_20261126b.json").read_text())["rows"]
    for row in (r for r in rows if r["config"] in ("diffusers-fp16", "diffusers-fp32")):
        unet_dtype = "fp16" if row["config"] == "diffusers-fp16" else "fp32"
        step = step_config(_case(row["case"], unet_dtype=unet_dtype), card.gpu.info)
        assert card.step_seconds(step) == pytest.approx(row["seconds_per_step"], rel=0.25), row["config"]


def test_streaming_is_nearly_free_on_a_gtx_1060_and_costly_on_an_h100():
    slow, _ = CardSpeed.for_gpu(SVD_XT_UNET_CONFIG, GTX_1060)
    fast, _ = CardSpeed.for_gpu(SVD_XT_UNET_CONFIG, H100)
    for case in ("A", "B"):
        settings = _case(case, cfg_split=True)
        assert slow.streaming_overhead(step_config(settings, slow.gpu.info)) < 0.02
        # measured +38 % (A) and +17 % (B) with CFG split
        assert fast.streaming_overhead(step_config(settings, fast.gpu.info)) > 0.15


def test_compute_paths_follow_the_card_generation():
    pascal, _ = CardSpeed.for_gpu(SVD_XT_UNET_CONFIG, GTX_1060)
    ada, _ = CardSpeed.for_gpu(SVD_XT_UNET_CONFIG, "NVIDIA GeForce RTX 4090")
    auto = step_config(_case("A"), pascal.gpu.info)
    assert (auto.compute, auto.storage_bytes, auto.casts_layerwise) == ("fp32", 2, True)  # Pascal: fp16 storage
    assert step_config(_case("A"), ada.gpu.info).compute == "fp16"
    fp32 = step_config(_case("A", half_compute="fp32"), ada.gpu.info)
    fp16 = step_config(_case("A", half_compute="fp16"), ada.gpu.info)
    assert ada.step_seconds(fp32) > 1.8 * ada.step_seconds(fp16)  # tensor cores
    # CFG split: the same FLOPs in two calls; never predicted faster
    split = step_config(_case("A", cfg_split=True), ada.gpu.info)
    assert (split.calls, split.batch) == (2, 1) and ada.step_seconds(split) >= ada.step_seconds(fp16)
    windows = step_config(_case("B", window_frames=12, overlap=4), ada.gpu.info)
    assert (windows.frames_per_call, windows.windows) == (12, 3)


def test_the_estimate_line_names_the_card_and_an_unknown_card_says_so():
    estimate = _estimate(_case("A"), GTX_1060)
    assert estimate.known_gpu and estimate.basis == "model"
    assert estimate.text.startswith("about ") and " s/step, about " in estimate.text
    assert estimate.text.endswith("for this clip on GTX 1060 6 GB")
    assert estimate.clip_seconds == pytest.approx(25 * estimate.seconds_per_step)  # no offload: nothing moved per run
    unknown = _estimate(_case("A"), "Mystery Accelerator 9000")
    table = GpuTable.load()
    assert not unknown.known_gpu and unknown.gpu_class == table.conservative
    assert "unknown GPU" in unknown.text and table.conservative in unknown.text
    assert unknown.seconds_per_step > estimate.seconds_per_step  # conservative: slower than the GTX 1060
    offloaded = _estimate(_case("A", offload="model"), GTX_1060, other_component_bytes=1e9)
    assert offloaded.clip_seconds > 25 * offloaded.seconds_per_step  # the weights cross PCIe once per run


def test_calibration_uses_the_measured_figure_then_the_cards_ratio_and_survives_a_bad_file(tmp_path):
    store = SpeedCalibration.load(tmp_path)
    first = _estimate(_case("A"), GTX_1060, model="svd-xt", calibration=store)
    assert first.basis == "model"
    for factor in (2, 4):
        store.record(speed_key("svd-xt", GTX_1060, _case("A", seed=factor)), GTX_1060, factor * first.predicted_s_per_step,
                     first.predicted_s_per_step, write_atomically)
    assert list(store.entries) == [speed_key("svd-xt", GTX_1060, _case("A"))]  # the seed does not change s/step

    reloaded = SpeedCalibration.load(tmp_path)
    same = _estimate(_case("A"), GTX_1060, model="svd-xt", calibration=reloaded)
    assert same.basis == "calibrated" and same.seconds_per_step == pytest.approx(3 * first.predicted_s_per_step)
    assert "measured on your last run" in same.text
    other_size = _estimate(_case("B"), GTX_1060, model="svd-xt", calibration=reloaded)
    assert other_size.basis == "card-calibrated"
    assert other_size.seconds_per_step == pytest.approx(3 * other_size.predicted_s_per_step)
    other_card = _estimate(_case("A"), H100, model="svd-xt", calibration=reloaded)
    assert other_card.basis == "model"
    assert [p.name for p in tmp_path.iterdir()] == [CALIBRATION_FILE]  # no temporary file left behind

    (tmp_path / CALIBRATION_FILE).write_text("{not json", encoding="utf-8")
    assert SpeedCalibration.load(tmp_path).entries == {}


GTX_1060_CARD = GpuInfo(GTX_1060, (6, 1))


def test_a_finished_run_calibrates_the_next_estimate_for_that_card(monkeypatch, tmp_path):
    """What run_job does on a GPU: estimate, run, remember; the studio's line for the same form is then
    'measured on your last run'. The card is named, not detected (the hardware boundary)."""
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    settings = RunSettings(height=576, width=1024, num_frames=25, num_inference_steps=25, unet_dtype="fp16")
    form = {MODEL: str(tmp_path / "svd-xt-not-loaded")}  # planned and estimated with SVD-XT's standard sizes
    first = card_speed_line(form, None, settings, GTX_1060_CARD)
    assert first.startswith("⏱ Time: about") and "GTX 1060 6 GB" in first and "measured" not in first
    estimate = estimate_for_card(SVD_XT_UNET_CONFIG, SVD_XT_DIMS, settings, GTX_1060_CARD)
    remember_speed(SVD_XT_DIMS, settings, GTX_1060_CARD, 30.0, estimate)
    again = estimate_for_card(SVD_XT_UNET_CONFIG, SVD_XT_DIMS, settings, GTX_1060_CARD)
    assert again.basis == "calibrated" and again.seconds_per_step == pytest.approx(30.0)
    assert "measured on your last run" in card_speed_line(form, None, settings, GTX_1060_CARD)
    record = estimate_record(again, 33.0)
    assert record["measured_over_estimate"] == pytest.approx(1.1) and record["basis"] == "calibrated"


def test_no_estimate_and_no_calibration_on_the_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    settings = RunSettings()
    assert estimate_for_card(SVD_XT_UNET_CONFIG, SVD_XT_DIMS, settings, None) is None
    remember_speed(SVD_XT_DIMS, settings, None, 1.0, None)
    assert not list(tmp_path.iterdir())
    assert card_speed_line({}, None, settings, None) == ""


def test_the_jobs_planner_knows_the_cards_speed():
    """Planner.for_gpu with the UNet's config (as run_job and the studio's budget call it): on a GTX 1060
    streaming is nearly free, so the 6 GB plan streams first."""
    planner = Planner.for_gpu(SVD_XT_DIMS, GTX_1060_CARD, SVD_XT_UNET_CONFIG)
    assert planner.speed is not None and planner.speed.gpu.name == "GTX 1060 6 GB"
    settings = RunSettings(height=576, width=1024, num_frames=25, unet_dtype="fp16")
    plan = planner.plan(settings, PRESETS["6GB"])
    assert "weight streaming first" in plan.reasons[0]
    assert Planner.for_gpu(SVD_XT_DIMS, GTX_1060_CARD).speed is None


def test_calibration_measures_steps_after_the_warm_up_step():
    """The first step carries CUDA's warm-up (1.4 s against 0.12 on the H100 for the demo model): a
    calibration that kept it would call the card 2x slower after a short first run."""
    stamps = [RunEvent(Phase.DENOISE, time=0.0)] + [
        RunEvent(Phase.DENOISE, time=t, step=i + 1, total=4) for i, t in enumerate((1.4, 1.52, 1.64, 1.76))]
    assert steady_seconds_per_step(stamps) == pytest.approx(0.12)
    assert steady_seconds_per_step(stamps[:2]) is None  # one step: nothing steady to measure

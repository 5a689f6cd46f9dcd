"""Compare FP32 vs FP16: fidelity numbers, the curve PNG, the table, and the three real runs."""

from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from lowvram_studio.engine.events import Phase, RunEvent
from lowvram_studio.monitor.record import RunRecord
from lowvram_studio.monitor.report import compare_table_md, curves_dataframe, plot_curves, psnr_ssim
from lowvram_studio.monitor.vram import VramMonitor
from lowvram_studio.settings import RunSettings


def test_psnr_of_a_video_against_itself_is_infinite():
    frames = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    psnr, ssim = psnr_ssim(frames, frames.copy())
    assert math.isinf(psnr) and ssim == pytest.approx(1.0)


def test_psnr_falls_with_the_difference():
    rng = np.random.default_rng(0)
    frames = rng.random((3, 32, 32, 3))
    slightly = np.clip(frames + rng.normal(0, 0.01, frames.shape), 0, 1)
    other = rng.random(frames.shape)
    psnr_close, ssim_close = psnr_ssim(slightly, frames)
    psnr_far, ssim_far = psnr_ssim(other, frames)
    assert psnr_close == pytest.approx(40, abs=1.5)  # sigma 0.01 -> 20*log10(1/0.01)
    assert psnr_far < 10 and ssim_far < 0.1 < ssim_close


def test_psnr_of_different_shapes_says_what_to_do():
    with pytest.raises(ValueError, match="same frames, height and width"):
        psnr_ssim(np.zeros((2, 8, 8, 3)), np.zeros((3, 8, 8, 3)))


def fake_run_record(label: str, hold_mib: int) -> RunRecord:
    """A real monitored stretch whose RSS grows by ``hold_mib`` during 'denoise'."""
    settings = RunSettings(height=64, width=64, num_frames=4, num_inference_steps=2)
    events = []
    with VramMonitor() as monitor:
        events.append(RunEvent(Phase.ENCODE))
        time.sleep(0.03)
        events.append(RunEvent(Phase.DENOISE))
        held = np.ones(hold_mib * 2**18, dtype=np.float32)  # touched pages count in RSS
        time.sleep(0.06)
        events.append(RunEvent(Phase.DENOISE, step=1, total=1))
        events.append(RunEvent(Phase.DECODE))
        del held
        time.sleep(0.03)
        events.append(RunEvent(Phase.DONE))
    record = RunRecord.from_failure(MemoryError(), settings, monitor, model={}, label=label, events=events)
    record.error = None  # a stand-in for a finished run: only the curve and events matter here
    return record


def test_curves_png_is_written_with_one_panel_per_run(tmp_path):
    records = [fake_run_record("FP32 original", 200), fake_run_record("FP16 only", 100)]
    path = plot_curves(records, tmp_path / "curves.png", colors={"FP32 original": "tab:red"}, title="t")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 500 and image.shape[1] > 800
    frame = curves_dataframe(records)
    assert set(frame["series"]) == {"FP32 original", "FP16 only"}
    fp32 = frame[frame.series == "FP32 original"].mib.max() - frame[frame.series == "FP32 original"].mib.min()
    assert fp32 > 150  # the held 200 MiB shows in the curve


def test_a_curves_png_cut_short_by_a_full_disk_never_carries_its_final_name(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full_disk(figure, target, **kwargs):  # the disk boundary: half a PNG, then ENOSPC
        Path(target).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space left"):
        plot_curves([fake_run_record("FP32 original", 10)], tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == []  # neither a cut curves.png nor a temporary left behind


def test_table_has_the_write_up_shape_and_every_figure(tmp_path):
    a, b = fake_run_record("FP32 original", 10), fake_run_record("FP16 + chosen optimizations", 10)
    a.error = "out of memory: CUDA"
    b.results.update(frames=4, seconds_total=2.0, output_fps=2.0, seconds_per_step=0.5, psnr_db=38.25, ssim=0.97)
    table = compare_table_md([a, b])
    lines = table.splitlines()
    assert lines[0] == (
        "| device | frames | FP32 original CPU RAM (peak RSS) | FP16 + chosen optimizations CPU RAM (peak RSS) "
        "| FP32 original frames generated per s | FP16 + chosen optimizations frames generated per s |"
    )
    assert lines[2].startswith("| CPU | 4 |") and " OOM |" in lines[2] and lines[2].endswith("| n/a | 2 |")
    assert "| FP32 original OOM |" in table
    assert "| 0.5 | 2 | 38.25 dB | 0.97 |" in table


# ---- the three real runs -----------------------------------------------------------------------
from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel  # noqa: E402

from lowvram_studio.compare import COMPARE_FILES, OPTIMIZED_LABEL, CompareError, load_compare, run_compare  # noqa: E402
from lowvram_studio.settings_adapter import generate  # noqa: E402
from lowvram_studio.models.demo import DEMO_UNET_CONFIG, build_demo_pipeline  # noqa: E402
from lowvram_studio.models.load import LoadedModel  # noqa: E402

# One denoise step of two frames without guidance: seconds on two cores, and a UNet wide enough
# (60 M parameters, 240 MB in fp32) that its weights, not activations, set the memory peak.
TINY_RUN = RunSettings(height=64, width=64, num_frames=2, num_inference_steps=1, max_guidance_scale=1.0, seed=0)


def weights_heavy_model() -> LoadedModel:
    demo = build_demo_pipeline()
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**{**DEMO_UNET_CONFIG, "block_out_channels": (128, 256, 256, 256)})
    pipeline = StableVideoDiffusionPipeline(
        vae=demo.vae, image_encoder=demo.image_encoder, unet=unet.eval().requires_grad_(False),
        scheduler=demo.scheduler, feature_extractor=demo.feature_extractor,
    )
    pipeline.set_progress_bar_config(disable=True)
    return LoadedModel(pipeline, "weights-heavy demo", "tests", "demo")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # These runs are tiny: on a busy 2-core machine OpenMP's spinning threads cost 10x the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, test_image):
    model = weights_heavy_model()
    before = {k: v.clone() for k, v in model.pipeline.unet.state_dict().items()}
    events = []
    settings = TINY_RUN.replace(decode_frames=1, vram_budget="8GB")  # (c) is planned for it; (a), (b) are not
    result = run_compare(model, test_image, settings, tmp_path_factory.mktemp("cmp"), on_event=events.append)
    return result, model, before, events


def test_compare_writes_json_png_and_table_that_load_back(compared):
    result, *_ = compared
    assert sorted(p.name for p in result.out_dir.iterdir()) == sorted(COMPARE_FILES)
    loaded = load_compare(result.out_dir)
    assert [r.label for r in loaded] == ["FP32 original", "FP16 only", "FP16 + chosen optimizations"]
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in result.records]
    assert [r.model["dtypes"]["unet"] for r in loaded] == ["float32", "float16", "float16"]
    assert all(r.baseline["rss_mib"] > 0 and r.results["frames"] == 2 and r.error is None for r in loaded)
    assert all(r.device == "cpu" and r.phase_seconds["denoise"] > 0 for r in loaded)
    assert matplotlib.image.imread(result.files["png"]).shape[1] > 800
    assert (result.out_dir / "table.md").read_text() == result.table_md
    assert "| CPU | 2 |" in result.table_md and "slow reference convolutions" in result.table_md


def test_the_three_runs_play_side_by_side_in_one_video(compared):
    from lowvram_studio.media import read_video

    result, *_ = compared
    frames, fps = read_video(result.files["video"])
    assert frames.shape == (2, 64, 3 * 64 + 2 * 8, 3) and fps == TINY_RUN.fps  # three clips, two white bars
    assert frames[:, :, 64:72].min() > 200  # the bar between run (a) and run (b)


def test_fp32_run_peaks_above_fp16_in_cpu_ram(compared):
    result, *_ = compared
    fp32, fp16, optimized = (r.results["ram_peak_mib"] for r in result.records)
    assert fp32 - fp16 > 60  # the UNet's weights: 240 MB in fp32, 120 MB in fp16
    assert fp32 - optimized > 60


def test_fp16_is_close_to_fp32_and_lossy_decode_costs_fidelity(compared):
    result, *_ = compared
    fp32, fp16, optimized = (r.results for r in result.records)
    assert fp32["psnr_db"] is None  # the reference itself
    assert fp16["psnr_db"] > 30 and fp16["ssim"] > 0.95
    assert optimized["psnr_db"] < fp16["psnr_db"]  # decode_frames 1 < 2 frames is lossy


def test_compare_restores_the_model_and_tags_events(compared):
    result, model, before, events = compared
    unet = model.pipeline.unet
    assert next(unet.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert [e.data["compare_run"] for e in events if e.phase == Phase.ENCODE] == [r.label for r in result.records]
    record = result.records[0]
    assert [s.phase for s in record.phase_spans()] == [Phase.LOAD, Phase.ENCODE, Phase.DENOISE, Phase.DECODE]


def test_compare_plans_the_optimized_run_for_the_budget_and_says_so(compared):
    """Issue 18.4: compare took --vram-budget and ignored it."""
    result, *_ = compared
    budgets = [record.settings["vram_budget"] for record in result.records]
    assert budgets == ["off", "off", "8GB"]
    assert any(note.startswith(OPTIMIZED_LABEL) and "planned for 8GB" in note and "fits" in note for note in result.notes), result.notes


def test_compare_refuses_interpolation_before_any_run(test_image, tmp_path):
    with pytest.raises(CompareError, match="set interpolate to 1 for compare"):
        run_compare(weights_heavy_model(), test_image, TINY_RUN.replace(interpolate=2), tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists() or not any((tmp_path / "cmp").iterdir())


def test_compare_refuses_a_folder_with_compare_files(compared, test_image):
    result, model, *_ = compared
    with pytest.raises(CompareError, match="already holds compare.json, curves.png, table.md, side_by_side.mp4; choose another"):
        run_compare(model, test_image, TINY_RUN, result.out_dir)


def test_psnr_of_a_real_run_against_itself_is_infinite_and_against_another_seed_low(test_image):
    # Random weights: the seed alone decides the video (the trained demo model copies its input whatever the seed).
    pipeline = build_demo_pipeline(random_init=True)
    first = generate(pipeline, test_image, TINY_RUN).frames
    again = generate(pipeline, test_image, TINY_RUN).frames
    other = generate(pipeline, test_image, TINY_RUN.replace(seed=1)).frames
    assert math.isinf(psnr_ssim(again, first)[0])
    assert psnr_ssim(other, first)[0] < 25  # far below fp16 vs fp32 (> 30 dB)


def test_a_compare_whose_fp32_reference_cannot_fit_the_machines_ram_is_refused_before_any_run():
    from lowvram_studio.compare import compare_runs, plan_compare
    from lowvram_studio.plan.memory_model import SVD_XT_DIMS
    from lowvram_studio.plan.planner import Planner
    from lowvram_studio.plan.ram import MachineRam

    model = LoadedModel(build_demo_pipeline(), "demo", "tests", "demo")
    runs = compare_runs(RunSettings(device="cpu", vram_budget="6GB"))  # on the CPU every weight stays in RAM
    full_size = Planner.for_gpu(SVD_XT_DIMS, None)  # the RAM of SVD-XT's weights, planned on the demo model
    small = MachineRam(total=4 * 2**30, available=2 * 2**30, swap=0)
    with pytest.raises(CompareError, match="FP32 original: this run keeps .* GiB of weights in RAM .*compare this model "
                                           "on a machine with more RAM"):
        plan_compare(model, runs, [], planner=full_size, machine=small)
    notes: list[str] = []
    planned = plan_compare(model, runs, notes, planner=full_size,
                           machine=MachineRam(total=64 * 2**30, available=64 * 2**30, swap=0))
    # the references run exactly as set; (c) under the budget, the plan named in the notes
    assert [one.settings for one in planned[:2]] == [run.settings for run in runs[:2]]
    assert all(one.plan is None for one in planned[:2]) and planned[2].plan is not None
    assert any(note.startswith(f"{OPTIMIZED_LABEL}, planned for 6GB: predicted peak") for note in notes), notes
    from lowvram_studio.planned_run import plan_run  # Generate's decision for the same request: the same plan

    generate_plan = plan_run(model, runs[2].settings, planner=full_size, machine=MachineRam(64 * 2**30, 64 * 2**30, 0))
    assert generate_plan.settings == planned[2].settings and generate_plan.plan.reasons == planned[2].plan.reasons

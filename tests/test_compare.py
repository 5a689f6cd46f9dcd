"""Compare FP32 vs FP16: fidelity numbers, the curve PNG, the table, and the three real runs."""

from __future__ import annotations

import math
import time

import matplotlib.image
import numpy as np
import pytest

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


def test_table_has_the_write_up_shape_and_every_figure(tmp_path):
    a, b = fake_run_record("FP32 original", 10), fake_run_record("FP16 + chosen optimizations", 10)
    a.error = "out of memory: CUDA"
    b.results.update(frames=4, seconds_total=2.0, output_fps=2.0, seconds_per_step=0.5, psnr_db=38.25, ssim=0.97)
    table = compare_table_md([a, b])
    lines = table.splitlines()
    assert lines[0] == (
        "| device | frames | FP32 original CPU RAM (peak RSS) | FP16 + chosen optimizations CPU RAM (peak RSS) "
        "| FP32 original FPS | FP16 + chosen optimizations FPS |"
    )
    assert lines[2].startswith("| CPU | 4 |") and " OOM |" in lines[2] and lines[2].endswith("| n/a | 2 |")
    assert "| FP32 original OOM |" in table
    assert "| 0.5 | 2 | 38.25 dB | 0.97 |" in table

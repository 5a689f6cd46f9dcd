"""Run records: the §7 JSON, its round trip, the DataFrame view and phase spans."""

from __future__ import annotations

import json
import time

import pytest

from lowvram_studio.engine.events import Phase, RunEvent
from lowvram_studio.monitor.record import RESULT_KEYS, RunRecord, record_run
from lowvram_studio.monitor.vram import IdleBaseline, VramMonitor
from lowvram_studio.settings import RunSettings


def recorded_failure() -> RunRecord:
    """A record built from a real monitor and real events, for a run that ran out of memory."""
    settings = RunSettings(height=64, width=64, num_frames=4, num_inference_steps=2)
    events = []
    with VramMonitor() as monitor:
        for phase, step in ((Phase.ENCODE, None), (Phase.DENOISE, None), (Phase.DENOISE, 1), (Phase.DENOISE, 2)):
            time.sleep(0.03)
            events.append(RunEvent(phase, step=step, total=2 if step else None))
        time.sleep(0.03)
        events.append(RunEvent(Phase.DECODE))
        time.sleep(0.03)
    return RunRecord.from_failure(
        MemoryError("decode needed 12 GiB"), settings, monitor, model={"name": "demo"}, label="FP32 original", events=events
    )


def test_record_json_has_the_section_7_shape_and_exactly_the_result_keys(tmp_path):
    record = recorded_failure()
    path = record.save(tmp_path / "run.json")
    data = json.loads(path.read_text())
    for key in ("version", "settings", "model", "env", "results", "events", "samples"):
        assert key in data
    assert tuple(data["results"]) == RESULT_KEYS
    assert data["results"]["frames"] is None and data["results"]["psnr_db"] is None  # not measured: null
    assert data["results"]["ram_peak_mib"] > 0
    assert data["settings"]["height"] == 64 and data["settings"]["unet_dtype"] == "auto"
    assert data["error"].startswith("out of memory")
    assert data["events"][0]["phase"] == "encode image"
    assert {"t", "device_used_mib", "process_used_mib", "torch_allocated_mib", "torch_reserved_mib", "rss_mib"} == set(
        data["samples"][0]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # the temporary file was renamed, not left


def test_record_loads_back_equal(tmp_path):
    record = recorded_failure()
    loaded = RunRecord.load(record.save(tmp_path / "run.json"))
    assert loaded.to_dict() == record.to_dict()
    assert loaded.samples == record.samples


def test_loading_something_else_says_what_to_do(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a LowVRAM Studio run record"):
        RunRecord.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="cannot read run record"):
        RunRecord.load(tmp_path / "missing.json")


@pytest.mark.parametrize("version", ["2", "1.0", None, True, [1]])
def test_a_record_whose_version_is_not_a_whole_number_is_refused_with_the_fix(tmp_path, version):
    data = recorded_failure().to_dict()
    data["version"] = version
    (tmp_path / "dropped.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"version is .*not a whole number.*pick a \.json file saved by LowVRAM"):
        RunRecord.load(tmp_path / "dropped.json")


def test_dataframe_is_long_format_from_zero_seconds():
    record = recorded_failure()
    frame = record.to_dataframe()
    assert list(frame.columns) == ["t_s", "mib", "series"]
    assert set(frame["series"]) == {"CPU RAM"}  # no GPU here: only RSS was measured
    assert frame["t_s"].min() >= 0 and frame["t_s"].max() == pytest.approx(record.samples[-1].t - record.t0)
    assert len(frame) == len(record.samples)


def test_phase_spans_follow_the_events():
    record = recorded_failure()
    spans = record.phase_spans()
    assert [s.phase for s in spans] == [Phase.ENCODE, Phase.DENOISE, Phase.DECODE]
    assert spans[0].end_s == spans[1].start_s and spans[1].end_s == spans[2].start_s
    assert spans[1].end_s - spans[1].start_s == pytest.approx(0.09, abs=0.06)  # three 30 ms sleeps
    assert spans[2].end_s == pytest.approx(record.samples[-1].t - record.t0)  # no DONE: ends with the curve
    assert len(record.step_times()) == 2


def test_curve_uses_the_best_measured_metric():
    record = recorded_failure()
    t, mib = record.curve()
    assert record.curve_metric() == "rss_mib"
    assert len(t) == len(mib) == len(record.samples) and (mib > 0).all()


def test_record_run_keeps_out_of_memory_as_a_result_only_when_asked():
    settings = RunSettings()

    def run():
        raise MemoryError("no room")

    baseline = IdleBaseline(None, None, None, 100.0)
    result, record = record_run(run, settings, model={}, label="x", baseline=baseline, record_out_of_memory=True)
    assert result is None and record.error == "out of memory: no room"
    assert record.baseline["rss_mib"] == 100.0
    with pytest.raises(MemoryError):
        record_run(run, settings, model={}, baseline=baseline)
    with pytest.raises(ZeroDivisionError):  # other errors always reach the caller
        record_run(lambda: 1 / 0, settings, model={}, baseline=baseline, record_out_of_memory=True)


def test_record_env_names_versions_and_no_gpu_here():
    env = recorded_failure().env
    assert env["torch"].startswith("2.") and env["diffusers"] and env["gradio"]
    assert env["gpu"] is None and env["vram_total_mib"] is None

def test_phase_peaks_name_the_phase_that_sets_the_peak():
    record = recorded_failure()
    peaks = record.phase_peaks()
    assert set(peaks) == {"encode image", "denoise", "decode"}
    assert max(peaks.values()) <= record.results["ram_peak_mib"]


def test_the_record_carries_the_peak_ram_of_each_phase():
    record = recorded_failure()
    by_phase = record.results["ram_peak_by_phase_mib"]
    assert set(by_phase) == {"encode image", "denoise", "decode"}
    assert 0 < max(by_phase.values()) <= record.results["ram_peak_mib"]
    assert RunRecord.from_dict(json.loads(json.dumps(record.to_dict()))).results["ram_peak_by_phase_mib"] == by_phase

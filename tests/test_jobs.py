"""One memory monitor per studio job: the worker's live curve and the run record are the same samples,
and the monitor's thread is gone however the job ends (real run_job on the demo model; CPU: RSS curve)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from lowvram_studio.engine.events import CancelToken, Phase, RunCancelled, RunEvent
from lowvram_studio.jobs import run_job
from lowvram_studio.media import read_mp4_comment
from lowvram_studio.models.load import LoadedModel, load_model
from lowvram_studio.monitor.record import RunRecord
from lowvram_studio.monitor.vram import THREAD_NAME, VramMonitor
from lowvram_studio.settings import RunSettings
from lowvram_studio.ui.studio import Studio
from lowvram_studio.ui.config_store import ConfigStore
from lowvram_studio.ui.worker import JobState, Worker

TINY = RunSettings(height=64, width=64, num_frames=4, num_inference_steps=2, seed=0)


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def model(demo_pipeline) -> LoadedModel:
    return LoadedModel(demo_pipeline, "demo", "demo", "demo")


def studio_work(model, image, video, counts: list[int], relay=None, settings: RunSettings = TINY):
    """The studio's Generate on the worker (run_job, no monitor passed), counting monitor threads at each event."""

    def work(on_event, cancel):
        def counting(event: RunEvent) -> None:
            counts.append(len(monitor_threads()))
            if relay is not None:
                relay(event, cancel)
            on_event(event)

        return run_job(model, image, settings, video, on_event=counting, cancel=cancel)

    return work


def assert_record_is_the_live_curve(job) -> RunRecord:
    record = job.result.record
    assert record.samples == job.monitor.samples  # not a second sampler's curve: the very same samples
    assert record.t0 == job.monitor.started_at
    assert len(job.curve()) == len(record.samples)  # every sample drew a point of the live curve
    assert RunRecord.load(job.result.record_path).samples == record.samples
    return record


def test_a_worker_job_runs_one_monitor_whose_samples_are_the_record(worker, model, test_image, tmp_path):
    counts: list[int] = []
    job = worker.submit("tab", "Generate", studio_work(model, test_image, tmp_path / "a.mp4", counts))
    assert job.done.wait(60) and job.state == JobState.DONE, job.error
    assert counts and set(counts) == {1}
    record = assert_record_is_the_live_curve(job)
    assert not job.monitor.running and not monitor_threads()
    # the measurement rules hold: idle baseline taken, phases marked on the curve's clock, peaks from the samples
    assert record.baseline is not None and record.monitor["cpu_fraction"] is not None
    spans = {span.phase: span for span in record.phase_spans()}
    assert spans[Phase.DENOISE].start_s > 0 and spans[Phase.DECODE].start_s >= spans[Phase.DENOISE].end_s
    assert record.results["ram_peak_mib"] == max(s.rss_mib for s in record.samples)


def _cancel_at_step_one(event: RunEvent, cancel) -> None:
    if event.phase == Phase.DENOISE and event.step == 1:
        cancel.cancel()


def _fail_at_step_one(event: RunEvent, cancel) -> None:
    if event.phase == Phase.DENOISE and event.step == 1:
        raise RuntimeError("the run broke at step 1 (raised by the test)")


@pytest.mark.parametrize(
    ("relay", "state"), [(_cancel_at_step_one, JobState.CANCELLED), (_fail_at_step_one, JobState.FAILED)]
)
def test_the_monitor_thread_ends_when_a_run_is_stopped_or_fails(worker, model, test_image, tmp_path, relay, state):
    counts: list[int] = []
    settings = TINY.replace(num_inference_steps=20)
    job = worker.submit("tab", "Generate", studio_work(model, test_image, tmp_path / "a.mp4", counts, relay, settings))
    assert job.done.wait(60) and job.state == state
    assert counts and set(counts) == {1}
    assert not job.monitor.running and job.monitor.stopped_at is not None and not monitor_threads()


def test_the_monitor_thread_ends_when_a_job_fails_before_its_run(worker, tmp_path):
    job = worker.submit("tab", "Generate", lambda on_event, cancel: load_model(str(tmp_path / "no-such-model")))
    assert job.done.wait(30) and job.state == JobState.FAILED
    assert not job.monitor.running and job.monitor.stopped_at is not None and not monitor_threads()


def test_an_out_of_memory_replan_retries_under_the_same_single_monitor(worker, model, test_image, tmp_path):
    calls: list[int] = []

    def oom_once(module, args):  # fake at the hardware boundary: the first UNet call runs out of GPU memory
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")

    counts: list[int] = []
    handle = model.pipeline.unet.register_forward_pre_hook(oom_once)
    try:
        job = worker.submit("tab", "Generate", studio_work(model, test_image, tmp_path / "a.mp4", counts))
        assert job.done.wait(60) and job.state == JobState.DONE, job.error
    finally:
        handle.remove()
    assert job.result.record.info["oom_retries"][0]["phase"] == Phase.DENOISE.value
    assert counts and set(counts) == {1}
    assert_record_is_the_live_curve(job)
    assert not monitor_threads()


def test_after_a_decode_out_of_memory_the_record_and_the_mp4_name_the_decode_that_ran(model, test_image, tmp_path):
    """Issue 18.3: the decode retry tightened the settings inside the run but the record and the mp4's tag
    kept the ones that ran out of memory, so "use these settings again" repeated the failure."""
    def two_frames_at_most(module, args):  # fake at the hardware boundary: the decoder fits two frames
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")

    handle = model.pipeline.vae.decoder.register_forward_pre_hook(two_frames_at_most)
    try:
        output = run_job(model, test_image, TINY, tmp_path / "a.mp4")
    finally:
        handle.remove()
    retries = output.record.info["oom_retries"]
    ran = retries[-1]["changed_settings"]["decode_frames"][1]
    assert ran <= 2 and {r["phase"] for r in retries} == {Phase.DECODE.value}
    saved = json.loads(output.record_path.read_text(encoding="utf-8"))
    assert saved["settings"]["decode_frames"] == ran
    tag = json.loads(read_mp4_comment(output.video))
    assert tag["settings"]["decode_frames"] == ran


def test_a_monitor_passed_to_run_job_is_started_stopped_and_recorded(model, test_image, tmp_path):
    """The CLI / benchmark path: no worker offers a monitor, so run_job runs (and ends) its own."""
    monitor = VramMonitor()
    output = run_job(model, test_image, TINY, tmp_path / "a.mp4", monitor=monitor)
    assert output.record.samples == monitor.samples and monitor.stopped_at is not None
    assert not monitor_threads()


def _max_monitor_threads_while(job, timeout: float = 60) -> int:
    """Highest number of monitor threads seen while ``job`` runs (polled every millisecond)."""
    most, deadline = 0, time.monotonic() + timeout
    while not job.done.is_set() and time.monotonic() < deadline:
        most = max(most, len(monitor_threads()))
        time.sleep(0.001)
    return most


def test_studio_generate_and_queued_jobs_each_run_one_monitor(tmp_path, test_image):
    studio = Studio("demo", tmp_path / "outputs", ConfigStore(tmp_path / "config"))
    try:
        job = studio.submit_generate("tab", test_image, TINY, {})
        assert _max_monitor_threads_while(job) == 1
        assert job.state == JobState.DONE, job.error
        record = assert_record_is_the_live_curve(job)
        loading = next(e for e in job.events if e.phase == Phase.LOAD)
        assert record.t0 <= loading.time  # the record's curve covers the job from before the model loaded

        studio.runner.add(test_image, TINY, "demo", [7])
        deadline = time.monotonic() + 30
        while (queued := studio.worker.running) is None or queued.label != "Queued job":
            assert time.monotonic() < deadline, "the queued job never started"
            time.sleep(0.001)
        assert _max_monitor_threads_while(queued) == 1
        assert queued.state == JobState.DONE, queued.error
        assert_record_is_the_live_curve(queued)
        assert not monitor_threads()
    finally:
        studio.close()


@pytest.mark.parametrize("stop_at", ["a.mp4", "a.gif"])
def test_stop_during_export_leaves_no_outputs(model, test_image, tmp_path, stop_at):
    """Stop as the mp4 or the GIF begins: the writer ends at its next frame and nothing is left, not even
    the mp4 that was already whole when the GIF was stopped."""
    token = CancelToken()
    exported: list[str] = []

    def on_event(event: RunEvent) -> None:
        if event.phase == Phase.EXPORT:
            exported.append(event.message)
            if event.message == stop_at:
                token.cancel()

    with pytest.raises(RunCancelled):
        run_job(model, test_image, TINY, tmp_path / "a.mp4", on_event=on_event, cancel=token, gif=True)
    assert exported == ["a.mp4", "a.gif"][: exported.index(stop_at) + 1]
    assert list(tmp_path.iterdir()) == []

"""The background worker: one job at a time, queue positions, Stop within a step or a decode chunk (a real
run_job on the demo model: a stopped run ends cancelled and writes nothing), failures kept per job."""

from __future__ import annotations

import threading

import pytest

from lowvram_studio.engine.events import Phase
from lowvram_studio.settings_adapter import generate
from lowvram_studio.jobs import run_job
from lowvram_studio.models.load import LoadedModel
from lowvram_studio.ui.worker import JobState, Worker


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.close()


def _blocking(gate: threading.Event, log: list, name: str):
    def work(on_event, cancel):
        log.append(f"start {name}")
        gate.wait(10)
        cancel.raise_if_cancelled()
        log.append(f"end {name}")
        return name

    return work


def test_jobs_run_one_at_a_time_and_report_their_queue_position(worker):
    gate, log = threading.Event(), []
    first = worker.submit("tab-a", "first", _blocking(gate, log, "first"))
    second = worker.submit("tab-b", "second", _blocking(gate, log, "second"))
    third = worker.submit("tab-c", "third", _blocking(gate, log, "third"))
    while first.state != JobState.RUNNING:
        first.done.wait(0.01)
    assert (worker.position(first), worker.position(second), worker.position(third)) == (0, 1, 2)
    gate.set()
    for job in (first, second, third):
        assert job.done.wait(10)
    assert log == ["start first", "end first", "start second", "end second", "start third", "end third"]
    assert [j.result for j in (first, second, third)] == ["first", "second", "third"]


def test_closing_a_tab_cancels_only_its_jobs_and_queued_ones_never_start(worker):
    gate, log = threading.Event(), []
    running = worker.submit("tab-a", "a1", _blocking(gate, log, "a1"))
    queued = worker.submit("tab-a", "a2", _blocking(gate, log, "a2"))
    other = worker.submit("tab-b", "b1", _blocking(gate, log, "b1"))
    while running.state != JobState.RUNNING:
        running.done.wait(0.01)
    assert worker.cancel_owner("tab-a") == 2
    gate.set()
    assert other.done.wait(10) and running.done.wait(10)
    assert (running.state, queued.state, other.state) == (JobState.CANCELLED, JobState.CANCELLED, JobState.DONE)
    assert "start a2" not in log


def test_a_failing_job_keeps_its_error_and_the_next_job_still_runs(worker):
    def broken(on_event, cancel):
        raise ValueError("the image is damaged; choose another image")

    bad = worker.submit("tab", "bad", broken)
    good = worker.submit("tab", "good", lambda on_event, cancel: 42)
    assert good.done.wait(10)
    assert bad.state == JobState.FAILED and "choose another image" in str(bad.error)
    assert good.state == JobState.DONE and good.result == 42


def test_stop_ends_a_real_run_within_one_step_and_the_curve_was_sampled(
    worker, demo_pipeline, test_image, small_settings
):
    settings = small_settings.replace(num_inference_steps=50, num_frames=4)
    steps_after_stop = []

    def work(on_event, cancel):
        def relay(event):
            on_event(event)
            if event.phase == Phase.DENOISE and event.step == 2:
                cancel.cancel()
            elif cancel.cancelled and event.phase == Phase.DENOISE:
                steps_after_stop.append(event.step)

        return generate(demo_pipeline, test_image, settings, on_event=relay, cancel=cancel)

    job = worker.submit("tab", "run", work)
    assert job.done.wait(60)
    assert job.state == JobState.CANCELLED
    assert steps_after_stop == []  # the step in flight when Stop came was the last one
    assert "denoise step 2/50" in job.progress_text()
    curve = job.curve()
    assert len(curve) >= 2 and all(mib > 0 for _, mib in curve)
    assert job.monitor.memory_label in ("CPU RAM", "VRAM")


@pytest.fixture(scope="module")
def model(demo_pipeline) -> LoadedModel:
    return LoadedModel(demo_pipeline, "demo", "demo", "demo")


def _decoder_calls(pipeline, after_each=None):
    """Count the real VAE decoder's calls (a forward hook on the diffusers module); ``after_each(count)``."""
    calls = [0]

    def count(_module, _inputs, _output):
        calls[0] += 1
        if after_each is not None:
            after_each(calls[0])

    return calls, pipeline.vae.decoder.register_forward_hook(count)


def test_stop_when_decode_starts_ends_the_run_cancelled_before_the_first_chunk_and_writes_nothing(
    worker, model, test_image, small_settings, tmp_path
):
    settings = small_settings.replace(num_frames=4, num_inference_steps=2, decode_frames=1)
    video = tmp_path / "out.mp4"

    def work(on_event, cancel):
        def relay(event):
            on_event(event)
            if event.phase == Phase.DECODE:
                cancel.cancel()  # Stop pressed as decoding starts

        return run_job(model, test_image, settings, video, on_event=relay, cancel=cancel, gif=True)

    calls, hook = _decoder_calls(model.pipeline)
    try:
        job = worker.submit("tab", "run", work)
        assert job.done.wait(60)
    finally:
        hook.remove()
    assert (job.state, job.error, job.result) == (JobState.CANCELLED, None, None)
    assert calls == [0]  # not one of the 4 decode chunks ran after Stop
    assert Phase.EXPORT not in [e.phase for e in job.events]
    assert list(tmp_path.iterdir()) == []  # no video, gif, record or temporary


def test_stop_during_an_all_frames_decode_ends_the_run_before_export_and_writes_nothing(
    worker, model, test_image, small_settings, tmp_path
):
    settings = small_settings.replace(num_frames=4, num_inference_steps=2, decode_frames=0)  # one decode call
    job = None

    def stop_inside_decode(count):
        job.cancel.cancel()  # Stop pressed while the single decode call runs

    def work(on_event, cancel):
        return run_job(model, test_image, settings, tmp_path / "out.mp4", on_event=on_event, cancel=cancel)

    calls, hook = _decoder_calls(model.pipeline, stop_inside_decode)
    try:
        job = worker.submit("tab", "run", work)
        assert job.done.wait(60)
    finally:
        hook.remove()
    assert (job.state, job.error) == (JobState.CANCELLED, None)
    assert calls == [1]
    phases = [e.phase for e in job.events]
    assert Phase.DECODE in phases and Phase.EXPORT not in phases
    assert list(tmp_path.iterdir()) == []

"""A job's files are its own, whole, and never replace anyone's (issue #21, items 4 and 5).

Real run_job on the demo model and the real ffmpeg; a full disk is a file-size limit (RLIMIT_FSIZE)
on a real process, a crash is SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from lowvram_studio.engine.events import Phase, RunEvent
from lowvram_studio.jobs import new_output_path, run_job
from lowvram_studio.media import MediaError, read_video, sweep_partial_outputs, write_mp4
from lowvram_studio.models.load import LoadedModel
from lowvram_studio.monitor.record import write_text_atomic
from lowvram_studio.settings import RunSettings
from lowvram_studio.ui.worker import JobState, Worker

ROOT = Path(__file__).resolve().parents[1]
TINY = RunSettings(height=64, width=64, num_frames=2, num_inference_steps=1, seed=0)
POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")


@pytest.fixture(scope="module")
def model(demo_pipeline) -> LoadedModel:
    return LoadedModel(demo_pipeline, "demo", "demo", "demo")


@contextlib.contextmanager
def disk_full_after(size: int) -> Iterator[None]:
    """Files written by this process and its children stop growing at ``size`` bytes, as on a full disk."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# ---- item 4: one name per job ----------------------------------------------------------------------
def test_ten_generates_submitted_in_the_same_second_all_complete(model, test_image, tmp_path):
    """Each click picks its name at once (as the studio's Generate does); the worker runs them one by one."""
    start = threading.Barrier(10)
    videos: list[Path] = []

    def click() -> None:
        start.wait()
        videos.append(new_output_path(tmp_path))

    clicks = [threading.Thread(target=click) for _ in range(10)]
    for thread in clicks:
        thread.start()
    for thread in clicks:
        thread.join()
    worker = Worker()
    try:
        jobs = [worker.submit("tab", "Generate", lambda on_event, cancel, video=video: run_job(
            model, test_image, TINY, video, on_event=on_event, cancel=cancel)) for video in videos]
        for job in jobs:
            assert job.done.wait(300) and job.state == JobState.DONE, job.error
    finally:
        worker.close()
    assert len(set(videos)) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        name for video in videos for name in (video.name, video.with_suffix(".json").name))


# ---- item 5: nothing half-written under a final name, nothing replaced, temporaries gone --------------
@POSIX_ONLY
def test_an_mp4_that_ffmpeg_could_not_finish_is_never_linked(tmp_path):
    frames = np.random.default_rng(0).random((8, 64, 64, 3), np.float32)
    with disk_full_after(2_000), pytest.raises(MediaError, match="could not write .*v.mp4"):
        write_mp4(frames, tmp_path / "v.mp4", fps=7)  # ffmpeg stops at 2000 bytes; its exit status says so
    assert list(tmp_path.iterdir()) == []


JOB_ON_A_FULL_DISK = """
import resource, sys
import PIL.Image
from lowvram_studio.engine.events import Phase
from lowvram_studio.jobs import run_job
from lowvram_studio.media import MediaError
from lowvram_studio.models.demo import build_demo_pipeline
from lowvram_studio.models.load import LoadedModel
from tests.test_outputs import TINY

video, phase, space = sys.argv[1], Phase(sys.argv[2]), int(sys.argv[3])


def disk_fills(event):  # from this phase on, files stop growing at `space` bytes: the disk is full
    if event.phase == phase:
        resource.setrlimit(resource.RLIMIT_FSIZE, (space, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


model = LoadedModel(build_demo_pipeline(), "demo", "demo", "demo")
try:
    run_job(model, PIL.Image.new("RGB", (64, 64), (200, 120, 40)), TINY, video, on_event=disk_fills)
except MediaError as exc:
    print(exc)
    sys.exit(3)
"""


@POSIX_ONLY
@pytest.mark.parametrize(
    ("phase", "kept"),
    [(Phase.EXPORT, []), (Phase.DONE, ["a.mp4"])],  # DONE: the video is written, the record not yet
    ids=["while-writing-the-video", "while-writing-the-record"],
)
def test_a_disk_filling_up_at_the_end_of_a_job_leaves_only_whole_files(tmp_path, phase, kept):
    """In a process of its own, so that the file-size limit meets only the job's files."""
    done = subprocess.run([sys.executable, "-c", JOB_ON_A_FULL_DISK, str(tmp_path / "a.mp4"), phase.value, "1000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert "could not write" in done.stdout and "free some disk space" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == kept  # no truncated video, no temporary file
    if kept:
        assert read_video(tmp_path / "a.mp4")[0].shape[0] == TINY.num_frames
        assert "the video was saved without its record" in done.stdout


@pytest.mark.parametrize("theirs", ["a.mp4", "a.json"])
def test_a_file_made_by_someone_else_during_the_run_is_never_replaced(model, test_image, tmp_path, theirs):
    def someone_else_writes(event: RunEvent) -> None:
        if event.phase == Phase.EXPORT:
            (tmp_path / theirs).write_text("someone else's")

    with pytest.raises(MediaError, match=f"{theirs} already exists"):
        run_job(model, test_image, TINY, tmp_path / "a.mp4", on_event=someone_else_writes)
    assert (tmp_path / theirs).read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({theirs, "a.mp4"})  # ours, when linked, is whole


@POSIX_ONLY
def test_a_state_file_rewrite_that_does_not_fit_keeps_the_old_file_and_no_temporary(tmp_path):
    state = tmp_path / "queue.json"
    state.write_text(json.dumps({"entries": []}))
    with disk_full_after(1_000), pytest.raises(OSError):
        write_text_atomic(state, json.dumps({"entries": ["x" * 2_000]}))
    assert [p.name for p in tmp_path.iterdir()] == ["queue.json"]
    assert json.loads(state.read_text()) == {"entries": []}


def _writer_that_hangs(path: Path) -> subprocess.Popen:
    """Another process that has begun writing ``path`` and is still at it, until killed."""
    script = (
        "import sys, time; from lowvram_studio.media import write_atomically\n"
        "def write(temp):\n"
        "    temp.write_bytes(b'half a video'); print('writing', flush=True); time.sleep(600)\n"
        "write_atomically(sys.argv[1], write)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    return writer


def test_the_next_job_sweeps_what_a_killed_writer_left_and_nothing_else(model, test_image, tmp_path):
    killed, alive = _writer_that_hangs(tmp_path / "old.mp4"), _writer_that_hangs(tmp_path / "other.mp4")
    try:
        killed.kill()  # kill -9 during export: no cleanup runs
        killed.wait()
        leftover = [p for p in tmp_path.iterdir() if p.name.startswith(".old.")]
        assert [p.name.endswith(".partial.mp4") for p in leftover] == [True]
        theirs = [tmp_path / name for name in ("notes.partial.txt", ".hidden", ".x.partial.mp4")]
        for path in theirs:
            path.write_text("not ours")

        run_job(model, test_image, TINY, tmp_path / "a.mp4")
        assert not leftover[0].exists() and not (tmp_path / "old.mp4").exists()
        assert all(path.exists() for path in theirs)  # named like no temporary of ours
        assert any(p.name.startswith(".other.") for p in tmp_path.iterdir())  # still being written
        assert (tmp_path / "a.mp4").is_file() and (tmp_path / "a.json").is_file()
    finally:
        alive.kill()
        alive.wait()


def test_sweeping_deletes_a_temporary_whose_process_id_was_reused(tmp_path):
    stale = tmp_path / f".v.{os.getpid()}.abcd1234.partial.mp4"
    stale.write_bytes(b"half a video")
    written = psutil.Process().create_time() - 3600  # an hour before this process, which has its id, started
    os.utime(stale, (written, written))
    assert sweep_partial_outputs(tmp_path) == [stale] and not stale.exists()

"""The studio's job queue: order, moves and removals kept on disk; one studio per queue; entries that cannot
be run are set aside and the rest runs; recovery deletes only what the queue made in its output folder; a
queue of three survives a studio killed with SIGKILL in the middle of a job (a real `lowvram-studio ui`
process, demo model)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import PIL.Image
import pytest
from gradio_client import Client, handle_file

from lowvram_studio.media import read_video
from lowvram_studio.settings import RunSettings
from lowvram_studio.ui.studio import Studio
from lowvram_studio.ui.config_store import ConfigStore
from lowvram_studio.ui.job_queue import JobQueue
from lowvram_studio.ui.queue_entry import QueueError, parse_seeds
from lowvram_studio.ui.queue_lock import QueueLocked, default_queue_dir
from lowvram_studio.ui.queue_runner import QueueRunner
from lowvram_studio.ui.worker import JobState, Worker

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "ball_and_box.png"
TINY = RunSettings(width=64, height=64, num_frames=2, num_inference_steps=1)


def _states(queue: JobQueue) -> list[tuple[int, str]]:
    return [(e.settings["seed"], e.state.value) for e in queue.snapshot()]


def test_seed_sweeps_expand_and_bad_lists_are_refused_with_the_form():
    assert parse_seeds("1..8", default=0) == list(range(1, 9))
    assert parse_seeds("3, 7,11", default=0) == [3, 7, 11]
    assert parse_seeds("1-3, 10", default=0) == [1, 2, 3, 10]
    assert parse_seeds("  ", default=42) == [42]
    with pytest.raises(QueueError, match="1..8 or 1, 5, 9"):
        parse_seeds("one to eight", default=0)
    with pytest.raises(QueueError, match="counts up"):
        parse_seeds("8..1", default=0)
    with pytest.raises(QueueError, match="at most 64"):
        parse_seeds("1..1000", default=0)


KILLED_DURING_THE_INPUT_COPY = """
import os, sys, PIL.Image
from lowvram_studio.settings import RunSettings
from lowvram_studio.ui.job_queue import JobQueue

def killed(image, target, *args, **kwargs):  # the process dies half-way through writing the PNG
    open(target, "wb").write(b"half a png")
    os._exit(9)

queue = JobQueue(sys.argv[1])
PIL.Image.Image.save = killed
queue.add(PIL.Image.open(sys.argv[2]), RunSettings(width=64, height=64), "demo", [1])
"""


def test_an_input_copy_killed_mid_write_is_swept_when_the_queue_opens_again(tmp_path):
    subprocess.run([sys.executable, "-c", KILLED_DURING_THE_INPUT_COPY, str(tmp_path), str(ASSET)], check=False,
                   timeout=120)
    left = [p.name for p in (tmp_path / "inputs").iterdir()]
    assert len(left) == 1 and ".partial" in left[0]  # the killed write left only its temporary
    JobQueue(tmp_path).close()
    assert list((tmp_path / "inputs").iterdir()) == []


def test_order_moves_and_removals_are_saved_and_restored(tmp_path):
    queue = JobQueue(tmp_path)
    image = PIL.Image.open(ASSET)
    queue.add(image, TINY, "demo", [1, 2, 3, 4])
    first = queue.snapshot()[0].id
    queue.move(queue.snapshot()[3].id, -2)  # seed 4 up two places
    queue.move(first, 1)  # seed 1 down one
    queue.remove(queue.snapshot()[-1].id)  # seed 3 (now last)
    assert [s for s, _ in _states(queue)] == [4, 1, 2]
    assert len(list((tmp_path / "inputs").glob("*.png"))) == 1  # the sweep shares one stored image copy
    queue.close()

    reopened = JobQueue(tmp_path)
    assert _states(reopened) == [(4, "queued"), (1, "queued"), (2, "queued")]
    stored = PIL.Image.open(reopened.image_path(reopened.snapshot()[0]))
    assert stored.tobytes() == image.convert("RGB").tobytes()
    with pytest.raises(QueueError, match="no queued job"):
        reopened.move("nope", 1)
    for entry in reopened.snapshot():
        reopened.remove(entry.id)
    assert not list((tmp_path / "inputs").glob("*.png"))  # images nobody waits for are deleted
    reopened.close()


def test_a_second_studio_on_the_same_queue_is_refused_and_told_who_holds_it(tmp_path):
    holder = JobQueue(tmp_path)
    holder.set_owner("http://127.0.0.1:7860/")
    with pytest.raises(QueueLocked, match=rf"process {os.getpid()}.*7860.*close it first"):
        JobQueue(tmp_path)
    holder.close()
    JobQueue(tmp_path).close()  # free again once the first one closed


def test_the_queue_lives_in_the_user_data_folder_or_beside_portable_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_STUDIO_CONFIG_DIR", str(tmp_path / "portable"))
    assert default_queue_dir() == tmp_path / "portable" / "queue"
    monkeypatch.delenv("LOWVRAM_STUDIO_CONFIG_DIR")
    monkeypatch.delenv("LOWVRAM_STUDIO_DATA_DIR", raising=False)  # the test session's private data folder
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    if sys.platform.startswith("linux"):
        assert default_queue_dir() == tmp_path / "data" / "lowvram-studio" / "queue"


def test_an_interrupted_job_runs_again_and_its_partial_output_is_deleted(tmp_path):
    queue = JobQueue(tmp_path / "queue")
    queue.add(PIL.Image.open(ASSET), TINY, "demo", [1, 2])
    interrupted = queue.start_next(tmp_path / "out")
    video = Path(interrupted.video)
    video.parent.mkdir()
    video.write_bytes(b"an mp4 linked in before the crash")  # its record was never written
    leftover = video.parent / f".{video.stem}.x1y2.partial.gif"  # what a killed writer leaves behind
    leftover.write_bytes(b"half a gif")
    queue.close()  # the process died: nobody marked the job finished

    restarted = JobQueue(tmp_path / "queue")
    restarted.recover(tmp_path / "out")  # the runner does this as the studio starts
    entry = restarted.snapshot()[0]
    assert (entry.state, entry.video) == (JobState.QUEUED, None)
    assert "runs again from the beginning" in entry.note and video.name in entry.note
    assert not video.exists() and not leftover.exists()

    finished = restarted.start_next(tmp_path / "out")  # this one finished: its record was written
    Path(finished.video).write_bytes(b"mp4")
    Path(finished.video).with_suffix(".json").write_text("{}")
    restarted.close()
    again = JobQueue(tmp_path / "queue")
    again.recover(tmp_path / "out")
    assert again.snapshot()[0].state == JobState.DONE and Path(finished.video).exists()
    again.close()


def _edit_queue_file(folder: Path, edit) -> None:
    path = folder / "queue.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data["entries"])
    path.write_text(json.dumps(data), encoding="utf-8")


def test_recovery_deletes_only_videos_the_queue_made_in_its_output_folder(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    queue = JobQueue(tmp_path / "queue")
    entries = queue.add(PIL.Image.open(ASSET), TINY, "demo", [1, 2, 3])
    for _ in entries:
        queue.start_next(out)  # all three "running" when the studio died
    queue.close()
    precious = elsewhere / "precious.mp4"  # the user's own files
    other_folder = elsewhere / f"queue-{entries[1].id}-seed2.mp4"  # a queue name, but not in the output folder
    holiday = out / "holiday.mp4"  # in the output folder, but not a name this queue gives its job
    kept = [precious, elsewhere / ".precious.backup", other_folder, holiday, out / ".holiday.x1.partial.mp4"]
    for path in kept:
        path.write_bytes(b"keep me")

    def point_elsewhere(stored):
        for entry, video in zip(stored, (precious, other_folder, holiday)):
            entry["video"] = str(video)  # a hand-edited, copied or older queue file

    _edit_queue_file(tmp_path / "queue", point_elsewhere)
    restarted = JobQueue(tmp_path / "queue")
    restarted.recover(out)
    assert [e.state for e in restarted.snapshot()] == [JobState.QUEUED] * 3
    assert all(path.read_bytes() == b"keep me" for path in kept)
    assert all("was left in place" in e.note and "runs again" in e.note for e in restarted.snapshot())
    restarted.close()


def test_entries_with_missing_or_odd_settings_are_set_aside_with_a_banner_and_the_rest_of_the_queue_runs(
    tmp_path,
):
    config = tmp_path / "config"
    queue = JobQueue(config / "queue")
    entries = queue.add(PIL.Image.open(ASSET), TINY, "demo", [1, 2, 3, 4, 5])
    queue.close()
    bad = {e.id for e in entries[:4]}

    def damage(stored):
        del stored[0]["settings"]["seed"]  # missing: KeyError on every refresh, and when it starts
        stored[1]["settings"]["noise_aug_strength"] = "abc"  # of the wrong type
        stored[2]["state"] = "paused"  # a state this version does not know
        stored[3]["image"] = "../../../etc/hostname"  # not a file of the queue's inputs/ folder

    _edit_queue_file(config / "queue", damage)
    for start in range(2):  # the first start sets them aside; a restart still says so and still runs
        studio = Studio("demo", tmp_path / "out", ConfigStore(config))
        try:
            banner = studio.banner()
            assert "4 queued job(s) could not be run as stored and were set aside" in banner
            assert all(e.id in banner for e in entries[:3]) and "seed" in banner and "1 more" in banner
            assert "the rest of the queue runs" in banner
            rows = studio.runner.rows()
            assert [row[1] for row in rows] == [entries[4].id]
            if start == 0:
                _wait_until(lambda: studio.queue.snapshot()[0].state == JobState.DONE, 120, "the good job to run")
        finally:
            studio.close()
    aside = json.loads((config / "queue" / "set-aside.json").read_text(encoding="utf-8"))["entries"]
    assert {e["entry"]["id"] for e in aside} == bad
    problems = " | ".join(e["problem"] for e in aside)
    for expected in ("settings lack seed", "wrong type: noise_aug_strength='abc'", "state must be one of",
                     "image must be"):
        assert expected in problems
    frames, _ = read_video(studio.queue.snapshot()[0].video)
    assert frames.shape == (2, 64, 64, 3)
    assert sorted(p.name for p in (config / "queue" / "inputs").iterdir()) == [entries[0].image]  # kept for them


def test_a_damaged_queue_file_is_set_aside_and_the_studio_starts_with_an_empty_queue(tmp_path):
    (tmp_path / "queue.json").write_text("{ half a file", encoding="utf-8")
    queue = JobQueue(tmp_path)
    assert queue.snapshot() == [] and "could not be read" in queue.warning and "moved to" in queue.warning
    assert len(list(tmp_path.glob("queue.json.corrupt-*"))) == 1
    queue.close()


def test_eta_is_unknown_until_a_run_of_that_model_and_size_was_measured(tmp_path):
    queue = JobQueue(tmp_path)
    runner = QueueRunner(queue, Worker(), tmp_path / "out", run_entry=None)
    queue.add(PIL.Image.open(ASSET), TINY.replace(num_inference_steps=10), "demo", [1, 2])
    assert [row[4] for row in runner.rows()] == ["unknown (no earlier run of this model and size)"] * 2
    queue.record_speed("demo", TINY, seconds_per_step=0.5, seconds=3.0)  # 1 step: 0.5 s + 2.5 s overhead
    assert [row[4] for row in runner.rows()] == ["≈ 8 s, done in ≈ 8 s", "≈ 8 s, done in ≈ 15 s"]
    queue.record_speed("demo", TINY.replace(width=128), seconds_per_step=9.0, seconds=9.0)  # another size
    assert runner.rows()[0][4].startswith("≈ 8 s")
    queue.close()


def test_eta_prefers_a_run_with_the_same_optimisation_settings_and_says_when_it_had_none(tmp_path):
    queue = JobQueue(tmp_path)
    runner = QueueRunner(queue, Worker(), tmp_path / "out", run_entry=None)
    split = TINY.replace(num_inference_steps=10, cfg_split=True)
    queue.add(PIL.Image.open(ASSET), split, "demo", [1])
    queue.record_speed("demo", TINY, seconds_per_step=0.5, seconds=3.0)  # plain settings: 0.5 s/step
    assert runner.rows()[0][4] == "≈ 8 s, done in ≈ 8 s (measured with other optimisation settings)"
    queue.record_speed("demo", split.replace(seed=5), seconds_per_step=1.0, seconds=12.5)  # same settings, other seed
    assert runner.rows()[0][4] == "≈ 12 s, done in ≈ 12 s"
    queue.record_speed("demo", TINY, seconds_per_step=0.5, seconds=3.0)  # a later plain run does not override it
    assert runner.rows()[0][4] == "≈ 12 s, done in ≈ 12 s"
    queue.close()
    assert JobQueue(tmp_path).estimate(queue.snapshot()[0]).same_settings  # kept on disk


def test_entries_whose_id_or_shape_cannot_name_an_output_are_set_aside_and_the_list_grows_across_starts(tmp_path):
    queue = JobQueue(tmp_path)
    entries = queue.add(PIL.Image.open(ASSET), TINY, "demo", [1, 2, 3])
    queue.close()

    def damage(stored):
        stored[0]["id"] = "../../outside"  # would name its video outside the output folder
        stored[2]["id"] = stored[1]["id"]  # a second job of the same id
        stored.append(["not", "an", "entry"])

    _edit_queue_file(tmp_path, damage)
    reopened = JobQueue(tmp_path)
    assert [e.id for e in reopened.snapshot()] == [entries[1].id]
    assert reopened.start_next(tmp_path / "out").video.endswith(f"queue-{entries[1].id}-seed2.mp4")
    assert "3 queued job(s)" in reopened.warning and "job without a readable id" in reopened.warning
    reopened.close()
    _edit_queue_file(tmp_path, lambda stored: stored[0]["settings"].update(width=65))
    again = JobQueue(tmp_path)
    assert again.snapshot() == [] and "4 queued job(s)" in again.warning
    problems = [e["problem"] for e in json.loads((tmp_path / "set-aside.json").read_text())["entries"]]
    assert problems[0].startswith("id must be") and "used by an earlier entry" in problems[1]
    assert problems[2].startswith("an entry must be a mapping") and "width must be a multiple of 16" in problems[3]
    again.close()


# ---- a real studio process, killed and started again --------------------------------------------
def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_studio(tmp_path: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "LOWVRAM_STUDIO_CONFIG_DIR": str(tmp_path / "config"), "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / f"studio-{port}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "lowvram_studio", "ui", "--no-browser", "--port", str(port),
         "--outputs", str(tmp_path / "out")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_until(check, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the studio exited ({process.returncode}) while waiting for {what}")
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _queue_file(tmp_path: Path) -> list[dict]:
    path = tmp_path / "config" / "queue" / "queue.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


def test_a_queue_of_three_survives_a_killed_studio_and_all_three_complete(tmp_path):
    port = _port()
    studio = _start_studio(tmp_path, port)
    try:
        _wait_until(lambda: _serving(port), 120, "the studio to serve", studio)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, message = client.predict(image_path=handle_file(str(ASSET)), seed_list="1..3", width=64, height=64,
                                    num_frames=2, num_inference_steps=1, api_name="/queue_add")
        assert message.startswith("Queued 3 job(s)")
        _wait_until(lambda: [e["state"] for e in _queue_file(tmp_path)] == ["running", "queued", "queued"], 60,
                    "job 1 to start", studio)
        studio.send_signal(signal.SIGKILL)  # a crash in the middle of job 1
        studio.wait(30)
    finally:
        if studio.poll() is None:
            studio.kill()
    assert [e["state"] for e in _queue_file(tmp_path)] == ["running", "queued", "queued"]

    port = _port()
    studio = _start_studio(tmp_path, port)
    try:
        _wait_until(lambda: _serving(port), 120, "the restarted studio to serve", studio)
        entries = _wait_until(lambda: [e for e in _queue_file(tmp_path) if e["state"] == "done"] == _queue_file(tmp_path)
                              and _queue_file(tmp_path), 180, "all three jobs to finish", studio)
        rows = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/queue_view")["value"]["data"]
        second = subprocess.run(
            [sys.executable, "-m", "lowvram_studio", "ui", "--no-browser", "--port", str(_port())], cwd=ROOT,
            env={**os.environ, "LOWVRAM_STUDIO_CONFIG_DIR": str(tmp_path / "config"), "PYTHONPATH": str(ROOT)},
            capture_output=True, text=True, timeout=120)
    finally:
        studio.terminate()
        studio.wait(30)
    assert second.returncode == 2 and "Traceback" not in second.stderr  # two studios on one queue: refused
    assert f"error: another LowVRAM Studio (process {studio.pid}" in second.stderr
    assert f"at http://127.0.0.1:{port}/) is running the job queue" in second.stderr
    assert [e["settings"]["seed"] for e in entries] == [1, 2, 3]
    assert "runs again from the beginning" in entries[0]["note"]
    assert [row[3] for row in rows] == ["done"] * 3 and all(row[4].startswith("took") for row in rows)
    for entry in entries:
        frames, _ = read_video(entry["video"])
        record = json.loads(Path(entry["video"]).with_suffix(".json").read_text())
        assert frames.shape == (2, 64, 64, 3) and record["settings"]["seed"] == entry["settings"]["seed"]
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len([n for n in outputs if n.endswith(".mp4")]) == 3
    assert not [n for n in outputs if n.startswith(".")]  # no temporaries of the killed run survive

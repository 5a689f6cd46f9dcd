"""The CLI end to end, as a user runs it: files written, bad input answered with one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram_studio.media import read_video

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "ball_and_box.png"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowvram_studio", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_generate_writes_mp4_and_record(tmp_path):
    out = tmp_path / "out.mp4"
    done = run_cli("generate", "--image", str(ASSET), "--out", str(out), "--frames", "8",
                   "--height", "64", "--width", "64", "--steps", "3", "--fps", "8")
    assert done.returncode == 0, done.stderr
    frames, fps = read_video(out)
    assert frames.shape == (8, 64, 64, 3) and fps == 8
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["settings"]["num_frames"] == 8 and record["settings"]["seed"] == 0
    assert record["results"]["frames"] == 8 and record["results"]["seconds_per_step"] > 0
    assert record["model"]["name"] == "demo" and "random weights" in record["model"]["note"]
    assert {"version", "settings", "model", "env", "results", "events", "samples"} <= set(record)
    assert "random weights" in done.stderr  # the demo model says so


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.png"], "error: missing.png does not exist"),
        (["--image", str(ASSET), "--height", "500"], "error: height must be a multiple of 64"),
        (["--image", str(ASSET), "--model", "/no/such/model"], "error: model '/no/such/model' was not found"),
        (["--image", str(ASSET), "--offload", "disk"], "error: offload must be one of none, model, stream"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(tmp_path, args, message):
    done = run_cli("generate", "--out", str(tmp_path / "o.mp4"), *args)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "taken.mp4"
    out.write_bytes(b"precious")
    done = run_cli("generate", "--image", str(ASSET), "--out", str(out))
    assert done.returncode == 2 and "already exists" in done.stderr
    assert out.read_bytes() == b"precious"


def test_info_json_describes_the_machine():
    done = run_cli("info", "--json")
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    assert env["torch"] and "nvml" in env and env["diffusers"]


def test_interpolation_delivers_more_frames_at_a_higher_rate(tmp_path):
    out = tmp_path / "x2.mp4"
    done = run_cli("generate", "--image", str(ASSET), "--out", str(out), "--frames", "4", "--height", "64",
                   "--width", "64", "--steps", "2", "--fps", "6", "--interpolate", "2")
    assert done.returncode == 0, done.stderr
    frames, fps = read_video(out)
    assert frames.shape[0] == 7 and fps == 12
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["results"]["interpolation"]["generated_frames"] == [0, 2, 4, 6]
    assert record["settings"]["interpolate"] == 2

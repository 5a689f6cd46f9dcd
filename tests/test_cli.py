"""The CLI end to end, as a user runs it: files written, bad input answered with one error line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowvram_studio.cli import EXIT_BAD_INPUT, EXIT_RUN_FAILED, main
from lowvram_studio.media import read_video
from lowvram_studio.models.demo import build_demo_pipeline, demo_model_info
from lowvram_studio.userdirs import CONFIG_ENV

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "ball_and_box.png"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowvram_studio", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def run_main(capsys, *args: str) -> tuple[int, str]:
    """``lowvram-studio ARGS`` in this process: (exit code, stderr). A traceback would raise here."""
    code = main(list(args))
    return code, capsys.readouterr().err


def the_error_line(err: str) -> str:
    """The one ``error:`` line a failed command prints."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


TINY = ["--frames", "2", "--height", "64", "--width", "64", "--steps", "1"]
LONG_NAME = "x" * 300  # longer than the 255 bytes a file name can have (ext4, NTFS, APFS)


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
    assert record["model"]["name"] == "demo" and record["model"]["note"] == demo_model_info().note
    assert {"version", "settings", "model", "env", "results", "events", "samples"} <= set(record)
    assert demo_model_info().note in done.stderr  # the demo model says what its weights are


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.png"], "error: missing.png does not exist"),
        (["--image", str(ASSET), "--height", "500"], "error: height must be a multiple of 16"),
        (["--image", str(ASSET), "--height", "480"], "error: height must be a multiple of 64 for this svd model; got 480; use 448 or 512"),
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


def test_pickle_checkpoint_is_refused_without_traceback(tmp_path):
    checkpoint = tmp_path / "svd_xt.ckpt"
    checkpoint.write_bytes(b"not really a pickle")
    done = run_cli("generate", "--image", str(ASSET), "--out", str(tmp_path / "o.mp4"), "--model", str(checkpoint))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {checkpoint} is a pickle checkpoint")


def test_models_lists_what_it_found(tmp_path):
    done = run_cli("models", "--models-dir", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_compare_writes_report_files(tmp_path):
    done = run_cli("compare", "--image", str(ASSET), "--out", str(tmp_path / "cmp"), "--frames", "4",
                   "--height", "64", "--width", "64", "--steps", "2", "--decode-frames", "2")
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    assert {"compare.json", "curves.png", "table.md"} <= set(names)
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(report["runs"]) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"noise_aug_strength": "abc"}, 'noise_aug_strength must be a number (float); got "abc" (str)'),
        ({"seed": True}, "seed must be a whole number (int); got true (bool)"),
        ({"extra": "hello"}, 'extra must be an object of named values (dict); got "hello" (str)'),
        ({"cfg_split": "yes"}, 'cfg_split must be true or false (bool); got "yes" (str)'),
        ({"interpolate": True}, "interpolate must be a whole number (int); got true (bool)"),
        ({"min_guidance_scale": "x", "prune_threshold": [1]}, 'min_guidance_scale must be a number (float); got "x"'),
        ([1, 2], "holds a JSON list, not an object of settings"),
        (None, "holds JSON null, not an object of settings"),
    ],
)
def test_a_settings_file_with_wrong_types_is_bad_input_naming_field_type_and_value(tmp_path, capsys, content,
                                                                                   message):
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps(content))
    code, err = run_main(capsys, "generate", "--image", str(ASSET), "--out", str(tmp_path / "o.mp4"),
                         "--settings", str(settings), *TINY)
    assert code == EXIT_BAD_INPUT
    line = the_error_line(err)
    assert line.startswith(f"error: settings file {settings}") and message in line, line
    assert not (tmp_path / "o.mp4").exists()


def test_a_settings_file_that_is_not_text_is_bad_input(tmp_path, capsys):
    settings = tmp_path / "s.json"
    settings.write_bytes(b"\xff\xfe\x00 not utf-8")
    code, err = run_main(capsys, "generate", "--image", str(ASSET), "--out", str(tmp_path / "o.mp4"),
                         "--settings", str(settings))
    assert code == EXIT_BAD_INPUT and f"error: cannot read settings file {settings}" in the_error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no CUDA GPU")
@pytest.mark.parametrize("where", ["flag", "settings file", "compare"])
def test_cuda_asked_for_without_a_gpu_is_bad_input_before_the_model_loads(tmp_path, capsys, monkeypatch, where):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr("lowvram_studio.models.load.load_model", no_loading)
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"device": "cuda"}))
    ask = {"flag": ["--device", "cuda"], "settings file": ["--settings", str(settings)], "compare": ["--device", "CUDA"]}
    command = "compare" if where == "compare" else "generate"
    code, err = run_main(capsys, command, "--image", str(ASSET), "--out", str(tmp_path / "o.mp4"), *ask[where], *TINY)
    assert code == EXIT_BAD_INPUT
    line = the_error_line(err)
    named = {"flag": "--device cuda", "settings file": f'"device": "cuda" in settings file {settings}',
             "compare": "--device cuda"}[where]
    assert line.startswith(f"error: {named} asked for, but torch sees no CUDA GPU; "), line
    assert "--device cpu" in line


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["generate", "--image", str(ASSET), "--out", f"{LONG_NAME}.mp4"], "--out"),
        (["generate", "--image", str(ASSET), "--out", f"{LONG_NAME}/o.mp4"], "--out"),
        (["generate", "--image", f"{LONG_NAME}.png", "--out", "o.mp4"], "--image"),
        (["generate", "--image", str(ASSET), "--out", "o.mp4", "--model", f"/{LONG_NAME}"], "--model"),
        (["generate", "--image", str(ASSET), "--out", "o.mp4", "--settings", f"{LONG_NAME}.json"], "--settings"),
        (["generate", "--from-record", f"{LONG_NAME}.json"], "--from-record"),
        (["compare", "--image", str(ASSET), "--out", LONG_NAME], "--out"),
        (["models", "--models-dir", LONG_NAME], "--models-dir"),
        (["models", "--comfyui-root", LONG_NAME], "--comfyui-root"),
    ],
)
def test_a_name_too_long_for_the_file_system_is_bad_input(tmp_path, capsys, monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, *args)
    assert code == EXIT_BAD_INPUT
    line = the_error_line(err)
    assert line.startswith(f"error: {flag} ") and "bytes long, more than the 255 a file" in line, line
    assert line.endswith("choose a shorter name")


def test_an_out_name_with_no_room_for_its_temporary_files_is_refused_before_computing(tmp_path, capsys):
    out = tmp_path / ("y" * 240 + ".mp4")  # a valid name, but ".NAME.PID.RANDOM.partial.json" beside it is not
    code, err = run_main(capsys, "generate", "--image", str(ASSET), "--out", str(out), *TINY)
    assert code == EXIT_BAD_INPUT
    line = the_error_line(err)
    assert line.startswith("error: --out ") and "is 244 bytes long, more than the 200 bytes an output name may have" in line, line
    assert "[denoise]" not in err and list(tmp_path.iterdir()) == []


@pytest.fixture
def private_queue(tmp_path, monkeypatch):
    """``ui`` checks the job queue's lock first: give it a queue no other studio uses."""
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_ui_on_a_port_that_does_not_exist_is_bad_input(private_queue, capsys, port):
    code, err = run_main(capsys, "ui", "--port", port, "--no-browser")
    assert code == EXIT_BAD_INPUT
    assert the_error_line(err).startswith(f"error: --port {port} is not a port; give a number from 1 to 65535")


def test_ui_on_a_port_in_use_is_bad_input(private_queue, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_main(capsys, "ui", "--port", str(port), "--no-browser")
    assert code == EXIT_BAD_INPUT
    line = the_error_line(err)
    assert line.startswith(f"error: port {port} on 127.0.0.1 is taken by another program"), line
    assert "leave --port out" in line


def _failing_demo(monkeypatch, hook) -> None:
    """The CLI's demo model, with ``hook`` on its UNet: the fake hardware failure."""
    pipeline = build_demo_pipeline()
    pipeline.unet.register_forward_hook(hook)
    monkeypatch.setattr("lowvram_studio.models.load.build_demo_pipeline", lambda: pipeline)


def _raise(error: BaseException):
    def hook(module, args, output):
        raise error
    return hook


def _nan(module, args, output):
    return (torch.full_like(output[0], float("nan")), *output[1:])


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        (_raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")),
         "error: out of GPU memory during denoise even after"),
        (_raise(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                             "you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")),
         "error: out of memory: [enforce fail at alloc_cpu.cpp:117]"),
        (_raise(MemoryError()), "error: out of memory: MemoryError"),
        (_nan, "error: the UNet produced NaN"),
    ],
)
def test_a_run_that_fails_on_this_hardware_has_its_own_exit_code(tmp_path, capsys, monkeypatch, hook, message):
    _failing_demo(monkeypatch, hook)
    code, err = run_main(capsys, "generate", "--image", str(ASSET), "--out", str(tmp_path / "o.mp4"), *TINY)
    assert code == EXIT_RUN_FAILED == 3
    line = the_error_line(err)
    assert line.startswith(message), line
    assert not (tmp_path / "o.mp4").exists()


def test_the_help_explains_the_exit_codes():
    for command in ([], ["generate"], ["compare"]):
        text = " ".join(run_cli(*command, "--help").stdout.split())
        assert "exit codes: 0 done, 1 a bug (please report it), 2 bad input" in text, command
        assert "3 the run failed on this hardware (out of memory, or NaN / inf values" in text, command

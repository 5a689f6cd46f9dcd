"""launch.py: Python check, quick second start, the CUDA wheel choice, and a real start of the studio."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import launch  # noqa: E402


def test_an_old_python_is_refused_with_what_to_install(monkeypatch, capsys):
    assert launch.python_problem((3, 11)) is None
    monkeypatch.setattr(launch, "MIN_PYTHON", (99, 0))
    assert launch.main([]) == 1
    assert "needs Python 99.0 or newer" in capsys.readouterr().out


def test_a_second_start_skips_set_up_only_while_the_stamp_matches(tmp_path):
    assert not launch.venv_ready(tmp_path)
    python = launch.venv_python(tmp_path)
    python.parent.mkdir(parents=True)
    python.write_text("")
    (tmp_path / launch.STAMP).write_text(launch.requirements_stamp())
    assert launch.venv_ready(tmp_path)
    (tmp_path / launch.STAMP).write_text("an older pyproject.toml")
    assert not launch.venv_ready(tmp_path)


GTX_1060 = launch.gpu_support.NvidiaGpu("NVIDIA GeForce GTX 1060 6GB", (6, 1), (580, 95, 5))


@pytest.fixture
def pip_calls(monkeypatch):
    """The network boundary: pip installs and download sizes are recorded, not fetched."""
    calls: list[list[str]] = []
    monkeypatch.setattr(launch.subprocess, "check_call", lambda command: calls.append(command) or 0)
    monkeypatch.setattr(launch, "download_size", lambda python, args: "2.6 GB")
    return calls


def _gpus(monkeypatch, gpus):
    """The nvidia-smi boundary: this machine reports ``gpus`` (None: nvidia-smi missing)."""
    monkeypatch.setattr(launch.gpu_support, "query_gpus", lambda: gpus)


def test_a_cpu_torch_on_a_gtx_1060_is_replaced_only_after_asking(monkeypatch, pip_calls, capsys):
    _gpus(monkeypatch, [GTX_1060])
    assert launch.ensure_torch(sys.executable, reinstall=False, ask=lambda prompt: "n")  # this test's torch is CPU-only
    out = capsys.readouterr().out
    assert "CPU-only build" in out and "--reinstall-torch" in out and pip_calls == []
    assert launch.ensure_torch(sys.executable, reinstall=False, ask=lambda prompt: "y")
    assert "https://download.pytorch.org/whl/cu126" in pip_calls[0] and "--force-reinstall" in pip_calls[0]
    assert "torch>=2.14,<2.15" in pip_calls[0]
    out = capsys.readouterr().out
    assert "2.6 GB to download" in out and "last official build with kernels for it" in out


def test_reinstall_torch_replaces_without_asking_and_a_torch_that_runs_is_kept(monkeypatch, pip_calls, capsys):
    _gpus(monkeypatch, [GTX_1060])
    assert launch.ensure_torch(sys.executable, reinstall=True, ask=lambda prompt: pytest.fail("asked"))
    assert len(pip_calls) == 1
    _gpus(monkeypatch, [])  # no NVIDIA GPU: the installed CPU torch runs, nothing is downloaded
    assert launch.ensure_torch(sys.executable, reinstall=True)
    assert len(pip_calls) == 1 and "keeping the installed PyTorch" in capsys.readouterr().out


def test_a_fresh_machine_without_nvidia_smi_gets_the_cpu_build_and_a_note(monkeypatch, pip_calls, tmp_path, capsys):
    _gpus(monkeypatch, None)
    monkeypatch.setattr(launch, "installed_torch", lambda python: None)  # a Python without torch
    assert launch.ensure_torch(str(tmp_path / "python"), reinstall=False)
    out = capsys.readouterr().out
    assert "nvidia-smi is missing or failed" in out and "--reinstall-torch" in out
    expected = "https://download.pytorch.org/whl/cpu" if sys.platform.startswith("linux") else None
    assert (expected in pip_calls[0]) if expected else "--index-url" not in pip_calls[0]
    assert "--force-reinstall" not in pip_calls[0]


def test_a_driver_too_old_stops_set_up_before_any_download(monkeypatch, pip_calls, capsys):
    _gpus(monkeypatch, [launch.gpu_support.NvidiaGpu("NVIDIA GeForce GTX 1060 6GB", (6, 1), (470, 1))])
    assert not launch.ensure_torch(sys.executable, reinstall=True)
    assert pip_calls == [] and "install driver 525.60.13 or newer" in capsys.readouterr().out


@pytest.mark.skipif(bool(launch.missing_modules()), reason="the studio's dependencies are not installed here")
def test_launch_starts_the_studio_on_the_given_port_without_set_up(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "LOWVRAM_STUDIO_CONFIG_DIR": str(tmp_path / "config"),
           "LOWVRAM_STUDIO_OUTPUTS": str(tmp_path / "outputs")}
    started = time.time()
    process = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--no-browser", "--port", str(port)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while time.time() - started < 120 and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.5)
        assert process.poll() is None, process.stdout.read()
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
        assert not (ROOT / ".venv").exists() or launch.venv_ready()  # nothing was installed for this start
    finally:
        process.terminate()
        process.wait(30)
    assert (tmp_path / "outputs").is_dir()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopping_the_launcher_stops_the_studio_it_started(how):
    import psutil
    import signal

    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import launch; "
              "launch.run_child([sys.executable, '-c', 'import time; time.sleep(120)'])")
    launcher = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 30
        while not psutil.Process(launcher.pid).children() and time.time() < deadline:
            time.sleep(0.1)
        child = psutil.Process(launcher.pid).children()[0]
        os.kill(launcher.pid, getattr(signal, how))
        launcher.wait(10)
        child.wait(10)  # raises psutil.TimeoutExpired when the studio outlives its launcher
    finally:
        launcher.kill()
